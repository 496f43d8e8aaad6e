"""Train a ``harm-lm`` judge (:mod:`.lm`): its data, the cached training loop, calibration, measurement.

**Data** (:func:`lm_training_data`; issue 25, item 1). Every prompt has a role, from the project
split (:func:`prompt_role`): ``eval`` (where harmful rates are measured: never read by a judge),
``train``, and on the ``judge`` side ``heldout`` (:func:`~.probe_training.is_heldout_prompt`, the
25 % every judge's held-out figures use), ``calibrate`` (salt ``judge-calibrate``, 20 % of the
rest, as ``harm-cross``) and ``judge-fit``. Training reads ``train`` and ``judge-fit`` prompts:

- PKU-SafeRLHF pairs: each row gives a safe (0) and an unsafe (1) response; (prompt, response)
  texts are deduplicated (by :func:`~excise.data.splits.prompt_key` of the prompt and the exact
  response), a text seen with both labels is dropped with its pairs. Loss: BCE on every labelled
  text plus ``pku_pairwise`` · ``softplus(z_safe − z_unsafe)`` per pair (as ``harm-cross``).
- HH-RLHF harmless-base pairs (the shared file is its test split): the dialogue before the last
  reply is the prompt — its split key the turns' texts joined by newlines (as the ``pairs``
  metric's ``_hh`` reader and :attr:`Example.split_key` build it), the judge reads it role-tagged
  (``Human: …\\n\\nAssistant: …``, as :func:`~.probe_training.heldout_hh_pairs`). No label: only
  ``hh_weight`` · ``softplus(z_chosen − z_rejected)`` (the rejected, more harmful reply above).

The ``calibrate`` PKU responses fit the Platt calibration (:func:`~.cross_training._calibrate`).
The held-out PKU responses and HH pairs are touched once, at the end, to measure the judge
(:func:`~.probe_training.harm_agreement`: accuracy, AUC, sensitivity and specificity with their
counts, content only, HH pairwise).

**Training.** The reader's frozen lower layers run once per unique text (eval mode, no grad) and
their output is cached (in ``cache_dtype``); each step runs only the top layers on a batch of
pairs. Batches are fixed, length-sorted groups of pairs (PKU and HH mixed), visited in a seeded
random order each epoch; AdamW with 10 % linear warm-up then linear decay; one torch thread and a
fixed seed make a run repeatable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from excise.data import assign_split, load_records, prompt_key, require_fields
from excise.errors import ConfigError, DataError
from excise.evaluate.judges.cross import TERSE_REFUSAL_WORDS, judge_scores
from excise.evaluate.judges.cross_training import CALIBRATE, _calibrate
from excise.evaluate.judges.lm import DEFAULT_READER, LMReader, reader_fingerprint, write_lm_judge
from excise.evaluate.judges.probe_training import (
    HH_PAIRS,
    PKU_PAIRS,
    LabelledPairs,
    harm_agreement,
    harm_probe_data,
    heldout_hh_pairs,
    holdout_mask,
    is_heldout_prompt,
)
from excise.evaluate.judges.refusal import RefusalJudge

__all__ = [
    "ROLES",
    "TRAIN_ROLES",
    "LMSettings",
    "LMTrainingData",
    "lm_training_data",
    "prompt_role",
    "train_lm",
]

ROLES = ("train", "judge-fit", "calibrate", "heldout", "eval")
TRAIN_ROLES = ("train", "judge-fit")


def prompt_role(key: str) -> str:
    """Where a prompt (or an HH dialogue's split key) sits: one of :data:`ROLES`.

    ``eval`` and ``train`` are the sides of :data:`~excise.data.splits.STANDARD_SPLITS`; a ``judge``
    side prompt is ``heldout`` when :func:`~.probe_training.is_heldout_prompt` says so, else
    ``calibrate`` (salt ``judge-calibrate``, 20 %) or ``judge-fit``.
    """
    side = assign_split(key)
    if side != "judge":
        return side
    if is_heldout_prompt(key):
        return "heldout"
    return "calibrate" if assign_split(key, CALIBRATE, salt="judge-calibrate") == "calibrate" else "judge-fit"


@dataclass
class LMTrainingData:
    """Deduplicated training texts and the pairs over them.

    Attributes:
        prompts, responses: the unique texts (the prompt as the judge reads it).
        labels: ``(N,)`` 1 unsafe, 0 safe, -1 no label (an HH reply).
        pku_pairs: ``(P, 2)`` text indices (safe, unsafe).
        hh_pairs: ``(Q, 2)`` text indices (chosen, rejected).
        keys: the split key of each text's prompt (what :func:`prompt_role` was asked).
        calibration: the ``calibrate`` PKU responses (deduplicated), for the Platt calibration.
        counts: how many of each were read, kept and dropped (recorded in the metadata).
    """

    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    pku_pairs: list[tuple[int, int]] = field(default_factory=list)
    hh_pairs: list[tuple[int, int]] = field(default_factory=list)
    calibration: LabelledPairs | None = None
    counts: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)


def lm_training_data(
    pku: str | Path = PKU_PAIRS, hh: str | Path | None = HH_PAIRS, *, limit: int | None = None
) -> LMTrainingData:
    """The ``harm-lm`` training texts, pairs and calibration part (module docstring); pure.

    Args:
        pku: PKU-style pairs (``prompt``, ``response = [safe, unsafe]``).
        hh: HH-RLHF ``chosen``/``rejected`` transcripts, or None for none.
        limit: keep the first ``limit`` trainable PKU rows and the first ``limit`` trainable HH pairs.

    Raises:
        DataError: malformed rows, or no trainable PKU pair.
    """
    from excise.data.examples import parse_hh_transcript

    data = LMTrainingData()
    index: dict[tuple[str, str], int] = {}
    conflicted: set[int] = set()

    def text(prompt: str, key: str, response: str, label: int) -> int:
        ident = (prompt_key(prompt), response)
        i = index.get(ident)
        if i is None:
            i = index[ident] = len(data.responses)
            data.prompts.append(prompt)
            data.responses.append(response)
            data.labels.append(label)
            data.keys.append(key)
        elif data.labels[i] != label and label >= 0:
            if data.labels[i] < 0:
                data.labels[i] = label
            else:
                conflicted.add(i)
        return i

    rows = load_records(pku)
    require_fields(rows, ["prompt", "response"], where=str(pku))
    roles = dict.fromkeys(ROLES, 0)
    cal_prompts, cal_responses, cal_labels = [], [], []
    cal_seen: dict[tuple[str, str], int] = {}
    cal_conflicts: set[int] = set()
    pku_rows = 0
    seen_pairs: set[tuple[int, int]] = set()
    duplicate_pairs = 0
    for i, row in enumerate(rows, start=1):
        pair = row["response"]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(r, str) for r in pair)):
            raise DataError(f"{pku}: row {i} needs response = [safe, unsafe] (two strings)")
        prompt = str(row["prompt"])
        role = prompt_role(prompt)
        roles[role] += 1
        if role == "calibrate":
            for response, label in zip(pair, (0, 1), strict=True):
                ident = (prompt_key(prompt), response)
                if ident not in cal_seen:
                    cal_seen[ident] = len(cal_labels)
                    cal_prompts.append(prompt)
                    cal_responses.append(response)
                    cal_labels.append(label)
                elif cal_labels[cal_seen[ident]] != label:
                    cal_conflicts.add(cal_seen[ident])
            continue
        if role not in TRAIN_ROLES or (limit is not None and pku_rows >= limit):
            continue
        pku_rows += 1
        ids = (text(prompt, prompt, pair[0], 0), text(prompt, prompt, pair[1], 1))
        if ids in seen_pairs or ids[0] == ids[1]:
            duplicate_pairs += 1
            continue
        seen_pairs.add(ids)
        data.pku_pairs.append(ids)

    hh_counts: dict[str, Any] = {"read": 0, "roles": dict.fromkeys(ROLES, 0), "unusable": 0}
    if hh is not None and Path(hh).is_file():
        hh_rows = load_records(hh)
        require_fields(hh_rows, ["chosen", "rejected"], where=str(hh))
        for row in hh_rows:
            hh_counts["read"] += 1
            try:
                c_history, c_prompt, chosen = parse_hh_transcript(str(row["chosen"]))
                r_history, r_prompt, rejected = parse_hh_transcript(str(row["rejected"]))
            except DataError:
                hh_counts["unusable"] += 1
                continue
            if (c_history, c_prompt) != (r_history, r_prompt) or not chosen.strip() or not rejected.strip():
                hh_counts["unusable"] += 1
                continue
            if chosen == rejected:
                hh_counts["unusable"] += 1
                continue
            key = "\n".join([t for _, t in c_history] + [c_prompt])
            role = prompt_role(key)
            hh_counts["roles"][role] += 1
            if role not in TRAIN_ROLES or (limit is not None and len(data.hh_pairs) >= limit):
                continue
            turns = [*c_history, ("user", c_prompt)]
            prompt = "\n\n".join(f"{'Human' if r == 'user' else 'Assistant'}: {t}" for r, t in turns)
            ids = (text(prompt, key, chosen, -1), text(prompt, key, rejected, -1))
            if ids in seen_pairs:
                duplicate_pairs += 1
                continue
            seen_pairs.add(ids)
            data.hh_pairs.append(ids)

    if conflicted:  # a text labelled safe in one row and unsafe in another: no label, no PKU pair
        for i in conflicted:
            data.labels[i] = -1
        data.pku_pairs = [p for p in data.pku_pairs if not (set(p) & conflicted)]
    if not data.pku_pairs:
        raise DataError(f"{pku}: no PKU pair with a train-side or judge-side (fitting) prompt")
    unused = _keep_paired(data)
    labels = np.array(data.labels)
    pku_texts = {i for p in data.pku_pairs for i in p}
    keep = [i for i in range(len(cal_labels)) if i not in cal_conflicts]
    data.calibration = LabelledPairs(
        [cal_prompts[i] for i in keep],
        [cal_responses[i] for i in keep],
        np.array([cal_labels[i] for i in keep], dtype=np.int64),
        [cal_prompts[i] for i in keep],
        str(pku),
    )
    data.counts = {
        "pku": {
            "data": str(pku),
            "rows_by_role": roles,
            "rows_used": pku_rows,
            "pairs": len(data.pku_pairs),
            "responses": len(pku_texts),
            "unsafe": int(sum(labels[i] == 1 for i in pku_texts)),
            "safe": int(sum(labels[i] == 0 for i in pku_texts)),
            "conflicting_labels_dropped": len(conflicted),
            "unpaired_responses_dropped": unused,
            "calibration_responses": len(keep),
            "calibration_conflicting_dropped": len(cal_conflicts),
        },
        "hh": {
            "data": None if hh is None else str(hh),
            "rows": hh_counts["read"],
            "unusable_rows": hh_counts["unusable"],
            "pairs_by_role": hh_counts["roles"],
            "pairs": len(data.hh_pairs),
        },
        "duplicate_pairs_dropped": duplicate_pairs,
        "texts": len(data.responses),
        "limit": limit,
        "sides": "train side of STANDARD_SPLITS and the judge side's fitting part (not its 25% held-out "
        "part, salt judge-holdout, nor its calibration part, salt judge-calibrate); never the eval side",
    }
    return data


def _keep_paired(data: LMTrainingData) -> int:
    """Drop the texts no pair uses (a conflicting text, its partner), renumbering the pairs; returns how
    many PKU texts went."""
    used = sorted({i for p in data.pku_pairs + data.hh_pairs for i in p})
    new = {old: k for k, old in enumerate(used)}
    dropped = len(data.labels) - len(used)  # PKU texts only: every HH text is in its pair
    for name in ("prompts", "responses", "labels", "keys"):
        values = getattr(data, name)
        setattr(data, name, [values[i] for i in used])
    data.pku_pairs = [(new[a], new[b]) for a, b in data.pku_pairs]
    data.hh_pairs = [(new[a], new[b]) for a, b in data.hh_pairs]
    return dropped


@dataclass(frozen=True)
class LMSettings:
    """Settings of a ``harm-lm`` training run.

    Attributes:
        reader: the reader model spec.
        lower: frozen lower decoder layers (cached); None = all but ``top``.
        top: trained decoder layers above them (LoRA + RMSNorms).
        rank: LoRA rank (alpha = 2·rank).
        pooling: ``last`` or ``mean``.
        max_length: tokens per rendered pair.
        epochs: passes over the pairs (ignored when ``steps`` is set).
        steps: optimiser steps (cycling over the batches), instead of ``epochs``.
        lr: AdamW peak learning rate (10 % linear warm-up, then linear decay to 0).
        weight_decay: AdamW weight decay.
        batch_size: pairs per step (PKU pairs have two labelled texts, HH pairs two unlabelled).
        pku_pairwise: weight of the PKU margin term beside the BCE.
        hh_weight: weight of the HH margin term (0: HH pairs are not read).
        cache_dtype: dtype of the cached lower-layer states (float32 exact; bfloat16 half the memory).
        seed: seeds the LoRA and head initialisation and the batch order.
    """

    reader: str = DEFAULT_READER
    lower: int | None = None
    top: int = 4
    rank: int = 8
    pooling: str = "last"
    max_length: int = 384
    epochs: int = 1
    steps: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 8
    pku_pairwise: float = 1.0
    hh_weight: float = 1.0
    cache_dtype: str = "float32"
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings for the metadata."""
        return asdict(self)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_lm(
    out: str | Path,
    *,
    settings: LMSettings | None = None,
    pku: str | Path = PKU_PAIRS,
    hh: str | Path | None = HH_PAIRS,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train, calibrate and measure a ``harm-lm`` judge; write its folder ``out``; return its metadata.

    Args:
        out: the judge folder to write (atomically; an existing one is replaced).
        settings: :class:`LMSettings` (default: SmolLM2-135M-Instruct, top 4 layers).
        pku: PKU-style pairs; hh: HH-RLHF transcripts (None: no HH pairs, no HH figure).
        limit: first ``limit`` trainable PKU rows and HH pairs, and ``limit`` held-out rows (quick runs).
        progress: show progress bars. log: where the plan line goes (default: nowhere).

    Raises:
        ConfigError: bad settings. DataError: a part of the data lacks one class.
    """
    settings = settings or LMSettings()
    if settings.cache_dtype not in _DTYPES:
        raise ConfigError(f"cache_dtype must be one of {', '.join(_DTYPES)}, got {settings.cache_dtype!r}")
    if settings.batch_size < 1 or (settings.steps is not None and settings.steps < 1) or settings.epochs < 1:
        raise ConfigError("batch_size, steps and epochs must be at least 1")
    say = log or (lambda _line: None)
    started = time.perf_counter()
    data = lm_training_data(pku, hh if settings.hh_weight > 0 else None, limit=limit)
    cal = data.calibration
    assert cal is not None
    if len(np.unique(cal.labels)) < 2:
        raise DataError(f"the calibration part of {pku} has labels of one class only; use more rows")

    lower = settings.lower if settings.lower is not None else _layers(settings.reader) - settings.top
    torch.manual_seed(settings.seed)
    model = LMReader(
        settings.reader,
        lower=lower,
        top=settings.top,
        rank=settings.rank,
        pooling=settings.pooling,
        max_length=settings.max_length,
    )
    ids = [model.encode(p, r) for p, r in zip(data.prompts, data.responses, strict=True)]
    cache, timing = _cache_lower(model, ids, _DTYPES[settings.cache_dtype], settings, data, say, progress)
    fit_seconds = _fit(model, data, cache, ids, settings, progress)
    del cache

    refusal = RefusalJudge()
    z_cal = model.logits(cal.prompts, cal.responses)
    refuses = np.array([refusal.refuses(r) for r in cal.responses], dtype=np.float64)  # (C,)
    calibration, chosen = _calibrate(z_cal, refuses, cal.labels, np.array(cal.groups))

    held = harm_probe_data(pku)
    held = held.subset(holdout_mask(held))
    if limit is not None:
        held = held.subset(np.arange(len(held)) < limit)
    hh_held = None
    if hh is not None and Path(hh).is_file():
        try:
            hh_held = heldout_hh_pairs(hh, limit=limit)
        except DataError:
            hh_held = None
    scorer = _Scorer(model, calibration, refusal)
    agreement = harm_agreement(scorer, held, content_only=True, hh=hh_held)
    p_held = np.array(scorer.score(held.prompts, held.responses))
    agreement.pop("judge", None)
    agreement["data"] = (
        f"{held.source} — judge side of STANDARD_SPLITS, held-out part (salt judge-holdout, 25%)"
    )
    agreement["pairwise"] = round(float((p_held[1::2] > p_held[0::2]).mean()), 4) if len(p_held) > 1 else None
    if hh_held is None:
        agreement["hh_pairs_null_reason"] = "no HH-RLHF file, or no held-out HH pair in it"
    reader = model.settings() | {"sha256_16": reader_fingerprint(settings.reader)}
    metadata: dict[str, Any] = {
        "name": "harm-lm",
        "kind": "harm-lm",
        "features": "(prompt, response) rendered as the reader's chat",
        "reader": reader,
        "training": settings.as_dict() | {"lower": lower},
        "calibration": chosen,
        "stand_in_for": "a moderation model such as beaver-dam-7b (SKU's judge) or Llama Guard",
        "trained_on": data.counts,
        "agreement": agreement,
        "terse_refusal_words": TERSE_REFUSAL_WORDS,
        "reference_scores": [round(float(p), 6) for p in p_held[:16]],
        "timing": timing | {"fit_seconds": round(fit_seconds, 1)},
    }
    metadata["train_seconds"] = round(time.perf_counter() - started, 1)
    write_lm_judge(Path(out), model.trainable_state(), calibration, metadata)
    return metadata


class _Scorer:
    """The trained reader as a judge, before it is written (what the held-out figures measure)."""

    name, threshold = "harm-lm", 0.5

    def __init__(self, model: LMReader, calibration: list[float], refusal: RefusalJudge) -> None:
        self.model, self.calibration, self.refusal = model, calibration, refusal

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not responses:
            return []
        z = self.model.logits(prompts, responses)
        return [
            float(p) for p in judge_scores(z, responses, self.refusal, self.calibration, TERSE_REFUSAL_WORDS)
        ]


def _batches(data: LMTrainingData, ids: list[list[int]], batch_size: int) -> list[list[tuple[str, int, int]]]:
    """Fixed length-sorted groups of pairs: ``[("pku" | "hh", a, b), …]`` per batch."""
    units = [("pku", a, b) for a, b in data.pku_pairs] + [("hh", a, b) for a, b in data.hh_pairs]
    units.sort(key=lambda u: max(len(ids[u[1]]), len(ids[u[2]])))
    return [units[s : s + batch_size] for s in range(0, len(units), batch_size)]


def _cache_lower(
    model: LMReader,
    ids: list[list[int]],
    dtype: torch.dtype,
    settings: LMSettings,
    data: LMTrainingData,
    say: Callable[[str], None],
    progress: bool,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Every text's lower-layer output, run once in length-sorted batches; says the plan after the first."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    cache: list[torch.Tensor | None] = [None] * len(ids)
    tokens = sum(len(i) for i in ids)
    batches = _batches(data, ids, settings.batch_size)
    steps = settings.steps or settings.epochs * len(batches)
    per_epoch = sum(2 * max(len(ids[u[1]]), len(ids[u[2]])) for b in batches for u in b)  # padded tokens
    trained_tokens = per_epoch * steps / max(len(batches), 1)
    width = 4 * settings.batch_size
    started = time.perf_counter()
    rate = None
    bar = tqdm(total=len(ids), desc="harm-lm cache", unit="text", disable=not progress)
    for start in range(0, len(order), width):
        chunk = order[start : start + width]
        t0 = time.perf_counter()
        for i, state in zip(chunk, model.lower_states([ids[i] for i in chunk], dtype), strict=True):
            cache[i] = state
        if rate is None:
            seconds = time.perf_counter() - t0
            padded = len(chunk) * max(len(ids[i]) for i in chunk)
            rate = seconds / max(padded * max(model.lower, 1), 1)  # seconds per token per layer
            cache_s = rate * tokens * model.lower
            train_s = 3 * rate * trained_tokens * model.top  # forward + backward ≈ 3 forwards
            memory = tokens * model.decoder.config.hidden_size * torch.empty(0, dtype=dtype).element_size()
            with tqdm.external_write_mode():  # the line above the progress bar, not through it
                say(
                    f"harm-lm plan: {len(ids)} texts ({tokens} tokens) to cache through {model.lower} of "
                    f"{model.n_layers} layers (≈ {memory / 2**30:.2f} GiB as {settings.cache_dtype}); "
                    f"{steps} steps of {settings.batch_size} pairs ({len(data.pku_pairs)} PKU, "
                    f"{len(data.hh_pairs)} HH) through {model.top} layers; estimated "
                    f"≈ {cache_s / 60:.1f} min caching + ≈ {train_s / 60:.1f} min training "
                    "(from the first batch)"
                )
        bar.update(len(chunk))
    bar.close()
    timing = {
        "texts": len(ids),
        "tokens": tokens,
        "cache_seconds": round(time.perf_counter() - started, 1),
        "steps": steps,
    }
    return [c for c in cache if c is not None], timing


def _fit(
    model: LMReader,
    data: LMTrainingData,
    cache: list[torch.Tensor],
    ids: list[list[int]],
    settings: LMSettings,
    progress: bool,
) -> float:
    """Train the top layers and the head on the cached states, in place; returns the seconds spent."""
    started = time.perf_counter()
    batches = _batches(data, ids, settings.batch_size)
    steps = settings.steps or settings.epochs * len(batches)
    labels = torch.tensor(data.labels, dtype=torch.float32)  # (N,)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, round(0.1 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    bar = tqdm(total=steps, desc="harm-lm train", unit="step", disable=not progress)
    done = 0
    while done < steps:
        for b in torch.randperm(len(batches), generator=generator).tolist():
            if done >= steps:
                break
            units = batches[b]
            texts = list(dict.fromkeys(i for _, a, r in units for i in (a, r)))
            where = {t: k for k, t in enumerate(texts)}
            z = model.top_logits([cache[t] for t in texts])  # (U,)
            loss = _loss(z, labels[texts], units, where, settings)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            done += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return time.perf_counter() - started


def _loss(
    z: torch.Tensor,
    y: torch.Tensor,
    units: list[tuple[str, int, int]],
    where: dict[int, int],
    settings: LMSettings,
) -> torch.Tensor:
    """BCE on the labelled texts + the PKU and HH margin terms (second of each pair scored higher)."""
    loss = z.new_zeros(())
    labelled = y >= 0
    if labelled.any():
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(z[labelled], y[labelled])
    for kind, weight in (("pku", settings.pku_pairwise), ("hh", settings.hh_weight)):
        pairs = [(where[a], where[b]) for k, a, b in units if k == kind]
        if pairs and weight > 0:
            low, high = (torch.tensor(side) for side in zip(*pairs, strict=True))
            loss = loss + weight * torch.nn.functional.softplus(z[low] - z[high]).mean()
    return loss


def _layers(reader: str) -> int:
    """The reader's number of decoder layers, from its config (the model is not loaded)."""
    from transformers import AutoConfig

    from excise.models.loading import resolve_model

    return int(AutoConfig.from_pretrained(resolve_model(reader)).num_hidden_layers)
