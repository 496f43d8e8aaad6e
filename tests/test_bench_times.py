"""benchmarks/bench_times.py on a tiny model: a measurement runs the real CLI, lands in the JSON
file with what the command recorded, and a rerun skips it (resume)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import load_script, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bt():
    return load_script("benchmarks/bench_times.py")


def _data_root(folder: Path) -> Path:
    """HaluEval QA rows and wikitext-2 rows, in the shared data layout, a few of each."""
    (folder / "halueval").mkdir(parents=True)
    rows = [
        {
            "knowledge": f"Fact {i} is about the number {i}.",
            "question": f"What is fact {i} about?",
            "right_answer": f"The number {i}",
            "hallucinated_answer": f"The letter {chr(97 + i % 26)}",
        }
        for i in range(24)
    ]
    (folder / "halueval" / "qa_data.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "wikitext2").mkdir()
    text = [{"text": f" Paragraph {i} says a few plain words about item {i} . \n"} for i in range(30)]
    (folder / "wikitext2" / "wiki_test_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    return folder


def test_a_measurement_is_recorded_and_skipped_on_rerun(bt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))  # the shared model cache, here
    model = save_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    data = _data_root(tmp_path / "data")
    results = tmp_path / "bench.json"
    bench = bt.Bench(model=str(model), data=data, threads=1, json_path=results)

    sft = bt.sft_measurement(bench, steps=2)
    (perplexity,) = [m for m in bt.perplexity_measurements(bench, quick=True) if "head 40" in m.label]
    assert "--data" in sft.args and "--split" in perplexity.args  # another data root: its files, same split
    trained = bt.measure(bench, sft)
    scored = bt.measure(bench, perplexity)

    for entry in (trained, scored):
        assert entry["exit_code"] == 0, entry.get("log_tail")
        assert entry["wall_s"] > 0 and entry["peak_rss_gb"] > 0
        assert entry["threads"] == 1 and len(entry["load_before"]) == 3
    assert len(trained["extras"]["step_seconds"]) == 2
    assert trained["extras"]["min_per_100_steps"] == pytest.approx(
        trained["extras"]["mean_step_s"] * 100 / 60
    )
    assert scored["extras"]["n_items"] == 30 and scored["extras"]["scored_tokens"] > 0
    assert [e["command"] for e in json.loads(results.read_text())["measurements"]] == [
        sft.command,
        perplexity.command,
    ]

    def no_run(*args, **kwargs):
        raise AssertionError("a measurement already in the file ran again")

    monkeypatch.setattr(subprocess, "run", no_run)
    again = bt.Bench(
        model=str(model), data=data, threads=1, json_path=results
    )  # a new process reads the file
    assert bt.measure(again, sft) == trained
    capsys.readouterr()
    bt.main(["--model", str(model), "--data-root", str(data), "--threads", "1", "--json", str(results),
             "--sections", "perplexity", "--quick", "--list"])  # fmt: skip
    listed = capsys.readouterr().out
    assert f"done  perplexity {perplexity.label}" in listed and "todo  perplexity recipes" in listed
