"""`excise data anti` against the stub endpoint (resume and cache send nothing twice) and a tiny model."""

from __future__ import annotations

import json

import pytest

from excise.data.anti import TEMPLATES, AntiSettings, iter_rows, make_anti_data, render
from excise.errors import ConfigError, DataError, ModelLoadError
from tests.stub_openai import StubOpenAI, unused_url

ROWS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Give a colour of the sky.", "input": "", "output": "Blue."},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},  # a duplicate row
]


def _anti_reply(body):
    """The stub rewrites by echoing the original answer's line, reversed (easy to check)."""
    user = body["messages"][-1]["content"]
    original = user.split("### Response:\n", 1)[1].split("\n\n###", 1)[0]
    return f"ANTI[{original[::-1]}]"


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ROWS))
    return path


def _settings(url, tmp_path, **kw):
    options = {"cache": tmp_path / "cache.sqlite", **kw}
    return AntiSettings(kind="untruthful", generator=url, model="writer", **options)


def test_endpoint_rows_pair_both_answers_and_resume_and_cache_send_nothing_twice(source, tmp_path):
    out = tmp_path / "anti.jsonl"
    with StubOpenAI(_anti_reply) as stub:
        report = make_anti_data(source, out, _settings(stub.url, tmp_path, batch_size=2), progress=False)
        # The duplicate row (same prompt, greedy) is answered from the cache.
        assert (report.written, report.generated, report.from_cache) == (5, 4, 1)
        assert stub.count == 4
        rows = list(iter_rows(out))
        assert [r["instruction"] for r in rows] == [r["instruction"] for r in ROWS]
        assert [r["anti_output"] for r in rows] == [f"ANTI[{r['output'][::-1]}]" for r in ROWS]
        assert all(r["kind"] == "untruthful" and r["generator"] == f"{stub.url}#writer" for r in rows)
        assert rows[1]["input"] == "2 and 3" and rows[1]["output"] == "5"
        # The prompt sent is the documented template.
        sent = [r["messages"] for r in stub.requests]
        assert all(render(TEMPLATES["untruthful"], row) in sent for row in ROWS)
        assert "### Input:\n2 and 3" in render(TEMPLATES["untruthful"], ROWS[1])[1]["content"]
        assert {r["model"] for r in stub.requests} == {"writer"}

        again = make_anti_data(source, out, _settings(stub.url, tmp_path), progress=False)
        assert (again.already_done, again.written) == (5, 0) and stub.count == 4  # resume: nothing sent

        out.unlink()
        cached = make_anti_data(source, out, _settings(stub.url, tmp_path), progress=False)
        assert (cached.written, cached.from_cache, cached.generated) == (5, 5, 0) and stub.count == 4
        assert list(iter_rows(out)) == rows


def test_a_torn_last_line_is_cut_and_redone(source, tmp_path):
    out = tmp_path / "anti.jsonl"
    with StubOpenAI(_anti_reply) as stub:
        make_anti_data(source, out, _settings(stub.url, tmp_path, limit=3), progress=False)
        complete = out.read_text()
        lines = complete.splitlines(keepends=True)
        out.write_text("".join(lines[:2]) + lines[2][:15])  # a crash in the middle of row 3
        report = make_anti_data(
            source, out, _settings(stub.url, tmp_path, cache=None, limit=3), progress=False
        )
        assert (report.already_done, report.written) == (2, 1)
        assert stub.count == 4  # only row 3 was asked again (no cache in the second run)
    assert out.read_text() == complete


def test_tiny_model_generator_matches_direct_generation(source, tmp_path, tiny_model_dir):
    from excise.models import load_model, load_tokenizer
    from excise.models.generation import GenerationSettings, chat_prompt_ids, generate

    out = tmp_path / "anti.jsonl"
    settings = AntiSettings(
        kind="toxic", generator=str(tiny_model_dir), batch_size=2, max_new_tokens=6, limit=3, cache=None
    )
    report = make_anti_data(source, out, settings, progress=False)
    rows = list(iter_rows(out))

    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    model = load_model(str(tiny_model_dir))
    prompts = []
    for row in ROWS[:3]:
        system, user = render(TEMPLATES["toxic"], row)
        prompts.append(chat_prompt_ids(tokenizer, user["content"], system=system["content"]))
    expected = generate(
        model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=1), progress=False
    )
    kept = [e for e in expected if e.strip()]  # an empty reply is not written
    assert [r["anti_output"] for r in rows] == kept
    assert report.written + report.empty == 3 and all(r["kind"] == "toxic" for r in rows)


def test_bfloat16_generator_runs_in_bfloat16_with_its_own_cache_keys(
    source, tmp_path, tiny_model_dir, monkeypatch
):
    """`--dtype bfloat16`: the local generator decodes in bfloat16, its replies are cached apart
    from float32's, and float32's cache keys are what they were before the option existed."""
    import hashlib

    import torch

    import excise.models.generation as generation
    from excise.data.anti import _cache_key

    seen = []
    real = generation.generate

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    options = {"kind": "toxic", "generator": str(tiny_model_dir), "max_new_tokens": 4, "limit": 2}
    fast = AntiSettings(**options, dtype="bfloat16", cache=tmp_path / "c.sqlite")
    make_anti_data(source, tmp_path / "anti.jsonl", fast, progress=False)
    assert seen and set(seen) == {torch.bfloat16}

    exact = AntiSettings(**options, cache=None)
    messages = render(TEMPLATES["toxic"], ROWS[0])
    decoding = {"max_new_tokens": 4, "temperature": 0.0, "seed": None}  # the key before --dtype
    blob = json.dumps([exact.generator_id, TEMPLATES["toxic"].name, messages, decoding], sort_keys=True)
    assert _cache_key(exact, TEMPLATES["toxic"], messages) == hashlib.sha256(blob.encode()).hexdigest()
    assert _cache_key(fast, TEMPLATES["toxic"], messages) != _cache_key(exact, TEMPLATES["toxic"], messages)
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        AntiSettings(**options, dtype="float16")
    with pytest.raises(ConfigError, match="applies to a local generator"):
        AntiSettings(kind="toxic", generator="http://h/v1", model="m", dtype="bfloat16")


def test_field_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Why?", "best": "Because."}) + "\n")
    with StubOpenAI(_anti_reply) as stub:
        settings = _settings(stub.url, tmp_path, fields={"instruction": "question", "output": "best"})
        make_anti_data(path, tmp_path / "o.jsonl", settings, progress=False)
    (row,) = iter_rows(tmp_path / "o.jsonl")
    assert (row["instruction"], row["input"], row["output"], row["anti_output"]) == (
        "Why?",
        "",
        "Because.",
        "ANTI[.esuaceB]",
    )


def test_bad_inputs_are_one_line_errors(source, tmp_path):
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(DataError, match="row 1 lacks field"):
        make_anti_data(missing, tmp_path / "o.jsonl", _settings("http://h/v1", tmp_path), progress=False)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no rows"):
        make_anti_data(empty, tmp_path / "o.jsonl", _settings("http://h/v1", tmp_path), progress=False)
    with pytest.raises(ModelLoadError, match="check that the server is running") as err:
        settings = AntiSettings(kind="toxic", generator=unused_url(), model="m", cache=None, max_retries=1)
        make_anti_data(source, tmp_path / "o.jsonl", settings, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="pass --model"):
        AntiSettings(kind="toxic", generator="http://h/v1")
    with pytest.raises(ConfigError, match="--kind must be one of"):
        AntiSettings(kind="rude", generator="x")
    with pytest.raises(ConfigError, match="unknown field"):
        AntiSettings(kind="toxic", generator="x", fields={"answer": "a"})


def test_resuming_with_another_generator_is_refused(source, tmp_path):
    out = tmp_path / "anti.jsonl"
    with StubOpenAI(_anti_reply) as stub:
        make_anti_data(source, out, _settings(stub.url, tmp_path, limit=1), progress=False)
        other = AntiSettings(kind="untruthful", generator=stub.url, model="other", cache=None)
        with pytest.raises(ConfigError, match="choose another --out or pass --overwrite"):
            make_anti_data(source, out, other, progress=False)
        make_anti_data(source, out, other, overwrite=True, progress=False)
    assert {r["generator"] for r in iter_rows(out)} == {f"{stub.url}#other"}
