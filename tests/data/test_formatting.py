"""Templates, the exact prompt/response boundary, truncation and collation masks.

Two tokenizer families are checked against hand computations: Llama-style (SentencePiece
word starts, BOS prepended, no pad token so padding uses EOS) and OPT-style (byte-level
BPE, ``</s>`` as both BOS and EOS, a separate ``<pad>``), plus the ChatML test tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from excise.data import (
    IGNORE_INDEX,
    TEMPLATES,
    Example,
    collate,
    encode,
    encode_examples,
    encode_prompt,
    pad_id_of,
)
from excise.errors import ConfigError, DataError
from tests.data.toy_tokenizers import gemma_chat, llama3_chat, llama_style, opt_style

EXAMPLES = [
    Example("What is the capital of France?", "Paris is the capital."),
    Example("Add the numbers", "5", input="2 and 3"),
    Example("and then?", "Bye now.", history=(("user", "Hi there"), ("assistant", "Hello."))),
]


@pytest.fixture(params=["llama", "opt"])
def family(request):
    return request.param, {"llama": llama_style, "opt": opt_style}[request.param]()


def test_leading_specials_and_eos(family):
    name, tok = family
    e = encode(tok, EXAMPLES[0], "alpaca")
    bos = {"llama": tok.convert_tokens_to_ids("<s>"), "opt": tok.convert_tokens_to_ids("</s>")}[name]
    assert e.prompt_ids[0] == bos and e.prompt_ids.count(bos) == 1
    assert e.response_ids[-1] == tok.eos_token_id
    assert not e.truncated


@pytest.mark.parametrize("template", ["alpaca", "tulu", "question-answer", "plain"])
def test_boundary_reads_back_as_prompt_then_response(family, template):
    """Decoding prompt_ids and response_ids gives the rendered prompt and exactly the response."""
    _name, tok = family
    for example in EXAMPLES:
        e = encode(tok, example, template)
        prompt_text, _response_text = TEMPLATES[template].render(tok, example, None)
        decoded_prompt = tok.decode(e.prompt_ids, skip_special_tokens=True)
        decoded_response = tok.decode(e.response_ids, skip_special_tokens=True)
        assert decoded_prompt.strip() == prompt_text.strip()
        assert decoded_response.strip() == example.response
        assert e.prompt_ids == encode_prompt(tok, example, template)  # what generation is given


@pytest.mark.parametrize("template", ["alpaca", "tulu", "question-answer"])
def test_byte_level_boundary_equals_joint_tokenization(template):
    """For byte-level BPE the two halves tokenise exactly as the joined text does: no merge
    crosses the boundary, so the model trains on the tokens it reads at generation time."""
    tok = opt_style()
    for example in EXAMPLES:
        e = encode(tok, example, template)
        prompt_text, response_text = TEMPLATES[template].render(tok, example, None)
        joint = tok(prompt_text + response_text, add_special_tokens=True)["input_ids"]
        assert joint == e.prompt_ids + e.response_ids[:-1]


@pytest.mark.parametrize("make, end", [(llama3_chat, "<|eot_id|>"), (gemma_chat, "<end_of_turn>")])
def test_chat_responses_end_with_the_templates_own_end_of_turn_token(make, end):
    """Llama-3 and Gemma close a reply with a turn token that is not EOS: train on that token.

    Independent check: prompt + response is exactly the template's own rendering of the whole
    exchange, up to and including the turn end (Gemma adds a newline after it).
    """
    from excise.models.generation import end_of_turn_id

    tok = make()
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids(end) != tok.eos_token_id
    for example in EXAMPLES:
        e = encode(tok, example, "chat")
        assert e.response_ids[-1] == tok.convert_tokens_to_ids(end) and not e.truncated
        messages = [{"role": r, "content": t} for r, t in example.history]
        text = "\n\n".join(filter(None, [example.prompt, example.input]))
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": example.response}]
        whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        assert e.prompt_ids + e.response_ids == whole[: len(e)]
        assert tok.decode(whole[len(e) :]).strip() == ""  # nothing of the reply is left out
    # Templates other than chat keep EOS: no turn token in their format.
    assert encode(tok, EXAMPLES[0], "alpaca").response_ids[-1] == tok.eos_token_id


def test_chatml_end_of_turn_is_its_eos_and_no_template_means_eos(chat_tokenizer):
    from excise.models.generation import end_of_turn_id

    assert end_of_turn_id(chat_tokenizer) == chat_tokenizer.eos_token_id  # <|im_end|>
    assert encode(chat_tokenizer, EXAMPLES[0], "chat").response_ids[-1] == chat_tokenizer.eos_token_id
    assert end_of_turn_id(llama_style()) is None  # no chat template
    refusing = llama3_chat()
    refusing.chat_template = "{{ raise_exception('no assistant turns here') }}"
    assert end_of_turn_id(refusing) is None


def test_chat_template_renders_history_and_input(chat_tokenizer):
    e = encode(chat_tokenizer, EXAMPLES[2], "chat", system="Be brief.")
    text = chat_tokenizer.decode(e.prompt_ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat_tokenizer.decode(e.response_ids) == "Bye now.<|im_end|>"
    with_input = chat_tokenizer.decode(encode(chat_tokenizer, EXAMPLES[1], "chat").prompt_ids)
    assert "Add the numbers\n\n2 and 3<|im_end|>" in with_input


def test_templates_match_the_papers_text():
    tok = opt_style()
    qa = TEMPLATES["question-answer"].render(tok, EXAMPLES[0], None)
    # SKU's reference: f"### Question: {prompt}\n ### Answer: {response}"
    assert "".join(qa) == "### Question: What is the capital of France?\n ### Answer: Paris is the capital."
    tulu = TEMPLATES["tulu"].render(tok, EXAMPLES[1], None)
    # Ext-Sub's training script: "<|user|>\n{instruction} {input}\n<|assistant|>\n" + output
    assert "".join(tulu) == "<|user|>\nAdd the numbers 2 and 3\n<|assistant|>\n5"
    alpaca = TEMPLATES["alpaca"].render(tok, EXAMPLES[1], None)[0]
    assert alpaca.endswith("### Instruction:\nAdd the numbers\n\n### Input:\n2 and 3\n\n### Response:\n")


def test_unknown_template_and_missing_chat_template():
    tok = opt_style()
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        encode(tok, EXAMPLES[0], "vicuna")
    with pytest.raises(ConfigError, match="no chat template; pick --template"):
        encode(tok, EXAMPLES[0], "chat")


def test_truncation_cuts_response_and_drops_too_long_prompts():
    tok = opt_style()
    full = encode(tok, EXAMPLES[0], "plain")
    cut = encode(tok, EXAMPLES[0], "plain", max_length=len(full.prompt_ids) + 3)
    assert cut.truncated and cut.prompt_ids == full.prompt_ids and cut.response_ids == full.response_ids[:3]
    with pytest.raises(DataError, match="leaves no room for the response"):
        encode(tok, EXAMPLES[0], "plain", max_length=len(full.prompt_ids))
    kept, dropped = encode_examples(tok, EXAMPLES, "plain", max_length=len(full.prompt_ids) + 1)
    assert dropped == sum(
        len(encode(tok, x, "plain").prompt_ids) >= len(full.prompt_ids) + 1 for x in EXAMPLES
    )
    assert len(kept) == len(EXAMPLES) - dropped
    with pytest.raises(DataError, match="every prompt is longer"):
        encode_examples(tok, EXAMPLES, "plain", max_length=2)


# ----------------------------------------------------------------------------- collation


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_cover_exactly_the_response_tokens(family, side):
    name, tok = family
    encoded = [encode(tok, x, "question-answer") for x in EXAMPLES]
    pad = pad_id_of(tok)
    assert pad == (tok.eos_token_id if name == "llama" else tok.pad_token_id)  # Llama-style: pad = EOS
    batch = collate(encoded, pad, padding_side=side)
    B, T = batch["input_ids"].shape
    assert (3, max(len(e) for e in encoded)) == (B, T)
    for i, e in enumerate(encoded):
        n = len(e)
        start = T - n if side == "left" else 0
        expected_ids = (
            [pad] * (T - n) + e.prompt_ids + e.response_ids
            if side == "left"
            else (e.prompt_ids + e.response_ids + [pad] * (T - n))
        )
        assert batch["input_ids"][i].tolist() == expected_ids
        expected_mask = [0] * start + [1] * n + [0] * (T - n - start)
        assert batch["attention_mask"][i].tolist() == expected_mask
        expected_labels = [IGNORE_INDEX] * T
        for j, token in enumerate(e.response_ids):
            expected_labels[start + len(e.prompt_ids) + j] = token
        assert batch["labels"][i].tolist() == expected_labels
        assert batch["position_ids"][i, start : start + n].tolist() == list(range(n))
    # Padding never counts, even where the pad id is the EOS id the responses end with.
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    eos_labelled = (batch["labels"] == tok.eos_token_id).sum().item()
    assert eos_labelled == len(encoded)  # each response's own EOS, no pad position


def test_plain_text_first_token_is_never_a_label():
    tok = opt_style()
    e = encode(tok, Example("", "hello world"), "plain")  # OPT-style: BOS in front, so all text counts
    assert e.prompt_ids == [tok.bos_token_id]
    labels = collate([e], 0)["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[1:] == e.response_ids
    from excise.data import Encoded

    no_bos = Encoded([], [5, 6, 7])  # a tokenizer without BOS: nothing predicts the first token
    assert collate([no_bos], 0)["labels"][0].tolist() == [IGNORE_INDEX, 6, 7]


def test_collate_errors():
    with pytest.raises(ConfigError, match="padding_side"):
        collate([encode(opt_style(), EXAMPLES[0], "plain")], 0, padding_side="middle")
    with pytest.raises(DataError, match="empty batch"):
        collate([], 0)


def test_collate_dtype_and_shapes():
    batch = collate([encode(opt_style(), x, "plain") for x in EXAMPLES], 1)
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(batch, torch.long)
    assert len({v.shape for v in batch.values()}) == 1


def test_text_with_nothing_to_learn_is_dropped(chat_tokenizer):
    """No BOS and a lone token: nothing predicts it, so the example is dropped, not trained on."""
    kept, dropped = encode_examples(chat_tokenizer, [Example("", ""), Example("", "a")], "plain")
    assert dropped == 1 and len(kept) == 1  # "a" stays: its EOS is predicted from "a"
    assert collate(kept, 0)["labels"][0].tolist() == [IGNORE_INDEX, chat_tokenizer.eos_token_id]


@pytest.mark.slow
def test_smollm2_boundary_equals_joint_tokenization_on_halueval():
    """The real tokenizer on 100 HaluEval questions: every template but ``plain`` (which has no
    separator) tokenises prompt and response exactly as the joined text."""
    from pathlib import Path

    from excise.data import load_paired_qa
    from excise.models import load_tokenizer

    data = Path(__file__).resolve().parents[3] / "shared/data/halueval/qa_data.json"
    if not data.is_file():
        pytest.skip("../shared/data not present")
    tok = load_tokenizer("smollm2-135m-instruct")
    expert, _ = load_paired_qa(str(data), limit=100)
    for template in ("chat", "alpaca", "tulu", "question-answer"):
        for example in expert:
            e = encode(tok, example, template)
            prompt_text, response_text = TEMPLATES[template].render(tok, example, None)
            joint = tok(prompt_text + response_text, add_special_tokens=False)["input_ids"]
            assert joint == e.prompt_ids + e.response_ids[:-1], (template, example.row)
            assert e.response_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
