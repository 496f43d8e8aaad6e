"""`excise sweep` / run_sweep: equal to separate `ops` + `eval` runs, the λ rule, bad input."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from excise.evaluate.stats import bootstrap_pvalue
from excise.pipeline.sweep import (
    SweepConfig,
    SweepMetric,
    choose_lam,
    item_stat,
    knee_point,
    lam_folder,
    linear_parts,
    paired_bootstrap,
    paired_difference,
    pareto_front,
    selection_split,
)
from tests.conftest import random_lora, save_tiny_model, write_peft_lora

pytestmark = pytest.mark.usefixtures("one_thread")


_SHAPES = {"q": (6, 5), "v": (4, 5)}


def _main(monkeypatch, *args: str) -> int:
    from excise.cli import main

    monkeypatch.setattr(sys, "argv", ["excise", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def _cfg(**kw) -> SweepConfig:
    settings = {
        "model": "m",
        "inputs": ["e", "a"],
        "lams": [0.5, 1.0],
        "deficiency": {"metric": "truthfulqa-mc", "key": "mc2"},
        "utility": {"metric": "perplexity", "key": "perplexity"},
        "out": "o",
    }
    return SweepConfig(**(settings | kw))


# ----------------------------------------------------------------------------- W(λ) = W0 + λ·D


@pytest.mark.parametrize(("operation", "n"), [("ext_sub", 2), ("subtract", 2), ("negate", 1), ("compose", 3)])
def test_linear_parts_rebuild_the_operator_at_any_lam(operation, n):
    from excise.pem.ops.registry import get_operator

    adapters = [random_lora(_SHAPES, seed=s) for s in range(n)]
    cfg = _cfg(operation=operation, inputs=[f"x{i}" for i in range(n)])
    w0, delta = linear_parts(cfg, adapters)
    fn = get_operator(operation).fn
    for lam in (-0.5, 0.3, 2.0):
        if operation == "negate":
            expected = fn(adapters[0], lam=lam)
        elif operation == "compose":
            expected = fn(*adapters, lams=[lam, lam])
        else:
            expected = fn(*adapters, lam=lam)
        for name, module in expected.modules.items():
            got = lam * delta.modules[name].dense() + (0.0 if w0 is None else w0.modules[name].dense())
            np.testing.assert_allclose(got, module.dense(), rtol=1e-12, atol=1e-12)
    assert (w0 is None) == (operation == "negate")
    # D keeps the operator's rank, W0 drops the zero block: r1 for the expert alone
    if operation == "ext_sub":
        assert delta.modules["q"].rank == 8 and w0.modules["q"].rank == 4


def test_linear_parts_refuse_ia3():
    from excise.errors import ConfigError
    from tests.conftest import random_rows

    with pytest.raises(ConfigError, match="needs LoRA adapters"):
        linear_parts(_cfg(), [random_rows({"q": (1, 5)}), random_rows({"q": (1, 5)}, seed=1)])


# ----------------------------------------------------------------------------- the λ rule


def test_choose_lam_follows_the_rule():
    lams = [0.0, 0.25, 0.5, 1.0, 2.0]
    mc2 = [0.30, 0.33, 0.36, 0.40, 0.41]  # higher is better
    ppl = [10.0, 10.2, 10.5, 10.49, 12.0]  # lower is better; +5 % → at most 10.5
    chosen = choose_lam(lams, mc2, ppl, higher_d=True, higher_u=False, tolerance=0.05)
    assert chosen["lam"] == 1.0 and chosen["admissible"] == [True, True, True, True, False]
    assert chosen["utility_loss"][2] == pytest.approx(0.05)
    # Tighter tolerance: only λ ≤ 0.25 qualifies.
    assert choose_lam(lams, mc2, ppl, higher_d=True, higher_u=False, tolerance=0.02)["lam"] == 0.25
    # A tie in the deficiency score goes to the smaller |λ|.
    tie = choose_lam(
        [0.0, -1.0, 0.5], [0.1, 0.5, 0.5], [1.0, 1.0, 1.0], higher_d=True, higher_u=False, tolerance=0
    )
    assert tie["lam"] == 0.5
    # Lower-is-better deficiency (toxicity) with a higher-is-better utility (accuracy).
    tox = choose_lam(
        [0.0, 1.0, 2.0], [0.5, 0.2, 0.1], [0.8, 0.78, 0.7], higher_d=False, higher_u=True, tolerance=0.05
    )
    assert tox["lam"] == 1.0
    # A NaN score never qualifies; λ = 0 always does.
    nan = choose_lam([0.0, 1.0], [0.3, 0.9], [10.0, math.nan], higher_d=True, higher_u=False, tolerance=0.05)
    assert nan["lam"] == 0.0 and nan["admissible"] == [True, False]


def test_choose_lam_with_zero_utility_at_lam0_uses_an_absolute_tolerance():
    # A lower-is-better share (empty answers, repeated n-grams, toxic outputs) that is 0 at λ = 0:
    # a relative loss is undefined, so the tolerance applies as an absolute difference.
    lams = [0.0, 1.0, 2.0, 3.0]
    mc2 = [0.30, 0.35, 0.40, 0.50]
    empty = [0.0, 0.0, 0.01, 0.2]
    chosen = choose_lam(lams, mc2, empty, higher_d=True, higher_u=False, tolerance=0.05)
    assert chosen["lam"] == 2.0 and chosen["admissible"] == [True, True, True, False]
    assert chosen["utility_loss"] == pytest.approx([0.0, 0.0, 0.01, 0.2])
    assert chosen["tolerance_kind"] == "absolute" and "absolute" in chosen["rule"]
    # The issue's case: λ = 0 always qualifies, even when nothing else does.
    issue = choose_lam([0.0, 1.0, 2.0], [0.3, 0.2, 0.1], [0, 0, 0.01], higher_d=True, higher_u=False,
                       tolerance=0.0)  # fmt: skip
    assert issue["lam"] == 0.0 and "reason" not in issue
    # A higher-is-better utility at 0 (accuracy of a broken base model): same absolute rule.
    up = choose_lam([0.0, 1.0], [0.5, 0.2], [0.0, 0.3], higher_d=False, higher_u=True, tolerance=0.05)
    assert up["lam"] == 1.0 and up["utility_loss"] == pytest.approx([0.0, -0.3])
    # Otherwise the rule stays relative and says so.
    rel = choose_lam([0.0, 1.0], [0.3, 0.4], [10.0, 10.4], higher_d=True, higher_u=False, tolerance=0.05)
    assert rel["tolerance_kind"] == "relative" and "(relative)" in rel["rule"] and rel["lam"] == 1.0
    none = choose_lam([0.0, 1.0], [0.3, 0.4], [math.nan, 1.0], higher_d=True, higher_u=False, tolerance=0.05)
    assert none["lam"] is None and none["reason"] == "λ = 0 has no finite utility score"


def test_pareto_front_and_knee():
    lams = [0.0, 1.0, 2.0, 3.0, 4.0]
    d = [0.0, 0.6, 0.8, 0.9, 0.5]  # higher better
    u = [1.0, 0.95, 0.8, 0.0, 0.4]  # higher better; λ=4 is dominated by λ=2
    assert pareto_front(d, u, higher_d=True, higher_u=True) == [0, 1, 2, 3]
    knee = knee_point(lams, d, u, higher_d=True, higher_u=True)
    # Scaled: x = d/0.9, y = u; chord (0,1)→(1,0); distance ∝ |x + y − 1|: λ=1 → 0.6167, λ=2 → 0.6889.
    assert knee["lam"] == 2.0
    assert knee["distance"] == pytest.approx((0.8 / 0.9 + 0.8 - 1) / math.sqrt(2))
    assert knee_point(lams[:2], d[:2], u[:2], higher_d=True, higher_u=True)["lam"] is None


def test_knee_is_beyond_the_chord_never_a_dent():
    # Issue 22's front: (0,1), (0.3,0.9), (0.5,0.1), (1,0); the dent (0.5,0.1) is farther from
    # the chord in absolute terms (0.283 against 0.141) but lies on the wrong side of it.
    lams = [0.0, 1.0, 2.0, 3.0]
    d, u = [0.0, 0.3, 0.5, 1.0], [1.0, 0.9, 0.1, 0.0]
    knee = knee_point(lams, d, u, higher_d=True, higher_u=True)
    assert knee["lam"] == 1.0
    assert knee["distance"] == pytest.approx((0.3 + 0.9 - 1) / math.sqrt(2))
    # Only dents (a concave front): no knee, with the reason.
    concave = knee_point(lams[:3], [0.0, 0.5, 1.0], [1.0, 0.2, 0.0], higher_d=True, higher_u=True)
    assert concave["lam"] is None and "beyond the chord" in concave["reason"]
    # A straight front has no knee either.
    straight = knee_point(lams[:3], [0.0, 0.5, 1.0], [1.0, 0.5, 0.0], higher_d=True, higher_u=True)
    assert straight["lam"] is None
    # Lower-is-better axes are oriented first: the same front mirrored gives the same knee.
    mirrored = knee_point(lams, [-x for x in d], [-x for x in u], higher_d=False, higher_u=False)
    assert mirrored["lam"] == 1.0
    # Equal distances: the smaller |λ| wins whatever the grid order, then the positive λ.
    tie = knee_point([0.0, -2.0, 1.0, 3.0], [0.0, 0.25, 0.875, 1.0], [1.0, 0.875, 0.25, 0.0],
                     higher_d=True, higher_u=True)  # fmt: skip
    assert tie["lam"] == 1.0
    sym = knee_point([0.0, 1.0, -1.0, 3.0], [0.0, 0.25, 0.875, 1.0], [1.0, 0.875, 0.25, 0.0],
                     higher_d=True, higher_u=True)  # fmt: skip
    assert sym["lam"] == 1.0


def test_item_stat_reproduces_the_number_and_bootstrap_is_paired():
    record = {
        "metrics": {"perplexity": math.exp((2.0 + 6.0) / (2 + 3)), "mc2": 0.5},
        "items": [
            {"nll": 2.0, "scored_tokens": 2, "key": "w0"},
            {"nll": 6.0, "scored_tokens": 3, "key": "w1"},
        ],
    }
    stat = item_stat("perplexity", "perplexity", record)
    assert stat == {"num": [2.0, 6.0], "den": [2.0, 3.0], "transform": "exp", "keys": ["w0", "w1"]}
    from excise.errors import ConfigError

    with pytest.raises(ConfigError, match="per-item scores give"):
        item_stat("perplexity", "perplexity", record | {"metrics": {"perplexity": 3.0}})
    with pytest.raises(ConfigError, match="no result 'mc9'"):
        item_stat("truthfulqa-mc", "mc9", record)
    # Paired: a constant shift of every item gives an interval of exactly that shift.
    keys = [f"k{i}" for i in range(24)]
    a = {"num": [0.1, 0.5, 0.9, 0.3] * 6, "den": [1.0] * 24, "transform": "identity", "keys": keys}
    b = a | {"num": [x + 0.2 for x in a["num"]]}
    low, high = paired_bootstrap(a, b, resamples=200, confidence=0.95, seed=0)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.2)
    # Against an independent computation of the same resampling.
    c = a | {"num": [0.4, 0.1, 0.8, 0.9] * 6}
    idx = np.random.default_rng(3).integers(0, 24, size=(500, 24))
    diffs = np.array(c["num"])[idx].mean(1) - np.array(a["num"])[idx].mean(1)
    got = paired_bootstrap(a, c, resamples=500, confidence=0.9, seed=3)
    assert got == pytest.approx((np.quantile(diffs, 0.05), np.quantile(diffs, 0.95)))
    full = paired_difference(a, c, resamples=500, confidence=0.9, seed=3)
    assert full["p"] == pytest.approx(bootstrap_pvalue(diffs)) and full["dropped"] == 0
    # Fewer than 20 resampling units: no interval, and the reason.
    few = {k: v[:4] if isinstance(v, list) else v for k, v in a.items()}
    assert paired_bootstrap(few, few, resamples=200, confidence=0.95, seed=0) is None
    assert "at least 20" in paired_difference(few, few, resamples=200, confidence=0.95, seed=0)["reason"]


def test_non_finite_resamples_are_counted_not_hidden():
    # A ratio whose denominator is 0 on some resamples (only one item has tokens).
    keys = [f"k{i}" for i in range(20)]
    a = {"num": [1.0] + [0.0] * 19, "den": [1.0] + [0.0] * 19, "transform": "identity", "keys": keys}
    out = paired_difference(a, a, resamples=1000, confidence=0.95, seed=0)
    idx = np.random.default_rng(0).integers(0, 20, size=(1000, 20))
    expected_dropped = int(np.sum(np.asarray(a["den"])[idx].sum(1) == 0))
    assert out["dropped"] == expected_dropped > 0


def test_interval_coverage_on_a_simulated_case():
    # 200 simulated paired experiments with a known difference of means: the 90 % interval
    # must cover it about 90 % of the time (binomial sd ≈ 2.1 points).
    rng = np.random.default_rng(1)
    covered, n, truth = 0, 60, 0.1
    for trial in range(200):
        base = rng.normal(0.0, 1.0, n)
        other = base + truth + rng.normal(0.0, 0.5, n)
        keys = [f"t{trial}-{i}" for i in range(n)]
        a = {"num": base.tolist(), "den": [1.0] * n, "transform": "identity", "keys": keys}
        b = a | {"num": other.tolist()}
        low, high = paired_bootstrap(a, b, resamples=1000, confidence=0.9, seed=trial)
        covered += low <= truth <= high
    assert 0.84 <= covered / 200 <= 0.96


def test_lam_is_chosen_on_one_part_and_reported_on_the_other():
    keys = [f"q{i}" for i in range(40)]
    split = selection_split(keys, 0.5, seed=0)
    assert len(split["select"]) == 20 and split["select"].isdisjoint(split["report"])
    assert split["select"] | split["report"] == set(keys)
    assert selection_split(keys, 0.5, seed=1) != split  # seeded
    assert selection_split(keys, 1.0, seed=0) == {"select": set(keys), "report": set()}
    assert selection_split(["only"], 0.5, seed=0)["report"] == set()


# ----------------------------------------------------------------------------- bad input


def test_nan_and_bad_grids_are_refused():
    with pytest.raises(ValidationError, match="finite"):
        _cfg(lams=[0.0, math.nan])
    with pytest.raises(ValidationError, match="empty"):
        _cfg(lams=[])
    with pytest.raises(ValidationError, match="repeated"):
        _cfg(lams=[1.0, 1.0])
    with pytest.raises(ValidationError, match="takes 2 input"):
        _cfg(inputs=["e"])
    with pytest.raises(ValidationError, match="unknown metric"):
        _cfg(deficiency={"metric": "truthy", "key": "x"})
    with pytest.raises(ValidationError, match="may not set adapter"):
        _cfg(utility={"metric": "perplexity", "key": "perplexity", "settings": {"adapter": "x"}})
    with pytest.raises(ValidationError, match="may not set device"):
        _cfg(utility={"metric": "perplexity", "key": "perplexity", "settings": {"device": "cpu"}})
    with pytest.raises(ValidationError, match="extra"):
        _cfg(utility={"metric": "perplexity", "key": "perplexity", "settings": {"limt": 3}})
    assert _cfg(lams=[1.0, 0.5]).grid == [0.0, 1.0, 0.5]
    assert SweepMetric(metric="perplexity", key="perplexity").higher is False
    assert SweepMetric(metric="truthfulqa-mc", key="mc2").higher is True


def test_cli_nan_grid_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    code = _main(
        monkeypatch, "sweep", "ext-sub", "e", "a", "--base", "m", "--out", str(out), "--lams", "0,nan"
    )
    err = capsys.readouterr().err
    assert code == 2 and err == "error: lams: λ grid values must be finite numbers, got nan\n"
    assert not out.exists()


# ----------------------------------------------------------------------------- sweep = separate runs


@pytest.fixture
def setup(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    from transformers import AutoModelForCausalLM

    adapters = []
    for seed, name in [(1, "expert"), (2, "anti")]:
        base = AutoModelForCausalLM.from_pretrained(model)
        adapters.append(write_peft_lora(tmp_path / name, base, seed=seed, r=4, lora_alpha=8,
                                        target_modules=["q_proj", "v_proj"]))  # fmt: skip
    mc = tmp_path / "mc.json"
    questions = [
        ("Is the sky blue?", ["Yes.", "No.", "Only at night."]),
        ("What is 2+2?", ["4", "5", "22"]),
        ("Can fish fly?", ["Most cannot.", "All can.", "Yes, always."]),
    ]
    rows = [
        {
            "question": q,
            "mc1_targets": {c[0]: 1, c[1]: 0, c[2]: 0},
            "mc2_targets": {c[0]: 1, c[2]: 1, c[1]: 0},
        }
        for q, c in questions
    ]
    mc.write_text(json.dumps(rows))
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in ["The cat sat on the mat.", "A b c d e f g."]))
    return model, adapters, mc, text


def test_sweep_equals_separate_ops_and_eval_runs(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model, (expert, anti), mc, text = setup
    out = tmp_path / "sweep"
    lams = [0.5, 1.0, 2.0]
    args = ["sweep", "ext-sub", str(expert), str(anti), "--base", str(model), "--out", str(out)]
    args += ["--lams", ",".join(map(str, lams)), "--device", "cpu", "--bootstrap", "50"]
    args += ["--deficiency", "truthfulqa-mc:mc2", "--deficiency-set", f"data={mc}"]
    args += ["--utility", "perplexity:perplexity", "--utility-set", f"data={text}"]
    args += ["--utility-set", "window=8", "--utility-set", "stride=4", "--extra", "truthfulqa-mc:mc1"]
    assert _main(monkeypatch, *args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "chosen λ" in printed and f"wrote {out}" in printed
    assert "λ = 0.5: truthfulqa-mc:mc2 " in captured.err  # one progress line per λ
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["lam"] for p in sweep["points"]] == [0.0, *lams]
    assert sweep["adapters"]["base_merged"] is True
    for point in sweep["points"]:
        lam = point["lam"]
        op = tmp_path / f"op{lam}"
        assert _main(monkeypatch, "ops", "ext-sub", "--expert", str(expert), "--anti-expert", str(anti),
                     "--lam", str(lam), "--out", str(op)) == 0  # fmt: skip
        for metric, data, extra in [
            ("truthfulqa-mc", mc, []),
            ("perplexity", text, ["--window", "8", "--stride", "4"]),
        ]:
            res = tmp_path / f"{metric}{lam}.json"
            args = ["eval", metric, "--base", str(model), "--adapter", str(op), "--data", str(data)]
            args += ["--out", str(res), "--device", "cpu", "--no-cache", *extra]
            code = _main(monkeypatch, *args)
            assert code == 0
            separate = json.loads(res.read_text())
            swept = json.loads((out / point["results"][metric]).read_text())
            for key, value in separate["metrics"].items():
                assert swept["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (lam, metric, key)
            if metric == "truthfulqa-mc":
                for a, b in zip(swept["items"], separate["items"], strict=True):
                    np.testing.assert_allclose(a["mc2_logliks"], b["mc2_logliks"], rtol=1e-4, atol=1e-4)
        mc1 = json.loads((out / point["results"]["truthfulqa-mc"]).read_text())["metrics"]["mc1"]
        assert point["extra"]["truthfulqa-mc:mc1"]["value"] == mc1
        axis = "deficiency"
        assert point[axis]["value"] == pytest.approx(
            json.loads((out / point["results"]["truthfulqa-mc"]).read_text())["metrics"]["mc2"]
        )
    # The chosen λ is what the rule gives on the selection items' numbers, recomputed from the
    # records; the figures at the chosen λ come from the other items.
    select = {a: set(sweep["selection"]["axes"][a]["select"]) for a in ("deficiency", "utility")}
    report = {a: set(sweep["selection"]["axes"][a]["report"]) for a in ("deficiency", "utility")}
    assert select["deficiency"] and report["deficiency"] and not select["deficiency"] & report["deficiency"]

    def mc2(point, keys):
        items = json.loads((out / point["results"]["truthfulqa-mc"]).read_text())["items"]
        return np.mean([it["mc2"] for it in items if it["key"] in keys])

    def ppl(point, keys):
        items = json.loads((out / point["results"]["perplexity"]).read_text())["items"]
        kept = [it for it in items if it["key"] in keys]
        return math.exp(sum(it["nll"] for it in kept) / sum(it["scored_tokens"] for it in kept))

    d = [mc2(p, select["deficiency"]) for p in sweep["points"]]
    u = [ppl(p, select["utility"]) for p in sweep["points"]]
    assert [p["selection"]["deficiency"] for p in sweep["points"]] == pytest.approx(d)
    expected = choose_lam([0.0, *lams], d, u, higher_d=True, higher_u=False, tolerance=0.05)
    assert sweep["chosen"]["lam"] == expected["lam"]
    k = expected["index"]
    held = sweep["chosen"]["report"]["deficiency"]
    assert held["value"] == pytest.approx(mc2(sweep["points"][k], report["deficiency"]))
    assert held["n"] == len(report["deficiency"]) and "reported on the other items" in sweep["chosen"]["rule"]
    # Fewer items than an interval needs: none, with the reason (λ = 0 against itself has none).
    if len(sweep["points"][1]["deficiency"]["items"]["keys"]) < 20:
        assert sweep["points"][1]["deficiency"]["ci"] is None
        assert "at least 20" in sweep["points"][1]["deficiency"]["ci_reason"]


def test_sweep_with_utility_keeps_base_view_and_refuses_used_output(setup, tmp_path, monkeypatch):
    from excise.errors import ConfigError
    from excise.pipeline.sweep import run_sweep

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model, (expert, anti), mc, _ = setup
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "Say hi."}, {"instruction": "Count."}]))
    cfg = SweepConfig(
        model=str(model), operation="subtract", inputs=[expert, anti], lams=[1.0], device="cpu",
        progress=False,
        deficiency={"metric": "truthfulqa-mc", "key": "mc1", "settings": {"data": str(mc)}},
        utility={"metric": "utility", "key": "similarity",
                 "settings": {"data": str(prompts), "max_new_tokens": 4, "split": "all"}},
        bootstrap=10, out=tmp_path / "s",
    )  # fmt: skip
    run_sweep(cfg)
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sweep["adapters"]["base_merged"] is False
    # At λ = 0 the model is the expert; utility's base answers come from the base model alone.
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval

    plain_cfg = EvalConfig(
        model=str(model), reference=str(model), data=str(prompts), max_new_tokens=4, split="all", device="cpu"
    )
    plain = run_eval("utility", plain_cfg, use_cache=False, progress=False)
    for point in sweep["points"]:
        record = json.loads((tmp_path / "s" / point["results"]["utility"]).read_text())
        assert [it["base_response"] for it in record["items"]] == [it["response"] for it in plain["items"]]
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        run_sweep(cfg.model_copy(update={"out": tmp_path / "used"}))
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["x"]
    assert not list(tmp_path.glob(".used.tmp-*"))


def test_lam_folder_is_exact_reversible_and_readable():
    readable = {0.0: "lam=0", 1.0: "lam=1", -2.0: "lam=-2", 0.5: "lam=0.5", 0.25: "lam=0.25",
                -0.75: "lam=-0.75", 1e-05: "lam=1e-05", 1.0000001: "lam=1.0000001"}  # fmt: skip
    assert {lam: lam_folder(lam) for lam in readable} == readable
    assert lam_folder(-0.0) == "lam=0"
    lams = [
        0.0,
        1.0,
        1.0000001,
        1 + 2**-52,
        0.1,
        0.1 + 2**-56,
        1 / 3,
        -1e-300,
        1e300,
        2.0**60,
        2.0**60 + 2**8,
    ]
    names = [lam_folder(lam) for lam in lams]
    assert len(set(names)) == len(lams)  # `:g` gave 1.0000001 and 1 + 2**-52 the folder of 1
    for lam, name in zip(lams, names, strict=True):
        assert float(name.removeprefix("lam=")) == lam and "/" not in name


def test_sweep_close_lams_get_their_own_records(setup, tmp_path, monkeypatch):
    from excise.pipeline.sweep import run_sweep

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model, (expert, anti), mc, text = setup
    cfg = SweepConfig(
        model=str(model), operation="ext_sub", inputs=[expert, anti], lams=[1.0, 1.0000001], device="cpu",
        progress=False, bootstrap=0, out=tmp_path / "s",
        deficiency={"metric": "truthfulqa-mc", "key": "mc2", "settings": {"data": str(mc)}},
        utility={"metric": "perplexity", "key": "perplexity",
                 "settings": {"data": str(text), "window": 8, "stride": 4}},
    )  # fmt: skip
    run_sweep(cfg)
    points = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]
    paths = [p["results"]["truthfulqa-mc"] for p in points]
    assert len(set(paths)) == 3
    for point, path in zip(points, paths, strict=True):
        assert json.loads((tmp_path / "s" / path).read_text())["sweep"]["lam"] == point["lam"]


def test_item_rules_name_registered_metrics():
    from excise.evaluate.metrics import METRICS
    from excise.pipeline.sweep import _ITEM_RULES

    assert {metric for metric, _ in _ITEM_RULES} <= set(METRICS)


def test_cli_unknown_operation_names_the_verbs(tmp_path, monkeypatch, capsys):
    code = _main(monkeypatch, "sweep", "frob", "e", "a", "--base", "m", "--out", str(tmp_path / "s"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'frob' is not one of: ext-sub, subtract, negate, compose" in err
    assert not (tmp_path / "s").exists()


def test_sweep_extra_metrics_are_scored_at_every_lam(setup, tmp_path, monkeypatch):
    from excise.pipeline.sweep import run_sweep

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model, (expert, anti), mc, text = setup
    ppl = {"data": str(text), "window": 8, "stride": 4}
    cfg = SweepConfig(
        model=str(model), operation="ext_sub", inputs=[expert, anti], lams=[1.0, 2.0], device="cpu",
        progress=False, bootstrap=20, out=tmp_path / "s",
        deficiency={"metric": "truthfulqa-mc", "key": "mc2", "settings": {"data": str(mc)}},
        utility={"metric": "perplexity", "key": "perplexity", "settings": ppl},
        extra=[{"metric": "truthfulqa-mc", "key": "mc1", "settings": {"data": str(mc)}},
               {"metric": "perplexity", "key": "nll_per_token", "settings": ppl | {"window": 6}}],
    )  # fmt: skip
    run_sweep(cfg)
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert set(sweep["extra"]) == {"truthfulqa-mc:mc1", "perplexity:nll_per_token"}
    for point in sweep["points"]:
        mc_record = json.loads((tmp_path / "s" / point["results"]["truthfulqa-mc"]).read_text())
        assert point["extra"]["truthfulqa-mc:mc1"]["value"] == mc_record["metrics"]["mc1"]
        # Other settings than the utility's perplexity: evaluated on their own, in their own file.
        own = tmp_path / "s" / "results" / lam_folder(point["lam"]) / "perplexity:nll_per_token.json"
        nll = json.loads(own.read_text())
        assert nll["settings"]["window"] == 6
        assert point["extra"]["perplexity:nll_per_token"]["value"] == nll["metrics"]["nll_per_token"]
        ppl_record = json.loads((tmp_path / "s" / point["results"]["perplexity"]).read_text())
        assert nll["metrics"]["nll_per_token"] != pytest.approx(np.log(ppl_record["metrics"]["perplexity"]))
    n = len(sweep["points"][0]["extra"]["truthfulqa-mc:mc1"]["items"]["keys"])
    for p in sweep["points"][1:]:  # extras get paired intervals too (or the reason they have none)
        e = p["extra"]["truthfulqa-mc:mc1"]
        assert e["ci"] is not None if n >= 20 else "at least 20" in e["ci_reason"]
    assert set(sweep["chosen"]["report"]) == {"deficiency", "utility", *sweep["extra"]}
    with pytest.raises(ValueError, match="each metric:key"):
        SweepConfig(**(cfg.model_dump() | {"extra": [cfg.extra[0], cfg.extra[0]]}))


# ----------------------------------------------------------------------------- pairing by item identity


def _stat(values, keys):
    return {"num": list(values), "den": [1.0] * len(values), "transform": "identity", "keys": list(keys)}


def test_paired_bootstrap_pairs_items_by_identity_not_position():
    """Two records of the same items in another order give the interval of the items paired."""
    from excise.pipeline.sweep import paired_bootstrap

    rng = np.random.default_rng(0)
    n, resamples, seed = 25, 300, 1
    a, b = rng.random(n), rng.random(n) + 0.2
    keys = [f"item{i}" for i in range(n)]
    perm = rng.permutation(n)
    shuffled = _stat(b[perm], [keys[j] for j in perm])
    got = paired_bootstrap(_stat(a, keys), shuffled, resamples=resamples, confidence=0.9, seed=seed)
    # Independently: the same index draw on both, items aligned.
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diff = b[idx].mean(1) - a[idx].mean(1)
    assert got == pytest.approx((np.quantile(diff, 0.05), np.quantile(diff, 0.95)), rel=1e-12)


def test_paired_bootstrap_refuses_records_of_other_items_or_without_keys():
    from excise.errors import ConfigError
    from excise.pipeline.sweep import paired_bootstrap, pairing_problem

    ref = _stat([0.1, 0.5, 0.9], ["a", "b", "c"])
    kw = {"resamples": 50, "confidence": 0.9, "seed": 0}
    with pytest.raises(ConfigError, match=r"scored different items \(3 and 3 items; 1 only in the first"):
        paired_bootstrap(ref, _stat([0.2, 0.4, 0.6], ["a", "b", "d"]), **kw)
    old = {"num": [0.2, 0.4, 0.6], "den": [1.0] * 3, "transform": "identity"}  # a record before keys
    assert "carry no identity keys" in pairing_problem(ref, old)
    with pytest.raises(ConfigError, match="carry no identity keys"):
        paired_bootstrap(ref, old, **kw)
    assert pairing_problem(ref, _stat([0.3, 0.2, 0.1], ["c", "b", "a"])) is None


def test_tolerance_on_an_interval_bound_and_ties_between_signs():
    lams = [0.0, 1.0, 2.0]
    d, u = [0.5, 0.6, 0.7], [10.0, 10.514, 10.3]  # perplexity: λ = 1 loses 5.14 %, λ = 2 3 %
    ci = [None, [0.40, 0.67], [0.35, 0.55]]  # Δppl intervals: 4.0–6.7 % and 3.5–5.5 %
    point = choose_lam(lams, d, u, higher_d=True, higher_u=False, tolerance=0.05)
    assert point["admissible"] == [True, False, True] and point["lam"] == 2.0
    worst = choose_lam(lams, d, u, higher_d=True, higher_u=False, tolerance=0.05,
                       utility_ci=ci, tolerance_on="worst")  # fmt: skip
    assert worst["admissible"] == [True, False, False] and worst["lam"] == 0.0
    assert "worse end of its paired interval" in worst["rule"]
    best = choose_lam([0.0, 1.0], d[:2], u[:2], higher_d=True, higher_u=False, tolerance=0.05,
                      utility_ci=ci[:2], tolerance_on="best")  # fmt: skip
    assert best["admissible"] == [True, True] and best["lam"] == 1.0
    # A higher-is-better utility: the loss is −Δ, so the interval's low end is the worse one.
    hb = choose_lam([0.0, 1.0], [0.1, 0.2], [1.0, 0.97], higher_d=True, higher_u=True, tolerance=0.05,
                    utility_ci=[None, [-0.08, 0.01]], tolerance_on="worst")  # fmt: skip
    assert hb["admissible"] == [True, False]
    # Equal deficiency at λ = −1 and λ = 1: the positive λ, whatever the grid order.
    for grid in ([0.0, -1.0, 1.0], [0.0, 1.0, -1.0]):
        tie = choose_lam(grid, [0.1, 0.5, 0.5], [1.0, 1.0, 1.0], higher_d=True, higher_u=True, tolerance=0.05)
        assert tie["lam"] == 1.0


def test_sweep_on_pairs_takes_differences_against_the_base_without_either_part(setup, tmp_path, monkeypatch):
    """A judge-free sweep (pairs:selectivity against answer-nll:delta_nll): at every λ the record
    equals `excise ops subtract` + `excise eval pairs` on the result (the reference there is the
    base with the adapter off), so the sweep's reference is the base alone, not W0."""
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval
    from excise.pipeline.sweep import run_sweep

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model, (expert, anti), _, _ = setup
    pairs = tmp_path / "pairs.json"
    rows = [{"prompt": f"Question {i}?", "response": [f"Good answer {i}.", f"Bad {i}!"]} for i in range(3)]
    pairs.write_text(json.dumps([*rows, {"prompt": "Question 0?", "response": ["Fine.", "Awful."]}]))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps([{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Count.", "output": "1"}])
    )
    all_rows = {"split": "all"}
    on_pairs = {"data": str(pairs)} | all_rows
    cfg = SweepConfig(
        model=str(model), operation="subtract", inputs=[expert, anti], lams=[1.0], device="cpu",
        progress=False, bootstrap=10, out=tmp_path / "s",
        deficiency={"metric": "pairs", "key": "selectivity", "settings": on_pairs},
        utility={"metric": "answer-nll", "key": "delta_nll", "settings": {"data": str(alpaca)} | all_rows},
        extra=[{"metric": "pairs", "key": "forget", "settings": on_pairs}],
    )  # fmt: skip
    run_sweep(cfg)
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sweep["adapters"]["base_merged"] is False
    for point in sweep["points"]:
        op = tmp_path / f"op{point['lam']}"
        args = ["ops", "subtract", "--a", str(expert), "--b", str(anti), "--lam", str(point["lam"])]
        assert _main(monkeypatch, *args, "--out", str(op)) == 0
        for metric, data in (("pairs", pairs), ("answer-nll", alpaca)):
            eval_cfg = EvalConfig(model=str(model), adapter=op, data=str(data), split="all", device="cpu")
            separate = run_eval(metric, eval_cfg, use_cache=False, progress=False)
            swept = json.loads((tmp_path / "s" / point["results"][metric]).read_text())
            for key, value in separate["metrics"].items():
                assert swept["metrics"][key] == pytest.approx(value, abs=1e-5), (point["lam"], metric, key)
        swept = json.loads((tmp_path / "s" / point["results"]["pairs"]).read_text())["metrics"]
        assert point["deficiency"]["value"] == pytest.approx(swept["selectivity"])
        assert point["extra"]["pairs:forget"]["value"] == pytest.approx(swept["forget"])


def test_an_absolute_tolerance_is_in_the_utilitys_own_units():
    # A ΔNLL utility: u(0) = -0.02 (the expert is a little better than the base). Relative to
    # |u(0)|, +0.006 nats is a 30 % loss and refused at tolerance 0.1; in nats it is well within.
    lams, d, u = [0.0, 1.0, 2.0], [0.06, 0.07, 0.08], [-0.02, -0.014, 0.2]
    relative = choose_lam(lams, d, u, higher_d=True, higher_u=False, tolerance=0.1)
    absolute = choose_lam(lams, d, u, higher_d=True, higher_u=False, tolerance=0.1, tolerance_kind="absolute")
    assert relative["lam"] == 0.0 and relative["tolerance_kind"] == "relative"
    assert absolute["lam"] == 1.0 and absolute["tolerance_kind"] == "absolute"
    assert absolute["utility_loss"] == pytest.approx([0.0, 0.006, 0.22])
    assert absolute["admissible"] == [True, True, False] and "utility's own units" in absolute["rule"]


def test_sweeps_from_one_expert_share_their_lam0_point_and_nothing_else(setup, tmp_path, monkeypatch):
    """λ = 0 is W0 alone: Ext-Sub and subtraction from one expert evaluate it once; every other
    point, another W0, or `cache=False` is computed."""
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval
    from excise.pipeline.sweep import run_sweep

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model, (expert, anti), mc, text = setup

    def sweep(operation, inputs, out, **kw):
        cfg = SweepConfig(
            model=str(model), operation=operation, inputs=inputs, lams=[1.0], device="cpu", progress=False,
            deficiency={"metric": "truthfulqa-mc", "key": "mc2", "settings": {"data": str(mc)}},
            utility={"metric": "perplexity", "key": "perplexity",
                     "settings": {"data": str(text), "window": 8, "stride": 4}},
            bootstrap=10, out=tmp_path / out, **kw,
        )  # fmt: skip
        run_sweep(cfg)
        summary = json.loads((tmp_path / out / "sweep.json").read_text())
        return {
            (p["lam"], metric): json.loads((tmp_path / out / rel).read_text())
            for p in summary["points"]
            for metric, rel in p["results"].items()
        }

    ext_sub = sweep("ext_sub", [expert, anti], "ext_sub")
    subtract = sweep("subtract", [expert, anti], "subtract")
    assert not any(r["from_cache"] for r in ext_sub.values())
    for metric in ("truthfulqa-mc", "perplexity"):
        assert subtract[0.0, metric]["from_cache"] and not subtract[1.0, metric]["from_cache"]
        assert subtract[0.0, metric]["metrics"] == ext_sub[0.0, metric]["metrics"]
        assert subtract[0.0, metric]["sweep"]["operation"] == "subtract"  # its own provenance
        assert subtract[1.0, metric]["metrics"] != ext_sub[1.0, metric]["metrics"]
    # Independently: the shared point is the expert, evaluated on its own.
    alone_cfg = EvalConfig(model=str(model), adapter=expert, data=str(mc), device="cpu")
    alone = run_eval("truthfulqa-mc", alone_cfg, use_cache=False, progress=False)
    shared = subtract[0.0, "truthfulqa-mc"]["metrics"]["mc2"]
    assert shared == pytest.approx(alone["metrics"]["mc2"], rel=1e-5)
    # The same sweep again reads every point back; the cache off recomputes them, to the same numbers.
    again = sweep("ext_sub", [expert, anti], "ext_sub", overwrite=True)
    fresh = sweep("ext_sub", [expert, anti], "ext_sub", overwrite=True, cache=False)
    assert all(r["from_cache"] for r in again.values()) and not any(r["from_cache"] for r in fresh.values())
    assert all(fresh[k]["metrics"] == again[k]["metrics"] == ext_sub[k]["metrics"] for k in ext_sub)
    # Another W0 (the anti-expert as the expert) shares nothing.
    swapped = sweep("ext_sub", [anti, expert], "swapped")
    assert not any(r["from_cache"] for r in swapped.values())
    assert swapped[0.0, "perplexity"]["metrics"] != ext_sub[0.0, "perplexity"]["metrics"]


def test_weights_digest_is_of_the_tensors_not_the_file(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from excise.pipeline.sweep import weights_digest

    folders = []
    for name, metadata in [("a", {"created": "1"}), ("b", {"created": "2"})]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
        tensors = {"x.lora_A.weight": torch.arange(6.0).reshape(2, 3), "x.lora_B.weight": torch.ones(3, 2)}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata)
        folders.append(folder)
    a, b = folders
    assert (a / "adapter_model.safetensors").read_bytes() != (b / "adapter_model.safetensors").read_bytes()
    assert weights_digest(a) == weights_digest(b) and weights_digest(None) is None
    tensors = load_file(str(b / "adapter_model.safetensors"))
    tensors["x.lora_B.weight"][0, 0] = 1.0000001
    save_file(tensors, str(b / "adapter_model.safetensors"))
    assert weights_digest(a) != weights_digest(b)
    (b / "adapter_model.safetensors").unlink()
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(a / "adapter_model.safetensors")).items()},
              str(b / "adapter_model.safetensors"))  # fmt: skip
    assert weights_digest(a) != weights_digest(b)  # the same values in another dtype: another model
