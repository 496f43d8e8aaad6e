"""Linear probes on sentence embeddings: the offline ``harm-probe`` and ``toxicity-probe`` judges.

A probe is logistic regression on all-MiniLM-L6-v2 embeddings
(:mod:`~excise.evaluate.judges.encoder`): ``P(unsafe | text) = σ(w·e(text) + b)``. Its
weights are a few KB of safetensors (``weight`` ``(D,)``, ``bias`` ``(1,)``) whose metadata
says what it was trained on and how well it did on held-out labelled data (``accuracy``,
``n``, ``data``, ``split``…); :meth:`ProbeJudge.describe` reports that measured agreement
beside every rate the probe produces. ``features`` in the metadata says what is embedded:
``response`` (the response alone) or ``prompt+response`` (prompt, newline, response).

The fitted model is plain L2-regularised logistic regression, minimised to convergence
with damped Newton steps in float64 (deterministic; tests check it against scikit-learn).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from excise.errors import ConfigError, DataError, ModelLoadError
from excise.evaluate.judges.agreement import with_sidecar
from excise.evaluate.judges.common import check_pairs

__all__ = [
    "FEATURES",
    "SHIPPED",
    "ProbeJudge",
    "ProbeWeights",
    "fit_logistic",
    "probe_texts",
    "read_probe",
    "write_probe",
]

FEATURES = ("response", "prompt+response")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED: dict[str, Path] = {
    "harm-probe": WEIGHTS_DIR / "harm_probe.safetensors",
    "toxicity-probe": WEIGHTS_DIR / "toxicity_probe.safetensors",
}


@dataclass(frozen=True)
class ProbeWeights:
    """A trained probe: ``weight`` ``(D,)``, ``bias``, and metadata (JSON-able values)."""

    weight: np.ndarray
    bias: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """``σ(E w + b)`` for embeddings ``(N, D)`` → ``(N,)`` float64."""
        logits = embeddings.astype(np.float64) @ self.weight.astype(np.float64) + self.bias  # (N,)
        return 1.0 / (1.0 + np.exp(-logits))


def probe_texts(prompts: Sequence[str], responses: Sequence[str], features: str) -> list[str]:
    """The texts a probe embeds for these pairs (see the module docstring)."""
    if features == "response":
        return list(responses)
    if features == "prompt+response":
        return [f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)]
    raise ConfigError(f"probe features must be one of {', '.join(FEATURES)}, got {features!r}")


def fit_logistic(
    X: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, max_iter: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression: argmin mean BCE(σ(Xw + b), y) + l2/2·|w|².

    Damped Newton steps in float64 (the objective is strictly convex for ``l2 > 0``): a few
    dozen iterations reach the optimum to ``tol`` even on (nearly) separable data, where
    first-order methods crawl.

    Args:
        X: features ``(N, D)``.
        y: labels ``(N,)`` in {0, 1}.
        l2: ridge penalty on ``w`` (not on ``b``); must be positive.
        max_iter: Newton iterations at most.
        tol: stop when the gradient's largest entry is below it.

    Returns:
        ``(w (D,), b)`` as float64.

    Raises:
        DataError: no rows, or only one class. ConfigError: ``l2`` not positive.
    """
    if len(X) == 0 or len(X) != len(y):
        raise DataError(f"cannot fit a probe on {len(X)} rows and {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise DataError("cannot fit a probe on labels of one class only; the data needs safe and unsafe rows")
    if not l2 > 0:
        raise ConfigError(f"l2 must be positive, got {l2}")
    N, D = X.shape
    Z = np.hstack([np.asarray(X, np.float64), np.ones((N, 1))])  # (N, D + 1), last column: bias
    y = np.asarray(y, np.float64)  # (N,)
    ridge = np.full(D + 1, l2)  # (D + 1,)
    ridge[-1] = 0.0  # the bias is not penalised
    theta = np.zeros(D + 1)  # (D + 1,)

    def objective(t: np.ndarray) -> float:
        z = Z @ t  # (N,)
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(ridge * t * t))

    loss = objective(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(Z @ theta)))  # (N,)
        grad = Z.T @ (p - y) / N + ridge * theta  # (D + 1,)
        if np.max(np.abs(grad)) < tol:
            break
        hessian = (Z.T * (p * (1 - p) / N)) @ Z + np.diag(ridge) + 1e-12 * np.eye(D + 1)  # (D + 1, D + 1)
        step = np.linalg.solve(hessian, grad)  # (D + 1,)
        rate = 1.0
        while rate > 1e-10:  # backtracking (Armijo) keeps every step a descent
            candidate = objective(theta - rate * step)
            if candidate <= loss - 1e-4 * rate * float(grad @ step):
                break
            rate *= 0.5
        theta, loss = theta - rate * step, objective(theta - rate * step)
    return theta[:-1].copy(), float(theta[-1])


def write_probe(path: Path, weights: ProbeWeights) -> Path:
    """Save a probe as safetensors (metadata values JSON-encoded), atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {
        "weight": np.ascontiguousarray(weights.weight, dtype=np.float32),  # (D,)
        "bias": np.asarray([weights.bias], dtype=np.float32),  # (1,)
    }
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in weights.metadata.items()})
    tmp.chmod(0o644)  # safetensors creates the file private; weights are meant to be shared
    tmp.replace(path)
    return path


def read_probe(path: Path) -> ProbeWeights:
    """Load a probe written by :func:`write_probe`.

    Raises:
        ModelLoadError: missing file, not safetensors, or no ``weight``/``bias`` tensors.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"probe weights {path} not found; train them with `excise eval judge-train`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as err:
        raise ModelLoadError(f"{path} is not a probe written by excise ({err})") from err
    if weight.ndim != 1 or bias.shape != (1,):
        raise ModelLoadError(
            f"{path}: expected weight (D,) and bias (1,), got {weight.shape} and {bias.shape}"
        )
    return ProbeWeights(weight.astype(np.float64), float(bias[0]), metadata)


class ProbeJudge:
    """A judge that embeds (prompt, response) pairs and applies a trained logistic probe.

    Args:
        path: the probe's safetensors file.
        name: the judge's recorded name (default: the ``name`` in the metadata, or the file stem).
        threshold: a score above it is flagged (default 0.5, the decision rule accuracy was measured at).
        batch_size: texts per encoder batch.
    """

    def __init__(
        self, path: str | Path, *, name: str | None = None, threshold: float = 0.5, batch_size: int = 64
    ) -> None:
        if not 0 <= threshold <= 1:
            raise ConfigError(f"probe threshold must be in [0, 1], got {threshold}")
        if batch_size < 1:
            raise ConfigError(f"probe batch_size must be at least 1, got {batch_size}")
        self.path = Path(path)
        self.weights = read_probe(self.path)
        meta = self.weights.metadata
        self.features = meta.get("features", "response")
        probe_texts([], [], self.features)  # validate early
        self.name = name or meta.get("name") or self.path.stem
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self._encoder = None

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """P(unsafe) per pair from the probe."""
        check_pairs(prompts, responses, self.name)
        if not responses:
            return []
        from excise.evaluate.judges.encoder import load_encoder

        encoder = self._encoder or load_encoder()
        self._encoder = encoder
        dim = self.weights.weight.shape[0]
        if encoder.dim != dim:
            raise ModelLoadError(
                f"{self.path}: probe expects {dim}-d embeddings, the encoder gives {encoder.dim}"
            )
        embeddings = encoder.embed(probe_texts(prompts, responses, self.features), batch_size=self.batch_size)
        return [float(p) for p in self.weights.probabilities(embeddings)]

    def describe(self) -> dict[str, Any]:
        """Name, settings, training data and the measured held-out agreement from the metadata,
        with the content-only and HH-RLHF figures of its sidecar (:func:`~.agreement.with_sidecar`)."""
        meta = dict(self.weights.metadata)
        return {
            "name": self.name,
            "threshold": self.threshold,
            "weights": str(self.path),
            "features": self.features,
            "encoder": meta.get("encoder"),
            "stand_in_for": meta.get("stand_in_for"),
            "trained_on": meta.get("trained_on"),
            "agreement": with_sidecar(meta.get("agreement"), self.path),
            "checks": meta.get("checks"),
        }
