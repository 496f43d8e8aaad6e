"""Read adapters, run one registered operator, write the result: what ``excise ops`` calls."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from excise.pem.io import check_output_dir, file_sha256, load_adapter, save_adapter
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
    adapters = [load_adapter(path, checksum=False) for path in inputs]
    fn = operator.dense_fn if dense else operator.fn
    if len(adapters) > 1:
        params = {**params, "allow_partial": allow_partial}
    # The inputs' checksums (for the provenance record) are computed while the
    # operator runs: hashing reads as many bytes as loading, and hashlib releases the GIL.
    files = [Path(a.source["path"]) / a.source["weights"] for a in adapters]
    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        digests = [pool.submit(file_sha256, file) for file in files]
        result = fn(*adapters, **params)
        for entry, digest in zip(result.source["inputs"], digests, strict=True):
            entry["sha256"] = digest.result()
    return save_adapter(result, out, overwrite=overwrite)
