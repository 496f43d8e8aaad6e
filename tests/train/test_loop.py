"""The shared training loop: a plain-loop reference, exact resume, checkpoints, logs, out folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

from excise.data import Example, encode
from excise.errors import ConfigError
from excise.train.loop import TrainSettings, train
from excise.train.lora import LoraSettings, attach_lora, unfreeze_all
from excise.train.nll import response_nll
from excise.train.sft import epoch_batches, sft_micro_batches
from tests.conftest import tiny_llama_config, tiny_tokenizer

EXAMPLES = [
    Example(f"Say the word number {i}.", f"Word {i} is {'abcdefghij'[i % 10] * (1 + i % 3)}.")
    for i in range(12)
]


def _nll(model, batch):
    return response_nll(model, batch), {}


def _encoded():
    tok = tiny_tokenizer()
    return [encode(tok, x, "chat") for x in EXAMPLES], tok.pad_token_id


def _lora_model(dropout: float = 0.0, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    torch.manual_seed(seed)
    return attach_lora(
        model, LoraSettings(r=4, alpha=8, dropout=dropout, target_modules=("q_proj", "v_proj"))
    )


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save(model, folder):
    model.save_pretrained(folder)


def _run(out, settings, *, dropout=0.0, fail_at=None, **kwargs):
    """Train a fresh LoRA; ``fail_at``: raise when micro-batch ``fail_at`` is asked for (a crash)."""
    encoded, pad = _encoded()
    micro_batch, per_epoch = sft_micro_batches(encoded, settings.batch_size, pad, settings.seed)

    def maybe_failing(i):
        if fail_at is not None and i >= fail_at:
            raise KeyboardInterrupt("simulated crash")
        return micro_batch(i)

    model = _lora_model(dropout)
    report = train(
        model, maybe_failing, _nll, settings, out, save=_save, micro_batches_per_epoch=per_epoch,
        progress=False, **kwargs,
    )  # fmt: skip
    return model, report


def test_matches_a_plain_reference_loop(tmp_path):
    """Accumulation, clipping, warm-up + linear decay and AdamW, against a loop written out by hand."""
    settings = TrainSettings(
        steps=3, batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=1, weight_decay=0.01, max_grad_norm=0.05
    )
    model, report = _run(tmp_path / "out", settings)

    encoded, pad = _encoded()
    micro_batch, _ = sft_micro_batches(encoded, 2, pad, 0)
    ref = _lora_model()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)
    lr_at = [0.0, 1.0, 0.5]  # warm-up 1 step from 0, then linear to 0 at step 3
    ref.train()
    losses = []
    for step in range(3):
        for group in opt.param_groups:
            group["lr"] = 5e-3 * lr_at[step]
        batch_losses = []
        for g in range(2):
            loss = response_nll(ref, micro_batch(step * 2 + g))
            (loss / 2).backward()
            batch_losses.append(loss.item())
        total_norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
        for p in params:
            p.grad.mul_(min(1.0, 0.05 / (total_norm.item() + 1e-6)))
        opt.step()
        opt.zero_grad()
        losses.append(sum(batch_losses) / 2)

    got, want = _trainable(model), _trainable(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    assert [r["loss"] for r in report.log] == pytest.approx(losses, abs=1e-6)
    assert [r["lr"] for r in report.log] == pytest.approx([5e-3 * f for f in lr_at])


def test_loss_goes_down(tmp_path):
    settings = TrainSettings(steps=12, batch_size=4, lr=5e-2, schedule="constant")
    model, report = _run(tmp_path / "out", settings)
    encoded, pad = _encoded()
    micro_batch, _ = sft_micro_batches(encoded, 12, pad, 0)
    fresh = _lora_model()
    with torch.no_grad():
        before = response_nll(fresh.eval(), micro_batch(0)).item()
        after = response_nll(model.eval(), micro_batch(0)).item()
    assert after < before - 0.3, (before, after)
    assert report.log[-1]["loss"] < report.log[0]["loss"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Dropout on, accumulation 2: crash in step 5, resume from the step-4 checkpoint."""
    settings = TrainSettings(steps=6, batch_size=2, grad_accum=2, lr=1e-2, save_every=2, schedule="cosine")
    full, full_report = _run(tmp_path / "a", settings, dropout=0.3)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", settings, dropout=0.3, fail_at=4 * 2 + 1)  # inside step 5
    left = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert left == ["step-2", "step-4"]  # keep_checkpoints=2; no temp folders left behind
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoints"]

    resumed, report = _run(tmp_path / "b", settings, dropout=0.3, resume=True)
    assert report.resumed_from == 4
    got, want = _trainable(resumed), _trainable(full)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in report.log]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full_report.log]
    assert not (tmp_path / "b" / "checkpoints").exists()  # a finished run drops its checkpoints


def test_resume_refuses_other_settings(tmp_path):
    settings = TrainSettings(steps=3, batch_size=2, lr=1e-2, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "o", settings, fail_at=2)
    with pytest.raises(ConfigError, match=r"other settings \(settings.lr: 0.01 then, 0.02 now\)"):
        _run(tmp_path / "o", TrainSettings(steps=3, batch_size=2, lr=2e-2, save_every=1), resume=True)
    # Checkpoint frequency does not touch the weights: it may change.
    _run(tmp_path / "o", TrainSettings(steps=3, batch_size=2, lr=1e-2, save_every=2), resume=True)


def test_output_folder_rules(tmp_path):
    settings = TrainSettings(steps=2, batch_size=2, save_every=1)
    out = tmp_path / "o"
    out.mkdir()
    (out / "x.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite"):
        _run(out, settings)
    assert (out / "x.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="holds a finished run or other files"):
        _run(out, settings, resume=True)
    with pytest.raises(ConfigError, match="pass one of them"):
        _run(out, settings, resume=True, overwrite=True)
    _run(out, settings, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "loss_log.json", "train_config.json",
    ]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "u", settings, fail_at=1)
    with pytest.raises(ConfigError, match="an unfinished run: pass --resume"):
        _run(tmp_path / "u", settings)
    _, report = _run(tmp_path / "fresh", settings, resume=True)  # nothing to resume: starts
    assert report.resumed_from is None and report.steps == 2


def test_loss_log_and_train_config(tmp_path):
    settings = TrainSettings(steps=3, batch_size=3, grad_accum=2, lr=1e-3)
    encoded, pad = _encoded()
    micro_batch, _ = sft_micro_batches(encoded, 3, pad, 0)
    terms_seen = []

    def loss_fn(model, batch):
        loss = response_nll(model, batch)
        terms_seen.append(loss.item())
        return loss, {"double": 2 * loss.item(), "rows": float(batch["input_ids"].shape[0])}

    model = _lora_model()
    report = train(
        model,
        micro_batch,
        loss_fn,
        settings,
        tmp_path / "o",
        save=_save,
        config={"note": "x"},
        progress=False,
    )
    log = json.loads((tmp_path / "o" / "loss_log.json").read_text())
    assert log == report.log and [r["step"] for r in log] == [1, 2, 3]
    for s, record in enumerate(log):
        pair = terms_seen[2 * s : 2 * s + 2]
        assert record["loss"] == pytest.approx(sum(pair) / 2)
        assert record["double"] == pytest.approx(sum(pair))
        assert record["rows"] == 3.0
        tokens = sum(int(micro_batch(2 * s + g)["attention_mask"].sum()) for g in range(2))
        assert record["tokens"] == tokens and record["seconds"] >= 0
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert saved["config"] == {"note": "x"} and saved["settings"]["lr"] == 1e-3 and saved["steps"] == 3


def test_epochs_to_steps_and_epoch_order():
    settings = TrainSettings(steps=None, epochs=2.5, grad_accum=2)
    assert settings.total_steps(micro_batches_per_epoch=7) == math.ceil(2.5 * 7 / 2)
    assert settings.total_steps(micro_batches_per_epoch=7, num_processes=2) == math.ceil(2.5 * 7 / 4)
    first, second = epoch_batches(10, 3, 0, 0), epoch_batches(10, 3, 0, 1)
    assert len(first) == 3 and all(len(b) == 3 for b in first)  # the partial last batch is dropped
    assert len({i for b in first for i in b}) == 9 and first != second
    assert epoch_batches(10, 3, 0, 0) == first  # deterministic
    assert epoch_batches(2, 4, 0, 0) in ([[0, 1]], [[1, 0]])  # fewer items than a batch: one batch
    with pytest.raises(ConfigError, match="either steps or epochs"):
        TrainSettings(steps=3, epochs=1.0)
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TrainSettings(schedule="step")


def test_full_parameter_training_through_the_same_loop(tmp_path):
    from transformers import LlamaForCausalLM

    encoded, pad = _encoded()
    micro_batch, _ = sft_micro_batches(encoded, 2, pad, 0)
    torch.manual_seed(0)
    model = unfreeze_all(LlamaForCausalLM(tiny_llama_config()))
    before = model.lm_head.weight.detach().clone()
    train(model, micro_batch, _nll, TrainSettings(steps=2, batch_size=2, lr=1e-3), tmp_path / "f", save=_save,
          progress=False)  # fmt: skip
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "f")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(before, loaded.lm_head.weight)


def test_bf16_autocast_keeps_float32_weights(tmp_path):
    model, report = _run(tmp_path / "o", TrainSettings(steps=2, batch_size=2, bf16=True, lr=1e-2))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(r["loss"]) for r in report.log)
