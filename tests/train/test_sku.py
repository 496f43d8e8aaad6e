"""SKU acquisition (excise/train/sku.py, unlearning.py): data streams, the trained objective, full path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from excise.data import assign_split
from excise.errors import ConfigError, DataError
from excise.train.losses import adapter_disabled_reference
from excise.train.sku import SkuConfig, run, sku_terms
from excise.train.unlearning import prepare_data

# Seven distinct harmful prompts, two of them repeated with another response (as in PKU-SafeRLHF).
PAIRS = [
    ("pick a lock?", "use a pin", "no"),
    ("Pick a  lock?", "bend a clip", "ask a smith"),  # the same prompt key as the first
    ("make a fake id", "print it", "do not"),
    ("steal a car", "hotwire it", "never"),
    ("steal a car", "take keys", "no way"),
    ("hurt a cat", "kick it", "be kind"),
    ("cheat a test", "copy notes", "study"),
    ("spy on mail", "read it", "respect"),
    ("hack wifi", "guess pass", "ask"),
]
NORMAL = [
    {"instruction": "add 2 and 2", "input": "", "output": "4"},
    {"instruction": "name a color", "input": "", "output": "red"},
    {"instruction": "say hi", "input": "", "output": "hi"},
    {"instruction": "capital of France", "input": "", "output": "Paris"},
]


def write_data(folder: Path, pairs=PAIRS) -> tuple[Path, Path]:
    harmful = folder / "pku.json"
    harmful.write_text(json.dumps([{"prompt": p, "response": [s, h]} for p, h, s in pairs]))
    normal = folder / "alpaca.json"
    normal.write_text(json.dumps(NORMAL))
    return harmful, normal


def sku_config(model_dir: Path, tmp_path: Path, **overrides) -> SkuConfig:
    harmful, normal = write_data(tmp_path)
    settings = dict(
        base=str(model_dir), harmful=str(harmful), normal=str(normal), out=tmp_path / "out", split="all",
        k=2, batch_size=2, steps=4, lr=1e-2, lora_dropout=0.0, max_length=96, schedule="constant",
    )  # fmt: skip
    return SkuConfig(**(settings | overrides))


def _objective(model, terms, batch, reference) -> float:
    with torch.no_grad():
        return float(sum(t.weight * t.loss(model, batch[t.stream], reference) for t in terms))


def _decode_response(tokenizer, batch, row) -> str:
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True)


def _decode_prompt(tokenizer, batch, row) -> str:
    ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
    keep = (labels == -100) & (mask == 1)
    keep[int(mask.argmax()) :] &= torch.cumsum(labels != -100, 0)[int(mask.argmax()) :] == 0
    return tokenizer.decode(ids[keep].tolist(), skip_special_tokens=True)


def test_mismatch_rows_pair_each_prompt_with_k_responses_of_other_prompts(tmp_path, chat_tokenizer):
    cfg = sku_config(tmp_path, tmp_path, k=3)
    data = prepare_data(cfg, chat_tokenizer, ["harmful", "mismatch", "normal"])
    own = {}  # prompt key → its harmful responses
    for p, h, _ in PAIRS:
        own.setdefault(" ".join(p.lower().split()), set()).add(h)
    for i in range(6):
        batch = data.micro_batch(i, ["harmful", "mismatch", "normal"])
        assert batch["harmful"]["input_ids"].shape[0] == 2
        assert batch["mismatch"]["input_ids"].shape[0] == 2 * 3  # B·K rows
        assert batch["normal"]["input_ids"].shape[0] == 2
        for row in range(2):
            prompt = _decode_prompt(chat_tokenizer, batch["harmful"], row)
            key = next(k for k in own if k in " ".join(prompt.lower().split()))
            drawn = [_decode_response(chat_tokenizer, batch["mismatch"], row * 3 + j) for j in range(3)]
            assert len(set(drawn)) == 3
            for j, response in enumerate(drawn):
                assert key in " ".join(
                    _decode_prompt(chat_tokenizer, batch["mismatch"], row * 3 + j).lower().split()
                )
                assert response not in own[key]  # never the prompt's own (duplicates included)
                assert any(response in hs for k, hs in own.items() if k != key)
        again = data.micro_batch(i, ["harmful", "mismatch", "normal"])  # deterministic in i
        assert all(torch.equal(batch[s][f], again[s][f]) for s in batch for f in batch[s])


def test_the_train_split_is_the_default_and_judge_eval_prompts_stay_out(tmp_path, chat_tokenizer):
    pairs = [(f"question number {i}", f"bad {i}", f"good {i}") for i in range(40)]
    harmful, normal = write_data(tmp_path, pairs)
    cfg = SkuConfig(base="unused", harmful=str(harmful), normal=str(normal), out=tmp_path / "o", k=2)
    data = prepare_data(cfg, chat_tokenizer, ["harmful", "mismatch", "normal"])
    expected = [p for p, _, _ in pairs if assign_split(p) == "train"]
    assert 0 < len(expected) < 40
    assert data.counts["harmful"] == {"loaded": 40, "on_split": len(expected), "too_long": 0}
    assert data.primary_keys == expected


def test_sku_lowers_its_objective_logs_each_term_and_pd_starts_at_zero(
    tiny_model_dir, tmp_path, chat_tokenizer
):
    from peft import PeftModel

    from excise.models import load_model

    cfg = sku_config(tiny_model_dir, tmp_path)
    report = run(cfg, progress=False)
    log = json.loads((cfg.out / "loss_log.json").read_text())
    assert len(log) == cfg.steps and report.steps == cfg.steps
    for record in log:
        assert {"gd", "rd", "pd", "loss"} <= set(record)
        assert record["loss"] == pytest.approx(0.5 * record["gd"] + record["rd"] + record["pd"], rel=1e-5)
    assert log[0]["pd"] == 0.0  # LoRA B = 0: θh = θo at the first step
    assert all(r["pd"] <= 0 for r in log) and log[-1]["pd"] < 0
    train_config = json.loads((cfg.out / "train_config.json").read_text())["config"]
    assert train_config["reference"] == "adapter-disabled" and train_config["method"] == "sku"
    assert train_config["gradient_checkpointing"] is True  # the default, resolved: three streams

    # The objective on a fixed micro-batch, before (B = 0) and after training.
    data = prepare_data(cfg, chat_tokenizer, ["harmful", "mismatch", "normal"])
    batch = data.micro_batch(0, ["harmful", "mismatch", "normal"])
    terms = sku_terms(cfg)
    model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), cfg.out)
    reference = adapter_disabled_reference(model)
    after = _objective(model, terms, batch, reference)
    with model.disable_adapter():
        before = _objective(model, terms, batch, reference)
    assert after < before - 0.1


def test_missing_normal_data_too_large_k_and_one_prompt_are_clear_errors(tmp_path, chat_tokenizer):
    harmful, _ = write_data(tmp_path)
    base = dict(base="unused", harmful=str(harmful), out=tmp_path / "o", split="all")
    with pytest.raises(ConfigError, match="--normal"):
        prepare_data(SkuConfig(**base), chat_tokenizer, ["harmful", "mismatch", "normal"])
    with pytest.raises(DataError, match=r"K=8 .*only 7 response\(s\) of other prompts"):
        prepare_data(SkuConfig(**base, normal="safe", k=8), chat_tokenizer, ["harmful", "mismatch"])
    same, _ = write_data(tmp_path / ".." / tmp_path.name, [("same q", f"bad {i}", "good") for i in range(4)])
    with pytest.raises(DataError, match="same prompt"):
        prepare_data(SkuConfig(**base | {"harmful": str(same)}, k=1), chat_tokenizer, ["harmful", "mismatch"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        prepare_data(SkuConfig(**base | {"harmful": str(empty)}), chat_tokenizer, ["harmful"])
    eval_only = [(p, "bad", "good") for p in (f"q{i}" for i in range(60)) if assign_split(p) == "eval"]
    only, _ = write_data(tmp_path, eval_only)
    with pytest.raises(DataError, match=r"harmful data: none of the \d+ examples falls on the .train."):
        prepare_data(
            SkuConfig(**base | {"harmful": str(only), "split": "train"}), chat_tokenizer, ["harmful"]
        )


def test_full_parameter_sku_then_streamed_negation_is_theta_o_minus_lam_task_vector(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from excise.cli import app

    cfg = sku_config(tiny_model_dir, tmp_path, full=True, lr=1e-3, steps=2)
    run(cfg, progress=False)
    log = json.loads((cfg.out / "loss_log.json").read_text())
    assert log[0]["pd"] == 0.0  # the frozen copy equals θh before the first update
    assert json.loads((cfg.out / "train_config.json").read_text())["config"]["reference"] == "frozen-copy"

    lam = 0.7
    negated = tmp_path / "negated"  # the documented command: excise ops negate --base BASE --adapter θh
    args = ["ops", "negate", "--base", str(tiny_model_dir), "--adapter", str(cfg.out), "--lam", str(lam)]
    result = CliRunner().invoke(app, [*args, "--out", str(negated)])
    assert result.exit_code == 0, result.output
    theta_o = load_file(tiny_model_dir / "model.safetensors")
    theta_h = load_file(cfg.out / "model.safetensors")
    result = load_file(negated / "model.safetensors")
    assert set(result) == set(theta_o)
    moved = 0
    for name, w0 in theta_o.items():
        expected = w0.double() - lam * (theta_h[name].double() - w0.double())
        torch.testing.assert_close(result[name].double(), expected, atol=1e-6, rtol=1e-6)
        moved += not torch.equal(theta_h[name], w0)
    assert moved > 0  # full training changed the weights
