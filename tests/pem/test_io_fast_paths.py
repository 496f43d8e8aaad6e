"""The fast paths of reading, computing and writing adapters, each checked against a plain twin.

Input folders are written here with ``safetensors`` itself (PEFT's key names and config
fields), so nothing in ``excise`` writes the data it is then checked against, and no
model or PEFT import is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file as load_pt
from safetensors.torch import save_file as save_pt

from excise.errors import AdapterError, ConfigError
from excise.pem import io as pem_io
from excise.pem.apply import apply_operator
from excise.pem.delta import Adapter, LowRankDelta
from excise.pem.io import AdapterWriter, file_sha256, load_adapter, save_adapter
from excise.pem.ops import ext_sub
from excise.pem.ops.base import apply_modulewise, result_dtype
from excise.pem.stream import SafetensorsWriter
from tests.conftest import ext_sub_rows_numpy, random_lora

PREFIX = "base_model.model."
SHAPES = {  # (out, in) of each adapted linear layer
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.self_attn.v_proj": (8, 16),
    "model.layers.0.mlp.down_proj": (16, 40),
    "model.layers.1.self_attn.q_proj": (24, 16),
}


def _write_lora_folder(
    folder: Path,
    *,
    seed: int,
    r: int,
    lora_alpha: float,
    dtype: str = "float32",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    shapes: dict[str, tuple[int, int]] = SHAPES,
) -> Path:
    """A PEFT LoRA folder as ``save_pretrained`` lays it out, written with safetensors directly."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (n_out, n_in) in shapes.items():
        rank = next((v for k, v in (rank_pattern or {}).items() if name.endswith(k)), r)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.from_numpy(
            rng.standard_normal((rank, n_in)).astype(np.float32)
        )
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.from_numpy(
            rng.standard_normal((n_out, rank)).astype(np.float32) * 0.1
        )
    folder.mkdir(parents=True)
    save_pt(
        {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}, folder / "adapter_model.safetensors"
    )
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": "tiny-llama",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "use_rslora": use_rslora,
        "use_dora": False,
        "target_modules": sorted({n.rsplit(".", 1)[1] for n in shapes}),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _pair(root: Path, dtype: str = "float32") -> tuple[Path, Path]:
    expert = _write_lora_folder(
        root / "expert",
        seed=1,
        r=4,
        lora_alpha=8,
        dtype=dtype,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    anti = _write_lora_folder(root / "anti", seed=2, r=6, lora_alpha=4, dtype=dtype, use_rslora=True)
    return expert, anti


@pytest.fixture
def lora_folders(tmp_path) -> tuple[Path, Path]:
    """Expert (rank and alpha patterns) and anti-expert (rsLoRA), float32 on disk."""
    return _pair(tmp_path / "in")


def _f32_lora(seed: int, scales: dict[str, float], ranks: dict[str, int]) -> Adapter:
    """An in-memory LoRA adapter holding float32 factors, as one read from a float32 file."""
    rng = np.random.default_rng(seed)
    modules = {}
    for name, (n_out, n_in) in SHAPES.items():
        B = rng.standard_normal((n_out, ranks[name])).astype(np.float32)
        A = rng.standard_normal((ranks[name], n_in)).astype(np.float32)
        modules[name] = LowRankDelta(B, A, scales[name])
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    return Adapter("LORA", config, modules, {"path": f"mem{seed}"}, "float32")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- bfloat16 bits


def _torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).bfloat16().view(torch.int16).numpy().view(np.uint16)


def _float32_from_bits(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def test_bfloat16_bits_match_torch_everywhere():
    rng = np.random.default_rng(0)
    # Random values over every magnitude float32 has, of both signs.
    magnitudes = 10.0 ** rng.uniform(-45, 38.5, 20_000)
    spread = (rng.choice([-1.0, 1.0], magnitudes.size) * magnitudes).astype(np.float32)
    # Random bit patterns: every exponent, subnormals included (NaNs removed below).
    patterns = _float32_from_bits(rng.integers(0, 2**32, 50_000, dtype=np.uint64))
    # Exact ties (low half 0x8000) with even and odd kept halves, and their neighbours.
    high = rng.integers(0, 0x7F80, 5_000, dtype=np.uint32) << np.uint32(16)
    sign = rng.choice([0, 0x80000000], high.size).astype(np.uint32)
    ties = np.concatenate([high | sign | low for low in (0x7FFF, 0x8000, 0x8001, 0x18000, 0xFFFF, 0)])
    special = np.array(
        [
            0x00000000, 0x80000000,  # ±0
            0x7F800000, 0xFF800000,  # ±inf
            0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x807FFFFF,  # subnormals
            0x00800000, 0x3F808000, 0x3F818000,  # smallest normal; 1 + tie (even), 1 + tie (odd)
            0x7F7FFFFF, 0xFF7FFFFF,  # ±float32 max: round up to ±inf
            0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7EFFFF, 0x7F7E8000,  # near max, ties and not
        ],
        dtype=np.uint32,
    )  # fmt: skip
    values = np.concatenate([spread, patterns, _float32_from_bits(ties), _float32_from_bits(special)])
    values = values[~np.isnan(values)]
    ours = pem_io._bfloat16_bits(values)
    assert ours.dtype == np.uint16 and ours.shape == values.shape
    np.testing.assert_array_equal(ours, _torch_bf16_bits(values))
    # 2-D and non-contiguous inputs give the same bits.
    grid = spread[:1000].reshape(20, 50)
    np.testing.assert_array_equal(pem_io._bfloat16_bits(grid[:, ::3]), _torch_bf16_bits(grid[:, ::3]))
    np.testing.assert_array_equal(pem_io._bfloat16_bits(grid.T), _torch_bf16_bits(grid.T))


def test_bfloat16_bits_of_nan_are_nan():
    nans = _float32_from_bits(
        np.array(
            [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF], np.uint32
        )
    )
    assert np.isnan(nans).all()
    bits = pem_io._bfloat16_bits(np.concatenate([nans, np.float32([1.0])]))
    exponent_all_ones = (bits & 0x7F80) == 0x7F80
    mantissa_nonzero = (bits & 0x007F) != 0
    assert (exponent_all_ones & mantissa_nonzero)[:-1].all()  # every NaN stays a NaN
    assert bits[-1] == 0x3F80  # and its neighbour is untouched
    back = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.isnan(back[:-1]).all()


# ----------------------------------------------------------------------------- writing


def _scales_and_ranks() -> tuple[dict[str, float], dict[str, int]]:
    names = list(SHAPES)
    scales = dict(zip(names, [2.0, 1.0, 0.3, 1 / math.sqrt(3)], strict=True))
    ranks = dict(zip(names, [4, 3, 2, 4], strict=True))
    return scales, ranks


def test_save_bfloat16_equals_torch_bfloat16_of_the_float32_factors(tmp_path):
    adapter = _f32_lora(0, *_scales_and_ranks())
    out = save_adapter(adapter, tmp_path / "out", dtype="bfloat16")
    saved = load_pt(out / "adapter_model.safetensors")
    for name, module in adapter.modules.items():
        folded = module.folded()  # the scale lives in B on disk
        for which, factor in (("A", folded.A), ("B", folded.B)):
            tensor = saved[f"{PREFIX}{name}.lora_{which}.weight"]
            assert tensor.dtype == torch.bfloat16
            expected = torch.from_numpy(np.asarray(factor, np.float32)).bfloat16()
            assert torch.equal(tensor.view(torch.int16), expected.view(torch.int16)), (name, which)
    # Read back (through torch, numpy has no bf16): the bf16 values upcast, scale 1.
    loaded = load_adapter(out)
    assert loaded.dtype == "bfloat16"
    for name, module in loaded.modules.items():
        assert module.scale == 1.0
        for which, array in (("A", module.A), ("B", module.B)):
            assert array.dtype == np.float32
            np.testing.assert_array_equal(array, saved[f"{PREFIX}{name}.lora_{which}.weight"].float().numpy())


def test_save_float16_equals_numpy_astype(tmp_path):
    adapter = _f32_lora(1, *_scales_and_ranks())
    out = save_adapter(adapter, tmp_path / "out", dtype="float16")
    saved = load_np(str(out / "adapter_model.safetensors"))
    for name, module in adapter.modules.items():
        folded = module.folded()
        for which, factor in (("A", folded.A), ("B", folded.B)):
            array = saved[f"{PREFIX}{name}.lora_{which}.weight"]
            assert array.dtype == np.float16
            np.testing.assert_array_equal(array.view(np.uint16), factor.astype(np.float16).view(np.uint16))
    assert load_adapter(out).dtype == "float16"


def test_save_keeps_the_delta_and_declares_ranks(tmp_path):
    adapter = _f32_lora(2, *_scales_and_ranks())
    out = save_adapter(adapter, tmp_path / "out")  # the adapter's own dtype: float32
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert (
        config["rank_pattern"]
        == config["alpha_pattern"]
        == {
            "model.layers.0.self_attn.v_proj": 3,
            "model.layers.0.mlp.down_proj": 2,
        }
    )
    loaded = load_adapter(out)
    assert loaded.dtype == "float32"
    for name, module in adapter.modules.items():
        ref = module.scale * (module.B.astype(np.float64) @ module.A.astype(np.float64))
        np.testing.assert_allclose(loaded.modules[name].dense(), ref, rtol=1e-6, atol=1e-7)


def test_writer_body_raising_leaves_nothing(tmp_path):
    adapter = _f32_lora(3, *_scales_and_ranks())
    (tmp_path / "keep.txt").write_text("x")
    before = _listing(tmp_path)
    with (
        pytest.raises(RuntimeError, match="boom"),
        AdapterWriter(tmp_path / "out", "LORA", adapter.modules, dtype="float32") as writer,
    ):
        for name, module in list(adapter.modules.items())[:2]:
            writer.write_module(name, module)
        raise RuntimeError("boom")
    assert _listing(tmp_path) == before


def test_writer_without_finish_publishes_nothing(tmp_path):
    adapter = _f32_lora(4, *_scales_and_ranks())
    before = _listing(tmp_path)
    with (
        pytest.raises(RuntimeError, match="finish"),
        AdapterWriter(tmp_path / "out", "LORA", adapter.modules, dtype="bfloat16") as writer,
    ):
        for name, module in adapter.modules.items():
            writer.write_module(name, module)
    assert _listing(tmp_path) == before
    # The same steps with finish do publish a folder (the check above is not vacuous).
    with AdapterWriter(tmp_path / "out", "LORA", adapter.modules, dtype="bfloat16") as writer:
        for name, module in adapter.modules.items():
            writer.write_module(name, module)
        writer.finish(adapter.config, adapter.source)
    assert _listing(tmp_path) == sorted([*before, "out"])
    assert _listing(tmp_path / "out") == ["adapter_config.json", "adapter_model.safetensors", "excise.json"]


def test_writer_failing_while_writing_the_header_leaves_nothing(tmp_path, monkeypatch):
    """The header outgrows its reservation and the rewrite fails (a full disk, say).

    The error must reach the caller and the temp folder must go, as for any failure.
    """

    def full_disk(self, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SafetensorsWriter, "_rewrite", full_disk)
    adapter = _f32_lora(5, *_scales_and_ranks())
    source = {"path": "mem", "note": "x" * 50_000}  # far beyond metadata_bytes
    before = _listing(tmp_path)
    with (
        pytest.raises(OSError, match="No space left"),
        AdapterWriter(tmp_path / "out", "LORA", adapter.modules, dtype="float32", metadata_bytes=0) as w,
    ):
        for name, module in adapter.modules.items():
            w.write_module(name, module)
        w.finish(adapter.config, source)
    assert _listing(tmp_path) == before


def test_large_provenance_is_rewritten_not_refused(tmp_path):
    adapter = _f32_lora(6, *_scales_and_ranks())
    source = {"path": "mem", "note": 'é"x' * 20_000}
    with AdapterWriter(tmp_path / "out", "LORA", adapter.modules, dtype="float32", metadata_bytes=0) as w:
        for name, module in adapter.modules.items():
            w.write_module(name, module)
        w.finish(adapter.config, source)
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["excise"])["note"] == source["note"]
    assert _listing(tmp_path) == ["out"]


# ----------------------------------------------------------------------------- reading


def test_mapped_tensors_equal_safe_open(tmp_path):
    rng = np.random.default_rng(7)
    tensors = {
        "f32": rng.standard_normal((5, 3)).astype(np.float32),
        "f64": rng.standard_normal((2, 2, 2)),
        "f16": rng.standard_normal(9).astype(np.float16),
        "i64": np.arange(-4, 4, dtype=np.int64),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u8": np.arange(7, dtype=np.uint8),
        "u16": np.arange(5, dtype=np.uint16),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
    }
    file = tmp_path / "t.safetensors"
    save_np(tensors, str(file), metadata={"format": "pt"})
    mapped = pem_io._map_tensors(file)
    assert mapped is not None and set(mapped) == set(tensors)
    with safe_open(str(file), framework="np") as f:
        for key in f.keys():  # noqa: SIM118
            expected = f.get_tensor(key)
            assert mapped[key].dtype == expected.dtype and mapped[key].shape == expected.shape, key
            np.testing.assert_array_equal(mapped[key], expected, err_msg=key)


def test_loaded_tensors_equal_safe_open_and_scales_follow_the_config(lora_folders):
    expert, anti = lora_folders
    scales = {
        expert: {"q_proj": 8 / 4, "v_proj": 3 / 4, "down_proj": 8 / 2},
        anti: {"q_proj": 4 / math.sqrt(6), "v_proj": 4 / math.sqrt(6), "down_proj": 4 / math.sqrt(6)},
    }
    for folder in lora_folders:
        adapter = load_adapter(folder)
        assert adapter.dtype == "float32" and set(adapter.modules) == set(SHAPES)
        with safe_open(str(folder / "adapter_model.safetensors"), framework="np") as f:
            for name, module in adapter.modules.items():
                for which, array in (("A", module.A), ("B", module.B)):
                    expected = f.get_tensor(f"{PREFIX}{name}.lora_{which}.weight")
                    assert array.dtype == expected.dtype
                    np.testing.assert_array_equal(array, expected)
                assert module.scale == pytest.approx(scales[folder][name.rsplit(".", 1)[1]], rel=1e-15)


def test_writing_into_loaded_arrays_never_reaches_the_file(lora_folders):
    folder = lora_folders[0]
    file = folder / "adapter_model.safetensors"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    with safe_open(str(file), framework="np") as f:
        originals = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    adapter = load_adapter(folder)
    for module in adapter.modules.values():
        module.A[...] = 123.0
        module.B[0, 0] = -7.0
    assert all(np.all(m.A == 123.0) for m in adapter.modules.values())  # the writes took
    assert hashlib.sha256(file.read_bytes()).hexdigest() == digest
    with safe_open(str(file), framework="np") as f:
        for key, original in originals.items():
            np.testing.assert_array_equal(f.get_tensor(key), original)
    again = load_adapter(folder)  # a fresh map does not see the first one's writes
    for name, module in again.modules.items():
        np.testing.assert_array_equal(module.A, originals[f"{PREFIX}{name}.lora_A.weight"])
        np.testing.assert_array_equal(module.B, originals[f"{PREFIX}{name}.lora_B.weight"])


def test_bf16_folder_loads_as_the_upcast_values(tmp_path):
    folder = _write_lora_folder(tmp_path / "bf", seed=3, r=4, lora_alpha=8, dtype="bfloat16")
    adapter = load_adapter(folder)
    assert adapter.dtype == "bfloat16"
    saved = load_pt(folder / "adapter_model.safetensors")
    for name, module in adapter.modules.items():
        for which, array in (("A", module.A), ("B", module.B)):
            tensor = saved[f"{PREFIX}{name}.lora_{which}.weight"]
            assert tensor.dtype == torch.bfloat16 and array.dtype == np.float32
            np.testing.assert_array_equal(array, tensor.float().numpy())


def test_file_sha256(tmp_path):
    rng = np.random.default_rng(8)
    files = {
        "normal": rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes(),
        "empty": b"",
        "one": b"\x00",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert file_sha256(tmp_path / name) == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert file_sha256(str(tmp_path / name)) == hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the test below has it
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite(dtype):
    rng = np.random.default_rng(9)
    big = np.finfo(dtype).max / 2  # its square (and any sum of squares) overflows
    finite_cases = [
        rng.standard_normal((7, 5)).astype(dtype),
        np.full(100, big, dtype=dtype),
        np.array([-big, big, 0.0, np.finfo(dtype).tiny], dtype=dtype),
        np.array([3e38 if dtype != np.float16 else 6e4], dtype=dtype),
        np.zeros((0, 3), dtype=dtype),
        rng.standard_normal((6, 6)).astype(dtype)[:, ::2],
    ]
    for x in finite_cases:
        assert np.isfinite(x).all()
        assert pem_io._all_finite(x) is True
    for bad in (np.nan, np.inf, -np.inf):
        for position in (0, 17, 39):
            x = rng.standard_normal((8, 5)).astype(dtype)
            x.reshape(-1)[position] = bad
            assert pem_io._all_finite(x) is False, (bad, position)
            x.reshape(-1)[(position + 1) % x.size] = big  # an overflowing finite value beside it
            assert pem_io._all_finite(x) is False, (bad, position)
        strided = np.full((4, 6), big, dtype=dtype)
        strided[3, 4] = bad
        assert pem_io._all_finite(strided[:, ::2]) is False
        assert pem_io._all_finite(strided[:, 1::2]) is True  # the bad entry is not in this view
    assert pem_io._all_finite(np.array([np.inf, -np.inf], dtype=dtype)) is False


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_warns_nothing_on_finite_input(dtype):
    """A finite tensor is no cause for a warning (``excise ops`` prints every warning to the user)."""
    big = np.full(64, np.finfo(dtype).max / 2, dtype=dtype)
    modest = np.full(1000, 10.0, dtype=dtype)  # float16: the sum of squares (1e5) overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pem_io._all_finite(big) is True
        assert pem_io._all_finite(modest) is True


# ----------------------------------------------------------------------------- operators


def _kernel(ms):
    """A row combination of the two inputs, ``None`` where the second input lacks the module."""
    first, second = ms
    if first is None or second is None:
        return None
    return LowRankDelta(
        np.hstack([first.B * first.scale, -0.5 * second.B * second.scale]), np.vstack([first.A, second.A])
    )


@pytest.mark.parametrize("threads", ["serial", "threaded"])
def test_apply_modulewise_hands_each_module_to_on_module(threads, monkeypatch):
    if threads == "threaded":  # _workers() runs modules in parallel only under single-threaded BLAS
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    else:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    shapes = {f"layers.{i}.proj": (6 + i, 5) for i in range(12)}
    first = random_lora(shapes, 3, seed=1)
    second = random_lora({k: v for k, v in shapes.items() if not k.startswith("layers.1")}, 2, seed=2)
    kwargs = {"allow_partial": True, "operation": "test_op", "params": {"w": 0.5}}
    kept = apply_modulewise([first, second], _kernel, **kwargs)
    handed: dict[str, LowRankDelta] = {}
    lock = threading.Lock()
    calls = []

    def sink(name, module):
        with lock:
            calls.append(name)
            handed[name] = module

    streamed = apply_modulewise([first, second], _kernel, **kwargs, on_module=sink)
    assert streamed.modules == {}
    assert streamed.source == kept.source
    assert streamed.source["operation"] == "test_op" and streamed.source["params"] == {"w": 0.5}
    assert streamed.source["inputs"] == [first.source, second.source]
    assert streamed.config == kept.config and streamed.peft_type == kept.peft_type
    assert streamed.dtype == kept.dtype
    assert sorted(calls) == sorted(handed) == sorted(kept.modules)  # once each, never for None
    assert set(kept.modules) == {k for k in shapes if not k.startswith("layers.1")}
    for name, module in kept.modules.items():
        np.testing.assert_array_equal(handed[name].B, module.B)
        np.testing.assert_array_equal(handed[name].A, module.A)
        assert handed[name].scale == module.scale
        ref = first.modules[name].dense() - 0.5 * second.modules[name].dense()
        np.testing.assert_allclose(module.dense(), ref, atol=1e-12)


def _with(adapter: Adapter, *, dtype: str, factor_dtype=None) -> Adapter:
    modules = {
        name: LowRankDelta(
            m.B.astype(factor_dtype or m.B.dtype), m.A.astype(factor_dtype or m.A.dtype), m.scale
        )
        for name, m in adapter.modules.items()
    }
    return Adapter(adapter.peft_type, adapter.config, modules, adapter.source, dtype)


def test_result_dtype():
    base = random_lora({"a": (4, 3), "b": (5, 3)}, 2)  # float64 factors
    assert result_dtype(_with(base, dtype="float32", factor_dtype=np.float32)) is np.float32
    assert result_dtype(_with(base, dtype="bfloat16", factor_dtype=np.float32)) is np.float32
    assert result_dtype(_with(base, dtype="float32")) is np.float64  # float64 in memory
    assert result_dtype(_with(base, dtype="bfloat16")) is np.float64
    assert result_dtype(_with(base, dtype="float16", factor_dtype=np.float32)) is np.float64
    assert result_dtype(_with(base, dtype="float64", factor_dtype=np.float32)) is np.float64
    mixed = _with(base, dtype="float32", factor_dtype=np.float32)
    mixed.modules["b"] = LowRankDelta(mixed.modules["b"].B.astype(np.float64), mixed.modules["b"].A)
    assert result_dtype(mixed) is np.float64  # one float64 B is enough
    only_a64 = _with(base, dtype="float32", factor_dtype=np.float32)
    only_a64.modules["a"] = LowRankDelta(only_a64.modules["a"].B, only_a64.modules["a"].A.astype(np.float64))
    assert result_dtype(only_a64) is np.float32  # A never decides


def test_ext_sub_float32_result_is_the_rounded_float64_result():
    scales, ranks = _scales_and_ranks()
    expert = _f32_lora(10, scales, ranks)
    anti = _f32_lora(11, {k: 0.7 * v for k, v in scales.items()}, {k: v + 1 for k, v in ranks.items()})
    # A zero row in each input, and a module only the expert has (kept unchanged).
    expert.modules["model.layers.0.self_attn.q_proj"].B[3] = 0.0
    anti.modules["model.layers.0.self_attn.q_proj"].B[5] = 0.0
    del anti.modules["model.layers.1.self_attn.q_proj"]
    for adapter in (expert, anti):
        assert all(m.B.dtype == m.A.dtype == np.float32 for m in adapter.modules.values())
    r32 = ext_sub(expert, anti, lam=0.7, allow_partial=True)
    r64 = ext_sub(
        _with(expert, dtype="float32", factor_dtype=np.float64),
        _with(anti, dtype="float32", factor_dtype=np.float64),
        lam=0.7,
        allow_partial=True,
    )
    assert set(r32.modules) == set(r64.modules) == set(SHAPES)
    for name, m32 in r32.modules.items():
        m64 = r64.modules[name]
        assert m32.B.dtype == np.float32 and m64.B.dtype == np.float64
        assert m32.scale == m64.scale == 1.0
        np.testing.assert_array_equal(m32.B.view(np.uint32), m64.B.astype(np.float32).view(np.uint32))
        assert m32.A.dtype == np.float32
        np.testing.assert_array_equal(m32.A.astype(np.float64), m64.A)
        # And both are Ext-Sub: the plain float64 row loop of DESIGN.md §1.
        W1 = expert.modules[name].dense()
        W2 = anti.modules[name].dense() if name in anti.modules else np.zeros_like(W1)
        np.testing.assert_allclose(m32.dense(), ext_sub_rows_numpy(W1, W2, 0.7), rtol=1e-5, atol=1e-5)


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("threads", ["serial", "threaded"])
def test_streamed_ext_sub_equals_save_of_in_memory_ext_sub(tmp_path, monkeypatch, dtype, threads):
    if threads == "threaded":
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    else:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    expert, anti = _pair(tmp_path / "in", dtype)
    # SHA-256 as the input digest, the one load_adapter records, so the records can be compared.
    streamed = apply_operator(
        "ext_sub", [expert, anti], tmp_path / "streamed", params={"lam": 0.5}, digest="sha256"
    )
    in_memory = save_adapter(ext_sub(load_adapter(expert), load_adapter(anti), lam=0.5), tmp_path / "mem")
    got, want = _tensors(streamed), _tensors(in_memory)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype == getattr(torch, dtype), key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key
    config = lambda folder: json.loads((folder / "adapter_config.json").read_text())  # noqa: E731
    assert config(streamed) == config(in_memory)
    record = lambda folder: json.loads((folder / "excise.json").read_text())  # noqa: E731
    a, b = record(streamed), record(in_memory)
    assert a["operation"] == b["operation"] == "ext_sub"
    assert a["params"] == b["params"] == {"lam": 0.5}
    assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}
    for entry, folder in zip(a["inputs"], (expert, anti), strict=True):
        assert (
            entry["sha256"] == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        )
        assert entry["dtype"] == dtype


@pytest.mark.parametrize(("which", "bad"), [(0, np.nan), (1, np.inf), (1, -np.inf)])
def test_streamed_ext_sub_refuses_non_finite_input_and_publishes_nothing(tmp_path, which, bad):
    folders = _pair(tmp_path / "in")
    file = folders[which] / "adapter_model.safetensors"
    tensors = load_np(str(file))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]
    tensors[key][1, 1] = bad
    save_np(tensors, str(file))
    before = _listing(tmp_path)
    with pytest.raises(AdapterError, match="NaN or Inf") as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the operator may meet the NaN first
        apply_operator("ext_sub", list(folders), tmp_path / "out", params={"lam": 0.5})
    assert key in str(info.value)
    assert _listing(tmp_path) == before


def test_streamed_output_is_no_larger_than_both_inputs(tmp_path):
    """The header reserved for streaming stays within what the inputs' own headers took."""
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(6) for m in "qkvo"]
    folders = []
    for seed in (1, 2):
        tensors = {}
        for name in names:
            tensors[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((4, 40), dtype=np.float32)
            tensors[f"base_model.model.{name}.lora_B.weight"] = rng.standard_normal((48, 4), dtype=np.float32)
        folder = tmp_path / f"in{seed}"
        folder.mkdir()
        save_np(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders.append(folder)
    out = apply_operator("ext_sub", folders, tmp_path / "out", params={"lam": 1.0})
    size = (out / "adapter_model.safetensors").stat().st_size
    assert size <= sum((f / "adapter_model.safetensors").stat().st_size for f in folders)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_verified_digest_hashes_the_file_and_finds_the_bad_tensor(tmp_path, dtype):
    from excise.pem.io import verified_digest

    tensors = {
        "base_model.model.m.lora_A.weight": torch.randn(4, 40),
        "base_model.model.m.lora_B.weight": torch.randn(48, 4),
        "counts": torch.arange(5),  # not a float: never checked
    }
    tensors = {k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v) for k, v in tensors.items()}
    file = tmp_path / "adapter_model.safetensors"
    save_pt(tensors, str(file), metadata={"format": "pt"})
    assert verified_digest(file, "sha256") == hashlib.sha256(file.read_bytes()).hexdigest()
    assert verified_digest(file) == xxhash.xxh3_128(file.read_bytes()).hexdigest()
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = dict(tensors)
        broken["base_model.model.m.lora_B.weight"] = tensors["base_model.model.m.lora_B.weight"].clone()
        broken["base_model.model.m.lora_B.weight"][17, 2] = bad
        save_pt(broken, str(file), metadata={"format": "pt"})
        for algorithm in ("xxh3_128", "sha256"):
            with pytest.raises(AdapterError, match=r"lora_B\.weight contains NaN or Inf"):
                verified_digest(file, algorithm)


def test_tensor_digest_is_of_names_dtypes_shapes_and_bytes_only(tmp_path):
    from excise.pem.io import tensor_digest

    tensors = {
        "b.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "a.weight": np.ones((2,), np.float16),
        "empty": np.zeros((0, 3), np.float32),
    }

    def expected(arrays: dict[str, np.ndarray], code: dict[str, str]) -> str:  # by hand, in name order
        digest = hashlib.sha256()
        for name in sorted(arrays):
            raw = np.ascontiguousarray(arrays[name]).astype(arrays[name].dtype.newbyteorder("<")).tobytes()
            digest.update(json.dumps([name, code[name], list(arrays[name].shape), len(raw)]).encode())
            digest.update(raw)
        return digest.hexdigest()

    codes = {"b.weight": "F32", "a.weight": "F16", "empty": "F32"}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_np(tensors, str(first), metadata={"created": "1"})
    save_np(dict(reversed(tensors.items())), str(second), metadata={"created": "2", "op": "negate"})
    assert first.read_bytes() != second.read_bytes()
    assert tensor_digest(first) == tensor_digest(second) == expected(tensors, codes)
    assert tensor_digest(first, "xxh3_128") != tensor_digest(first)
    for change in ("bit", "shape", "dtype"):
        other = dict(tensors)
        if change == "bit":
            other["b.weight"] = tensors["b.weight"].copy()
            other["b.weight"].view(np.uint32)[1, 2] ^= 1  # one ulp
        elif change == "shape":
            other["b.weight"] = tensors["b.weight"].reshape(4, 3)  # the same bytes
        else:
            other["b.weight"] = tensors["b.weight"].view(np.int32)  # the same bytes, another dtype
        save_np(other, str(second))
        assert tensor_digest(second) != tensor_digest(first), change
    (tmp_path / "broken.safetensors").write_bytes(b"\x10" + bytes(7) + b"{not json")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        tensor_digest(tmp_path / "broken.safetensors")
    with pytest.raises(ConfigError, match="unknown digest"):
        tensor_digest(first, "md5")


def test_verified_digest_of_a_bin_adapter(tmp_path):
    from excise.pem.io import verified_digest

    state = {
        "base_model.model.m.lora_A.weight": torch.randn(4, 40),
        "base_model.model.m.lora_B.weight": torch.randn(48, 4),
    }
    torch.save(state, tmp_path / "adapter_model.bin")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["m"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    file = tmp_path / "adapter_model.bin"
    assert verified_digest(file, "sha256") == hashlib.sha256(file.read_bytes()).hexdigest()
    assert verified_digest(file) == xxhash.xxh3_128(file.read_bytes()).hexdigest()
    state["base_model.model.m.lora_A.weight"][0, 0] = float("nan")
    torch.save(state, file)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        verified_digest(file)


def test_unknown_digest_is_refused_before_anything_is_written(tmp_path):
    from excise.errors import ConfigError

    folders = _pair(tmp_path / "in")
    with pytest.raises(ConfigError, match="unknown digest 'md5'"):
        apply_operator("ext_sub", folders, tmp_path / "out", params={"lam": 1.0}, digest="md5")
    assert not (tmp_path / "out").exists()


def test_verified_digest_checks_a_loaded_bin_adapter_without_reading_it_again(tmp_path, monkeypatch):
    from excise.pem.io import verified_digest

    state = {
        "base_model.model.m.lora_A.weight": torch.randn(4, 40),
        "base_model.model.m.lora_B.weight": torch.randn(48, 4),
    }
    state["base_model.model.m.lora_B.weight"][3, 1] = float("inf")
    torch.save(state, tmp_path / "adapter_model.bin")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["m"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_adapter(tmp_path, checksum=False, check_finite=False)
    monkeypatch.setattr(pem_io, "load_adapter", lambda *a, **k: pytest.fail("the .bin was read again"))
    with pytest.raises(AdapterError, match=r"lora_B\.weight contains NaN or Inf"):
        verified_digest(tmp_path / "adapter_model.bin", adapter=adapter)
