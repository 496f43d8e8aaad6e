"""Loaders of instruction, paired-QA, harmful-QA and text data; field mapping; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from excise.data import (
    Example,
    assign_split,
    load_harmful_qa,
    load_instructions,
    load_paired_qa,
    load_texts,
    parse_field_mapping,
    parse_hh_transcript,
    prompt_key,
    select_split,
)
from excise.errors import ConfigError, DataError, ExciseWarning

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _write(path: Path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- instructions


def test_instructions_alpaca_fields_and_optional_input(tmp_path):
    spec = _write(
        tmp_path / "a.json",
        [
            {"instruction": " Add. ", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "input": "", "output": "Hello!"},
        ],
    )
    examples = load_instructions(spec)
    assert examples == [Example("Add.", "5", input="2 and 3", row=0), Example("Greet.", "Hello!", row=1)]


def test_instructions_csv_with_field_mapping(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("q,a\nWhat?,That.\nWho?,Them.\n")
    examples = load_instructions(str(path), fields={"prompt": "q", "response": "a", "input": ""})
    assert [(e.prompt, e.response, e.input) for e in examples] == [
        ("What?", "That.", ""),
        ("Who?", "Them.", ""),
    ]


def test_instructions_missing_field_names_row_and_fix(tmp_path):
    spec = _write(tmp_path / "a.json", [{"instruction": "x", "output": "y"}, {"instruction": "z"}])
    with pytest.raises(DataError, match=r"row 2 lacks field\(s\) output .*--field"):
        load_instructions(spec)


def test_empty_value_is_missing(tmp_path):
    spec = _write(tmp_path / "a.json", [{"instruction": "x", "output": "   "}])
    with pytest.raises(DataError, match="row 1 lacks field"):
        load_instructions(spec)


def test_bad_field_mapping_is_config_error(tmp_path):
    spec = _write(tmp_path / "a.json", [{"instruction": "x", "output": "y"}])
    with pytest.raises(ConfigError, match=r"unknown field name.*answer.*known: prompt, input, response"):
        load_instructions(spec, fields={"answer": "output"})
    with pytest.raises(DataError, match=r"lacks field.*nope"):
        load_instructions(spec, fields={"response": "nope"})


def test_missing_file_and_empty_set(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_instructions(str(tmp_path / "absent.json"))
    with pytest.raises(DataError, match="holds no rows"):
        load_instructions(_write(tmp_path / "e.json", []))


def test_parse_field_mapping():
    assert parse_field_mapping(["prompt=question", "input="]) == {"prompt": "question", "input": ""}
    with pytest.raises(ConfigError, match="NAME=COLUMN"):
        parse_field_mapping(["prompt"])


# ----------------------------------------------------------------------------- paired QA


def test_paired_qa_same_questions_both_sides(tmp_path):
    rows = [
        {"knowledge": "K1", "question": "Q1", "right_answer": "R1", "hallucinated_answer": "H1"},
        {"knowledge": "K2", "question": "Q2", "right_answer": "R2", "hallucinated_answer": "H2"},
    ]
    expert, anti = load_paired_qa(_jsonl(tmp_path / "qa.json", rows))
    assert [(e.prompt, e.input, e.response) for e in expert] == [("Q1", "K1", "R1"), ("Q2", "K2", "R2")]
    assert [(e.prompt, e.input, e.response) for e in anti] == [("Q1", "K1", "H1"), ("Q2", "K2", "H2")]
    no_knowledge, _ = load_paired_qa(_jsonl(tmp_path / "qa.json", rows), fields={"input": ""})
    assert all(e.input == "" for e in no_knowledge)


def test_paired_qa_missing_answer(tmp_path):
    spec = _jsonl(tmp_path / "qa.json", [{"question": "Q", "right_answer": "R"}])
    with pytest.raises(DataError, match="hallucinated_answer"):
        load_paired_qa(spec)


# ----------------------------------------------------------------------------- harmful QA


def test_pku_pairs_response1_is_harmful(tmp_path):
    rows = [{"prompt": "How to X?", "response": ["I can't help.", "Do X like so."]}]
    harmful, safe = load_harmful_qa(_write(tmp_path / "p.json", rows))
    assert harmful == [Example("How to X?", "Do X like so.", row=0)]
    assert safe == [Example("How to X?", "I can't help.", row=0)]


def test_pku_pairs_malformed_response(tmp_path):
    spec = _write(tmp_path / "p.json", [{"prompt": "P", "response": "just one"}])
    with pytest.raises(DataError, match=r"row 1: 'response' must be a list \[safe, unsafe\]"):
        load_harmful_qa(spec)


def _reference_pku_harmful(rows):
    """The SKU / LLMU loaders' harmful set (``create_pku_dataloader_from_dataset``): every unsafe response."""
    out = []
    for row in rows:
        for j in (0, 1):
            if not row[f"is_response_{j}_safe"]:
                out.append((row["prompt"], row[f"response_{j}"]))
    return out


def test_raw_pku_rows_keep_every_unsafe_response(tmp_path):
    rows = [
        {"prompt": "A", "response_0": "bad", "response_1": "good", "is_response_0_safe": False,
         "is_response_1_safe": True},
        {"prompt": "B", "response_0": "ok", "response_1": "ok2", "is_response_0_safe": True,
         "is_response_1_safe": True},
        {"prompt": "C", "response_0": "fine", "response_1": "worse", "is_response_0_safe": True,
         "is_response_1_safe": False},
        {"prompt": "D", "response_0": "awful", "response_1": "vile", "is_response_0_safe": False,
         "is_response_1_safe": False},
    ]  # fmt: skip
    harmful, safe = load_harmful_qa(_write(tmp_path / "raw.json", rows))
    assert [(e.prompt, e.response) for e in harmful] == _reference_pku_harmful(rows)
    assert [(e.prompt, e.response) for e in harmful] == [
        ("A", "bad"),
        ("C", "worse"),
        ("D", "awful"),
        ("D", "vile"),
    ]
    assert [(e.prompt, e.response) for e in safe] == [("A", "good"), ("B", "ok"), ("B", "ok2"), ("C", "fine")]
    assert [e.row for e in harmful] == [0, 2, 3, 3]


def test_raw_pku_rows_from_csv_read_the_flags_as_booleans(tmp_path):
    csv = tmp_path / "raw.csv"
    csv.write_text(
        "prompt,response_0,response_1,is_response_0_safe,is_response_1_safe\n"
        "A,bad,good,False,True\nD,awful,vile,false,0\n"
    )
    harmful, safe = load_harmful_qa(str(csv))
    assert [e.response for e in harmful] == ["bad", "awful", "vile"]
    assert [e.response for e in safe] == ["good"]


def test_raw_pku_rows_with_no_unsafe_response_are_a_clear_error(tmp_path):
    rows = [{"prompt": "B", "response_0": "ok", "response_1": "ok2", "is_response_0_safe": True,
             "is_response_1_safe": True}]  # fmt: skip
    with pytest.raises(DataError, match="no row has an unsafe response"):
        load_harmful_qa(_write(tmp_path / "raw.json", rows))


def test_two_mapped_columns(tmp_path):
    rows = [{"goal": "G", "bad": "B", "good": "S"}]
    harmful, safe = load_harmful_qa(
        _write(tmp_path / "t.json", rows), fields={"prompt": "goal", "harmful": "bad", "safe": "good"}
    )
    assert (harmful[0].response, safe[0].response, harmful[0].prompt) == ("B", "S", "G")
    with pytest.raises(ConfigError, match="both harmful=COLUMN and safe=COLUMN"):
        load_harmful_qa(_write(tmp_path / "t.json", rows), fields={"harmful": "bad"})


def test_hh_transcript_split_into_history_prompt_response():
    text = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I pick a lock?\n\nAssistant: Like this."
    history, prompt, response = parse_hh_transcript(text)
    assert history == (("user", "Hi"), ("assistant", "Hello."))
    assert (prompt, response) == ("How do I pick a lock?", "Like this.")
    with pytest.raises(DataError, match="must end with a Human turn followed by an Assistant turn"):
        parse_hh_transcript("\n\nHuman: only a question")


def test_hh_rows_rejected_is_harmful(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: Q?\n\nAssistant: No.",
            "rejected": "\n\nHuman: Q?\n\nAssistant: Yes, here is how.",
        }
    ]
    harmful, safe = load_harmful_qa(_jsonl(tmp_path / "hh.jsonl", rows))
    assert (harmful[0].prompt, harmful[0].response) == ("Q?", "Yes, here is how.")
    assert (safe[0].prompt, safe[0].response) == ("Q?", "No.")


def test_hh_malformed_rows_skipped_with_a_warning(tmp_path):
    good = {"chosen": "\n\nHuman: Q?\n\nAssistant: No.", "rejected": "\n\nHuman: Q?\n\nAssistant: Yes."}
    bad = {"chosen": "\n\nHuman: Q?\n\nAssistant: A\n\nAssistant: B", "rejected": "\n\nHuman: Q?"}
    with pytest.warns(ExciseWarning, match=r"skipped 1 transcript.*rows 2\)"):
        harmful, _ = load_harmful_qa(_jsonl(tmp_path / "hh.jsonl", [good, bad]))
    assert len(harmful) == 1
    with pytest.raises(DataError, match="no transcript ends with a Human turn"):
        load_harmful_qa(_jsonl(tmp_path / "hh.jsonl", [bad]))


def test_harmful_unknown_layout(tmp_path):
    with pytest.raises(DataError, match=r"not harmful-QA data.*the first row has: a, b"):
        load_harmful_qa(_write(tmp_path / "x.json", [{"a": 1, "b": 2}]))


# ----------------------------------------------------------------------------- text


def test_texts_skip_blank_rows(tmp_path):
    spec = _jsonl(
        tmp_path / "w.jsonl", [{"text": ""}, {"text": " = Title = \n"}, {"text": "\n"}, {"text": "x"}]
    )
    examples = load_texts(spec)
    assert [(e.prompt, e.response, e.row) for e in examples] == [("", " = Title = \n", 1), ("", "x", 3)]


def test_texts_errors(tmp_path):
    with pytest.raises(DataError, match="every row's 'text' is blank"):
        load_texts(_jsonl(tmp_path / "w.jsonl", [{"text": ""}, {"text": "  "}]))
    with pytest.raises(DataError, match=r"no column 'body'.*--field text=COLUMN"):
        load_texts(_jsonl(tmp_path / "w.jsonl", [{"text": "a"}]), field="body")


# ----------------------------------------------------------------------------- splits


def test_select_split_partitions_by_prompt():
    examples = [Example(f"Question {i % 50}?", f"answer {i}") for i in range(200)]  # each prompt 4 times
    sides = {side: select_split(examples, side) for side in ("train", "judge", "eval")}
    assert sum(len(v) for v in sides.values()) == len(examples)
    prompts = {side: {e.prompt for e in v} for side, v in sides.items()}
    assert not prompts["train"] & prompts["judge"] and not prompts["train"] & prompts["eval"]
    assert not prompts["judge"] & prompts["eval"]
    for side, chosen in sides.items():  # the side is the project-wide hash of the prompt
        assert all(assign_split(e.prompt) == side for e in chosen)
    assert select_split(examples, "all") == examples
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        select_split(examples, "test")


# ----------------------------------------------------------------------------- the shared data files

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


@needs_shared
def test_real_halueval_qa():
    expert, anti = load_paired_qa(str(SHARED / "halueval/qa_data.json"))
    assert len(expert) == len(anti) == 10000
    assert expert[0].prompt == anti[0].prompt and expert[0].response != anti[0].response
    assert expert[0].input  # the knowledge paragraph


@needs_shared
def test_real_alpaca_demo():
    examples = load_instructions(str(SHARED / "alpaca_gpt4/alpaca_en_demo.json"))
    assert len(examples) == 999 and all(e.prompt and e.response for e in examples)


@needs_shared
def test_real_pku_pairs():
    harmful, safe = load_harmful_qa(str(SHARED / "pku_saferlhf/pku_saferlhf_test_safe_unsafe_pairs.json"))
    assert len(harmful) == len(safe) == 5135
    assert len({prompt_key(e.split_key) for e in harmful}) == 930  # docs/UNLEARNING.md's counts
    rows = json.loads((SHARED / "pku_saferlhf/pku_saferlhf_test_safe_unsafe_pairs.json").read_text())
    assert harmful[7].response == rows[7]["response"][1].strip()
    assert safe[7].response == rows[7]["response"][0].strip()


@needs_shared
def test_real_hh_rlhf():
    with pytest.warns(ExciseWarning, match="skipped 5 transcript"):
        harmful, safe = load_harmful_qa(str(SHARED / "hh_rlhf/harmless_base_test.jsonl"))
    assert 2200 < len(harmful) == len(safe) <= 2312
    assert all(e.history == () or e.history[0][0] == "user" for e in harmful)
    assert sum(bool(e.history) for e in harmful) > 1000  # most are multi-turn


@needs_shared
def test_real_wikitext():
    examples = load_texts(str(SHARED / "wikitext2/wiki_test_raw.jsonl"))
    assert 2000 < len(examples) < 4358 and all(e.response.strip() for e in examples)


def test_paired_qa_format_controls(tmp_path):
    rows = [
        {"question": "Q1", "right_answer": "Paris", "hallucinated_answer": "Lyon."},  # 1 vs 1 word
        {
            "question": "Q2",
            "right_answer": "Arthur's Magazine",
            "hallucinated_answer": "First for Women was.",
        },
        {"question": "Q3", "right_answer": "The Five.", "hallucinated_answer": "The Four Tops."},  # 2 vs 3
        {"question": "Q4", "right_answer": "Mr. J. R. R.", "hallucinated_answer": "Wait..."},
    ]
    spec = _jsonl(tmp_path / "qa.json", rows)
    expert, anti = load_paired_qa(spec, max_word_ratio=1.5, strip_final_period=True)
    # Independently: word counts 1/1, 2/4, 2/3, 4/1 → ratios 1, 2, 1.5, 4.
    assert [e.prompt for e in expert] == ["Q1", "Q3"] == [a.prompt for a in anti]
    pairs = [(e.response, a.response) for e, a in zip(expert, anti, strict=True)]
    assert pairs == [("Paris", "Lyon"), ("The Five", "The Four Tops")]
    assert [e.row for e in expert] == [0, 2]
    unstripped, _ = load_paired_qa(spec, strip_final_period=False, max_word_ratio=5)
    assert [e.response for e in unstripped][3] == "Mr. J. R. R."
    ellipsis = load_paired_qa(spec, strip_final_period=True)[1][3]
    assert ellipsis.response == "Wait..."  # an ellipsis is not a final period
    with pytest.raises(DataError, match="word ratio"):
        load_paired_qa(_jsonl(tmp_path / "q2.json", rows[1:2]), max_word_ratio=1.0)
