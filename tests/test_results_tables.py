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
    prefix = ppl([1.0] * 4) | {"data_summary": {"kept": 40, "after_split": 4358}, "settings": {"window": 512}}
    assert "4 windows of 512 tokens (the first 40 of 4358 rows)" in rt._ppl_note(prefix)


# ----------------------------------------------------------------------------- committed sweeps


RESULTS = ROOT / "docs" / "results" / "ext-sub-truthfulness"


# The first ext-sub-truthfulness run's Ext-Sub sweep (docs/results at 41d3dce, before its re-run):
# λ → (TruthfulQA MC2, wikitext-2 perplexity), and the knee its sweep.json reported.
FIRST_RUN_POINTS = {
    0.0: (0.43165816417643255, 32.23392404430479),
    0.5: (0.43213673421951876, 32.8939569376208),
    1.0: (0.43201436634279355, 33.88981362316746),
    2.0: (0.4457286554044395, 37.148774179758476),
    3.0: (0.4735276129481773, 42.83606003734415),
}
FIRST_RUN_KNEE = 2.0  # by the absolute distance to the chord


def test_first_run_extsub_knee_was_inside_its_chord_and_is_gone() -> None:
    from excise.pipeline.sweep import knee_point, pareto_front

    lams = list(FIRST_RUN_POINTS)
    mc2 = [FIRST_RUN_POINTS[lam][0] for lam in lams]
    ppl = [FIRST_RUN_POINTS[lam][1] for lam in lams]
    front = [lams[i] for i in pareto_front(mc2, ppl, higher_d=True, higher_u=False)]
    assert front == [0.0, 0.5, 2.0, 3.0]  # λ = 1 is beaten by λ = 0.5 on both axes
    # Independently: scale the front with "better" upwards; the chord joins (0, 1) and (1, 0).
    xs = {lam: (FIRST_RUN_POINTS[lam][0] - mc2[0]) / (max(mc2) - mc2[0]) for lam in front}
    ys = {lam: (max(ppl) - FIRST_RUN_POINTS[lam][1]) / (max(ppl) - min(ppl)) for lam in front}
    absolute = max(front[1:-1], key=lambda lam: abs(xs[lam] + ys[lam] - 1))
    assert absolute == FIRST_RUN_KNEE  # what the old rule reported …
    assert xs[2.0] + ys[2.0] < 1  # … lies on the wrong side of the chord: a dent
    assert all(xs[lam] + ys[lam] <= 1 for lam in front)  # no point beyond the chord at all
    assert knee_point(lams, mc2, ppl, higher_d=True, higher_u=False)["lam"] is None


@pytest.mark.skipif(not (RESULTS / "sweeps" / "ext_sub" / "sweep.json").is_file(), reason="no committed run")
def test_committed_extsub_sweep_selects_on_one_half_and_reports_on_the_other(rt) -> None:
    sweep = json.loads((RESULTS / "sweeps" / "ext_sub" / "sweep.json").read_text())
    redone = rt.reanalyse(rt.Run(RESULTS), "ext_sub")["analysis"]
    knee = redone["knee"]["lam"]
    if knee is not None:  # the knee, if any, lies beyond the chord of the committed front
        pts = {p["lam"]: (p["deficiency"]["value"], -p["utility"]["value"]) for p in sweep["points"]}
        front = redone["pareto"]
        xs, ys = [pts[lam][0] for lam in front], [pts[lam][1] for lam in front]
        x = (pts[knee][0] - min(xs)) / (max(xs) - min(xs))
        y = (pts[knee][1] - min(ys)) / (max(ys) - min(ys))
        assert x + y > 1
    # Chosen on one half of the questions, reported on the other: disjoint, together all 200.
    axes = redone["selection"]["axes"]["deficiency"]
    assert not set(axes["select"]) & set(axes["report"]) and len(axes["select"]) + len(axes["report"]) == 200
    assert redone["chosen"]["report"]["deficiency"]["n"] == len(axes["report"])


def test_rejudged_rates_sit_beside_the_run_own(rt) -> None:
    """§4 side by side (issue 25 item 5): the committed re-scored answers, read back independently."""
    folder = ROOT / "docs" / "results" / "sku-harmful"
    rejudged = folder / "rejudged" / "harm-cross"
    run = rt.Run(folder)
    assert [name for name, _ in rt.rejudged_runs(run)] == ["harm-cross"]
    table = rt.sku_rejudged(run)
    old = json.loads((folder / "results" / "sku" / "harmful.json").read_text())
    new = json.loads((rejudged / "results" / "sku" / "harmful.json").read_text())
    assert old["judge"]["name"] == "harm-lm" and new["judge"]["name"] == "harm-cross"
    pairs = list(zip(old["items"], new["items"], strict=True))
    assert all(a["response"] == b["response"] for a, b in pairs)  # the same answers: no regeneration
    same = sum(a["flagged"] == b["flagged"] for a, b in pairs) / len(pairs)
    rows = [line for line in table.splitlines() if line.startswith("| SKU (θo − θh), λ=1 |")]
    assert len(rows) == 1  # one table per re-scoring judge
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == f"{old['metrics']['harmful_rate']:.2f}"
    assert cells[2] == f"{new['metrics']['harmful_rate']:.2f}"
    assert cells[5] == f"{same:.2f}"
    assert new["judge"]["agreement"]["auc"] != old["judge"]["agreement"]["auc"]


def test_diagnostics_of_a_run_without_them_print_nothing(rt, tmp_path) -> None:
    """No empty table for a run folder that lacks the diagnostics (§4's committed files)."""
    assert rt.diagnostics(rt.Run(tmp_path), [("ext_sub", "expert vs anti-expert")]) == ""


# ----------------------------------------------------------------------------- §5: the sku-gemma run

PAIR_KEYS = ("win_rate", "win_rate_sum", "margin", "nll_chosen", "nll_rejected", "nll_chosen_sum",
             "nll_rejected_sum", "forget", "retain", "selectivity")  # fmt: skip


def _pairs_record(rng: np.random.Generator, prompts: list[str], n_pairs: list[int], edited: bool) -> dict:
    """A `pairs` record in the question-answer template: one item per prompt holding its pairs' totals."""
    items = []
    for i, (prompt, n) in enumerate(zip(prompts, n_pairs, strict=True)):
        totals = {k: float(rng.normal(2.0, 0.5) * n) for k in PAIR_KEYS}
        forget, retain = (rng.normal(0.3, 0.2) * n, rng.normal(0.2, 0.2) * n) if edited else (0.0, 0.0)
        totals |= {"forget": forget, "retain": retain, "selectivity": forget - retain}
        items.append(
            {"key": f"p{i}", "prompt": prompt, "n_pairs": n} | {f"{k}_total": v for k, v in totals.items()}
        )
    metrics = {k: sum(it[f"{k}_total"] for it in items) / sum(n_pairs) for k in PAIR_KEYS}
    template = {"template": "question-answer", "chat": None}
    return {"metric": "pairs", "metrics": metrics, "items": items, "format": "question-answer", "limit": 150,
            "n_pairs": sum(n_pairs), "n_prompts": len(prompts), "settings": template}  # fmt: skip


def _mean_record(metric: str, field: str, values: list[float], **extra) -> dict:
    items = [{"key": f"i{i}", field: v} for i, v in enumerate(values)]
    return {"metric": metric, "metrics": {field: sum(values) / len(values)}, "items": items,
            "n_items": len(values), **extra}  # fmt: skip


def _sku_gemma_run(folder: Path) -> dict[str, dict[str, dict]]:
    """A small synthetic run of recipes/sku-gemma.yaml: base, SKU (LoRA and full parameters) and NPO,
    the paper's-ε SKU without any result, and `sku_full` without its Alpaca NLL."""
    rng = np.random.default_rng(7)
    prompts = [f"harmful prompt {i}" for i in range(40)]
    n_pairs = [int(x) for x in rng.integers(1, 4, size=40)]
    judge = {"name": "synthetic-judge", "agreement": {"accuracy": 0.7, "auc": 0.75, "n": 100}}
    records: dict[str, dict[str, dict]] = {}
    for model in ("base", "sku", "sku_full", "npo"):
        edited = model != "base"
        alpaca = [float(x) for x in rng.normal(2.0, 0.3, 30)]
        refusal = [0.0] * 30 if not edited else [float(x) for x in rng.normal(-0.5, 1.0, 30)]
        flags = [bool(x) for x in rng.random(40) < (0.7 if not edited else 0.5)]
        windows = [{"key": f"w{i}", "begin": 256 * i, "end": 256 * (i + 1), "scored_tokens": 255,
                    "nll": float(rng.normal(3.0, 0.1) * 255)} for i in range(25)]  # fmt: skip
        nll = sum(w["nll"] for w in windows) / sum(w["scored_tokens"] for w in windows)
        answers = [{"key": f"h{i}", "prompt": p, "response": f"answer of {model} to {p}", "score": float(f),
                    "flagged": f} for i, (p, f) in enumerate(zip(prompts, flags, strict=True))]  # fmt: skip
        settings = {"template": "question-answer", "chat": None}
        harmful = {"metric": "harmful-rate", "metrics": {"harmful_rate": sum(flags) / 40}, "items": answers,
                   "n_items": 40, "judge": judge, "settings": settings}  # fmt: skip
        records[model] = {
            "pairs": _pairs_record(rng, prompts, n_pairs, edited),
            "alpaca_nll": _mean_record("answer-nll", "delta_nll", [a - 2.0 for a in alpaca]),
            "refusal_pku": _mean_record("refusal-logprob", "delta_refusal_logprob", refusal, refusal="No."),
            "harmful": harmful,
            "advbench": harmful | {"items": list(reversed(answers))},  # the same answers, another order
            "perplexity": {
                "metric": "perplexity",
                "metrics": {"perplexity": math.exp(nll)},
                "items": windows,
                "settings": {"window": 256},
            },
        }
        records[model]["alpaca_nll"]["metrics"]["nll"] = sum(alpaca) / len(alpaca)
    del records["sku_full"]["alpaca_nll"]
    records["sku"]["pairs"]["items"].reverse()  # paired by prompt, never by position
    for model, by_eval in records.items():
        for name, record in by_eval.items():
            path = folder / "results" / model / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
    (folder / "stages.json").write_text(json.dumps({"stages": {"eval pairs/base": {"seconds": 60.0}}}))
    return records


def _row(text: str, label: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert rows, label
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_sku_gemma_section_5_renders_and_pairs_by_prompt(rt, tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "sku-gemma-synthetic"
    records = _sku_gemma_run(folder)
    monkeypatch.setattr(rt, "IMG", tmp_path / "img")
    rt.main([str(folder)])
    text = capsys.readouterr().out
    # The judge-free table: the selectivity of SKU (LoRA) against the base model, a primary contrast.
    cells = _row(text, "SKU, LoRA (θo − θh), λ=1")
    base, sku = records["base"]["pairs"], records["sku"]["pairs"]
    # Independently: prompts resampled with their pairs (SKU's put in the base's prompt order by key),
    # Σ selectivity / Σ pairs, minus the base's (0).
    by_key = {it["key"]: it for it in sku["items"]}
    sel = np.array([by_key[it["key"]]["selectivity_total"] for it in base["items"]])
    n = np.array([it["n_pairs"] for it in base["items"]], dtype=float)
    base_sel = np.array([it["selectivity_total"] for it in base["items"]])
    idx = np.random.default_rng(rt.SEEDS[0]).integers(0, len(n), size=(rt.RESAMPLES, len(n)))
    d = sel[idx].sum(1) / n[idx].sum(1) - base_sel[idx].sum(1) / n[idx].sum(1)
    lo, hi = np.quantile(d, [0.025, 0.975])
    diff = sel.sum() / n.sum()
    assert cells[6].startswith(f"**{diff:+.3f} [{lo:+.3f}, {hi:+.3f}] (")  # bold: primary
    assert math.isclose(diff, sku["metrics"]["selectivity"])
    header = [c.strip() for c in text.splitlines()[3].strip("|").split("|")]
    assert header[6] == "selectivity = forget − retain" and header[-1] == "refusal Δlog p (PKU)"
    assert "refusal Δlog p (AdvBench)" not in text  # the recipe has no refusal_advbench
    # The records' template, not "chat template".
    assert "each answer in the question-answer template" in text and "chat template" not in text
    # Missing results: the paper's-ε SKU has none, sku_full has no Alpaca NLL: "–" cells, no crash.
    assert set(_row(text, "SKU, paper's ε (θo − θh, LoRA), λ=1")[1:]) == {"–"}
    full = _row(text, "SKU, full parameters (θo − θh), λ=1")
    assert full[7:9] == ["–", "–"] and full[6].startswith("**")
    # The judged table: harmful rate with a paired difference against the base model, perplexity.
    judged = text[text.index("| model | harmful rate (PKU)") :]
    cells = _row(judged, "SKU, LoRA (θo − θh), λ=1")
    rate = records["sku"]["harmful"]["metrics"]["harmful_rate"]
    assert cells[1] == f"{rate:.2f}"
    assert cells[3].startswith(f"**{rate - records['base']['harmful']['metrics']['harmful_rate']:+.3f} [")
    assert cells[-1] == f"{records['sku']['perplexity']['metrics']['perplexity']:.2f}"
    assert "Answers generated in the question-answer template" in judged
    # Sample answers of base, SKU (LoRA and full parameters) and NPO; the §5 plots, not §4's.
    assert "  - SKU, full parameters λ=1 (score" in text and "  - NPO (score" in text
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "sku_gemma_harmful.png",
        "sku_gemma_likelihood.png",
    ]


# ----------------------------------------------------------------------------- §6: the ext-sub-gemma run


def _as_gemma_run(src: Path, dst: Path) -> None:
    """The committed §1b run rewritten as an ext-sub-gemma run: the sweeps named `ext_sub` and
    `subtract`, the trained-format TruthfulQA evaluation `truthfulqa_tulu` (the same numbers)."""
    for path in sorted(src.rglob("*")):
        rel = str(path.relative_to(src))
        rel = rel.replace("ext_sub_chat", "ext_sub").replace("subtract_chat", "subtract")
        rel = rel.replace("truthfulqa_chat", "truthfulqa_tulu")
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".json":
            target.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text().replace("truthfulqa_chat", "truthfulqa_tulu")
            target.write_text(text.replace("ext_sub_chat", "ext_sub").replace("subtract_chat", "subtract"))


def test_ext_sub_gemma_section_6_is_section_1b_in_the_tulu_template(
    rt, tmp_path, monkeypatch, capsys
) -> None:
    src = ROOT / "docs" / "results" / "ext-sub-truthfulness-chat"
    folder = tmp_path / "ext-sub-gemma"
    _as_gemma_run(src, folder)
    monkeypatch.setattr(rt, "IMG", tmp_path / "img")
    rt.main(["--no-plots", str(folder)])
    text = capsys.readouterr().out
    assert "MC2 (tulu)" in text and "MC2 (chat)" not in text and "tulu template" in text
    # Ext-Sub λ = 1 against its expert (λ = 0) on tulu-format MC2, the primary contrast: the point
    # difference and a bootstrap of the per-question MC2 paired by question (in the expert's order).
    points = {}
    for lam in (0.0, 1.0):
        record = json.loads(
            (
                folder / "sweeps" / "ext_sub" / "results" / rt.lam_folder(lam) / "truthfulqa-mc.json"
            ).read_text()
        )
        points[lam] = {it["question"]: it["mc2"] for it in record["items"]}
    questions = list(points[0.0])
    a = np.array([points[0.0][q] for q in questions])
    b = np.array([points[1.0][q] for q in questions])
    idx = np.random.default_rng(rt.SEEDS[0]).integers(0, len(a), size=(rt.RESAMPLES, len(a)))
    d = b[idx].mean(1) - a[idx].mean(1)
    lo, hi = np.quantile(d, [0.025, 0.975])
    cells = [
        c.strip()
        for c in next(line for line in text.splitlines() if line.startswith("| Ext-Sub λ=1 |"))
        .strip("|")
        .split("|")
    ]
    assert cells[2] == f"{b.mean():.3f}"
    assert cells[3].startswith(f"**{b.mean() - a.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] (")  # bold: primary

    # The base model's own perplexity shows where the run scored it, "–" where it did not.
    def base_row() -> list[str]:
        line = next(
            line for line in capsys.readouterr().out.splitlines() if line.startswith("| base model |")
        )
        return [c.strip() for c in line.strip("|").split("|")]

    (folder / "results" / "base" / "perplexity.json").unlink(missing_ok=True)  # a run that did not score it
    rt.main(["--no-plots", str(folder)])
    assert base_row()[6] == "–"
    ppl = {
        "metric": "perplexity",
        "metrics": {"perplexity": 36.3149},
        "items": [],
        "settings": {"window": 256},
    }
    (folder / "results" / "base" / "perplexity.json").write_text(json.dumps(ppl))
    rt.main(["--no-plots", str(folder)])
    assert base_row()[6] == "36.31"


def test_items_read_says_how_the_questions_were_taken(rt) -> None:
    """The caption comes from the record: a subsample, a prefix (records before issue 22) or all."""

    def record(kept, pool, subsample):
        summary = {"kept": kept, "after_split": pool}
        if subsample:
            summary["subsample"] = {"seed": 0, "n": kept}
        return {"n_items": kept, "data_summary": summary}

    assert rt._items_read(record(200, 817, True)) == "200 questions (a seeded subsample of the 817)"
    assert rt._items_read(record(200, 817, False)) == "200 questions (the first 200 of 817)"
    assert rt._items_read(record(817, 817, False)) == "all 817 questions"
    assert rt._items_read({"n_items": 5}) == "5 questions"
    assert rt._how_taken(record(150, 965, True)) == "a seeded subsample of the 965"  # §4b, §5: pairs
    assert rt._how_taken(record(965, 965, False)) == "all" and rt._how_taken({}) is None
