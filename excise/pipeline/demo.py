"""The demo recipe: Ext-Sub (arXiv 2308.08090, DESIGN.md §1) on HaluEval QA, on a CPU.

Trains an expert LoRA on HaluEval QA's right answers and an anti-expert LoRA on the
same questions' hallucinated answers, removes the anti-expert's deficiency from the
expert with Ext-Sub, then scores base / expert / anti-expert / Ext-Sub on held-out
questions (mean per-token log-likelihood of the right vs the hallucinated answer)
and generates a few answers. It stands in for the real trainers and evaluation until
``excise train sft`` exists; the training loop is written out here on purpose.

    python -c "from pathlib import Path; from excise.pipeline.demo import run_demo; \
run_demo(Path('runs/demo'))"

About 12 minutes on 2 CPU cores with SmolLM2-135M-Instruct (plus ~40 s once, the first
time, to convert the GGUF model).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from excise import __version__
from excise.data import training_data_record
from excise.errors import ConfigError, DataError
from excise.models import load_model, load_tokenizer, resolve_model
from excise.models.generation import GenerationSettings, generate
from excise.pem.io import atomic_output_dir, check_output_dir, load_adapter, save_adapter
from excise.pem.ops import ext_sub

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_DATA", "DEFAULT_MODEL", "QAExample", "load_halueval_qa", "run_demo"]

DEFAULT_MODEL = "smollm2-135m-instruct"
# The shared data folder sits beside the repository (DESIGN.md §5).
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared/data/halueval/qa_data.json"
# Short on purpose: SmolLM2's template otherwise inserts a ~20-token default system prompt.
SYSTEM_PROMPT = "Answer the question in a few words, using the knowledge given."
TARGET_MODULES = ("q_proj", "v_proj")
ROLES = ("base", "expert", "anti_expert", "ext_sub")
_FIELDS = ("knowledge", "question", "right_answer", "hallucinated_answer")


@dataclass(frozen=True)
class QAExample:
    """One HaluEval QA row; ``row`` is its 0-based position in the source file."""

    row: int
    knowledge: str
    question: str
    right_answer: str
    hallucinated_answer: str


@dataclass(frozen=True)
class _Encoded:
    """Token ids of one prompt and its two answers (each ends with the EOS token)."""

    example: QAExample
    prompt: list[int]
    right: list[int]
    hallucinated: list[int]


def run_demo(
    out: Path,
    *,
    model: str = DEFAULT_MODEL,
    data: Path | None = None,
    steps: int = 30,
    lam: float = 1.0,
    batch_size: int = 4,
    lr: float = 1e-3,
    rank: int = 8,
    alpha: int = 16,
    n_eval: int = 40,
    n_generate: int = 3,
    max_new_tokens: int = 48,
    max_length: int = 256,
    with_knowledge: bool = True,
    bf16: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> Path:
    """Train expert and anti-expert LoRAs, apply Ext-Sub, score and report.

    Writes ``out/expert``, ``out/anti_expert``, ``out/ext_sub`` (PEFT adapter folders)
    and ``out/demo_report.json``, and prints a table of the scores.

    Args:
        out: output folder; must be absent or empty unless ``overwrite``.
        model: base model spec (alias, ``.gguf`` file, local folder or hub id); its
            tokenizer must have a chat template.
        data: HaluEval QA file (JSON Lines or a JSON list with ``knowledge``,
            ``question``, ``right_answer``, ``hallucinated_answer``); defaults to
            :data:`DEFAULT_DATA`.
        steps: optimizer steps per adapter; each step sees ``batch_size`` new
            questions, so ``steps * batch_size`` questions are used for training.
        lam: Ext-Sub subtraction weight λ.
        batch_size: questions per step (training) and per forward pass (scoring).
        lr: AdamW learning rate.
        rank: LoRA rank ``r`` of both adapters.
        alpha: LoRA ``lora_alpha`` of both adapters.
        n_eval: held-out questions to score (disjoint from training questions).
        n_generate: held-out questions to answer greedily (the first ``n_eval`` ones).
        max_new_tokens: generation length limit.
        max_length: questions whose prompt plus longer answer exceed this many tokens
            are skipped.
        with_knowledge: put HaluEval's ``knowledge`` paragraph in the prompt.
        bf16: train under bfloat16 autocast (faster only on CPUs with bf16 support).
        seed: seeds the split, the LoRA initialisation and the data order.
        overwrite: replace the demo's outputs in a non-empty ``out``.
        progress: show progress bars.
        console: where to print the table; a new :class:`rich.console.Console` if None.

    Returns:
        The path of ``demo_report.json``.

    Raises:
        ConfigError: a setting is out of range, ``out`` is not empty (and not
            ``overwrite``), or the tokenizer has no chat template.
        DataError: the data file is missing, malformed or has too few questions.
        ModelLoadError: the base model cannot be loaded.
    """
    _check_settings(
        steps=steps,
        lam=lam,
        batch_size=batch_size,
        lr=lr,
        rank=rank,
        alpha=alpha,
        n_eval=n_eval,
        n_generate=n_generate,
        max_length=max_length,
    )
    out = check_output_dir(out, overwrite=overwrite)
    data = Path(data) if data is not None else DEFAULT_DATA
    console = console or Console()
    settings = {
        "model": model, "data": str(data), "steps": steps, "lam": lam, "batch_size": batch_size,
        "lr": lr, "rank": rank, "alpha": alpha, "target_modules": list(TARGET_MODULES),
        "n_eval": n_eval, "n_generate": n_generate, "max_new_tokens": max_new_tokens,
        "max_length": max_length, "with_knowledge": with_knowledge, "bf16": bf16, "seed": seed,
    }  # fmt: skip
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    # 1. Data: one split by question, so no held-out question is ever trained on.
    examples = load_halueval_qa(data)
    tokenizer = load_tokenizer(model)
    if not tokenizer.chat_template:
        raise ConfigError(f"tokenizer of {model!r} has no chat template; the demo needs a chat model")
    eval_set, train_set = _split(
        examples, tokenizer, n_eval=n_eval, n_train=steps * batch_size,
        max_length=max_length, with_knowledge=with_knowledge, seed=seed,
    )  # fmt: skip
    timings["data"] = _lap(clock)

    # 2. Expert and anti-expert: same questions, same order, same LoRA init.
    paths = {role: out / role for role in ("expert", "anti_expert", "ext_sub")}
    losses: dict[str, list[float]] = {}
    trained_rows = [e.example.row for e in train_set]
    for role, answer in (("expert", "right"), ("anti_expert", "hallucinated")):
        t0 = time.perf_counter()
        # What `excise eval` checks its items against: the rows this demo picked.
        record = training_data_record(
            str(data), format="paired-expert" if answer == "right" else "paired-anti",
            fields={}, split="all", rows=trained_rows,
        )  # fmt: skip
        losses[role] = _train_lora(
            model, train_set, answer=answer, out=paths[role], steps=steps,
            batch_size=batch_size, lr=lr, rank=rank, alpha=alpha, bf16=bf16, seed=seed,
            pad_id=tokenizer.pad_token_id, overwrite=overwrite, progress=progress, record=record,
        )  # fmt: skip
        timings[f"train_{role}"] = _lap(t0)

    # 3. Ext-Sub on the two saved adapters (pem/ sees tensors only).
    t0 = time.perf_counter()
    merged = ext_sub(load_adapter(paths["expert"]), load_adapter(paths["anti_expert"]), lam=lam)
    save_adapter(merged, paths["ext_sub"], overwrite=overwrite)
    timings["ext_sub"] = _lap(t0)

    # 4. Score all four on held-out questions: one base model, three adapters on it.
    t0 = time.perf_counter()
    peft_model = _load_all(model, paths)
    scores = {
        role: _score(peft_model, role, eval_set, batch_size=batch_size,
                     pad_id=tokenizer.pad_token_id, progress=progress)
        for role in ROLES
    }  # fmt: skip
    timings["score"] = _lap(t0)

    # 5. Greedy answers from the base and the Ext-Sub model.
    t0 = time.perf_counter()
    questions = eval_set[:n_generate]
    answers = {
        role: _generate(peft_model, role, questions, tokenizer, max_new_tokens=max_new_tokens)
        for role in ("base", "ext_sub")
    }
    generations = [
        {"row": e.example.row, "question": e.example.question, "right_answer": e.example.right_answer,
         "base": answers["base"][i], "ext_sub": answers["ext_sub"][i]}
        for i, e in enumerate(questions)
    ]  # fmt: skip
    timings["generate"] = _lap(t0)
    timings["total"] = _lap(clock)

    report = {
        "excise_version": __version__,
        "settings": settings,
        "resolved_model": resolve_model(model),
        "split": {
            "n_train": len(train_set),
            "n_eval": len(eval_set),
            "train_rows": [e.example.row for e in train_set],
            "eval_rows": [e.example.row for e in eval_set],
        },
        "train_loss": {role: {"first": v[0], "last": v[-1], "all": v} for role, v in losses.items()},
        "scores": scores,
        "generations": generations,
        "adapters": {role: str(p) for role, p in paths.items()},
        "timings_s": timings,
    }
    report_path = out / "demo_report.json"
    _write_json(report, report_path)
    _print_report(console, scores, generations, timings, report_path)
    return report_path


def load_halueval_qa(path: Path) -> list[QAExample]:
    """Read HaluEval QA rows from a JSON Lines file or a JSON list.

    Args:
        path: the file (``qa_data.json`` upstream is JSON Lines despite its name).

    Returns:
        The rows, in file order.

    Raises:
        DataError: the file is missing, not JSON, empty, or a row lacks a field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; pass the HaluEval qa_data.json path")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    if not numbered:
        raise DataError(f"{path} holds no rows")
    examples = []
    for row, (lineno, record) in enumerate(numbered):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected an object with fields {', '.join(_FIELDS)}")
        missing = [f for f in _FIELDS if not isinstance(record.get(f), str) or not record[f].strip()]
        if missing:
            raise DataError(f"{path}:{lineno}: missing or empty field(s) {', '.join(missing)}")
        examples.append(QAExample(row, *(record[f].strip() for f in _FIELDS)))
    return examples


def _check_settings(**values: float) -> None:
    """Raise ConfigError naming the first out-of-range setting."""
    if not math.isfinite(values["lam"]):
        raise ConfigError(f"lam must be finite, got {values['lam']}")
    if not (math.isfinite(values["lr"]) and values["lr"] > 0):
        raise ConfigError(f"lr must be positive, got {values['lr']}")
    for name in ("steps", "batch_size", "rank", "alpha", "n_eval", "max_length"):
        if values[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {values[name]}")
    if not 0 <= values["n_generate"] <= values["n_eval"]:
        raise ConfigError(
            f"n_generate must be between 0 and n_eval ({values['n_eval']}), got {values['n_generate']}"
        )


def _lap(since: float) -> float:
    return round(time.perf_counter() - since, 2)


def _split(
    examples: Sequence[QAExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_eval: int,
    n_train: int,
    max_length: int,
    with_knowledge: bool,
    seed: int,
) -> tuple[list[_Encoded], list[_Encoded]]:
    """Shuffle, drop repeated questions and over-long rows, take eval then train."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    seen: set[str] = set()
    picked: list[_Encoded] = []
    for i in order:
        example = examples[i]
        key = " ".join(example.question.lower().split())
        if key in seen:
            continue  # disjoint *by question*: a repeated question would leak across the split
        seen.add(key)
        encoded = _encode(tokenizer, example, with_knowledge=with_knowledge)
        if len(encoded.prompt) + max(len(encoded.right), len(encoded.hallucinated)) > max_length:
            continue
        picked.append(encoded)
        if len(picked) == n_eval + n_train:
            return picked[:n_eval], picked[n_eval:]
    raise DataError(
        f"need {n_eval + n_train} distinct questions of at most {max_length} tokens "
        f"(n_eval + steps * batch_size), found {len(picked)}"
    )


def _encode(tokenizer: PreTrainedTokenizerBase, example: QAExample, *, with_knowledge: bool) -> _Encoded:
    """Chat-template the question; tokenize each answer on its own, ending with EOS.

    Prompt and answer are tokenized separately so that both answers are scored on the
    very same prompt tokens; EOS (``<|im_end|>`` for ChatML) ends the turn, so the
    model also learns — and is scored on — where the answer stops.
    """
    user = (
        f"Knowledge: {example.knowledge}\nQuestion: {example.question}"
        if with_knowledge
        else example.question
    )
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    right = tokenizer(example.right_answer, add_special_tokens=False)["input_ids"] + eos
    hallucinated = tokenizer(example.hallucinated_answer, add_special_tokens=False)["input_ids"] + eos
    return _Encoded(example, prompt, right, hallucinated)


@dataclass(frozen=True)
class _Batch:
    """A left-padded batch: answers end every row, so their logits are the last ``keep``."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, A) the last A tokens, -100 outside answers
    keep: int  # A + 1 logits to compute

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "logits_to_keep": self.keep,
            "use_cache": False,
        }


def _collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> _Batch:
    """Left-pad (prompt, answer) pairs into one batch with answer-only targets.

    Left padding puts every answer at the end, so ``logits_to_keep`` computes the LM
    head (49k × 576 for SmolLM2) only over answer positions instead of the whole row.
    """
    T = max(len(p) + len(a) for p, a in pairs)
    A = max(len(a) for _, a in pairs)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)  # (B, T)
    targets = torch.full((len(pairs), A), -100, dtype=torch.long)  # (B, A)
    for i, (prompt, answer) in enumerate(pairs):
        row = prompt + answer
        input_ids[i, T - len(row) :] = torch.tensor(row)
        attention_mask[i, T - len(row) :] = 1
        targets[i, A - len(answer) :] = torch.tensor(answer)
    # Positions count real tokens only, so a padded row sees the same RoPE positions
    # as it would alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return _Batch(input_ids, attention_mask, position_ids, targets, keep=A + 1)


def _answer_logprobs(model: torch.nn.Module, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the answer tokens and their mask, each ``(B, A)``."""
    logits = model(**batch.as_kwargs()).logits[:, :-1].float()  # (B, A, V): position t predicts t + 1
    mask = batch.targets != -100  # (B, A)
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, A, V)
    picked = logprobs.gather(-1, batch.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, A)
    return picked * mask, mask


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _train_lora(
    model_spec: str,
    train_set: Sequence[_Encoded],
    *,
    answer: str,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    rank: int,
    alpha: int,
    bf16: bool,
    seed: int,
    pad_id: int,
    overwrite: bool,
    progress: bool,
    record: dict[str, Any],
) -> list[float]:
    """Train one LoRA on (prompt, ``answer``) pairs with plain AdamW; save it to ``out`` with
    ``train_config.json`` naming its training data (``record``, see ``excise.data.trained``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # same LoRA init for expert and anti-expert
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES), lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(load_model(model_spec), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    losses: list[float] = []
    batches = list(_batches(train_set, batch_size))[:steps]
    bar = tqdm(batches, desc=f"train {out.name}", unit="step", disable=not progress)
    for chunk in bar:
        batch = _collate([(e.prompt, getattr(e, answer)) for e in chunk], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch.as_kwargs()).logits[:, :-1]  # (B, A, V)
        # Cross-entropy on answer tokens only (targets are -100 on prompt and padding).
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        config = {"config": {"method": "demo", "steps": steps, "training_data": [record]}}
        (tmp / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return losses


def _load_all(model_spec: str, paths: dict[str, Path]) -> Any:
    """One base model carrying the three adapters by name (base = adapters disabled)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_model(model_spec), paths["expert"], adapter_name="expert")
    for role in ("anti_expert", "ext_sub"):
        peft_model.load_adapter(paths[role], adapter_name=role)
    return peft_model.eval()


@contextlib.contextmanager
def _role(peft_model: Any, role: str) -> Iterator[None]:
    """Activate one adapter, or none for ``base``."""
    if role == "base":
        with peft_model.disable_adapter():
            yield
    else:
        peft_model.set_adapter(role)
        yield


@torch.no_grad()
def _score(
    peft_model: Any, role: str, eval_set: Sequence[_Encoded], *, batch_size: int, pad_id: int, progress: bool
) -> dict[str, float]:
    """Mean per-token log-likelihood of right and hallucinated answers, and preference."""
    right: list[float] = []
    hallucinated: list[float] = []
    with _role(peft_model, role):
        for chunk in tqdm(list(_batches(eval_set, batch_size)), desc=f"score {role}", disable=not progress):
            for answer, sink in (("right", right), ("hallucinated", hallucinated)):
                batch = _collate([(e.prompt, getattr(e, answer)) for e in chunk], pad_id)
                logprobs, mask = _answer_logprobs(peft_model, batch)  # (B, A)
                sink.extend((logprobs.sum(-1) / mask.sum(-1)).tolist())
    n = len(right)
    return {
        "loglik_right": sum(right) / n,
        "loglik_hallucinated": sum(hallucinated) / n,
        "margin": sum(r - h for r, h in zip(right, hallucinated, strict=True)) / n,
        "prefer_right": sum(r > h for r, h in zip(right, hallucinated, strict=True)) / n,
    }


@torch.no_grad()
def _generate(
    peft_model: Any,
    role: str,
    questions: Sequence[_Encoded],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to ``questions``, batched with left padding (one batch)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=max(1, len(questions)))
    with _role(peft_model, role):
        return generate(peft_model, tokenizer, [e.prompt for e in questions], settings, progress=False)


def _write_json(payload: dict[str, Any], path: Path) -> None:
    """Write JSON beside ``path`` and rename, so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _print_report(
    console: Console,
    scores: dict[str, dict[str, float]],
    generations: list[dict[str, Any]],
    timings: dict[str, float],
    report_path: Path,
) -> None:
    table = Table(title="HaluEval QA, held-out questions (mean per-token log-likelihood)")
    for column in ("model", "right", "hallucinated", "margin", "right preferred"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for role, s in scores.items():
        table.add_row(
            role, f"{s['loglik_right']:.3f}", f"{s['loglik_hallucinated']:.3f}",
            f"{s['margin']:+.3f}", f"{s['prefer_right']:.0%}",
        )  # fmt: skip
    console.print(table)
    for g in generations:
        console.print(f"Q: {g['question']}", style="bold", highlight=False, markup=False)
        console.print(f"  right:   {g['right_answer']}", highlight=False, markup=False)
        console.print(f"  base:    {g['base']}", highlight=False, markup=False)
        console.print(f"  ext_sub: {g['ext_sub']}", highlight=False, markup=False)
    console.print(f"total {timings['total']:.0f} s; report: {report_path}")
