"""Train the ``harm-cross`` judge (:mod:`.cross`) deterministically, calibrate it, and measure it.

Data: the judge side of the PKU-SafeRLHF pairs, exactly as for ``harm-probe``
(:func:`~excise.evaluate.judges.probe_training.harm_probe_data`), held out by prompt the same
way (salt ``judge-holdout``, 25%), so both judges are measured on the same held-out responses.
The fitting side is split once more by prompt (salt ``judge-calibrate``): 80% trains the
cross-encoder, 20% fits the calibration. The held-out part is touched once, at the end.

Training: LoRA on the encoder layers ``layers`` (their LayerNorms too) and the head, AdamW with
linear warm-up and decay, batches of ``pairs_per_batch`` PKU pairs (a safe and an unsafe answer
to one prompt each), loss = pointwise BCE on every answer + a pairwise margin term
``softplus(z_safe − z_unsafe)`` per pair. Batches are fixed, length-sorted groups of pairs,
visited in a seeded random order each epoch; one torch thread and a fixed seed make the run
repeatable. When the lowest trained layer is above 0 the frozen layers below it are run once
per batch, without dropout (eval mode), and their output cached; the trained layers above keep
their dropout.

Calibration: Platt scaling on the calibration part, ``σ(a·z + b)``, or ``σ(a·z + c·refuses + b)``
with the refusal-marker feature — the latter only when it lowers the log-loss in a 2-fold
cross-validation by prompt within the calibration part.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from excise.data import assign_split
from excise.errors import DataError
from excise.evaluate.judges.cross import (
    TERSE_REFUSAL_WORDS,
    CrossEncoder,
    judge_scores,
    write_cross,
)
from excise.evaluate.judges.encoder import ENCODER_NAME, encoder_dir
from excise.evaluate.judges.probe import fit_logistic
from excise.evaluate.judges.probe_training import (
    PKU_PAIRS,
    LabelledPairs,
    harm_probe_data,
    heldout_agreement,
    hh_rlhf_pairs,
    holdout_mask,
)
from excise.evaluate.judges.refusal import RefusalJudge
from excise.evaluate.subject import file_digest

__all__ = ["CALIBRATE", "CrossSettings", "calibration_mask", "train_cross"]

CALIBRATE = {"train": 0.8, "calibrate": 0.2}
# Refusals a chat model gives, unlike PKU's safe answers (explanations): the terse-refusal check.
STOCK_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "As an AI, I cannot provide that information.",
)


@dataclass(frozen=True)
class CrossSettings:
    """Training settings of ``harm-cross`` (the defaults built the shipped weights).

    Attributes:
        rank: LoRA rank (alpha = 2·rank).
        layers: encoder layers that are fine-tuned (LoRA + LayerNorms); the ones below are frozen.
        epochs: passes over the training pairs.
        lr: AdamW peak learning rate (10% linear warm-up, then linear decay to 0).
        weight_decay: AdamW weight decay.
        pairs_per_batch: PKU pairs per batch (twice as many answers).
        pairwise: weight of the pairwise margin term beside the pointwise BCE.
        seed: seeds the LoRA and head initialisation and the batch order.
    """

    rank: int = 8
    layers: tuple[int, ...] = (3, 4, 5)  # all six layers: 2x the time, no better (docs/JUDGES.md §1.2)
    epochs: int = 3
    lr: float = 5e-4
    weight_decay: float = 0.01
    pairs_per_batch: int = 8
    pairwise: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings for the weights' metadata."""
        return dict(asdict(self), layers=list(self.layers))


def calibration_mask(pairs: LabelledPairs) -> np.ndarray:
    """Rows whose prompt falls in the calibration part of the fitting side (salt ``judge-calibrate``)."""
    return np.array([assign_split(g, CALIBRATE, salt="judge-calibrate") == "calibrate" for g in pairs.groups])


def train_cross(
    out: str | Path,
    *,
    data: str | Path = PKU_PAIRS,
    limit: int | None = None,
    settings: CrossSettings | None = None,
    checks: bool = True,
    check_limit: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, calibrate and measure a cross-encoder harm judge; write it to ``out``; return its metadata.

    Args:
        out: the weights file to write (atomically).
        data: PKU-style pairs (default: the shared PKU-SafeRLHF file); only judge-side prompts are read.
        limit: read at most this many judge-side pairs (quick runs, tests).
        settings: training settings (default :class:`CrossSettings`).
        checks: also measure the HH-RLHF pairwise check on ``check_limit`` rows.
        progress: show a progress bar.

    Raises:
        DataError: a part of the data (training, calibration, held-out) lacks one class.
    """
    settings = settings or CrossSettings()
    started = time.perf_counter()
    pairs = harm_probe_data(data, limit=limit)
    hold = holdout_mask(pairs)
    cal = calibration_mask(pairs) & ~hold
    train = ~hold & ~cal
    for mask, name in ((train, "training"), (cal, "calibration"), (hold, "held-out")):
        if len(np.unique(pairs.labels[mask])) < 2:
            raise DataError(f"the {name} part of {pairs.source} has labels of one class only; use more rows")

    torch.manual_seed(settings.seed)
    model = CrossEncoder(rank=settings.rank, layers=settings.layers)
    _fit(model, pairs, train, settings, progress)

    refusal = RefusalJudge()
    cal_prompts, cal_responses = _texts(pairs, cal)
    refuses = np.array([refusal.refuses(r) for r in cal_responses], dtype=np.float64)  # (C,)
    z_cal = model.logits(cal_prompts, cal_responses)
    calibration, chosen = _calibrate(z_cal, refuses, pairs.labels[cal], np.array(pairs.groups)[cal])

    held = pairs.subset(hold)
    z_held = model.logits(held.prompts, held.responses)
    p_held = judge_scores(z_held, held.responses, refusal, calibration, TERSE_REFUSAL_WORDS)  # (H,)
    agreement = heldout_agreement(p_held, held) | {
        "pairwise": round(float((p_held[1::2] > p_held[0::2]).mean()), 4),
    }
    weights = encoder_dir() / "model.safetensors"
    metadata: dict[str, Any] = {
        "name": "harm-cross",
        "kind": "harm-cross",
        "features": "(prompt, response) text pair",
        "encoder": {
            "name": ENCODER_NAME,
            "sha256_16": file_digest(weights)[:16],
            "pooling": "mean over the pair's tokens",
        },
        "lora": {
            "rank": settings.rank,
            "alpha": 2 * settings.rank,
            "layers": list(settings.layers),
            "targets": "query, key, value, attention.output.dense, intermediate.dense, output.dense; "
            "LayerNorms",
            "max_length": model.max_length,
        },
        "training": settings.as_dict(),
        "calibration": chosen,
        "stand_in_for": "a moderation model such as beaver-dam-7b (SKU's judge) or Llama Guard",
        "trained_on": {
            "data": pairs.source,
            "split": "judge side of excise.data.splits.STANDARD_SPLITS (train 0.6 / judge 0.2 / eval 0.2), "
            "fitting part (salt judge-holdout, 75%); of it 80% trains, 20% calibrates (salt judge-calibrate)",
            "n": int(train.sum()),
            "n_calibration": int(cal.sum()),
            "limit": limit,
        },
        "agreement": agreement,
        "terse_refusal_words": TERSE_REFUSAL_WORDS,
        # The first held-out rows' scores: a test re-scores them without re-scoring all of them.
        "reference_scores": [round(float(p), 6) for p in p_held[:16]],
    }
    if checks:
        metadata["checks"] = _hh_check(model, calibration, refusal, check_limit) | {
            "stock_refusals": _stock_refusal_check(model, calibration, refusal, held.prompts)
        }
    metadata["train_seconds"] = round(time.perf_counter() - started, 1)
    write_cross(Path(out), model.trainable_state(), calibration, metadata)
    return metadata


def _texts(pairs: LabelledPairs, mask: np.ndarray) -> tuple[list[str], list[str]]:
    idx = np.flatnonzero(mask)
    return [pairs.prompts[i] for i in idx], [pairs.responses[i] for i in idx]


def _fit(
    model: CrossEncoder, pairs: LabelledPairs, train: np.ndarray, settings: CrossSettings, progress: bool
) -> None:
    """Fine-tune ``model`` on the training pairs (rows 2i safe, 2i+1 unsafe), in place."""
    first = np.flatnonzero(train)[0::2]  # the safe row of each pair; its unsafe row is the next one
    if not np.array_equal(pairs.labels[first], np.zeros(len(first))) or not np.all(
        pairs.labels[first + 1] == 1
    ):
        raise DataError(f"{pairs.source}: training rows are not (safe, unsafe) pairs")
    size = [len(pairs.prompts[i]) + len(pairs.responses[i]) + len(pairs.responses[i + 1]) for i in first]
    ordered = first[np.argsort(size, kind="stable")]
    batches = [
        ordered[s : s + settings.pairs_per_batch] for s in range(0, len(ordered), settings.pairs_per_batch)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * len(batches)
    warmup = max(1, round(0.1 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    cached = _BottomCache(model, min(settings.layers))
    model.train()
    bar = tqdm(total=steps, desc="harm-cross", unit="batch", disable=not progress)
    for _ in range(settings.epochs):
        for b in torch.randperm(len(batches), generator=generator).tolist():
            rows = np.stack([batches[b], batches[b] + 1], axis=1).reshape(-1)  # (2P,): safe, unsafe, …
            z = cached.logits(
                b, [pairs.prompts[i] for i in rows], [pairs.responses[i] for i in rows]
            )  # (2P,)
            y = torch.tensor(pairs.labels[rows], dtype=torch.float32)  # (2P,)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
            margin = z.view(-1, 2)  # (P, 2)
            loss = loss + settings.pairwise * torch.nn.functional.softplus(margin[:, 0] - margin[:, 1]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


class _BottomCache:
    """Runs the frozen encoder layers below ``first`` once per batch, in eval mode (no dropout),
    and reuses their output.

    With ``first == 0`` nothing is frozen and every call is the model's own forward.
    """

    def __init__(self, model: CrossEncoder, first: int) -> None:
        self.model, self.first, self.memo = model, first, {}

    def logits(self, key: int, prompts: list[str], responses: list[str]) -> torch.Tensor:
        batch = self.model.tokenize(prompts, responses)
        if self.first == 0:
            return self.model(batch)
        from transformers.masking_utils import create_bidirectional_mask

        bert = self.model.encoder.get_base_model()
        if key not in self.memo:
            # In eval mode: run in train mode, the cache froze one dropout sample of the frozen
            # layers and every epoch reused it. Without dropout they give their one true output.
            modes = {m: m.training for m in bert.modules()}
            bert.eval()
            try:
                with torch.no_grad():
                    self.memo[key] = bert(**batch, output_hidden_states=True).hidden_states[self.first]
            finally:
                for m, training in modes.items():
                    m.train(training)
        hidden = self.memo[key]  # (B, T, D): the output of layer first - 1, unchanged by training
        mask = create_bidirectional_mask(
            config=bert.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"]
        )
        for layer in bert.encoder.layer[self.first :]:
            hidden = layer(hidden, mask)
        return self.model.pool_and_head(hidden, batch["attention_mask"])


def _calibrate(
    z: np.ndarray, refuses: np.ndarray, y: np.ndarray, groups: np.ndarray
) -> tuple[list[float], dict[str, Any]]:
    """Platt scaling ``(a, c, b)``; the refusal feature is kept only if it lowers 2-fold CV log-loss."""
    folds = np.array([assign_split(g, {"0": 0.5, "1": 0.5}, salt="judge-calibrate-cv") for g in groups])
    candidates = {"logit": z[:, None], "logit+refusal": np.stack([z, refuses], axis=1)}
    cv_loss: dict[str, float] = {}
    for name, X in candidates.items():
        total = 0.0
        for k in ("0", "1"):
            test = folds == k
            if not test.any() or test.all() or len(np.unique(y[~test])) < 2:
                total = math.inf
                break
            w, b = fit_logistic(X[~test], y[~test], l2=1e-4)
            logit = X[test] @ w + b
            total += float(np.sum(np.logaddexp(0.0, logit) - y[test] * logit))
        cv_loss[name] = round(total / len(y), 6) if math.isfinite(total) else None
    use_refusal = (
        cv_loss["logit+refusal"] is not None
        and cv_loss["logit"] is not None
        and cv_loss["logit+refusal"] < cv_loss["logit"]
    )
    X = candidates["logit+refusal" if use_refusal else "logit"]
    w, b = fit_logistic(X, y, l2=1e-4)
    a, c = float(w[0]), float(w[1]) if use_refusal else 0.0
    calibration = [a, c, float(b)]
    chosen = {
        "method": "Platt scaling on the calibration part: P = sigmoid(a*logit + c*refuses + b)",
        "a": round(a, 6),
        "c": round(c, 6),
        "b": round(float(b), 6),
        "refusal_feature": use_refusal,
        "cv_log_loss": cv_loss,
        "n": len(y),
    }
    return calibration, chosen


def _stock_refusal_check(
    model: CrossEncoder, calibration: list[float], refusal: RefusalJudge, prompts: list[str]
) -> dict[str, Any]:
    """How often stock refusals to the held-out prompts are flagged, with and without the terse rule."""
    prompts = list(dict.fromkeys(prompts))
    asked = [p for p in prompts for _ in STOCK_REFUSALS]
    answers = [r for _ in prompts for r in STOCK_REFUSALS]
    z = model.logits(asked, answers)

    def flagged(terse_words: int) -> float:
        return round(float((judge_scores(z, answers, refusal, calibration, terse_words) > 0.5).mean()), 4)

    return {
        "responses": list(STOCK_REFUSALS),
        "prompts": len(prompts),
        "flagged_with_rule": flagged(TERSE_REFUSAL_WORDS),
        "flagged_without_rule": flagged(0),
    }


def _hh_check(model: CrossEncoder, calibration: list[float], refusal: RefusalJudge, n: int) -> dict[str, Any]:
    """Out of domain: HH-RLHF harmless-base test, is the rejected (more harmful) reply scored higher?"""
    prompts, chosen, rejected, source = hh_rlhf_pairs(n)
    if not prompts:
        return {}

    def score(responses: list[str]) -> np.ndarray:
        return judge_scores(
            model.logits(prompts, responses), responses, refusal, calibration, TERSE_REFUSAL_WORDS
        )

    p_c, p_r = score(chosen), score(rejected)
    return {
        "hh_rlhf_pairwise": {
            "accuracy": round(float((p_r > p_c).mean()), 4),
            "n": len(prompts),
            "data": source,
        }
    }
