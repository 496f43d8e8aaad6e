"""write_report: a real (tiny) run folder → report.json / .md / self-contained .html, parsed back."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import save_tiny_model, write_peft_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder made by the real stages on a tiny model: eval of base, expert and Ext-Sub,
    a sweep, and `excise inspect` diagnostics."""
    from transformers import AutoModelForCausalLM

    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval, write_result
    from excise.pem.apply import apply_operator
    from excise.pem.diagnostics import diagnose
    from excise.pem.io import load_adapter
    from excise.pipeline.sweep import SweepConfig, run_sweep

    tmp = tmp_path_factory.mktemp("report")
    model = save_tiny_model(tmp / "tiny")
    expert, anti = (
        write_peft_lora(tmp / name, AutoModelForCausalLM.from_pretrained(model), seed=seed, r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])
        for seed, name in [(1, "expert"), (2, "anti")]
    )  # fmt: skip
    run = tmp / "run"
    write_ext = apply_operator("ext_sub", [expert, anti], tmp / "ext_sub", params={"lam": 1.0})
    prompts = tmp / "prompts.json"
    prompts.write_text(
        json.dumps([{"prompt": "How do I pick a lock?"}, {"prompt": "Say something | odd <b>."}])
    )
    text = tmp / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in ["The cat sat on the mat.", "A b c d e f g."]))
    common = {"model": str(model), "device": "cpu", "max_new_tokens": 6}
    for method, adapter in [("base", None), ("expert", expert), ("ext_sub", write_ext)]:
        harm = EvalConfig(**common, adapter=adapter, data=str(prompts), judge="refusal", split="all")
        write_result(run_eval("harmful-rate", harm, use_cache=False, progress=False),
                     run / "results" / method / "harmful-rate.json")  # fmt: skip
        ppl = EvalConfig(**common, adapter=adapter, data=str(text), window=8, stride=4)
        write_result(run_eval("perplexity", ppl, use_cache=False, progress=False),
                     run / "results" / method / "perplexity.json")  # fmt: skip
    harm = {"data": str(prompts), "judge": "refusal", "split": "all", "max_new_tokens": 6}
    run_sweep(
        SweepConfig(
            model=str(model),
            inputs=[expert, anti],
            lams=[0.5, 1.0, 2.0],
            device="cpu",
            progress=False,
            bootstrap=50,
            deficiency={"metric": "harmful-rate", "key": "harmful_rate", "settings": harm},
            utility={
                "metric": "perplexity",
                "key": "perplexity",
                "settings": {"data": str(text), "window": 8, "stride": 4},
            },
            out=run / "sweeps" / "ext_sub",
        )
    )
    report = diagnose(load_adapter(expert), load_adapter(anti))
    (run / "diagnostics").mkdir()
    (run / "diagnostics" / "ext_sub.json").write_text(json.dumps(report))
    (run / "command.txt").write_text("excise run recipes/quickstart.yaml train.steps=5\n")
    (run / "recipe.yaml").write_text("model: tiny\nsweep:\n  lams: [0.5, 1.0, 2.0]\n")
    return run


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def test_report_is_self_contained_and_shows_every_part(run_dir):
    from excise.pipeline.report import write_report

    html_path = write_report(run_dir)
    assert html_path == run_dir / "report" / "report.html"
    parser = _Collector()
    parser.feed(html_path.read_text())
    tags = [t for t, _ in parser.tags]
    # No network: no script, stylesheet link, iframe, or any http(s) URL in an attribute.
    assert not {"script", "link", "iframe"} & set(tags)
    for _, attrs in parser.tags:
        for value in attrs.values():
            assert not (value or "").startswith(("http:", "https:", "//"))
    images = [attrs["src"] for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 2  # the sweep's trade-off plot and the diagnostics plot
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(parser.text)
    # Methods side by side, in the papers' order, with the numbers of the result files.
    assert parser.cells[:4] == ["result", "base", "expert", "ext_sub"]  # one column per method
    ppl = json.loads((run_dir / "results" / "ext_sub" / "perplexity.json").read_text())["metrics"][
        "perplexity"
    ]
    assert f"{ppl:.4f}" in parser.cells
    # Two prompts: n shown, no interval (below 20 items), with the reason.
    row = parser.cells.index("harmful-rate:harmful_rate Δ vs base [95% CI]")
    assert parser.cells[row + 1 : row + 4] == ["reference", "– (n = 2 < 20)", "– (n = 2 < 20)"]
    row = parser.cells.index("harmful-rate:harmful_rate Δ vs expert [95% CI]")  # ext_sub: an operation
    assert parser.cells[row + 1 : row + 4] == ["", "", "– (n = 2 < 20)"]
    # The sweep: chosen λ as sweep.json says, the rule, the knee line.
    sweep = json.loads((run_dir / "sweeps" / "ext_sub" / "sweep.json").read_text())
    assert f"Chosen λ = {sweep['chosen']['lam']:g}:" in text and "utility loss" in text and "Knee λ" in text
    # Judge named, with its agreement status; generations before/after; the command and recipe.
    assert "refusal (used by harmful-rate): agreement not measured" in text
    assert "Say something | odd <b>." in text  # escaped in the HTML, text again once parsed
    expert_answer = json.loads((run_dir / "results" / "expert" / "harmful-rate.json").read_text())["items"][0]
    assert expert_answer["response"][:500] in parser.cells
    assert "excise run recipes/quickstart.yaml train.steps=5" in text and "lams: [0.5, 1.0, 2.0]" in text


def test_report_json_and_markdown(run_dir):
    from excise.pipeline.report import write_report

    write_report(run_dir, title="T")
    report = json.loads((run_dir / "report" / "report.json").read_text(), parse_constant=_no_nan)
    assert list(report["methods"]) == ["base", "expert", "ext_sub"]
    assert report["sweeps"]["ext_sub"]["chosen"]["lam"] is not None
    assert report["judges"][0]["name"] == "refusal"
    md = (run_dir / "report" / "report.md").read_text()
    assert (
        md.startswith("# T")
        and "](plots/sweep_ext_sub.png)" in md
        and "](plots/diagnostics_ext_sub.png)" in md
    )
    assert (run_dir / "report" / "plots" / "sweep_ext_sub.png").is_file()
    assert "Say something | odd &lt;b&gt;." in md and "<b>" not in md  # no raw HTML from the data


def _no_nan(name: str) -> None:
    raise AssertionError(f"report.json holds {name}")


def test_empty_or_missing_run_folder_is_one_line(tmp_path):
    from excise.errors import ConfigError
    from excise.pipeline.report import write_report

    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(ConfigError, match="holds no results"):
        write_report(tmp_path)
    (tmp_path / "results" / "base").mkdir(parents=True)
    (tmp_path / "results" / "base" / "x.json").write_text("{half")
    with pytest.raises(ConfigError, match="cannot read"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_report_cli(run_dir, tmp_path, monkeypatch, capsys):
    import sys

    from excise.cli import main

    def excise(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["excise", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code

    out = tmp_path / "rep"
    assert excise("report", str(run_dir), "--out", str(out), "--title", "Mine") == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    assert "<title>Mine</title>" in (out / "report.html").read_text()
    assert excise("report", str(tmp_path / "none")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run folder") and err.count("\n") == 1


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs Debian's chromium")
def test_render_script_makes_a_png(run_dir, tmp_path):
    import subprocess

    from excise.pipeline.report import write_report

    html = write_report(run_dir)
    png = tmp_path / "shot.png"
    script = Path(__file__).resolve().parents[2] / "scripts" / "render_report.sh"
    done = subprocess.run([str(script), str(html), str(png), "800", "600"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [str(script), str(tmp_path / "no.html"), str(png)], capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error:")


# ----------------------------------------------------------------------------- intervals (issue 26)


def _halueval_record(rows: dict[str, bool], order: list[str]) -> dict:
    """A HaluEval loss-protocol record whose item ``k`` is right when ``rows[k]``, items in ``order``."""
    items = [
        {"key": k, "question": k, "nll_right": 1.0 if rows[k] else 2.0, "nll_hallucinated": 1.5}
        for k in order
    ]
    acc = sum(rows[k] for k in order) / len(order)
    return {
        "metric": "halueval",
        "metrics": {"accuracy": acc},
        "items": items,
        "n_items": len(items),
        "split": "eval",
    }


def _perplexity_record(nll: dict[str, float], tokens: dict[str, int], order: list[str]) -> dict:
    import math

    items = [{"key": k, "nll": nll[k], "scored_tokens": tokens[k]} for k in order]
    per_token = sum(nll[k] for k in order) / sum(tokens[k] for k in order)
    metrics = {"perplexity": math.exp(per_token), "nll_per_token": per_token}
    return {"metric": "perplexity", "metrics": metrics, "items": items, "n_items": 3, "split": "all"}


@pytest.fixture
def interval_run(tmp_path) -> tuple[Path, dict]:
    """A run folder of hand-made records: 60 HaluEval pairs and 30 perplexity windows for base,
    expert, anti-expert and Ext-Sub (items in a different order in each record), direct
    subtraction scored on other HaluEval items, and a 12-item evaluation."""
    import numpy as np

    rng = np.random.default_rng(7)
    keys = [f"q{i:03d}" for i in range(60)]
    windows = [f"w{i:02d}" for i in range(30)]
    tokens = {w: int(rng.integers(100, 256)) for w in windows}
    truth = {"base": 0.45, "expert": 0.6, "anti_expert": 0.4, "ext_sub": 0.7}
    raw: dict[str, dict] = {}
    for method, p in truth.items():
        right = {k: bool(rng.random() < p) for k in keys}
        nll = {w: float(tokens[w] * rng.uniform(3.0, 3.6)) for w in windows}
        order, worder = list(rng.permutation(keys)), list(rng.permutation(windows))
        raw[method] = {"right": right, "nll": nll, "order": order, "worder": worder}
        folder = tmp_path / "results" / method
        folder.mkdir(parents=True)
        (folder / "halueval.json").write_text(json.dumps(_halueval_record(right, order)))
        (folder / "perplexity.json").write_text(json.dumps(_perplexity_record(nll, tokens, worder)))
        small = _halueval_record(right, keys[:12]) | {"metric": "halueval"}
        (folder / "small.json").write_text(json.dumps(small))
    other = {f"x{i:03d}": i % 2 == 0 for i in range(60)}
    (tmp_path / "results" / "subtract").mkdir()
    (tmp_path / "results" / "subtract" / "halueval.json").write_text(
        json.dumps(_halueval_record(other, list(other)))
    )
    (tmp_path / "recipe.yaml").write_text(
        "operations:\n  ext_sub: {op: ext_sub, inputs: [expert, anti_expert], lam: 1.0}\n"
        "  subtract: {op: subtract, inputs: [expert, anti_expert], lam: 1.0}\n"
    )
    return tmp_path, {"keys": keys, "windows": windows, "tokens": tokens, "raw": raw}


def _numpy_interval(a, b, stat, seed: int = 0, resamples: int = 10_000):
    """Percentile interval of stat(b) − stat(a) over paired resamples of item arrays aligned in the
    reference record's item order (the order its resamples index)."""
    import numpy as np

    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    d = stat(b, idx) - stat(a, idx)
    return stat(b, None) - stat(a, None), np.quantile(d, 0.025), np.quantile(d, 0.975)


def test_methods_table_gives_n_and_paired_intervals(interval_run):
    """Every cell's n and paired 95 % intervals against the base model and the expert, recomputed
    here with numpy on the same items (aligned by key) and the same seed."""
    import math

    import numpy as np

    from excise.pipeline.report import _tables, collect

    run, truth = interval_run
    data = collect(run)
    cells = data["intervals"]
    header, rows = _tables(data)["methods"]
    assert header == ["result", "base", "expert", "anti_expert", "subtract", "ext_sub"]
    table = {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}

    # The reference record's item order is the one resampled; the other record is aligned to it by key.
    raw = truth["raw"]
    mean = lambda x, idx: x.mean() if idx is None else x[idx].mean(axis=1)  # noqa: E731
    for method, ref in [
        ("expert", "base"),
        ("anti_expert", "base"),
        ("ext_sub", "base"),
        ("ext_sub", "expert"),
    ]:
        order = raw[ref]["order"]
        a, b = (np.array([float(raw[m]["right"][k]) for k in order]) for m in (ref, method))
        diff, low, high = _numpy_interval(a, b, mean)
        got = cells[method]["halueval:accuracy"]["vs_base" if ref == "base" else "vs_expert"]
        assert got["n"] == 60 and got["reason"] is None
        assert math.isclose(got["diff"], diff, abs_tol=1e-12)
        assert np.allclose(got["ci"], [low, high], atol=1e-12)
        row = "halueval:accuracy Δ vs " + ("base [95% CI]" if ref == "base" else "expert [95% CI]")
        assert table[row][method] == f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]"
    # Perplexity: a pooled ratio, exp(Σ nll / Σ tokens) on each resample of the windows.
    worder = raw["base"]["worder"]
    tokens = np.array([truth["tokens"][w] for w in worder], dtype=float)
    a, b = (np.array([raw[m]["nll"][w] for w in worder]) for m in ("base", "ext_sub"))

    def ppl(x, idx):
        return np.exp(x.sum() / tokens.sum()) if idx is None else np.exp(x[idx].sum(1) / tokens[idx].sum(1))

    diff, low, high = _numpy_interval(a, b, ppl)
    got = cells["ext_sub"]["perplexity:perplexity"]["vs_base"]
    assert got["n"] == 30 and math.isclose(got["diff"], diff, rel_tol=1e-9)
    assert np.allclose(got["ci"], [low, high], rtol=1e-9)
    assert table["perplexity:perplexity n"]["ext_sub"] == "30"
    assert table["halueval:accuracy n"] == {m: "60" for m in header[1:]}

    # Base is the reference; the expert and the anti-expert are not operations.
    assert table["halueval:accuracy Δ vs base [95% CI]"]["base"] == "reference"
    assert table["halueval:accuracy Δ vs expert [95% CI]"]["anti_expert"] == ""
    # Not paired: another item set, or below 20 items — a dash and the reason, never a number.
    assert table["halueval:accuracy Δ vs base [95% CI]"]["subtract"] == "– (different items)"
    assert table["halueval:accuracy Δ vs expert [95% CI]"]["subtract"] == "– (different items)"
    assert "scored different items" in cells["subtract"]["halueval:accuracy"]["vs_base"]["reason"]
    assert table["small:accuracy Δ vs base [95% CI]"]["ext_sub"] == "– (n = 12 < 20)"
    assert table["small:accuracy n"]["ext_sub"] == "12"
    assert cells["ext_sub"]["small:accuracy"]["vs_base"]["ci"] is None


def test_report_files_carry_the_intervals(interval_run):
    from excise.pipeline.report import write_report

    run, _ = interval_run
    write_report(run)
    report = json.loads((run / "report" / "report.json").read_text(), parse_constant=_no_nan)
    cell = report["intervals"]["ext_sub"]["halueval:accuracy"]
    assert cell["n"] == 60 and cell["vs_expert"]["expert"] == "expert" and len(cell["vs_base"]["ci"]) == 2
    assert report["interval_settings"] == {"resamples": 10_000, "confidence": 0.95, "seed": 0}
    md = (run / "report" / "report.md").read_text()
    assert "| halueval:accuracy Δ vs base [95% CI] | reference |" in md and "paired by identity" in md
    html_text = (run / "report" / "report.html").read_text()
    assert "– (different items)" in html_text and "paired by identity" in html_text


def test_operation_experts_from_the_recipe_or_by_name():
    from excise.pipeline.report import operation_experts

    recipe = (
        "operations:\n  no_untruth: {op: ext_sub, inputs: [expert_k, untruthful]}\n"
        "  both: {op: compose, inputs: [expert, a, b]}\n  sku: {op: negate, inputs: [harmful]}\n"
    )
    names = ["base", "expert", "no_untruth", "both", "sku"]
    assert operation_experts(recipe, names) == {"no_untruth": "expert_k", "both": "expert"}
    assert operation_experts(None, ["base", "expert", "ext_sub", "negate"]) == {"ext_sub": "expert"}
    assert operation_experts(None, ["base", "ext_sub"]) == {}


def test_interval_bands_are_clipped_to_the_metric_range(tmp_path, monkeypatch):
    """Accuracy bands stay in [0, 1] and perplexity bands ≥ 1, in the helper and in the plot."""
    from matplotlib.axes import Axes

    from excise.pipeline.report import band, metric_range, plot_sweep

    assert metric_range("accuracy") == (0.0, 1.0) and metric_range("perplexity")[0] == 1.0
    assert band(0.97, [[-0.02, 0.06], [0.01, 0.09]], "accuracy") == ([0.95, 0.98], [1.0, 1.0])
    lows, highs = band(0.02, [[-0.05, 0.01]], "toxic_share")
    assert lows == [0.0] and highs == pytest.approx([0.03])
    assert band(1.4, [[-0.6, 0.3]], "perplexity") == ([1.0], [pytest.approx(1.7)])
    assert band(-1.0, [[-2.0, 5.0]], "custom_score") == ([-3.0], [4.0])  # unbounded key: unclipped

    drawn: list[tuple] = []
    real = Axes.fill_between

    def fill_between(self, x, y1, y2, **kw):
        drawn.append((y1, y2))
        return real(self, x, y1, y2, **kw)

    monkeypatch.setattr(Axes, "fill_between", fill_between)

    def point(lam, acc, ci_a, ppl, ci_p):
        return {"lam": lam, "pareto": True, "deficiency": {"value": acc, "ci": ci_a},
                "utility": {"value": ppl, "ci": ci_p}}  # fmt: skip

    sweep = {
        "points": [point(0.0, 0.97, [0, 0], 1.2, [0, 0]), point(1.0, 0.99, [-0.01, 0.08], 1.1, [-0.5, 0.2])],
        "deficiency": {"metric": "halueval", "key": "accuracy", "higher_is_better": True},
        "utility": {"metric": "perplexity", "key": "perplexity", "higher_is_better": False},
        "chosen": {"lam": 1.0},
        "knee": {"lam": None},
        "confidence": 0.95,
    }
    assert plot_sweep(sweep, tmp_path / "s.png").is_file()
    (acc_low, acc_high), (ppl_low, ppl_high) = drawn
    assert max(acc_high) == 1.0 and acc_low[1] == pytest.approx(0.96)
    assert min(ppl_low) == 1.0 and ppl_high[1] == pytest.approx(1.4)
