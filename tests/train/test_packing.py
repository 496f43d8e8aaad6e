"""Packed SFT rows (excise/train/packing.py): every example once, no padding, no attention across examples."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from excise.data import Encoded, collate
from excise.train.nll import response_logprobs, response_nll
from excise.train.packing import collate_packed, pack
from tests.conftest import tiny_llama_config


def _examples(n: int, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    return [
        Encoded(
            [rng.randrange(3, 120) for _ in range(rng.randint(1, 9))],
            [rng.randrange(3, 120) for _ in range(rng.randint(1, 12))],
        )
        for _ in range(n)
    ]


def test_pack_places_every_example_once_within_capacity():
    examples = _examples(40)
    rows = pack(examples, 32)
    placed = sorted(id(e) for row in rows for e in row)
    assert placed == sorted(id(e) for e in examples)
    assert all(sum(len(e) for e in row) <= 32 for row in rows)
    total = sum(len(e) for e in examples)
    assert len(rows) <= math.ceil(total / 32) + 1  # best-fit decreasing: close to the bound
    assert [[id(e) for e in row] for row in pack(examples, 32)] == [[id(e) for e in row] for row in rows]
    with pytest.raises(ValueError, match="more than the packing capacity"):
        pack(examples, 5)


def test_collate_packed_restarts_positions_and_labels_responses_only():
    a, b = Encoded([5, 6], [7, 8, 9]), Encoded([], [10, 11])  # b: no prompt, its first token unpredicted
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11], [10, 11, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, 11], [-100, 11] + [-100] * 5]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradient_equal_the_padded_batch(attn):
    """Each example attends only to itself: per-token log-probabilities equal the unpacked ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    config._attn_implementation = attn
    model = get_peft_model(
        LlamaForCausalLM(config).eval(),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    examples = _examples(6, seed=1)
    rows = pack(examples, 40)
    assert len(rows) < len(examples)  # several examples share a row
    packed = collate_packed(rows)
    flat = collate([e for row in rows for e in row])  # the same examples in the same order, padded

    got, got_mask = response_logprobs(model, packed)
    want, want_mask = response_logprobs(model, flat)
    torch.testing.assert_close(got[got_mask], want[want_mask], atol=1e-5, rtol=1e-5)

    grads = []
    for batch in (packed, flat):
        model.zero_grad()
        response_nll(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, atol=1e-6, rtol=1e-5)

    # With the row's 2D attention mask instead, examples would see the ones before them.
    crossing = model(
        input_ids=packed["input_ids"],
        attention_mask=packed["attention_mask"],
        position_ids=packed["position_ids"],
    ).logits
    isolated = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    assert not torch.allclose(crossing, isolated, atol=1e-4)


def _qa_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "question": f"q{i} " + "w " * rng.randint(0, 12),
            "right_answer": "a " * rng.randint(1, 15),
            "hallucinated_answer": "x",
        }
        for i in range(n)
    ]


def test_padding_share_is_logged_and_falls_with_grouping_and_packing(tiny_model_dir, tmp_path):
    from excise.train.sft import SftConfig, run

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _qa_rows(60)))
    shares = {}
    for name, extra in {
        "plain": {"group_by_length": False, "batch_size": 4},
        "grouped": {"batch_size": 4},
        "packed": {"packing": True, "batch_size": 1},
    }.items():
        cfg = SftConfig(
            base=str(tiny_model_dir), data=str(data), out=tmp_path / name, format="paired-expert",
            split="all", steps=6, max_length=64, lr=1e-3, **extra,
        )  # fmt: skip
        report = run(cfg, progress=False)
        log = json.loads((cfg.out / "loss_log.json").read_text())
        summary = json.loads((cfg.out / "train_config.json").read_text())
        assert all(0 <= r["padding"] < 1 for r in log)
        assert summary["padding_share"] == report.padding_share
        expected = 1 - sum(r["tokens"] for r in log) / sum(r["tokens"] / (1 - r["padding"]) for r in log)
        assert report.padding_share == pytest.approx(expected, abs=1e-4)
        shares[name] = report.padding_share
    assert shares["packed"] < shares["grouped"] < shares["plain"]
