"""Activation checkpointing (``excise.train.lora.enable_activation_checkpointing``): memory, not results."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from excise.train.lora import LoraSettings, attach_lora, enable_activation_checkpointing
from excise.train.losses import kl_to_reference_loss, sequence_nll
from tests.train.test_baselines import baseline_config
from tests.train.test_losses import _batch
from tests.train.test_sku import sku_config


def _layer_calls(model) -> list[str]:
    calls: list[str] = []
    for layer in model.get_base_model().model.layers:
        layer.self_attn.register_forward_hook(
            lambda *a: calls.append("grad" if torch.is_grad_enabled() else "nograd")
        )
    return calls


def test_checkpointing_gives_the_same_gradients_and_recomputes_only_the_trained_forward(tiny_llama):
    """Dropout on: the recompute replays the same masks. The no-grad reference forward runs once."""
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = attach_lora(
            type(tiny_llama)(tiny_llama.config),
            LoraSettings(r=4, dropout=0.3, target_modules=("q_proj", "v_proj")),
        )
        model.load_state_dict(tiny_llama.state_dict(), strict=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        if checkpointed:
            enable_activation_checkpointing(model)
        model.train()
        calls = _layer_calls(model)
        torch.manual_seed(1)
        loss = sequence_nll(model, _batch()) + kl_to_reference_loss(model, _batch())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, calls))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-6)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, atol=1e-6, rtol=1e-5)
    layers = 2
    # Without: 2 trained forwards + 1 reference forward per layer. With: each trained forward again.
    assert calls0.count("grad") == 2 * layers and calls0.count("nograd") == layers
    assert calls1.count("grad") == 4 * layers and calls1.count("nograd") == layers


def _run(method: str, model_dir, tmp_path, full: bool, checkpointing: bool):
    out = tmp_path / f"{method}-{full}-{checkpointing}"
    common = dict(out=out, steps=2, full=full, gradient_checkpointing=checkpointing, lora_dropout=0.1)
    if method == "sft":
        from excise.train.sft import SftConfig, run
        from tests.train.test_sku import write_data

        _, normal = write_data(tmp_path)
        cfg = SftConfig(base=str(model_dir), data=str(normal), split="all", batch_size=2, lr=1e-2, **common)
        run(cfg, progress=False)
    elif method == "sku":
        from excise.train.sku import run

        run(sku_config(model_dir, tmp_path, **common), progress=False)
    else:
        from excise.train.baselines import run

        run(baseline_config(model_dir, tmp_path, method, **common), progress=False)
    name = "model.safetensors" if full else "adapter_model.safetensors"
    return load_file(out / name)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("method", ["sft", "sku", "ga", "ga_mismatch", "llmu", "finetune"])
def test_every_trainer_trains_the_same_weights_with_gradient_checkpointing(
    method, full, tiny_model_dir, tmp_path
):
    plain = _run(method, tiny_model_dir, tmp_path, full, checkpointing=False)
    checkpointed = _run(method, tiny_model_dir, tmp_path, full, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5)
