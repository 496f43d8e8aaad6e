"""The frozen reference p_θo of SKU's L_PD and LLMU's KL is the original model, never a dropout sample.

On a tiny OPT with dropout (SKU's paper model family) the reference forward must run in
eval mode while the model trains; before the fix it ran in train mode, so p_θo was a random
dropout sample (L_PD = −3.4e-4 at step 0 where the reference code gives −KL(p_θo ‖ p_θh)).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from excise.train.losses import (
    adapter_disabled_reference,
    eval_mode,
    kl_to_reference_loss,
    preservation_divergence_loss,
    response_logits,
)
from tests.train.test_sku import sku_config


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.1, attention_dropout=0.1,
        activation_dropout=0.1, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return OPTForCausalLM(config)


@pytest.fixture
def opt_lora():
    """A tiny OPT with dropout 0.1 under a fresh LoRA (B = 0: θh = θo), in train mode."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_opt(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    return model.train()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 128, (3, 12), generator=generator)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # a left-padded row
    labels = input_ids.clone()
    labels[:, :6] = -100  # prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _base_logits(model, batch) -> torch.Tensor:
    """p_θo independently: the original weights, adapter off, no dropout."""
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        logits = response_logits(model, batch)[0]
    model.train()
    return logits


def test_the_reference_is_the_eval_mode_original_model_while_the_model_trains(opt_lora, batch):
    expected = _base_logits(opt_lora, batch)
    reference = adapter_disabled_reference(opt_lora)
    with torch.no_grad():
        first, second = (head(hidden) for hidden, head in (reference(batch), reference(batch)))  # (N, V)
    assert torch.equal(first, expected) and torch.equal(second, expected)  # no dropout sample
    assert opt_lora.training and all(m.training for m in opt_lora.modules())  # train mode restored


def test_eval_mode_restores_each_submodules_own_mode(opt_lora):
    frozen = opt_lora.base_model.model.model.decoder.layers[0]
    frozen.eval()  # a submodule a recipe keeps in eval mode on purpose
    before = {name: m.training for name, m in opt_lora.named_modules()}
    with eval_mode(opt_lora):
        assert not any(m.training for m in opt_lora.modules())
    assert {name: m.training for name, m in opt_lora.named_modules()} == before
    with pytest.raises(RuntimeError), eval_mode(opt_lora):
        raise RuntimeError("restored on errors too")
    assert {name: m.training for name, m in opt_lora.named_modules()} == before


@pytest.mark.parametrize("loss, sign", [(preservation_divergence_loss, -1.0), (kl_to_reference_loss, 1.0)])
def test_step_zero_divergence_is_against_p_theta_o_itself(opt_lora, batch, loss, sign):
    """At step 0 (B = 0): L_PD = −KL(p_θo ‖ p_θh), LLMU's = +KL, p_θo exact, p_θh the training forward.

    In eval mode both sides are the same distribution: exactly 0. In train mode only the model
    being trained has dropout (as in the reference code, whose frozen model stays in eval mode).
    """
    reference = adapter_disabled_reference(opt_lora)
    log_p_ref = F.log_softmax(_base_logits(opt_lora, batch), -1)  # (N, V)

    torch.manual_seed(7)
    value = loss(opt_lora, batch, reference)
    torch.manual_seed(7)  # the same dropout masks: the reference draws no random numbers
    logits, _, rows = response_logits(opt_lora, batch)
    with torch.no_grad():
        token_kl = F.kl_div(F.log_softmax(logits, -1), log_p_ref, log_target=True, reduction="none").sum(-1)
        per_row = [token_kl[rows == r].mean() for r in rows.unique()]
        expected = sign * torch.stack(per_row).mean()
    assert float(value.detach()) == pytest.approx(float(expected), abs=1e-6)
    assert float(value.detach()) != 0.0  # the training forward's dropout, not the reference's

    opt_lora.eval()
    assert float(loss(opt_lora, batch, reference).detach()) == 0.0  # θh = θo and p_θo exact: nothing else


def test_sku_run_logs_step_zero_pd_against_the_eval_mode_reference(tmp_path):
    """The recipe itself (run_objective): step 0's logged pd, recomputed term by term as the loop does."""
    from excise.models import load_model
    from excise.train.loop import _micro_seed
    from excise.train.lora import attach_lora
    from excise.train.sku import run, sku_terms
    from excise.train.unlearning import prepare_data
    from tests.conftest import tiny_tokenizer

    folder = tmp_path / "tiny-opt"
    _tiny_opt().save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    cfg = sku_config(folder, tmp_path, steps=1, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    run(cfg, progress=False)
    logged = json.loads((cfg.out / "loss_log.json").read_text())[0]["pd"]

    torch.manual_seed(cfg.seed)
    model = attach_lora(load_model(str(folder)), cfg.lora_settings()).train()
    streams = ["harmful", "mismatch", "normal"]
    batch = prepare_data(cfg, tokenizer, streams).micro_batch(0, streams)
    torch.manual_seed(_micro_seed(cfg.seed, 0))  # the loop's dropout seed of micro-batch 0
    values = {  # the loop's loss_fn, with p_θo computed here independently
        t.name: float(
            t.loss(model, batch[t.stream], lambda b: (_base_logits(model, b), torch.nn.Identity())).detach()
        )
        for t in sku_terms(cfg)
    }
    assert logged == pytest.approx(values["pd"], abs=1e-7)
    assert logged < 0  # only the trained forward has dropout
