"""Judged rates corrected for the judge's sensitivity and specificity (Rogan–Gladen), and the
agreement counts they need.

Checked against independent computations: hand-computed values, a delta-method standard
error, and a simulation with a known prevalence and a judge of known sensitivity and
specificity measured on finite labelled sets. The metric tests use test-only judges (below)
on a tiny model, as tests/evaluate/test_metrics.py does.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from excise.evaluate.judges.agreement import confusion_fields, counts_from_rates, operating_counts
from excise.evaluate.stats import MIN_YOUDEN, corrected_rate_interval, rogan_gladen
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the estimator


def test_rogan_gladen_by_hand():
    assert rogan_gladen(0.4, 0.8, 0.9) == pytest.approx(0.3 / 0.7)  # (0.4 + 0.9 − 1) / 0.7
    assert rogan_gladen(0.345, 0.8, 0.85) == pytest.approx(0.3)  # 0.8·0.3 + 0.15·0.7 flagged
    assert rogan_gladen(0.05, 0.8, 0.9) == 0.0  # (−0.05) / 0.7, clipped
    assert rogan_gladen(0.95, 0.8, 0.9) == 1.0  # 0.85 / 0.7, clipped
    assert rogan_gladen(0.37, 1.0, 1.0) == pytest.approx(0.37)  # a perfect judge changes nothing
    with pytest.raises(ValueError, match="sensitivity must be in"):
        rogan_gladen(0.5, 1.2, 0.9)


@pytest.mark.parametrize("se, sp", [(0.5, 0.52), (0.5, 0.5 + MIN_YOUDEN), (0.3, 0.4)])
def test_refused_when_the_judge_cannot_tell_the_classes_apart(se, sp):
    with pytest.raises(ValueError, match="Youden's J"):
        rogan_gladen(0.5, se, sp)
    n_pos = n_neg = 100
    tp, tn = round(se * n_pos), round(sp * n_neg)
    out = corrected_rate_interval(
        [True] * 30 + [False] * 20, true_positives=tp, n_positive=n_pos, true_negatives=tn, n_negative=n_neg
    )
    assert out["value"] is None and out["ci"] is None and "Youden's J" in out["reason"]
    assert out["youden"] == pytest.approx(se + sp - 1)


def test_interval_record_by_hand():
    flags = [True] * 40 + [False] * 60
    out = corrected_rate_interval(flags, true_positives=80, n_positive=100, true_negatives=90, n_negative=100)
    assert out["value"] == pytest.approx((0.4 + 0.9 - 1) / 0.7)
    assert out["rate"] == 0.4 and out["n"] == 100
    assert (out["sensitivity"], out["specificity"], out["youden"]) == pytest.approx((0.8, 0.9, 0.7))
    assert (out["n_positive"], out["n_negative"], out["resamples"]) == (100, 100, 10_000)
    lo, hi = out["ci"]
    assert 0 <= lo < out["value"] < hi <= 1 and out["stderr"] > 0 and "reason" not in out
    again = corrected_rate_interval(
        flags, true_positives=80, n_positive=100, true_negatives=90, n_negative=100
    )
    assert again == out  # seeded
    few = corrected_rate_interval(
        flags[:10], true_positives=80, n_positive=100, true_negatives=90, n_negative=100
    )
    assert few["value"] is not None and few["ci"] is None and "at least 20" in few["reason"]
    none = corrected_rate_interval(flags, true_positives=0, n_positive=0, true_negatives=90, n_negative=100)
    assert none["value"] is None and "one class" in none["reason"]


def test_stderr_matches_the_delta_method():
    """Away from the clip, Var π̂ ≈ (Var p̂ + π²·Var se + (1 − π)²·Var sp) / J²."""
    n, k, tp, n_pos, tn, n_neg = 2000, 800, 400, 500, 450, 500
    out = corrected_rate_interval([True] * k + [False] * (n - k), true_positives=tp, n_positive=n_pos,
                                  true_negatives=tn, n_negative=n_neg)  # fmt: skip
    p, se, sp = k / n, tp / n_pos, tn / n_neg
    pi, j = (p + sp - 1) / (se + sp - 1), se + sp - 1
    var = p * (1 - p) / n + pi**2 * se * (1 - se) / n_pos + (1 - pi) ** 2 * sp * (1 - sp) / n_neg
    assert out["stderr"] == pytest.approx(math.sqrt(var) / j, rel=0.05)
    assert out["ci"][0] == pytest.approx(pi - 1.96 * math.sqrt(var) / j, abs=0.005)
    assert out["ci"][1] == pytest.approx(pi + 1.96 * math.sqrt(var) / j, abs=0.005)


def test_simulation_unbiased_and_covers():
    """True prevalence 0.3; a judge with sensitivity 0.8 and specificity 0.85, each measured on
    300 labelled items; 400 items judged per study. Over 1,000 studies the corrected estimate
    averages the truth and its 95 % interval covers it ≈ 95 % of the time; the raw rate (which
    estimates 0.345, not 0.3) covers it about half the time with its own 95 % interval."""
    rng = np.random.default_rng(12345)
    prevalence, se, sp, n, n_pos, n_neg, studies = 0.3, 0.8, 0.85, 400, 300, 300, 1000
    covered = raw_covered = 0
    estimates = []
    for study in range(studies):
        truth = rng.random(n) < prevalence
        flags = np.where(truth, rng.random(n) < se, rng.random(n) < 1 - sp)
        tp, tn = int(rng.binomial(n_pos, se)), int(rng.binomial(n_neg, sp))
        out = corrected_rate_interval(flags.tolist(), true_positives=tp, n_positive=n_pos, true_negatives=tn,
                                      n_negative=n_neg, seed=study)  # fmt: skip
        estimates.append(out["value"])
        covered += out["ci"][0] <= prevalence <= out["ci"][1]
        raw, half = flags.mean(), 1.96 * math.sqrt(flags.mean() * (1 - flags.mean()) / n)
        raw_covered += raw - half <= prevalence <= raw + half
    assert abs(np.mean(estimates) - prevalence) < 0.005
    assert 0.93 <= covered / studies <= 0.97
    assert raw_covered / studies < 0.65


# ----------------------------------------------------------------------------- agreement counts


def test_counts_from_the_shipped_harm_cross_metadata():
    from excise.evaluate.judges.cross import CROSS_SHIPPED, read_cross

    agreement = read_cross(CROSS_SHIPPED)[2]["agreement"]
    n = agreement["n"]
    counts = counts_from_rates(
        n, agreement["accuracy"], agreement["positive_rate"], agreement["flagged_rate"]
    )
    assert counts is not None and all(isinstance(v, int) and v >= 0 for v in counts.values())
    assert sum(counts.values()) == n
    assert round((counts["true_positives"] + counts["true_negatives"]) / n, 4) == agreement["accuracy"]
    assert round((counts["true_positives"] + counts["false_positives"]) / n, 4) == agreement["flagged_rate"]
    assert round((counts["true_positives"] + counts["false_negatives"]) / n, 4) == agreement["positive_rate"]


@pytest.mark.parametrize(
    "tp, fn, fp, tn", [(225, 93, 166, 152), (84, 25, 20, 127), (0, 7, 0, 993), (3, 0, 0, 0)]
)
def test_counts_from_rates_round_trip(tp, fn, fp, tn):
    n = tp + fn + fp + tn
    rates = round((tp + tn) / n, 4), round((tp + fn) / n, 4), round((tp + fp) / n, 4)
    assert counts_from_rates(n, *rates) == {
        "true_positives": tp, "false_negatives": fn, "false_positives": fp, "true_negatives": tn,
    }  # fmt: skip


def test_counts_from_rates_refuses_what_the_figures_do_not_fix():
    assert counts_from_rates(636, 0.5928, 0.5, 0.6149) is None  # TP would be 225.3
    assert counts_from_rates(20_000, 0.5, 0.5, 0.5) is None  # 4 decimals cannot pin one count of n
    assert counts_from_rates(10, 0.9, 0.1, 0.9) is None  # TP 4.5
    assert counts_from_rates(10, 0.0, 0.9, 0.9) is None  # TN would be −4


def test_confusion_fields_by_hand():
    flagged = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    labels = np.array([1, 0, 1, 0, 1, 0])
    assert confusion_fields(flagged, labels) == {
        "sensitivity": 0.6667, "specificity": 0.6667, "n_positive": 3, "n_negative": 3,
        "true_positives": 2, "true_negatives": 2,
    }  # fmt: skip
    assert confusion_fields(flagged[:1], labels[:1])["specificity"] is None


def test_measured_agreement_records_carry_the_counts():
    from excise.evaluate.judges.probe_training import LabelledPairs, heldout_agreement, measure_agreement

    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    pairs = LabelledPairs(["p"] * 7, [f"r{i}" for i in range(7)], labels, ["p"] * 7, "test")
    p_held = np.array([0.9, 0.7, 0.2, 0.6, 0.1, 0.3, 0.5])  # 0.5 is not above 0.5
    held = heldout_agreement(p_held, pairs)
    assert held["threshold"] == 0.5
    assert (held["true_positives"], held["n_positive"], held["true_negatives"], held["n_negative"]) == (
        2,
        3,
        3,
        4,
    )
    assert (held["sensitivity"], held["specificity"]) == (0.6667, 0.75)

    class Fixed:
        name, threshold = "fixed", 0.65

        def score(self, prompts, responses):
            return p_held.tolist()

    measured = measure_agreement(Fixed(), pairs)
    assert (measured["true_positives"], measured["true_negatives"]) == (2, 4)
    counts, reason = operating_counts({"name": "fixed", "threshold": 0.65, "agreement": measured})
    assert reason is None and counts["source"] == "counts recorded with the agreement"
    assert (counts["sensitivity"], counts["specificity"]) == pytest.approx((2 / 3, 1.0))


def test_operating_counts_of_the_shipped_judges_and_their_refusals():
    from excise.evaluate.judges import load_judge
    from excise.evaluate.metrics.base import judge_record

    counts, reason = operating_counts(judge_record(load_judge("harm-cross")))
    assert reason is None and counts["source"].startswith("derived")
    keys = ("true_positives", "n_positive", "true_negatives", "n_negative")
    assert tuple(counts[k] for k in keys) == (225, 318, 152, 318)
    counts, reason = operating_counts(judge_record(load_judge("harm-cross", threshold=0.7)))
    assert counts is None and "measured at threshold 0.5" in reason
    counts, reason = operating_counts(judge_record(load_judge("harm-cross", terse_refusal_words=0)))
    assert counts is None and "terse_refusal_words=15" in reason
    counts, reason = operating_counts(judge_record(load_judge("refusal")))
    assert counts is None and "no measured agreement" in reason


def test_judge_check_prints_sensitivity_and_specificity(tmp_path):
    from typer.testing import CliRunner

    from excise.cli import app

    data = tmp_path / "labelled.jsonl"
    rows = [("I'm sorry, I can't.", 0), ("Sure, step one ...", 1), ("Here you go.", 0), ("I cannot help.", 1)]
    data.write_text("".join(json.dumps({"prompt": "p", "response": r, "label": y}) + "\n" for r, y in rows))
    out = tmp_path / "agreement.json"
    result = CliRunner().invoke(
        app, ["eval", "judge-check", "--judge", "refusal", "--data", str(data), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    # refusal flags rows 2 and 3: TP = 1 of 2 unsafe, TN = 1 of 2 safe.
    assert "sensitivity 0.5000 (1/2), specificity 0.5000 (1/2), Youden's J 0.0000" in result.output
    agreement = json.loads(out.read_text())["agreement"]
    assert (agreement["sensitivity"], agreement["specificity"], agreement["n_positive"]) == (0.5, 0.5, 2)


# ----------------------------------------------------------------------------- in the metrics


class CountsJudge:
    """Test-only judge: the score of tests/evaluate/test_metrics.py's LengthJudge, and an agreement
    record with confusion counts (as measure_agreement writes them)."""

    name = "counts-test"
    threshold = 0.5

    def __init__(self, tp=80, n_pos=100, tn=90, n_neg=100, threshold=0.5):
        counts = {"true_positives": tp, "n_positive": n_pos, "true_negatives": tn, "n_negative": n_neg}
        n = n_pos + n_neg
        self.agreement = {"accuracy": (tp + tn) / n, "n": n, "threshold": threshold, **counts}

    def score(self, prompts, responses):
        return [min(1.0, (len(r) % 11) / 10) for r in responses]

    def describe(self):
        return {"name": self.name, "threshold": self.threshold, "agreement": self.agreement}


class NoAgreementJudge(CountsJudge):
    def describe(self):
        return {"name": "no-agreement", "threshold": self.threshold, "agreement": None}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", max_position_embeddings=4096)


@pytest.fixture
def harm_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "harm.json"
    path.write_text(
        json.dumps([{"prompt": f"How to do thing {i}?", "instruction": f"Say {i}."} for i in range(24)])
    )
    return path


def _run(name, model_dir, data, judge):
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval

    cfg = EvalConfig(
        model=str(model_dir), data=str(data), device="cpu", max_new_tokens=6, batch_size=4, split="all"
    )
    return run_eval(name, cfg, judge=judge, progress=False)


def test_harmful_rate_carries_the_corrected_rate(model_dir, harm_file):
    record = _run("harmful-rate", model_dir, harm_file, CountsJudge())
    flags = [it["flagged"] for it in record["items"]]
    rate = sum(flags) / len(flags)
    assert record["metrics"]["harmful_rate"] == pytest.approx(rate)  # unchanged
    assert record["metrics"]["harmful_rate_corrected"] == pytest.approx(rogan_gladen(rate, 0.8, 0.9))
    detail = record["corrected"]["harmful_rate"]
    assert detail["value"] == record["metrics"]["harmful_rate_corrected"] and detail["n"] == 24
    assert detail["counts_source"] == "counts recorded with the agreement" and detail["threshold"] == 0.5
    assert detail["ci"][0] <= detail["value"] <= detail["ci"][1]
    assert record["stderr"]["harmful_rate_corrected"] == detail["stderr"]
    expected = corrected_rate_interval(
        flags, true_positives=80, n_positive=100, true_negatives=90, n_negative=100
    )
    assert detail["ci"] == pytest.approx(expected["ci"])

    # The report does not break on it: a number with no per-item field gives a reason, not an error.
    from excise.pipeline.report import compare_cell

    cell = compare_cell(record, record, "harmful-rate", "harmful_rate_corrected")
    assert cell["ci"] is None and "per-item" in cell["reason"]
    assert compare_cell(record, record, "harmful-rate", "harmful_rate")["diff"] == 0


def test_corrected_rate_refused_with_the_reason(model_dir, harm_file):
    record = _run("harmful-rate", model_dir, harm_file, NoAgreementJudge())
    assert record["metrics"]["harmful_rate_corrected"] is None
    assert "no measured agreement" in record["null_reasons"]["harmful_rate_corrected"]
    assert record["metrics"]["harmful_rate"] is not None
    blind = _run("harmful-rate", model_dir, harm_file, CountsJudge(tp=50, n_pos=100, tn=52, n_neg=100))
    assert blind["metrics"]["harmful_rate_corrected"] is None
    assert "Youden's J" in blind["null_reasons"]["harmful_rate_corrected"]
    other = _run("harmful-rate", model_dir, harm_file, CountsJudge(threshold=0.7))
    assert "measured at threshold 0.7" in other["null_reasons"]["harmful_rate_corrected"]


def test_toxicity_corrects_the_flagged_rate_at_the_judge_threshold(model_dir, harm_file):
    record = _run("toxicity", model_dir, harm_file, CountsJudge())
    rate = record["metrics"]["judge_flagged_rate"]
    assert record["metrics"]["judge_flagged_rate_corrected"] == pytest.approx(rogan_gladen(rate, 0.8, 0.9))
    assert record["corrected"]["judge_flagged_rate"]["n"] == 24
    assert "toxic_share_corrected" not in record["metrics"]  # 0.8 is not where agreement is measured


def test_report_shows_the_corrected_rate(model_dir, harm_file, tmp_path):
    from excise.evaluate.runner import write_result
    from excise.pipeline.report import write_report

    record = _run("harmful-rate", model_dir, harm_file, CountsJudge())
    run = tmp_path / "run"
    for method in ("base", "ext_sub"):
        write_result(record, run / "results" / method / "harmful-rate.json")
    write_report(run, title="T")
    md = (run / "report" / "report.md").read_text()
    assert "harmful-rate:harmful_rate_corrected" in md
    assert "sensitivity 0.800 (80/100), specificity 0.900 (90/100)" in md  # the judge's line


def test_a_saved_record_is_corrected_from_its_judge_record(model_dir, harm_file):
    from excise.evaluate.metrics.base import corrected_rate

    record = _run("harmful-rate", model_dir, harm_file, CountsJudge())
    again = corrected_rate(record["judge"], [it["flagged"] for it in record["items"]])
    assert again["value"] == record["metrics"]["harmful_rate_corrected"]
    assert again["ci"] == record["corrected"]["harmful_rate"]["ci"]
