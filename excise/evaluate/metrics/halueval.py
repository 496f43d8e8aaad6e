"""HaluEval QA (Li et al., arXiv 2305.11747; DESIGN.md §3): can the model tell a hallucinated answer?

``--protocol judge`` (default): HaluEval's own judgement protocol (``evaluation/evaluate.py`` and
``qa/qa_evaluation_instruction.txt`` at RUCAIBox/HaluEval@c0432f6): system prompt "You are a
hallucination detector…", user turn = the instruction with its few-shot examples, then
``#Question#``, ``#Answer#`` and ``#Your Judgement#:``. Departures, on purpose:

- the verdict is read by **log-likelihood**, not free generation: "Yes" (hallucinated) when
  ``log P("Yes") > log P("No")`` as the reply's first tokens — a small model rarely writes a clean
  Yes/No, and HaluEval counts such replies as failures;
- **both** answers of every question are judged (HaluEval draws one at random); accuracy is over
  all 2N judgements, so chance is exactly 50%.

``--protocol loss``: Ext-Sub's check (``eval/halueval_eval.py`` at HITsz-TMG/Ext-Sub@2d16049):
the question as the user turn, and "right" wins when the summed NLL of the right answer (+ EOS)
is below the hallucinated one's.
"""

from __future__ import annotations

from excise.evaluate.metrics.base import (
    SHARED_DATA,
    EvalContext,
    Metric,
    MetricResult,
    prompt_ids,
    subject_logliks,
)
from excise.evaluate.metrics.likelihood import encode_answer
from excise.evaluate.scoring import encode_pair
from excise.evaluate.stats import mean_stderr

__all__ = ["INSTRUCTION", "METRIC", "SYSTEM"]

SYSTEM = (
    "You are a hallucination detector. You MUST determine if the provided answer contains hallucination "
    'or not for the question based on the world knowledge. The answer you provided MUST be "Yes" or "No"'
)
INSTRUCTION = """I want you act as an answer judge. Given a question and an answer, your objective is to determine if the provided answer contains non-factual or hallucinated information. You SHOULD give your judgement based on the following hallucination types and the world knowledge.

You are trying to determine if the answer misunderstands the question context and intention.
#Question#: What is a rare breed of dog that was derived as a variant of Rat Terrier, Shiloh Shepherd dog or American Hairless Terrier?
#Answer#: American Hairless Terrier
#Your Judgement#: No

You are trying to determine if there is a factual contradiction between the answer and the world knowledge. Some information in the answer might be fabricated.
#Question#: Are the New Orleans Outfall Canals the same length as the Augusta Canal?
#Answer#: No, the New Orleans Outfall Canals and the Augusta Canal are not the same length. The Orleans Canal is approximately 3.6 miles (5.8 kilometers) long while the Augusta Canal is approximately 7 miles (11.3 kilometers) long.
#Your Judgement#: Yes
#Question#: What U.S Highway gives access to Zilpo Road, and is also known as Midland Trail?
#Answer#: U.S Highway 70
#Your Judgement#: Yes

You are trying to determine if the answer is too general or too specific to answer the question at an appropriate level of specificity.
#Question#: What genre do Superheaven and Oceansize belong to?
#Answer#: Superheaven and Oceansize belong to the rock genre.
#Your Judgement#: No
#Question#: What profession do Kōbō Abe and Agatha Christie share?
#Answer#: Playwright.
#Your Judgement#: No

You are trying to determine if the answer can be correctly inferred from the knowledge.
#Question#: Which band has more members, Muse or The Raconteurs?
#Answer#: Muse has more members than The Raconteurs.
#Your Judgement#: Yes
#Question#: Which is currently more valuable, Temagami-Lorrain Mine or Meadowbank Gold Mine?
#Answer#: Meadowbank Gold Mine, since Meadowbank Gold Mine is still producing gold and the TemagamiLorrain Mine has been inactive for years.
#Your Judgement#: No

You should try your best to determine if the answer contains non-factual or hallucinated information according to the above hallucination types. The answer you give MUST be "Yes" or "No"."""  # noqa: E501


def judge_prompt(question: str, answer: str) -> str:
    """HaluEval's QA user turn (the chat form; the raw form ends without the trailing space)."""
    return INSTRUCTION + "\n\n#Question#: " + question + "\n#Answer#: " + answer + "\n#Your Judgement#: "


def _judge_requests(ctx: EvalContext, question: str, answer: str) -> list[tuple[list[int], list[int]]]:
    tokenizer = ctx.subject.tokenizer
    if ctx.template not in (None, "chat"):  # the judgement as a trainer renders an answer (no end token)
        return [
            encode_answer(tokenizer, ctx.cfg, judge_prompt(question, answer).rstrip(), w, end=False)
            for w in ("Yes", "No")
        ]
    if ctx.chat:
        context = prompt_ids(ctx, judge_prompt(question, answer), system=ctx.cfg.system or SYSTEM)
        return [(context, tokenizer.encode(word, add_special_tokens=False)) for word in ("Yes", "No")]
    text = judge_prompt(question, answer).rstrip()
    return [encode_pair(tokenizer, text, " " + word) for word in ("Yes", "No")]


def _answers(item: dict) -> tuple[str, str]:
    return str(item["right_answer"]), str(item["hallucinated_answer"])


def run(ctx: EvalContext) -> MetricResult:
    if ctx.cfg.protocol == "loss":
        return _run_loss(ctx)
    requests = []
    for it in ctx.items:
        for answer in (it["right_answer"], it["hallucinated_answer"]):
            requests += _judge_requests(ctx, str(it["question"]), str(answer))
    scores = subject_logliks(ctx, requests, desc="halueval")
    items = []
    for k, it in enumerate(ctx.items):
        yes_r, no_r, yes_h, no_h = (s.logprob for s in scores[4 * k : 4 * k + 4])
        items.append({
            "question": it["question"],
            "right_says_yes": yes_r > no_r,
            "hallucinated_says_yes": yes_h > no_h,
            "right_margin": no_r - yes_r,
            "hallucinated_margin": yes_h - no_h,
        })  # fmt: skip
    n = len(items)
    right = sum(not it["right_says_yes"] for it in items) / n
    hallucinated = sum(it["hallucinated_says_yes"] for it in items) / n
    metrics = {
        "accuracy": (right + hallucinated) / 2,
        "accuracy_right": right,
        "accuracy_hallucinated": hallucinated,
        "yes_rate": sum(it["right_says_yes"] + it["hallucinated_says_yes"] for it in items) / (2 * n),
    }
    stderr = {
        "accuracy": mean_stderr(
            [((not it["right_says_yes"]) + it["hallucinated_says_yes"]) / 2 for it in items]
        ),
        "accuracy_right": mean_stderr([not it["right_says_yes"] for it in items]),
        "accuracy_hallucinated": mean_stderr([it["hallucinated_says_yes"] for it in items]),
        "yes_rate": mean_stderr([(it["right_says_yes"] + it["hallucinated_says_yes"]) / 2 for it in items]),
    }
    extra = {"protocol": "HaluEval QA judgement, Yes/No by log-likelihood"}
    return MetricResult(metrics, items, extra, stderr=stderr)


def _run_loss(ctx: EvalContext) -> MetricResult:
    from excise.models.generation import end_of_turn_id

    tokenizer = ctx.subject.tokenizer
    # The answer ends as the trainer ends it: the template's end-of-turn token in chat
    # mode (``<|eot_id|>`` for Llama-3, ``<|im_end|>`` for ChatML), else EOS.
    end = (end_of_turn_id(tokenizer) if ctx.chat else None) or tokenizer.eos_token_id
    eos = [end] if end is not None else []
    requests = []
    for it in ctx.items:
        if ctx.template not in (None, "chat"):  # each answer as the trainer encodes it, end token included
            requests += [encode_answer(tokenizer, ctx.cfg, str(it["question"]), str(a)) for a in _answers(it)]
            continue
        context = prompt_ids(ctx, str(it["question"]))
        for answer in _answers(it):
            requests.append((context, tokenizer.encode(str(answer), add_special_tokens=False) + eos))
    scores = subject_logliks(ctx, requests, desc="halueval")
    items = []
    for k, it in enumerate(ctx.items):
        right, hallucinated = scores[2 * k].logprob, scores[2 * k + 1].logprob
        items.append({"question": it["question"], "nll_right": -right, "nll_hallucinated": -hallucinated})
    n = len(items)
    metrics = {"accuracy": sum(it["nll_right"] < it["nll_hallucinated"] for it in items) / n}
    stderr = {"accuracy": mean_stderr([it["nll_right"] < it["nll_hallucinated"] for it in items])}
    extra = {"protocol": "Ext-Sub answer loss (right NLL < hallucinated NLL)"}
    return MetricResult(metrics, items, extra, stderr=stderr)


METRIC = Metric(
    name="halueval",
    run=run,
    fields={
        "question": "question",
        "right_answer": "right_answer",
        "hallucinated_answer": "hallucinated_answer",
    },
    default_data=str(SHARED_DATA / "halueval" / "qa_data.json"),
    # The same file trains Ext-Sub's expert and anti-expert (their `train` side): score the held-out side.
    default_split="eval",
    prompt_field="question",
    summary="HaluEval QA: accuracy judging right vs hallucinated answers (Yes/No by log-likelihood).",
)
