"""Operators on full fine-tunes (excise/pem/full.py): exact, streamed, safe on bad input.

Expected values come from an independent in-memory computation on whole state dicts:
``ext_sub_rows_reference`` (the published per-row algorithm) for Ext-Sub and
composition, plain task-vector arithmetic for the rest.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from excise.errors import ConfigError, ExciseError, ExciseWarning, ModelLoadError
from excise.pem import full
from excise.pem.full import apply_full
from excise.pem.io import PROVENANCE_FILE
from excise.pem.linalg import ext_sub_rows_reference
from tests.conftest import tiny_llama_config

# ----------------------------------------------------------------------------- helpers


def _reference(op: str, base: dict, fts: list[dict], params: dict) -> dict[str, torch.Tensor]:
    """``θ_base + op(τ_1, …)`` on whole state dicts, in float64, cast to the base's dtypes."""
    out = {}
    for name, t0 in base.items():
        if not t0.is_floating_point():
            out[name] = t0
            continue
        n_rows = t0.shape[0] if t0.ndim >= 2 else 1
        rows0 = t0.double().reshape(n_rows, -1).numpy()  # (rows, dim)
        taus = [ft[name].double().reshape(n_rows, -1).numpy() - rows0 for ft in fts]
        if op == "ext_sub":
            tau = ext_sub_rows_reference(taus[0], taus[1], params.get("lam", 1.0))
        elif op == "compose":
            lams = params.get("lams", 1.0)
            lams = [lams] * (len(taus) - 1) if isinstance(lams, float) else lams
            tau = taus[0].copy()
            for anti, lam in zip(taus[1:], lams, strict=True):
                if params.get("sequential", False):
                    tau = ext_sub_rows_reference(tau, anti, lam)
                else:
                    tau += ext_sub_rows_reference(taus[0], anti, lam) - taus[0]  # −λ_k d_k
        elif op == "subtract":
            tau = taus[0] - params.get("lam", 1.0) * taus[1]
        elif op == "add":
            tau = taus[0] + params.get("weight", 1.0) * taus[1]
        elif op == "scale":
            tau = params["weight"] * taus[0]
        else:
            assert op == "negate"
            tau = -params.get("lam", 1.0) * taus[0]
        out[name] = torch.from_numpy(rows0 + tau).reshape(t0.shape).to(t0.dtype)
    return out


def _load(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder, whole (tests only)."""
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _write(folder: Path, state: dict[str, torch.Tensor], n_shards: int = 1) -> Path:
    """Write ``state`` as ``model.safetensors`` or as ``n_shards`` shards with an index."""
    folder.mkdir(parents=True)
    names = sorted(state)
    if n_shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in names[i::n_shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def _finetune(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return ft


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


# ----------------------------------------------------------------------------- tiny Llama zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes, sharded and single-file, fp32 and bf16.

    Rows with degenerate task vectors are planted: an expert row equal to the base
    (τ1_i = 0), an anti-expert row equal to the base (τ2_i = 0) and an anti-expert
    row antiparallel to the expert's.
    """
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    expert, anti, anti2 = (_finetune(base, seed) for seed in (1, 2, 3))
    with torch.no_grad():
        q0 = base.model.layers[0].self_attn.q_proj.weight
        expert.model.layers[0].self_attn.q_proj.weight[0] = q0[0]
        anti.model.layers[0].self_attn.q_proj.weight[1] = q0[1]
        tau1 = expert.model.layers[0].self_attn.q_proj.weight[2] - q0[2]
        anti.model.layers[0].self_attn.q_proj.weight[2] = q0[2] - 0.5 * tau1
    paths = {}
    for name, model in {"base": base, "expert": expert, "anti": anti, "anti2": anti2}.items():
        model.save_pretrained(root / name, max_shard_size="100KB")  # 3–4 shards
        model.save_pretrained(root / f"{name}_single")
        model.to(torch.bfloat16).save_pretrained(root / f"{name}_bf16", max_shard_size="100KB")
        paths.update({name: root / name, f"{name}_single": root / f"{name}_single"})
        paths[f"{name}_bf16"] = root / f"{name}_bf16"
    (root / "expert" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (root / "expert" / "chat_template.jinja").write_text("{{ messages }}")
    (root / "expert" / "README.md").write_text("# the expert")

    torch.manual_seed(0)
    tied_config = tiny_llama_config()
    tied_config.tie_word_embeddings = True
    tied = LlamaForCausalLM(tied_config).eval()
    for name, model in {
        "tied": tied,
        "tied_expert": _finetune(tied, 4),
        "tied_anti": _finetune(tied, 5),
    }.items():
        model.save_pretrained(root / name, max_shard_size="100KB")
        paths[name] = root / name
    return paths


_MODELS = {
    "ext_sub": ["expert", "anti"],
    "compose": ["expert", "anti", "anti2"],
    "subtract": ["expert", "anti"],
    "add": ["expert", "anti"],
    "scale": ["expert"],
    "negate": ["expert"],
}
_CASES = [
    ("ext_sub", {"lam": 1.0}),
    ("ext_sub", {"lam": 2.5}),
    ("compose", {"lams": [1.0, 0.5]}),
    ("compose", {"lams": [1.0, 0.5], "sequential": True}),
    ("subtract", {"lam": 0.7}),
    ("add", {"weight": 0.3}),
    ("scale", {"weight": -0.5}),
    ("negate", {"lam": 1.5}),
]


@pytest.mark.parametrize(("op", "params"), _CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(_CASES)])
def test_equals_in_memory_reference(zoo, tmp_path, op, params):
    models = [zoo[m] for m in _MODELS[op]]
    out = apply_full(op, zoo["base"], models, tmp_path / "out", params=params, progress=False)
    got = _load(out)
    expected = _reference(op, _load(zoo["base"]), [_load(m) for m in models], params)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_degenerate_rows(zoo, tmp_path):
    """τ1_i = 0 and τ2_i = 0 remove nothing; an antiparallel τ2_i is removed whole."""
    out = apply_full(
        "ext_sub", zoo["base"], [zoo["expert"], zoo["anti"]], tmp_path / "o", params={"lam": 1.0}
    )
    key = "model.layers.0.self_attn.q_proj.weight"
    got, base = _load(out)[key].double(), _load(zoo["base"])[key].double()
    tau1 = _load(zoo["expert"])[key].double() - base
    tau2 = _load(zoo["anti"])[key].double() - base
    torch.testing.assert_close(got[0], base[0], atol=1e-7, rtol=0)
    torch.testing.assert_close(got[1], base[1] + tau1[1], atol=1e-7, rtol=0)
    torch.testing.assert_close(got[2], base[2] + tau1[2] - tau2[2], atol=1e-6, rtol=0)
    assert torch.isfinite(got).all()


def test_output_layout_files_and_provenance(zoo, tmp_path):
    out = apply_full(
        "ext_sub", zoo["base"], [zoo["expert"], zoo["anti_single"]], tmp_path / "o", progress=False
    )
    base_index = json.loads((zoo["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index  # the base's shard layout, shard by shard
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _load(out).values())
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert "README.md" not in names  # it describes the expert, not the result
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["operation"] == "ext_sub" and provenance["params"] == {"lam": 1.0}
    assert [i["role"] for i in provenance["inputs"]] == ["expert", "anti-expert"]
    assert provenance["inputs"][1]["hashed"] == "model.safetensors"
    assert len(provenance["base"]["sha256"]) == 64


def test_loads_with_transformers(zoo, tmp_path):
    from transformers import LlamaForCausalLM

    models = [zoo["expert"], zoo["anti"]]
    out = apply_full("ext_sub", zoo["base"], models, tmp_path / "o", params={"lam": 1.0}, progress=False)
    model = LlamaForCausalLM.from_pretrained(out).eval()
    expected = _reference("ext_sub", _load(zoo["base"]), [_load(m) for m in models], {"lam": 1.0})
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_single_file_inputs_give_single_file_output(zoo, tmp_path):
    models = [zoo["expert_single"], zoo["anti"]]
    out = apply_full(
        "subtract", zoo["base_single"], models, tmp_path / "o", params={"lam": 1.0}, progress=False
    )
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    sharded = apply_full("subtract", zoo["base"], models, tmp_path / "s", params={"lam": 1.0}, progress=False)
    got, again = _load(out), _load(sharded)
    assert all(torch.equal(got[k], again[k]) for k in got)


def test_bf16_stays_bf16(zoo, tmp_path):
    models = [zoo["expert_bf16"], zoo["anti_bf16"]]
    out = apply_full("ext_sub", zoo["base_bf16"], models, tmp_path / "o", params={"lam": 1.0}, progress=False)
    got = _load(out)
    expected = _reference("ext_sub", _load(zoo["base_bf16"]), [_load(m) for m in models], {"lam": 1.0})
    for name, value in expected.items():
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name], value, msg=name)  # bf16 tolerances


def test_tied_embeddings(zoo, tmp_path):
    from transformers import LlamaForCausalLM

    assert "lm_head.weight" not in _load(zoo["tied"])
    models = [zoo["tied_expert"], zoo["tied_anti"]]
    out = apply_full("ext_sub", zoo["tied"], models, tmp_path / "o", params={"lam": 1.0}, progress=False)
    expected = _reference("ext_sub", _load(zoo["tied"]), [_load(m) for m in models], {"lam": 1.0})
    model = LlamaForCausalLM.from_pretrained(out)
    emb = expected["model.embed_tokens.weight"]
    torch.testing.assert_close(model.lm_head.weight.detach(), emb, atol=1e-6, rtol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_row_blocks_change_nothing(zoo, tmp_path):
    """Every operator is row-local: tiny row blocks give the same bytes as whole tensors."""
    models = [zoo["expert"], zoo["anti"], zoo["anti2"]]
    whole = apply_full("compose", zoo["base"], models, tmp_path / "whole", progress=False)
    with mock.patch.object(full, "_BLOCK_ELEMENTS", 100):
        blocks = apply_full("compose", zoo["base"], models, tmp_path / "blocks", progress=False)
    a, b = _load(whole), _load(blocks)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_bin_shards(zoo, tmp_path, legacy):
    """``pytorch_model.bin`` (single and sharded) reads like safetensors."""
    base, expert = _load(zoo["base"]), _load(zoo["expert"])
    (tmp_path / "base").mkdir()
    torch.save(base, tmp_path / "base" / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    (tmp_path / "expert").mkdir()
    names = sorted(expert)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: expert[k] for k in part}, tmp_path / "expert" / file)
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "expert" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    models = [tmp_path / "expert", zoo["anti"]]
    out = apply_full(
        "ext_sub", tmp_path / "base", models, tmp_path / "o", params={"lam": 1.0}, progress=False
    )
    assert (out / "model.safetensors").is_file()
    expected = _reference("ext_sub", base, [expert, _load(zoo["anti"])], {"lam": 1.0})
    got = _load(out)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_overwrite(zoo, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="overwrite"):
        apply_full("negate", zoo["base"], [zoo["expert"]], out, progress=False)
    assert (out / "old.txt").exists()
    apply_full("negate", zoo["base"], [zoo["expert"]], out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_pem_stays_light():
    """Importing the full-model path loads neither transformers, peft nor torch."""
    code = "import sys, excise.pem.full; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- bad input


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _resave(folder: Path, edit) -> Path:
    """Load ``folder``'s single ``model.safetensors``, apply ``edit`` and write it back."""
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _bad_inputs(zoo: dict[str, Path], tmp: Path) -> dict[str, tuple]:
    """case → (error class, match, operation, base, models, params); built lazily per case."""
    from transformers import LlamaForCausalLM

    def no_weights():
        (tmp / "empty").mkdir()
        (tmp / "empty" / "config.json").write_text("{}")
        return (
            ModelLoadError,
            r"no model\.safetensors.*pytorch_model\.bin",
            "negate",
            tmp / "empty",
            [zoo["expert"]],
        )

    def adapter():
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_config.json").write_text("{}")
        return ModelLoadError, "PEFT adapter", "negate", zoo["base"], [tmp / "adapter"]

    def corrupt_shard():
        bad = _copy_model(zoo["expert"], tmp / "bad")
        next(bad.glob("model-*.safetensors")).write_bytes(b"not a safetensors file at all")
        return ModelLoadError, "corrupt", "negate", zoo["base"], [bad]

    def truncated():
        bad = _copy_model(zoo["anti_single"], tmp / "bad")
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
        return ModelLoadError, "corrupt", "ext_sub", zoo["base"], [zoo["expert"], bad]

    def missing_shard():
        bad = _copy_model(zoo["expert"], tmp / "bad")
        next(bad.glob("model-*.safetensors")).unlink()
        return ModelLoadError, "shard .* is missing", "negate", zoo["base"], [bad]

    def bad_index():
        bad = _copy_model(zoo["expert"], tmp / "bad")
        (bad / "model.safetensors.index.json").write_text("{not json")
        return ModelLoadError, "shard index", "negate", zoo["base"], [bad]

    def missing_tensor():
        bad = _resave(_copy_model(zoo["expert_single"], tmp / "bad"), lambda s: s.pop("model.norm.weight"))
        return ModelLoadError, "model.norm.weight .* missing", "negate", zoo["base"], [bad]

    def extra_tensor():
        bad = _resave(_copy_model(zoo["expert_single"], tmp / "bad"), lambda s: s.update(extra=torch.ones(3)))
        return ModelLoadError, "lacks", "negate", zoo["base"], [bad]

    def shape_mismatch():
        config = tiny_llama_config()
        config.intermediate_size = 80
        LlamaForCausalLM(config).save_pretrained(tmp / "other")
        return (
            ModelLoadError,
            "different base|another base",
            "ext_sub",
            zoo["base"],
            [zoo["expert"], tmp / "other"],
        )

    def nan_in_finetune():
        bad = _copy_model(zoo["anti_single"], tmp / "bad")
        _resave(bad, lambda s: s["model.layers.1.mlp.up_proj.weight"].__setitem__((3, 4), float("nan")))
        return ModelLoadError, "NaN or Inf", "ext_sub", zoo["base"], [zoo["expert"], bad]

    def inf_in_base():
        bad = _copy_model(zoo["base_single"], tmp / "bad")
        _resave(bad, lambda s: s["model.norm.weight"].__setitem__(0, float("inf")))
        return ModelLoadError, "base contains NaN or Inf", "negate", bad, [zoo["expert"]]

    def float8():
        bad = _copy_model(zoo["expert_single"], tmp / "bad")
        _resave(
            bad, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.float8_e4m3fn)})
        )
        return ModelLoadError, "F8_E4M3", "negate", zoo["base"], [bad]

    return {
        "missing folder": lambda: (ModelLoadError, "not found", "negate", tmp / "nope", [zoo["expert"]]),
        "file not folder": lambda: (
            ModelLoadError,
            "is a file",
            "negate",
            zoo["base_single"] / "model.safetensors",
            [zoo["expert"]],
        ),
        "no weights": no_weights,
        "adapter folder": adapter,
        "corrupt shard": corrupt_shard,
        "truncated file": truncated,
        "missing shard": missing_shard,
        "bad index": bad_index,
        "missing tensor": missing_tensor,
        "extra tensor": extra_tensor,
        "shape mismatch": shape_mismatch,
        "nan in fine-tune": nan_in_finetune,
        "inf in base": inf_in_base,
        "float8": float8,
        "too few models": lambda: (ConfigError, "needs 2", "ext_sub", zoo["base"], [zoo["expert"]]),
        "too many models": lambda: (
            ConfigError,
            "needs 1",
            "negate",
            zoo["base"],
            [zoo["expert"], zoo["anti"]],
        ),
        "compose alone": lambda: (ConfigError, "at least 2", "compose", zoo["base"], [zoo["expert"]]),
        "unknown operator": lambda: (ConfigError, "unknown operator", "ties", zoo["base"], [zoo["expert"]]),
    }


_BAD_CASES = [
    "missing folder",
    "file not folder",
    "no weights",
    "adapter folder",
    "corrupt shard",
    "truncated file",
    "missing shard",
    "bad index",
    "missing tensor",
    "extra tensor",
    "shape mismatch",
    "nan in fine-tune",
    "inf in base",
    "float8",
    "too few models",
    "too many models",
    "compose alone",
    "unknown operator",
]


@pytest.mark.parametrize("case", _BAD_CASES)
def test_bad_input(zoo, tmp_path, case):
    error, match, op, base, models = _bad_inputs(zoo, tmp_path)[case]()
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as info:
        apply_full(op, base, models, out, progress=False)
    assert "\n" not in str(info.value)
    _assert_nothing_left(out)


@pytest.mark.parametrize(
    ("op", "params", "match"),
    [
        ("ext_sub", {"lam": float("nan")}, "finite"),
        ("ext_sub", {"lam": "1"}, "number"),
        ("ext_sub", {"weight": 1.0}, "unknown parameter"),
        ("compose", {"lams": [1.0, 2.0, 3.0]}, "one per anti-expert"),
        ("compose", {"sequential": "yes"}, "true or false"),
        ("scale", {}, "needs the parameter weight"),
    ],
)
def test_bad_params(zoo, tmp_path, op, params, match):
    models = [zoo[m] for m in _MODELS[op]]
    with pytest.raises(ConfigError, match=match):
        apply_full(op, zoo["base"], models, tmp_path / "out", params=params, progress=False)
    _assert_nothing_left(tmp_path / "out")


def test_output_is_an_input(zoo, tmp_path):
    base = _copy_model(zoo["base"], tmp_path / "base")
    with pytest.raises(ConfigError, match="one of the input"):
        apply_full("negate", base, [zoo["expert"]], base, overwrite=True, progress=False)
    assert (base / "model.safetensors.index.json").exists()


def test_fp16_overflow(tmp_path):
    base = _write(tmp_path / "base", {"w": torch.zeros(2, 3, dtype=torch.float16)})
    ft = _write(tmp_path / "ft", {"w": torch.full((2, 3), 60000.0, dtype=torch.float16)})
    with pytest.raises(ConfigError, match="overflows float16"):
        apply_full("negate", base, [ft], tmp_path / "out", params={"lam": 2.0}, progress=False)
    _assert_nothing_left(tmp_path / "out")


def test_errors_are_excise_errors():
    assert issubclass(ModelLoadError, ExciseError) and issubclass(ConfigError, ExciseError)


# ----------------------------------------------------------------------------- property


_shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=_shapes,
    op_params=st.sampled_from(_CASES),
    lam=st.floats(-3, 3),
    n_shards=st.integers(1, 3),
    block=st.sampled_from([1, 3, 1 << 22]),
    seed=st.integers(0, 2**16),
)
def test_random_models_match_reference(shapes, op_params, lam, n_shards, block, seed):
    """Any shapes (0-D to 3-D), shard counts and row blocks: equal to the reference.

    Integer buffers are copied from the base; zero task-vector rows appear by chance.
    """
    op, params = op_params
    params = {k: (lam if k in ("lam", "weight") else v) for k, v in params.items()}
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)}
    base["step"] = torch.arange(3)
    fts = []
    for _ in _MODELS[op]:
        # Some tensors unchanged (zero task vectors); the integer buffer differs but is ignored.
        ft = {
            k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) * (seed % 3 + i)
            for i, (k, v) in enumerate(base.items())
            if v.is_floating_point()
        }
        ft["step"] = torch.arange(3) + 7
        fts.append(ft)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_dir = _write(root / "base", base, min(n_shards, len(base)))
        ft_dirs = [_write(root / f"ft{i}", ft, 1 + i % 2) for i, ft in enumerate(fts)]
        with mock.patch.object(full, "_BLOCK_ELEMENTS", block):
            out = apply_full(op, base_dir, ft_dirs, root / "out", params=params, progress=False)
        got = _load(out)
    expected = _reference(op, base, fts, params)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=1e-9, atol=1e-9, err_msg=name)


# ----------------------------------------------------------------------------- dtypes


def test_bf16_base_with_fp32_finetunes_writes_fp32(zoo, tmp_path):
    """The widest input dtype by default: fp32 fine-tunes of a bf16 base keep every edit."""
    base = _load(zoo["base_bf16"])
    models = [zoo["expert"], zoo["anti"]]
    out = apply_full("ext_sub", zoo["base_bf16"], models, tmp_path / "o", params={"lam": 1.0}, progress=False)
    got = _load(out)
    expected = _reference("ext_sub", {k: v.double() for k, v in base.items()}, [_load(m) for m in models], {})
    for name, value in expected.items():
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], value.float(), atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", ["float64", "bf16"])
def test_requested_dtype(zoo, tmp_path, dtype):
    """--dtype is honoured; a narrower one warns with the share of edits it rounds away."""
    models = [zoo["expert"], zoo["anti"]]
    params = {"lam": 1.0}
    if dtype == "bf16":
        with pytest.warns(ExciseWarning, match=r"writing in bfloat16 rounds \d+ of \d+ changed weights"):
            out = apply_full("ext_sub", zoo["base"], models, tmp_path / "o", params=params, dtype=dtype)
    else:
        out = apply_full("ext_sub", zoo["base"], models, tmp_path / "o", params=params, dtype=dtype)
    expected = _reference("ext_sub", _load(zoo["base"]), [_load(m) for m in models], params)
    torch_dtype = {"float64": torch.float64, "bf16": torch.bfloat16}[dtype]
    got = _load(out)
    for name, value in expected.items():
        assert got[name].dtype == torch_dtype
        torch.testing.assert_close(got[name].float(), value.to(torch_dtype).float(), msg=name)
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        apply_full("ext_sub", zoo["base"], models, tmp_path / "x", dtype="int8")


# ----------------------------------------------------------------------------- rows are output neurons


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_rows_match_the_lora_path(tmp_path):
    """GPT-2 stores Conv1D weights (in, out). Ext-Sub on full fine-tunes made by merging two
    LoRAs equals the LoRA path's Ext-Sub of those LoRAs, merged by PEFT: both work on output
    neurons (PEFT's ``fan_in_fan_out``)."""
    from peft import PeftModel

    from excise.pem.apply import apply_operator
    from tests.conftest import ext_sub_rows_numpy, write_peft_lora

    targets = ["c_attn", "c_proj", "c_fc"]
    _gpt2().save_pretrained(tmp_path / "base")
    adapters, fts = [], []
    for seed in (1, 2):
        adapter = write_peft_lora(
            tmp_path / f"lora{seed}", _gpt2(), seed=seed, r=4, lora_alpha=8, target_modules=targets,
            fan_in_fan_out=True,
        )  # fmt: skip
        PeftModel.from_pretrained(_gpt2(), adapter).merge_and_unload().save_pretrained(tmp_path / f"ft{seed}")
        adapters.append(adapter)
        fts.append(tmp_path / f"ft{seed}")
    lam = 0.8
    out = apply_full(
        "ext_sub", tmp_path / "base", fts, tmp_path / "full", params={"lam": lam}, progress=False
    )
    lora = apply_operator("ext_sub", adapters, tmp_path / "lora", params={"lam": lam})
    merged = PeftModel.from_pretrained(_gpt2(), lora).merge_and_unload().state_dict()
    got, base = _load(out), _load(tmp_path / "base")
    assert got.keys() == base.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, merged[name], atol=2e-6, rtol=1e-5, msg=name)
    # And against DESIGN.md §1's rows written out, on the transposed weight.
    name = "transformer.h.1.attn.c_attn.weight"
    t0 = base[name].double().numpy()  # (in, out)
    tau1, tau2 = (_load(ft)[name].double().numpy() - t0 for ft in fts)
    expected = t0 + ext_sub_rows_numpy(tau1.T, tau2.T, lam).T
    np.testing.assert_allclose(got[name].double().numpy(), expected, atol=2e-6, rtol=1e-5)


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, head_dim=8, layer_types=["full_attention"],
    )  # fmt: skip
    return GptOssForCausalLM(config).eval()


def test_fused_moe_experts_are_rows_per_expert(tmp_path):
    """GPT-OSS stores its experts fused and transposed, (experts, in, out): each expert's
    output neurons are the rows, as if each expert were an nn.Linear."""
    from tests.conftest import ext_sub_rows_numpy

    base = _gpt_oss()
    base.save_pretrained(tmp_path / "base")
    fts = []
    for seed in (1, 2):
        _finetune(base, seed).save_pretrained(tmp_path / f"ft{seed}")
        fts.append(tmp_path / f"ft{seed}")
    out = apply_full("ext_sub", tmp_path / "base", fts, tmp_path / "o", params={"lam": 1.0}, progress=False)
    got, theta0 = _load(out), _load(tmp_path / "base")
    thetas = [_load(ft) for ft in fts]
    fused = 0
    for name, t0 in theta0.items():
        t0 = t0.double().numpy()
        tau1, tau2 = (t[name].double().numpy() - t0 for t in thetas)
        if t0.ndim == 3:  # (experts, in, out)
            fused += 1
            expected = t0 + np.stack(
                [ext_sub_rows_numpy(a.T, b.T, 1.0).T for a, b in zip(tau1, tau2, strict=True)]
            )
        else:
            n_rows = t0.shape[0] if t0.ndim >= 2 else 1
            shape = (n_rows, -1)
            expected = t0 + ext_sub_rows_numpy(tau1.reshape(shape), tau2.reshape(shape), 1.0).reshape(
                t0.shape
            )
        np.testing.assert_allclose(got[name].double().numpy(), expected, atol=1e-6, rtol=1e-5, err_msg=name)
    assert fused == 2  # gate_up_proj and down_proj


def test_fused_experts_in_the_default_layout_and_without_config(tmp_path):
    """(experts, out, in), transformers' default; without config.json the layout is unknown."""
    from tests.conftest import ext_sub_rows_numpy

    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.experts.down_proj"
    states = [{name: torch.randn(3, 5, 7, generator=g, dtype=torch.float64)} for _ in range(3)]
    folders = [_write(tmp_path / role, s) for role, s in zip(("base", "ft1", "ft2"), states, strict=True)]
    (folders[0] / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    out = apply_full("ext_sub", folders[0], folders[1:], tmp_path / "o", params={"lam": 1.0}, progress=False)
    t0 = states[0][name].numpy()
    tau1, tau2 = (s[name].numpy() - t0 for s in states[1:])
    expected = t0 + np.stack([ext_sub_rows_numpy(a, b, 1.0) for a, b in zip(tau1, tau2, strict=True)])
    np.testing.assert_allclose(_load(out)[name].numpy(), expected, atol=1e-12, rtol=1e-12)

    (folders[0] / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"fused MoE experts.*config\.json") as info:
        apply_full("ext_sub", folders[0], folders[1:], tmp_path / "o2", progress=False)
    assert "\n" not in str(info.value)
    _assert_nothing_left(tmp_path / "o2")


# ----------------------------------------------------------------------------- integer tensors


def test_quantised_integer_tensor_that_differs_is_refused(tmp_path):
    """A uint8 tensor (e.g. MXFP4 blocks) edited by the fine-tune cannot be copied from the base."""
    base = {"w": torch.randn(4, 3, dtype=torch.float32), "blocks": torch.arange(12, dtype=torch.uint8)}
    ft = {"w": base["w"] + 1.0, "blocks": base["blocks"] + 1}
    base_dir, ft_dir = _write(tmp_path / "base", base, 1), _write(tmp_path / "ft", ft, 1)
    with pytest.raises(ModelLoadError, match=r"tensor blocks \(uint8\) differs .* dequantise"):
        apply_full("negate", base_dir, [ft_dir], tmp_path / "out", params={"lam": 1.0}, progress=False)
    assert not (tmp_path / "out").exists()


def test_equal_quantised_and_int64_buffers_are_copied(tmp_path):
    """Equal narrow integer tensors and differing int64 counters are taken from the base."""
    base = {
        "w": torch.randn(4, 3, dtype=torch.float32),
        "blocks": torch.arange(12, dtype=torch.uint8),
        "step": torch.arange(3),
    }
    ft = {"w": base["w"] + 1.0, "blocks": base["blocks"].clone(), "step": base["step"] + 5}
    base_dir, ft_dir = _write(tmp_path / "base", base, 1), _write(tmp_path / "ft", ft, 1)
    got = _load(apply_full("negate", base_dir, [ft_dir], tmp_path / "o", params={"lam": 1.0}, progress=False))
    assert torch.equal(got["blocks"], base["blocks"]) and torch.equal(got["step"], base["step"])
    torch.testing.assert_close(got["w"], base["w"] - 1.0)
