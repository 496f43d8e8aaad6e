"""The streamed safetensors writer (excise/pem/stream.py), checked against the safetensors library."""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from excise.pem import stream
from excise.pem.stream import SafetensorsWriter, header_entry_bound


def _mixed_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """One tensor of every dtype the writer names, of assorted shapes (an empty one too)."""
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((5, 7)).astype(np.float32),
        "f64": rng.standard_normal((3, 2, 4)),
        "f16": rng.standard_normal(11).astype(np.float16),
        "i64": rng.integers(-(2**62), 2**62, size=(2, 3), dtype=np.int64),
        "u8": rng.integers(0, 256, size=(13,), dtype=np.uint8),
        "bool": rng.random((3, 3)) > 0.5,
        "empty": np.zeros((0, 4), dtype=np.float32),
        "layer.0.weight": rng.standard_normal((1, 1)).astype(np.float32),
    }


def _read_np(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    with safe_open(str(file), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == expected.dtype.newbyteorder("="), name
        assert actual.shape == expected.shape, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)


def _write(file: Path, tensors: dict[str, np.ndarray], header_bytes: int, metadata=None) -> Path:
    """Write ``tensors`` the way AdapterWriter drives the writer: construct, add, close(metadata)."""
    writer = SafetensorsWriter(file, header_bytes)
    for name, array in tensors.items():
        writer.add(name, array)
    writer.close(metadata)
    return file


def _header_size(file: Path) -> int:
    return int.from_bytes(file.read_bytes()[:8], "little")


def test_several_dtypes_and_metadata_read_back(tmp_path):
    tensors = _mixed_tensors()
    metadata = {"format": "pt", "note": 'quotes " and ünïcode'}
    file = tmp_path / "t.safetensors"
    _write(file, tensors, 4096, metadata)
    got, got_metadata = _read_np(file)
    _assert_same(got, tensors)
    assert got_metadata == metadata
    assert _header_size(file) % 8 == 0  # the data section starts 8-byte aligned
    # The reserved header is padded with spaces, and the file ends where the data does.
    n = _header_size(file)
    header = file.read_bytes()[8 : 8 + n]
    assert header.rstrip(b" ") == json.dumps(json.loads(header), separators=(",", ":")).encode()
    assert file.stat().st_size == 8 + n + sum(a.nbytes for a in tensors.values())


def test_leaving_the_block_writes_the_header_without_metadata(tmp_path):
    tensors = _mixed_tensors(seed=1)
    file = tmp_path / "t.safetensors"
    with SafetensorsWriter(file, 4096) as writer:
        for name, array in tensors.items():
            writer.add(name, array)
    got, got_metadata = _read_np(file)
    _assert_same(got, tensors)
    assert not got_metadata


def test_close_with_metadata_inside_the_block_closes_once(tmp_path):
    """The documented use: ``close(metadata)`` inside ``with`` (the only way to pass metadata).

    Leaving the block afterwards must not close the file descriptor a second time: by
    then its number may belong to another file, which would get this header and be closed.
    """
    tensors = {"a": np.arange(5, dtype=np.float32)}
    file, other = tmp_path / "t.safetensors", tmp_path / "unrelated.bin"
    other.write_bytes(b"untouched" * 10)
    fd = None
    try:
        with SafetensorsWriter(file, 1024) as writer:
            writer.add("a", tensors["a"])
            writer.close({"format": "pt"})
            fd = os.open(other, os.O_RDWR)  # reuses the lowest free number: the writer's
        os.fstat(fd)  # still ours: leaving the block did not close it
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    assert other.read_bytes() == b"untouched" * 10
    got, metadata = _read_np(file)
    _assert_same(got, tensors)
    assert metadata == {"format": "pt"}


def test_concurrent_adds_from_many_threads(tmp_path):
    rng = np.random.default_rng(3)
    dtypes = [np.float32, np.float64, np.float16, np.int64, np.uint8]
    tensors = {
        f"base_model.model.layers.{i}.w": (rng.standard_normal(rng.integers(1, 300)) * 100).astype(
            dtypes[i % len(dtypes)]
        )
        for i in range(400)
    }
    file = tmp_path / "t.safetensors"
    bound = sum(header_entry_bound(name) for name in tensors)
    writer = SafetensorsWriter(file, bound)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda item: writer.add(*item), tensors.items()))
    writer.close({"k": "v"})
    got, metadata = _read_np(file)
    _assert_same(got, tensors)
    assert metadata == {"k": "v"}


def test_too_small_reservation_rewrites_the_file_exactly(tmp_path, monkeypatch):
    calls = []
    original = SafetensorsWriter._rewrite

    def spy(self, text):
        calls.append(len(text))
        return original(self, text)

    monkeypatch.setattr(SafetensorsWriter, "_rewrite", spy)
    tensors = _mixed_tensors(seed=2)
    file = tmp_path / "t.safetensors"
    _write(file, tensors, 10, {"format": "pt"})
    assert len(calls) == 1  # the rewrite path was taken
    got, metadata = _read_np(file)
    _assert_same(got, tensors)
    assert metadata == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no .resized left
    n = _header_size(file)
    assert n % 8 == 0 and n - calls[0] < 8  # the exact header, padded to 8 bytes only
    assert file.stat().st_size == 8 + n + sum(a.nbytes for a in tensors.values())


def test_reservation_boundary(tmp_path, monkeypatch):
    """A header exactly the reserved size fits; one byte more takes the rewrite."""
    calls = []
    original = SafetensorsWriter._rewrite
    monkeypatch.setattr(
        SafetensorsWriter, "_rewrite", lambda self, text: (calls.append(1), original(self, text))
    )
    array = np.arange(6, dtype=np.float32)
    text = json.dumps(
        {"x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, separators=(",", ":")
    ).encode()
    # Pad the name so the header is a multiple of 8 (the reservation is rounded up to 8).
    name = "x" * (1 + (-len(text)) % 8)
    size = len(text) + len(name) - 1
    assert size % 8 == 0
    for reserve, rewrites in ((size, 0), (size - 8, 1)):
        calls.clear()
        file = tmp_path / f"r{reserve}.safetensors"
        with SafetensorsWriter(file, reserve) as writer:
            writer.add(name, array)
        assert len(calls) == rewrites
        got, _ = _read_np(file)
        _assert_same(got, {name: array})


def test_same_name_twice_is_refused(tmp_path):
    file = tmp_path / "t.safetensors"
    with SafetensorsWriter(file, 1024) as writer:
        writer.add("a", np.ones(3, np.float32))
        with pytest.raises(ValueError, match="twice"):
            writer.add("a", np.zeros(3, np.float32))
        writer.add("b", np.arange(4, dtype=np.int64))
    got, _ = _read_np(file)
    _assert_same(got, {"a": np.ones(3, np.float32), "b": np.arange(4, dtype=np.int64)})


def test_unknown_dtype_is_refused(tmp_path):
    with SafetensorsWriter(tmp_path / "t.safetensors", 1024) as writer, pytest.raises(TypeError):
        writer.add("c", np.ones(2, np.complex64))


def test_non_contiguous_and_big_endian_arrays(tmp_path):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, 8))
    tensors = {
        "strided": base[:, ::2],
        "transposed": base.T,
        "fortran": np.asfortranarray(base.astype(np.float32)),
        "big_f64": base.astype(">f8"),
        "big_f32_strided": base.astype(">f4")[::2, 1::3],
        "big_i64": np.arange(-5, 5).astype(">i8"),
        "big_f16": base[0].astype(">f2"),
    }
    file = tmp_path / "t.safetensors"
    with SafetensorsWriter(file, 2048) as writer:
        for name, array in tensors.items():
            writer.add(name, array)
    got, _ = _read_np(file)
    _assert_same(got, tensors)
    with safe_open(str(file), framework="np") as f:
        assert f.get_slice("big_f64").get_dtype() == "F64"
        assert f.get_slice("big_f32_strided").get_dtype() == "F32"


def test_dtype_code_names_the_bits(tmp_path):
    """A uint16 array written with dtype_code BF16 is read as bfloat16 of those bits."""
    torch = pytest.importorskip("torch")
    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: these values fit bf16
    file = tmp_path / "t.safetensors"
    with SafetensorsWriter(file, 1024) as writer:
        writer.add("w", bits, dtype_code="BF16")
    with safe_open(str(file), framework="pt") as f:
        tensor = f.get_tensor("w")
    assert tensor.dtype == torch.bfloat16
    np.testing.assert_array_equal(tensor.float().numpy(), values)


def test_same_content_as_safetensors_save_file(tmp_path):
    tensors = _mixed_tensors(seed=5)
    theirs = tmp_path / "theirs.safetensors"
    ours = tmp_path / "ours.safetensors"
    save_file(tensors, str(theirs), metadata={"format": "np"})
    # A generous reservation (lots of padding), tensors in a different order from save_file's.
    _write(ours, dict(reversed(tensors.items())), 1 << 16, {"format": "np"})
    a, b = load_file(str(ours)), load_file(str(theirs))
    _assert_same(a, b)
    _assert_same(a, tensors)


def test_zero_dimensional_array_keeps_its_shape(tmp_path):
    """A 0-d tensor is valid safetensors (shape []); save_file keeps it so."""
    scalar = np.array(2.5, dtype=np.float32)
    ours = tmp_path / "ours.safetensors"
    with SafetensorsWriter(ours, 1024) as writer:
        writer.add("s", scalar)
    save_file({"s": scalar}, str(tmp_path / "theirs.safetensors"))
    assert load_file(str(tmp_path / "theirs.safetensors"))["s"].shape == ()
    assert load_file(str(ours))["s"].shape == ()


def test_exception_in_block_closes_without_header(tmp_path, monkeypatch):
    closed = []
    monkeypatch.setattr(SafetensorsWriter, "close", lambda self, metadata=None: closed.append(1))
    with pytest.raises(RuntimeError), SafetensorsWriter(tmp_path / "t.safetensors", 64) as writer:
        writer.add("a", np.ones(2))
        raise RuntimeError("boom")
    assert not closed  # no header is written for a failed block


@pytest.mark.parametrize(
    "name",
    ["a", "base_model.model.model.layers.31.mlp.down_proj.lora_B.weight", 'we"ird\\name', "ünï\u2603", ""],
)
def test_header_entry_bound_covers_the_largest_budgeted_entry(name):
    dim, offset = 10**10 - 1, 10**16 - 1  # the largest numbers the budget promises to fit
    for dtype in {*stream.NUMPY_DTYPES, "BF16"}:
        for ndim in range(5):
            entry = {"dtype": dtype, "shape": [dim] * ndim, "data_offsets": [offset, offset]}
            text = json.dumps({name: entry}, separators=(",", ":"))
            # Inside the header an entry is `"name":{...}` plus a separating comma.
            assert header_entry_bound(name, ndim) >= len(text) - 2 + 1, (dtype, ndim)
            assert header_entry_bound(name, ndim) <= len(text) - 2 + 1 + 8, (dtype, ndim)  # tight


def test_entry_beyond_the_budget_still_writes(tmp_path):
    """A name-only reservation too small for the real header falls back to the rewrite."""
    array = np.zeros(3, dtype=np.float32)
    file = tmp_path / "x.safetensors"
    with SafetensorsWriter(file, header_entry_bound("t", 0)) as writer:
        writer.add("t", array)
    got, _ = _read_np(file)
    _assert_same(got, {"t": array})


def test_platforms_without_pwrite_write_the_same_file(tmp_path, monkeypatch):
    """The seek-and-write fallback (Windows has no os.pwrite) gives the same tensors, from threads."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(stream, "_pwrite", stream._seek_and_write)
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((17, 5 + i)).astype(np.float32) for i in range(40)}
    file = tmp_path / "x.safetensors"
    with SafetensorsWriter(file, 4096) as writer, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda item: writer.add(*item), tensors.items()))
    got, _ = _read_np(file)
    _assert_same(got, tensors)
