"""Read adapters, run one registered operator, write the result: what ``excise ops`` calls."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from excise.pem.io import AdapterWriter, check_output_dir, file_sha256, load_adapter
from excise.pem.ops.registry import get_operator

__all__ = ["apply_operator"]


def apply_operator(
    name: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    params: dict[str, Any],
    dense: bool = False,
    allow_partial: bool = False,
    overwrite: bool = False,
) -> Path:
    """Apply the operator ``name`` to the adapter folders ``inputs`` and write ``out``.

    Args:
        name: registry name (``ext_sub``, ``compose``, ``subtract``, ``add``, ``scale``,
            ``negate``); hyphens are accepted.
        inputs: adapter folders, in the operator's argument order.
        out: output folder (written atomically).
        params: the operator's keyword parameters (``lam``, ``weight``, ``lams``…).
        dense: use the dense reference twin (rank-``in`` output, slow; for parity).
        allow_partial: combine adapters whose target modules differ.
        overwrite: replace a non-empty ``out``.

    Returns:
        ``out``.

    Raises:
        ConfigError: unknown operator, bad parameters, existing output.
        AdapterError: unreadable or incompatible adapters.
    """
    operator = get_operator(name)
    check_output_dir(out, overwrite=overwrite)  # fail before reading anything
    fn = operator.dense_fn if dense else operator.fn
    if len(inputs) > 1:
        params = {**params, "allow_partial": allow_partial}
    # The inputs' checksums (for the provenance record) are computed while the next
    # input loads and the operator runs: hashlib releases the GIL.
    with ThreadPoolExecutor(max_workers=max(1, len(inputs))) as pool:
        adapters, digests = [], []
        for path in inputs:
            adapters.append(load_adapter(path, checksum=False))
            digests.append(pool.submit(_background_sha256, Path(path) / adapters[-1].source["weights"]))
        names = dict.fromkeys(name for adapter in adapters for name in adapter.modules)
        sources = json.dumps([a.source for a in adapters]) + json.dumps(params)
        with AdapterWriter(
            out,
            adapters[0].peft_type,
            names,
            dtype=adapters[0].dtype,
            overwrite=overwrite,
            metadata_bytes=4096 + 2 * len(sources),
        ) as writer:
            # Each module is written by the worker that computed it, while others compute.
            result = fn(*adapters, **params, on_module=writer.write_module)
            for entry, digest in zip(result.source["inputs"], digests, strict=True):
                entry["sha256"] = digest.result()
            writer.finish(result.config, result.source)
    return Path(out)


def _background_sha256(file: Path) -> str:
    """:func:`file_sha256` in a thread of the lowest CPU priority (Linux), so hashing fills
    idle cores instead of taking one from the operator's workers."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux: priorities are per process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return file_sha256(file)
