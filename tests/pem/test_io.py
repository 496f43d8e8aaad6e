"""Adapter folders in and out: PEFT round trips and every bad input of the issue."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from excise.errors import AdapterError, ConfigError
from excise.pem import io as pem_io
from excise.pem.io import load_adapter, save_adapter
from excise.pem.linalg import ext_sub_rows_reference
from excise.pem.ops import ext_sub
from tests.conftest import adapter_json, tiny_llama_config, write_peft_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def _peft_deltas(folder: Path) -> dict[str, np.ndarray]:
    """Each LoRA layer's delta as PEFT itself computes it after loading ``folder``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(_llama(), folder)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name] = module.get_delta_weight("default").detach().double().numpy()
    return out


@pytest.fixture
def lora_pair(tmp_path):
    expert = write_peft_lora(
        tmp_path / "expert",
        _llama(),
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    anti = write_peft_lora(
        tmp_path / "anti", _llama(), seed=2, r=6, lora_alpha=4, target_modules=TARGETS, use_rslora=True
    )
    return expert, anti


def test_effective_scale_matches_peft(lora_pair):
    for folder in lora_pair:
        ours = load_adapter(folder)
        theirs = _peft_deltas(folder)
        assert set(ours.modules) == set(theirs)
        for name, delta in theirs.items():
            np.testing.assert_allclose(ours.modules[name].dense(), delta, rtol=1e-5, atol=1e-6)


def test_ext_sub_round_trip_through_peft(lora_pair, tmp_path):
    expert, anti = (load_adapter(f) for f in lora_pair)
    out = save_adapter(ext_sub(expert, anti, lam=0.8), tmp_path / "out")
    config = adapter_json(out)
    assert config["r"] == 10 and config["rank_pattern"] and not config["use_rslora"]
    theirs = _peft_deltas(out)
    expected = {
        name: ext_sub_rows_reference(expert.modules[name].dense(), anti.modules[name].dense(), 0.8)
        for name in expert.modules
    }
    assert set(theirs) == set(expected)
    for name in expected:
        np.testing.assert_allclose(theirs[name], expected[name], rtol=1e-4, atol=1e-5)
    # Forward pass with our adapter equals the forward pass with the dense delta merged by hand.
    from peft import PeftModel

    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ours = PeftModel.from_pretrained(_llama(), out).eval()(x).logits
        by_hand = _llama()
        modules = dict(by_hand.named_modules())
        for name, W in expected.items():
            modules[name].weight += torch.from_numpy(W).float()
        reference = by_hand(x).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    provenance = json.loads((out / "excise.json").read_text())
    assert provenance["operation"] == "ext_sub" and provenance["params"] == {"lam": 0.8}
    assert [i["path"] for i in provenance["inputs"]] == [str(p.resolve()) for p in lora_pair]
    with safe_open(str(out / "adapter_model.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["excise"])["operation"] == "ext_sub"


def test_ia3_round_trip_through_peft(tmp_path):
    from peft import IA3Config, PeftModel, get_peft_model

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        )
        model = get_peft_model(_llama(), config)
        folders.append(tmp_path / f"ia3_{seed}")
        model.save_pretrained(folders[-1])
    expert, anti = (load_adapter(f) for f in folders)
    assert expert.peft_type == "IA3"
    out = save_adapter(ext_sub(expert, anti, lam=0.5), tmp_path / "out")
    loaded = PeftModel.from_pretrained(_llama(), out)
    checked = 0
    for name, module in loaded.base_model.model.named_modules():
        if hasattr(module, "ia3_l") and "default" in module.ia3_l:
            v1, v2 = (a.modules[name].rows for a in (expert, anti))  # l − 1, one row per module
            expected = 1.0 + ext_sub_rows_reference(v1, v2, 0.5).reshape(module.ia3_l["default"].shape)
            np.testing.assert_allclose(module.ia3_l["default"].detach().double().numpy(), expected, atol=1e-6)
            checked += 1
    assert checked == 6
    assert adapter_json(out)["feedforward_modules"] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_prefix_tuning_round_trip_through_peft(tmp_path):
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(_llama(), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
        folders.append(tmp_path / f"prefix_{seed}")
        model.save_pretrained(folders[-1])
    expert, anti = (load_adapter(f) for f in folders)
    config = adapter_json(folders[0])
    head_dim = config["token_dim"] // config["num_attention_heads"]
    assert expert.modules["prompt_embeddings"].rows.shape[1] == head_dim
    out = save_adapter(ext_sub(expert, anti, lam=1.0), tmp_path / "out")
    loaded = PeftModel.from_pretrained(_llama(), out)
    weight = loaded.prompt_encoder["default"].embedding.weight.detach().double().numpy()
    e = load_file(folders[0] / "adapter_model.safetensors")["prompt_embeddings"].double().numpy()
    a = load_file(folders[1] / "adapter_model.safetensors")["prompt_embeddings"].double().numpy()
    expected = ext_sub_rows_reference(e.reshape(-1, head_dim), a.reshape(-1, head_dim), 1.0).reshape(e.shape)
    np.testing.assert_allclose(weight, expected, atol=1e-6)


def test_bf16_adapter_is_read_and_written_as_bf16(lora_pair, tmp_path):
    src = lora_pair[0]
    bf = tmp_path / "bf16"
    bf.mkdir()
    (bf / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    state = {k: v.bfloat16() for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(state, bf / "adapter_model.safetensors")
    adapter = load_adapter(bf)
    assert adapter.dtype == "bfloat16"
    out = save_adapter(ext_sub(adapter, adapter, lam=1.0), tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "adapter_model.safetensors").values())


def test_legacy_bin_is_loaded_safely(lora_pair, tmp_path):
    src = lora_pair[0]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    torch.save(load_file(src / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    a, b = load_adapter(legacy), load_adapter(src)
    for name in a.modules:
        np.testing.assert_allclose(a.modules[name].dense(), b.modules[name].dense())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_bin_is_refused(lora_pair, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((lora_pair[0] / "adapter_config.json").read_text())
    torch.save({"x": _Exploit()}, evil / "adapter_model.bin")
    with pytest.raises(AdapterError, match="unsafe"):
        load_adapter(evil)


# ----------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: None, None),
        (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "corrupt"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(
                (d / "adapter_model.safetensors").read_bytes()[:-50]
            ),
            "corrupt",
        ),
        (lambda d: _edit_config(d, peft_type="LOHA"), "not supported"),
        (lambda d: _edit_config(d, use_dora=True), "DoRA"),
        (lambda d: _edit_config(d, r=3, rank_pattern={}), "says r=3"),
        (
            lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if "q_proj.lora_B" not in k}),
            "no lora_B",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: {**t, next(iter(t)): t[next(iter(t))] * float("nan")}),
            "NaN or Inf",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: {**t, next(iter(t)): t[next(iter(t))] * float("inf")}),
            "NaN or Inf",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: {**t, "base_model.model.lm_head.weight": torch.ones(2, 2)}),
            "not supported",
        ),
    ],
)
def test_bad_adapter_folders(lora_pair, tmp_path, mutate, message):
    folder = _copy(lora_pair[0], tmp_path / "case")
    mutate(folder)
    if message is None:
        load_adapter(folder)
        return
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(folder)
    assert "\n" not in str(info.value)


def _edit_config(folder: Path, **changes) -> None:
    config = adapter_json(folder)
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    file = folder / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        load_adapter(tmp_path / "f")


def test_output_is_atomic(lora_pair, tmp_path, monkeypatch):
    adapter = load_adapter(lora_pair[0])
    out = tmp_path / "out"
    save_adapter(adapter, out)
    with pytest.raises(ConfigError, match="not empty"):
        save_adapter(adapter, out)
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pem_io, "_cast", boom)
    with pytest.raises(RuntimeError):
        save_adapter(adapter, out, overwrite=True)
    with pytest.raises(RuntimeError):
        save_adapter(adapter, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder, no half output
    assert (out / "adapter_model.safetensors").exists()  # the old output survived


def test_provenance_records_operation_inputs_and_checksums(lora_pair, tmp_path):
    import hashlib

    import xxhash

    from excise.pem.apply import apply_operator

    expert, anti = lora_pair
    out = apply_operator("ext-sub", [expert, anti], tmp_path / "out", params={"lam": 0.5})
    record = json.loads((out / pem_io.PROVENANCE_FILE).read_text())
    with safe_open(str(out / "adapter_model.safetensors"), framework="np") as f:
        embedded = json.loads(f.metadata()["excise"])
    assert embedded == record
    assert record["operation"] == "ext_sub"
    assert record["params"] == {"lam": 0.5}
    assert record["allow_partial"] is False
    for entry, folder in zip(record["inputs"], (expert, anti), strict=True):
        weights = folder / "adapter_model.safetensors"
        assert entry["path"] == str(folder.resolve())
        assert entry["xxh3_128"] == xxhash.xxh3_128(weights.read_bytes()).hexdigest()
        assert "sha256" not in entry
    # --sha256 records SHA-256 instead, the checksum load_adapter computes on its own.
    out = apply_operator("ext-sub", [expert, anti], tmp_path / "sha", params={"lam": 0.5}, digest="sha256")
    record = json.loads((out / pem_io.PROVENANCE_FILE).read_text())
    for entry, folder in zip(record["inputs"], (expert, anti), strict=True):
        weights = folder / "adapter_model.safetensors"
        assert entry["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert "xxh3_128" not in entry
    assert load_adapter(expert).source["sha256"] == record["inputs"][0]["sha256"]
    assert load_adapter(expert, checksum=False).source["sha256"] is None
