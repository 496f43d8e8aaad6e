"""scripts/results_tables.py: Holm stars per section, the legacy item-key fallback, the rounding
rule, and the λ rule and knee redone on a committed sweep (issue 22 items 4 and 7)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rt():
    return load_script("scripts/results_tables.py")


def _holm_rejections(pvalues: list[float], alpha: float) -> set[int]:
    """Independent Holm step-down: reject p_(1), p_(2)… while p_(i) ≤ α/(m − i + 1), stop at the first
    that is not."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    m, out = len(pvalues), set()
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (m - rank):
            break
        out.add(i)
    return out


# ----------------------------------------------------------------------------- Holm stars


def test_stars_are_holm_rejections_within_the_family(rt) -> None:
    rng = random.Random(3)
    for _ in range(200):
        m = rng.randint(1, 9)
        ps = [rng.choice([rng.uniform(0, 0.02), rng.uniform(0, 1)]) for _ in range(m)]
        fam = rt.Family("test")
        for p in ps:
            # An interval that excludes 0 well away from the rounding rule: only Holm decides.
            fam.add(rt.Contrast(diff=0.1, ci=(0.05, 0.15), p=[p] * len(rt.SEEDS)))
        fam.adjust()
        stars = {i for i, c in enumerate(fam.members) if c.star}
        assert stars == _holm_rejections(ps, rt.ALPHA), ps


def test_uncorrected_significance_is_not_a_star(rt) -> None:
    # Three intervals each at p = 0.03: each excludes 0 alone, none survives Holm (0.09 > 0.05).
    fam = rt.Family("test")
    for _ in range(3):
        fam.add(rt.Contrast(diff=0.1, ci=(0.01, 0.2), p=[0.03] * len(rt.SEEDS)))
    fam.adjust()
    assert [c.star for c in fam.members] == [False] * 3
    assert all(math.isclose(c.p_holm, 0.09) for c in fam.members)
    assert "(0.090)" in str(fam.members[0])
    assert "Stars: 0" in fam.summary() and "3 of the 3 intervals exclude 0" in fam.summary()


def test_a_star_must_hold_under_every_seed(rt) -> None:
    fam = rt.Family("test")
    steady = fam.add(rt.Contrast(diff=-0.2, ci=(-0.3, -0.1), p=[0.001] * len(rt.SEEDS)))
    # Significant with seed 0 only (the detox λ = 1 case): no star, and the printed p is the worst seed's.
    flaky = fam.add(rt.Contrast(diff=-0.1, ci=(-0.2, -0.01), p=[0.004] + [0.2] * (len(rt.SEEDS) - 1)))
    fam.adjust()
    assert steady.star and not flaky.star
    assert math.isclose(flaky.p_holm, 0.2)


def test_a_bound_that_prints_as_zero_gets_no_star(rt) -> None:
    def star(ci: tuple[float, float]) -> bool:
        fam = rt.Family("test")
        c = fam.add(rt.Contrast(diff=-0.03, ci=ci, p=[1e-4] * len(rt.SEEDS)))
        fam.adjust()
        return c.star

    assert not star((-0.0562, -0.0004))  # prints [-0.056, -0.000]
    assert not star((0.0004, 0.05))  # prints [+0.000, +0.050]
    assert star((-0.0562, -0.0006))  # prints [-0.056, -0.001]
    assert rt.rounds_to_zero(-0.00049) and not rt.rounds_to_zero(0.0005)


def test_contrasts_without_an_interval_stay_out_of_the_family(rt) -> None:
    fam = rt.Family("test")
    fam.add(rt.Contrast(diff=0.1, note="n = 4: no interval"))
    c = fam.add(rt.Contrast(diff=0.1, ci=(0.05, 0.15), p=[0.02] * len(rt.SEEDS)))
    fam.adjust()
    assert math.isclose(c.p_holm, 0.02) and c.star  # a family of one
    assert str(fam.members[0]) == "+0.100 (n = 4: no interval)"


# ----------------------------------------------------------------------------- legacy item keys


def _record(metric: str, items: list[dict], metrics: dict, data: str = "d.json") -> dict:
    return {"metric": metric, "metrics": metrics, "items": items, "data": data}


def _harm(prompts: list[str], flagged: list[bool], data: str = "d.json") -> dict:
    items = [
        {"prompt": p, "response": "r", "score": float(f), "flagged": f}
        for p, f in zip(prompts, flagged, strict=True)
    ]
    return _record("harmful-rate", items, {"harmful_rate": sum(flagged) / len(flagged)}, data)


def test_legacy_keys_from_text_or_window_and_refused_when_repeated(rt) -> None:
    keys, why = rt.legacy_keys([{"question": "Ｑ1"}, {"question": "Q2"}])
    assert why is None and keys == ["question:Q1", "question:Q2"]  # NFKC: full-width Q is Q
    keys, why = rt.legacy_keys([{"begin": 0, "end": 512}, {"begin": 512, "end": 1024}])
    assert keys == ["window:0:512", "window:512:1024"]
    keys, why = rt.legacy_keys([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}])
    assert keys is None and "more than once" in why
    keys, why = rt.legacy_keys([{"score": 1.0}])
    assert keys is None and "identify" in why
    assert rt.keyed({"items": [{"key": "k", "prompt": "a"}]})["items"][0]["key"] == "k"  # own keys kept


def test_repeated_legacy_text_is_not_paired_by_position(rt, capsys) -> None:
    prompts = [f"p{i}" for i in range(30)]
    prompts[7] = prompts[3]
    a = rt.keyed(_harm(prompts, [i % 2 == 0 for i in range(30)]))
    b = rt.keyed(_harm(prompts, [i % 3 == 0 for i in range(30)]))
    assert "legacy_key_problem" in a
    fam = rt.Family("§t")
    c = fam.compare(a, b, "harmful-rate", "harmful_rate", label="dup")
    fam.adjust()
    assert c.ci is None and c.note.startswith("not paired") and not c.in_family
    assert "not paired" in capsys.readouterr().err


def test_legacy_records_pair_by_text_not_by_position(rt) -> None:
    rng = np.random.default_rng(0)
    prompts = [f"prompt {i}" for i in range(60)]
    fa, fb = list(rng.random(60) < 0.5), list(rng.random(60) < 0.7)
    a, b = _harm(prompts, fa), _harm(prompts, fb)
    perm = rng.permutation(60)
    b_shuffled = _harm([prompts[i] for i in perm], [fb[i] for i in perm])
    fam = rt.Family("§t")
    same = fam.compare(rt.keyed(a), rt.keyed(b), "harmful-rate", "harmful_rate")
    shuffled = fam.compare(rt.keyed(a), rt.keyed(b_shuffled), "harmful-rate", "harmful_rate")
    assert same.ci == shuffled.ci and same.p == shuffled.p
    # The same point difference as the records' own numbers, and an interval around it.
    assert math.isclose(same.diff, sum(fb) / 60 - sum(fa) / 60)
    assert same.ci[0] < same.diff < same.ci[1]
    # Another data file: refused even though the texts match.
    other = fam.compare(
        rt.keyed(a), rt.keyed(_harm(prompts, fb, data="other.json")), "harmful-rate", "harmful_rate"
    )
    assert other.ci is None and "different data" in other.note


def test_the_paired_interval_matches_an_independent_bootstrap(rt) -> None:
    # Paired resampling by hand (same draws: numpy's default_rng(seed).integers(0, n, (R, n))).
    rng = np.random.default_rng(1)
    n = 50
    prompts = [f"q{i}" for i in range(n)]
    fa, fb = rng.random(n) < 0.4, rng.random(n) < 0.6
    a, b = rt.keyed(_harm(prompts, list(fa))), rt.keyed(_harm(prompts, list(fb)))
    c = rt.Family("§t").compare(a, b, "harmful-rate", "harmful_rate")
    idx = np.random.default_rng(rt.SEEDS[0]).integers(0, n, size=(rt.RESAMPLES, n))
    d = fb[idx].mean(1) - fa[idx].mean(1)
    assert np.allclose(c.ci, np.quantile(d, [0.025, 0.975]))
    tail = min((d <= 0).sum(), (d >= 0).sum())
    assert math.isclose(c.p[0], min(1.0, (2 * tail + 1) / (rt.RESAMPLES + 1)))


def test_perplexity_windows_below_twenty_get_no_interval(rt) -> None:
    def ppl(nll: list[float]) -> dict:
        items = [
            {"begin": 512 * i, "end": 512 * (i + 1), "scored_tokens": 511, "nll": x}
            for i, x in enumerate(nll)
        ]
        value = math.exp(sum(nll) / (511 * len(nll)))
        return _record("perplexity", items, {"perplexity": value})

    c = rt.Family("§t").compare(
        rt.keyed(ppl([1600.0, 1500, 1700, 1100])),
        rt.keyed(ppl([1650.0, 1520, 1760, 1120])),
        "perplexity",
        "perplexity",
    )
    assert c.ci is None and not c.in_family and "no interval" in str(c)
    assert "4 windows" in rt._ppl_note(ppl([1.0] * 4)) and rt._ppl_note(ppl([1.0] * 20)) == ""


# ----------------------------------------------------------------------------- committed sweeps


RESULTS = ROOT / "docs" / "results" / "ext-sub-truthfulness"


@pytest.mark.skipif(not (RESULTS / "sweeps" / "ext_sub" / "sweep.json").is_file(), reason="no committed run")
def test_committed_extsub_knee_was_inside_its_chord_and_is_gone(rt) -> None:
    sweep = json.loads((RESULTS / "sweeps" / "ext_sub" / "sweep.json").read_text())
    assert sweep["knee"]["lam"] == 2.0  # what the absolute-distance rule reported
    # Independently: on the Pareto front, scaled with better upwards, λ = 2 lies below the chord.
    pts = {p["lam"]: (p["deficiency"]["value"], -p["utility"]["value"]) for p in sweep["points"]}
    front = sweep["pareto"]
    xs, ys = [pts[lam][0] for lam in front], [pts[lam][1] for lam in front]
    x = (pts[2.0][0] - min(xs)) / (max(xs) - min(xs))
    y = (pts[2.0][1] - min(ys)) / (max(ys) - min(ys))
    assert x + y < 1
    redone = rt.reanalyse(rt.Run(RESULTS), "ext_sub")["analysis"]
    assert redone["knee"]["lam"] is None
    assert redone["chosen"]["lam"] == 0.5
    # Chosen on one half of the questions, reported on the other: disjoint, together all 200.
    axes = redone["selection"]["axes"]["deficiency"]
    assert not set(axes["select"]) & set(axes["report"]) and len(axes["select"]) + len(axes["report"]) == 200
    assert redone["chosen"]["report"]["deficiency"]["n"] == 100


def test_rejudged_rates_sit_beside_the_run_own(rt) -> None:
    """§4 side by side (issue 25 item 5): the committed re-scored answers, read back independently."""
    folder = ROOT / "docs" / "results" / "sku-harmful"
    rejudged = folder / "rejudged" / "harm-cross"
    run = rt.Run(folder)
    assert [name for name, _ in rt.rejudged_runs(run)] == ["harm-cross", "harm-lm"]  # sorted folders
    table = rt.sku_rejudged(run)
    old = json.loads((folder / "results" / "sku" / "harmful.json").read_text())
    new = json.loads((rejudged / "results" / "sku" / "harmful.json").read_text())
    pairs = list(zip(old["items"], new["items"], strict=True))
    assert all(a["response"] == b["response"] for a, b in pairs)  # the same answers: no regeneration
    same = sum(a["flagged"] == b["flagged"] for a, b in pairs) / len(pairs)
    rows = [line for line in table.splitlines() if line.startswith("| SKU (θo − θh), λ=1 |")]
    assert len(rows) == 2  # one table per re-scoring judge
    lm = json.loads((folder / "rejudged" / "harm-lm" / "results" / "sku" / "harmful.json").read_text())
    assert rows[1].split("|")[3].strip() == f"{lm['metrics']['harmful_rate']:.2f}"
    row = rows[0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{old['metrics']['harmful_rate']:.2f}"
    assert cells[2] == f"{new['metrics']['harmful_rate']:.2f}"
    assert cells[5] == f"{same:.2f}"
    assert new["judge"]["agreement"]["auc"] != old["judge"]["agreement"]["auc"]  # the retrained weights
