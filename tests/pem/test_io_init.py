"""LoRA init methods that PEFT applies to the base weights (excise/pem/io.py ``_check_init``).

PiSSA, OLoRA, CorDA and LoRA-GA train on ``W − s·B0A0``, so their delta on the real
base is ``s·(BA − B0A0)``, not ``s·BA``; LoftQ swaps the base for a quantised copy.
Such adapters are refused with PEFT's conversion fix; PEFT's converted adapter and the
plain inits are read, and every result is written as a plain LoRA
(``init_lora_weights: true``). Expected weights come from PEFT itself: the merged
model it trained or loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from excise.errors import AdapterError
from excise.pem.apply import apply_operator
from excise.pem.io import load_adapter
from tests.conftest import adapter_json, tiny_llama_config, write_peft_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def _peft_model(init, **kwargs):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **kwargs)
    return get_peft_model(_llama(), config)


def _train(peft_model, seed: int = 1) -> None:
    """Stand-in for training: move every LoRA factor (PEFT's init values are kept underneath)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _merged(model) -> dict[str, torch.Tensor]:
    """The model's effective weights (adapter merged), in float64."""
    return {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}


def _loaded(adapter: Path) -> dict[str, torch.Tensor]:
    """What PEFT loads from ``adapter`` on the pristine base, merged."""
    from peft import PeftModel

    return _merged(PeftModel.from_pretrained(_llama(), adapter))


def _base() -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in _llama().state_dict().items()}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_peft_inits_that_rewrite_the_base_are_refused(tmp_path, init):
    """Saved by PEFT as they come out of get_peft_model: refused, with PEFT's fix named."""
    peft_model = _peft_model(init)
    peft_model.save_pretrained(tmp_path / "a")
    assert adapter_json(tmp_path / "a")["init_lora_weights"] == init
    with pytest.raises(AdapterError) as info:
        load_adapter(tmp_path / "a")
    message = str(info.value)
    assert "\n" not in message
    assert repr(init) in message and "path_initial_model_for_weight_conversion" in message
    assert "s·(BA − B0A0)" in message


@pytest.mark.parametrize(
    ("init", "match"),
    [
        ("corda", "path_initial_model_for_weight_conversion"),
        ("corda_niter_4", "path_initial_model_for_weight_conversion"),
        ("lora_ga", "path_initial_model_for_weight_conversion"),
        ("loftq", "quantised"),
        ("some_future_init", "not a value PEFT 0.21 reads"),
    ],
)
def test_other_rewriting_or_unknown_inits_are_refused(tmp_path, init, match):
    """These need PEFT preprocessing (or quantisation) to create: the config names them."""
    folder = write_peft_lora(tmp_path / "a", _llama(), seed=1, r=4, target_modules=TARGETS)
    config = adapter_json(folder)
    config["init_lora_weights"] = init
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(folder)
    assert "\n" not in str(info.value) and repr(init) in str(info.value)


def test_pissa_refused_by_the_ops_command_too(tmp_path):
    """The refusal happens before anything is written."""
    _peft_model("pissa").save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match="pissa"):
        apply_operator("negate", [tmp_path / "a"], tmp_path / "out", params={"lam": 1.0})
    assert not (tmp_path / "out").exists()


def test_converted_pissa_negates_exactly(tmp_path):
    """PEFT's conversion gives a plain LoRA: negating it gives ``W − Δ`` for the trained ``Δ``.

    Untrained, Δ = 0 and the negation loads as the base itself (read as s·BA, the
    unconverted adapter loaded ~0.1 away from it).
    """
    for trained in (False, True):
        root = tmp_path / f"trained={trained}"
        peft_model = _peft_model("pissa")
        peft_model.save_pretrained(root / "init")
        if trained:
            _train(peft_model)
        peft_model.save_pretrained(
            root / "pissa", path_initial_model_for_weight_conversion=str(root / "init")
        )
        assert adapter_json(root / "pissa")["init_lora_weights"] is True
        effective = _merged(peft_model)  # the trained model: residual base + s·BA
        base = _base()
        out = apply_operator("negate", [root / "pissa"], root / "neg", params={"lam": 1.0})
        got = _loaded(out)
        assert adapter_json(out)["init_lora_weights"] is True
        moved = 0.0
        for name, w in base.items():
            expected = w - (effective[name] - w)
            torch.testing.assert_close(got[name], expected, atol=2e-5, rtol=0, msg=name)
            moved = max(moved, (effective[name] - w).abs().max().item())
        assert (moved > 1e-3) == trained  # the training really moved the weights


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "mica", "eva"])
def test_plain_inits_are_read_and_results_are_plain_lora(tmp_path, init):
    """Inits that leave the base alone (MiCA: A0 = 0) are read as s·BA; the result says
    ``init_lora_weights: true``, so PEFT reruns no init (MiCA's SVD, EVA's zero B…)."""
    kwargs = {}
    if init == "eva":
        from peft import EvaConfig

        kwargs["eva_config"] = EvaConfig()
    peft_model = _peft_model(init, **kwargs)
    _train(peft_model)
    peft_model.save_pretrained(tmp_path / "a")
    assert adapter_json(tmp_path / "a")["init_lora_weights"] == init
    effective, base = _merged(_peft_model_loaded(tmp_path / "a")), _base()
    for op, params, sign in (("negate", {"lam": 1.0}, -1.0), ("scale", {"weight": 2.0}, 2.0)):
        out = apply_operator(op, [tmp_path / "a"], tmp_path / op, params=params)
        config = adapter_json(out)
        assert config["init_lora_weights"] is True
        assert config.get("eva_config") is None
        got = _loaded(out)
        for name, w in base.items():
            expected = w + sign * (effective[name] - w)
            torch.testing.assert_close(got[name], expected, atol=2e-5, rtol=0, msg=name)


def _peft_model_loaded(folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_llama(), folder)


def test_lora_on_fused_expert_parameters_is_refused(tmp_path):
    """PEFT's target_parameters on a fused MoE tensor keeps one rank-r block per expert in
    lora_A (r·experts, in) / lora_B (out, r·experts): B·A would sum the experts' deltas."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, head_dim=8, layer_types=["full_attention"],
    )  # fmt: skip
    lora = LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    get_peft_model(GptOssForCausalLM(config), lora).save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match="target_parameters") as info:
        load_adapter(tmp_path / "a")
    assert "\n" not in str(info.value)
