"""A safetensors file written tensor by tensor, from several threads, as results arrive.

``safetensors.numpy.save_file`` needs every tensor in memory before it writes the
first byte, so an operator's output would be computed whole, then written on one core.
This writer lets each worker thread write its module the moment it is computed
(``os.pwrite`` releases the GIL), so writing overlaps computing and the whole result
is never held at once. Reading stays with the ``safetensors`` library.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header size ``N``, a JSON header of ``N`` bytes, then the tensors' bytes, which the
header's ``data_offsets`` must tile without gaps. Tensors are written in the order
they arrive; the header is written last, into ``header_bytes`` reserved at the start
and padded with spaces — padding the format allows. A header that outgrows the
reservation (a bound the caller gives) is not an error: the file is rewritten once
with the exact header.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path

import numpy as np

__all__ = ["NUMPY_DTYPES", "SafetensorsWriter", "header_entry_bound", "read_header"]

# safetensors dtype codes and the little-endian numpy dtypes that hold them (BF16 has none).
NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}  # fmt: skip
_CODE_OF = {np.dtype(numpy): code for code, numpy in NUMPY_DTYPES.items()}
_ALIGN = 8  # the data section starts 8-byte aligned, as safetensors' own writer does
# Digits budgeted per number in a header entry: dimensions below 10^10, offsets below
# 10^16 (10 PB). A header that still outgrows its reservation costs a rewrite, not an error.
_DIM_DIGITS, _OFFSET_DIGITS = 10, 16


def header_entry_bound(name: str, ndim: int = 4) -> int:
    """Header bytes one tensor called ``name`` takes at most (``ndim`` dimensions, each
    below 10^10, offsets below 10^16): the budget :class:`SafetensorsWriter` reserves."""
    skeleton = '"":{"dtype":"BF16","shape":[],"data_offsets":[,]},'
    return len(json.dumps(name)) - 2 + len(skeleton) + ndim * (_DIM_DIGITS + 1) + 2 * _OFFSET_DIGITS


def read_header(buffer: bytes | memoryview | mmap.mmap) -> tuple[int, dict[str, dict]]:
    """Where a safetensors file's tensor data starts, and its tensor entries (name →
    ``dtype``, ``shape``, ``data_offsets``), from the file's first bytes or a map of it.
    Only for a file ``safe_open`` has already validated."""
    size = int.from_bytes(buffer[:8], "little")
    header = json.loads(buffer[8 : 8 + size])
    return 8 + size, {key: info for key, info in header.items() if key != "__metadata__"}


class SafetensorsWriter:
    """Write one safetensors file; ``add`` may be called from several threads.

    Use as a context manager: ``close`` (or leaving the block) writes the header, once
    every ``add`` has returned. On an exception the file is left incomplete; callers
    write into a temporary folder (:class:`~excise.pem.io.atomic_output_dir`). Tensors
    follow each other without padding, so one dtype per file (as ``excise`` writes) keeps
    every tensor aligned to its item size.

    Args:
        file: the file to create.
        header_bytes: bytes reserved for the JSON header (rounded up to 8).
    """

    def __init__(self, file: str | Path, header_bytes: int) -> None:
        self.file = Path(file)
        self._reserved = -(-max(header_bytes, 2) // _ALIGN) * _ALIGN
        self._entries: dict[str, dict] = {}
        self._end = 0  # bytes of tensor data allocated so far
        self._lock = threading.Lock()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)  # O_BINARY: Windows
        self._fd: int | None = os.open(self.file, flags, 0o644)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._fd is None:  # already closed
            return
        if exc_type is None:
            self.close()
        else:
            os.close(self._fd)
            self._fd = None

    def add(self, name: str, array: np.ndarray, *, dtype_code: str | None = None) -> None:
        """Write one tensor (C-contiguous copy made only if needed).

        Args:
            name: tensor name, unique in the file.
            array: the data, little-endian; its dtype names the tensor's dtype.
            dtype_code: the safetensors dtype code when the array holds another
                type's bits (``"BF16"`` for bfloat16 stored as ``uint16``).
        """
        data = array if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(array.shape)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        code = dtype_code or _CODE_OF.get(data.dtype)
        if code is None:
            raise TypeError(f"no safetensors dtype for numpy {data.dtype}")
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.file} is already closed")
            if name in self._entries:
                raise ValueError(f"tensor {name} written twice")
            begin = self._end
            self._end += data.nbytes
            self._entries[name] = {
                "dtype": code,
                "shape": list(data.shape),
                "data_offsets": [begin, self._end],
            }
            fd = self._fd
        _pwrite_all(fd, memoryview(data.reshape(-1)).cast("B"), 8 + self._reserved + begin)

    def close(self, metadata: dict[str, str] | None = None) -> None:
        """Write the header (with ``metadata``, string values) and close the file."""
        if self._fd is None:
            raise ValueError(f"{self.file} is already closed")
        fd, self._fd = self._fd, None
        header = dict(self._entries)
        if metadata:
            header = {"__metadata__": metadata, **header}
        text = json.dumps(header, separators=(",", ":")).encode()
        try:
            if len(text) <= self._reserved:
                _pwrite_all(fd, _size_prefix(self._reserved) + text.ljust(self._reserved, b" "), 0)
                os.ftruncate(fd, 8 + self._reserved + self._end)
                return
        finally:
            os.close(fd)
        self._rewrite(text)

    def _rewrite(self, text: bytes) -> None:
        """The header did not fit: move the data behind an exact header (rare)."""
        size = -(-len(text) // _ALIGN) * _ALIGN
        moved = self.file.with_name(self.file.name + ".resized")
        with self.file.open("rb") as src, moved.open("wb") as dst:
            dst.write(_size_prefix(size) + text.ljust(size, b" "))
            src.seek(8 + self._reserved)
            remaining = self._end
            while remaining:
                chunk = src.read(min(remaining, 1 << 24))
                dst.write(chunk)
                remaining -= len(chunk)
        os.replace(moved, self.file)


def _size_prefix(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = _pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


_SEEK_LOCK = threading.Lock()


def _seek_and_write(fd: int, data: memoryview, offset: int) -> int:
    """``os.pwrite`` where the platform has none (Windows): seek and write under a lock."""
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


_pwrite = getattr(os, "pwrite", _seek_and_write)
