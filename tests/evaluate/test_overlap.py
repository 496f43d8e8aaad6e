"""No evaluation on training prompts (issue 10 item 1): the README's Ext-Sub flow on a tiny model.

An expert and an anti-expert are trained on the ``train`` side of a HaluEval-style file, Ext-Sub
combines them, and ``excise eval halueval`` must score only the questions neither saw; an explicit
``--split all`` is refused with the count, directly and through chains of ``excise ops``. The
trained questions are recomputed here independently, from :func:`excise.data.assign_split`.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from excise.data import assign_split, prompt_key
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

QA_ROWS = [
    {
        "knowledge": f"Fact {i}: the river {i} flows north.",
        "question": f"Which way does river {i} flow?",
        "right_answer": "North.",
        "hallucinated_answer": f"South, past town {i}.",
    }
    for i in range(40)
]
TRAIN_SIDE = [r["question"] for r in QA_ROWS if assign_split(r["question"]) == "train"]
EVAL_SIDE = [r["question"] for r in QA_ROWS if assign_split(r["question"]) == "eval"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Model, data, expert and anti-expert (train side), their Ext-Sub and its negation."""
    from excise.pem.apply import apply_operator
    from excise.train.sft import SftConfig, run

    root = tmp_path_factory.mktemp("flow")
    model = save_tiny_model(root / "tiny")
    qa = root / "qa_data.json"
    qa.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))  # JSON Lines, as HaluEval
    paths = {"model": model, "qa": qa}
    for side in ("expert", "anti"):
        cfg = SftConfig(
            base=str(model), data=str(qa), out=root / side, format=f"paired-{side}", steps=1,
            batch_size=2, lora_r=2, target_modules=("q_proj",),
        )  # fmt: skip
        run(cfg, progress=False)
        paths[side] = root / side
    paths["ext_sub"] = apply_operator(
        "ext_sub", [paths["expert"], paths["anti"]], root / "ext_sub", params={"lam": 1.0}
    )
    paths["negated"] = apply_operator("negate", [paths["ext_sub"]], root / "negated", params={"lam": 1.0})
    return paths


def _main(monkeypatch, capsys, *args):
    from excise.cli import main

    monkeypatch.setattr(sys, "argv", ["excise", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _eval(monkeypatch, capsys, flow, adapter, out, *extra):
    args = ["eval", "halueval", "--base", str(flow["model"]), "--adapter", str(adapter)]
    args += ["--data", str(flow["qa"]), "--protocol", "loss", "--device", "cpu", "--out", str(out), *extra]
    return _main(monkeypatch, capsys, *args)


def test_trainer_records_what_it_trained_on(flow):
    from excise.data import file_sha256, trained_prompt_keys

    config = json.loads((flow["expert"] / "train_config.json").read_text())["config"]
    (record,) = config["training_data"]
    assert record["data"] == str(flow["qa"].resolve()) and record["sha256"] == file_sha256(flow["qa"])
    assert (record["format"], record["split"], record["salt"]) == ("paired-expert", "train", "excise")
    assert trained_prompt_keys(record) == {prompt_key(q) for q in TRAIN_SIDE}


def test_readme_flow_scores_only_unseen_questions(monkeypatch, capsys, flow, tmp_path):
    out = tmp_path / "halueval.json"
    code, _, err = _eval(monkeypatch, capsys, flow, flow["ext_sub"], out)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert [it["question"] for it in record["items"]] == EVAL_SIDE  # the default is the eval side
    assert not set(EVAL_SIDE) & set(TRAIN_SIDE)
    checks = record["training_overlap"]
    assert {c["data"] for c in checks} == {str(flow["qa"].resolve())} and len(checks) == 2  # expert, anti
    assert all(c["overlap"] == 0 for c in checks) and record["warnings"] == []


@pytest.mark.parametrize("adapter", ["expert", "ext_sub", "negated"])
def test_split_all_on_trained_modules_is_refused(monkeypatch, capsys, flow, tmp_path, adapter):
    out = tmp_path / "r.json"
    code, _, err = _eval(monkeypatch, capsys, flow, flow[adapter], out, "--split", "all")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(
        f"error: {len(TRAIN_SIDE)} of the {len(QA_ROWS)} evaluation items of {flow['qa']} have a prompt "
        f"that {flow[adapter]} was trained on ({flow['qa'].resolve()}, split 'train')"
    )
    assert not out.exists()


def test_allow_overlap_writes_the_warning(monkeypatch, capsys, flow, tmp_path):
    out = tmp_path / "r.json"
    code, _, err = _eval(monkeypatch, capsys, flow, flow["negated"], out, "--split", "all", "--allow-overlap")
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["n_items"] == len(QA_ROWS)
    assert [c["overlap"] for c in record["training_overlap"]] == [len(TRAIN_SIDE)] * 2
    assert len(record["warnings"]) == 2
    assert record["warnings"][0].startswith(f"{len(TRAIN_SIDE)} of the {len(QA_ROWS)} evaluation items")
    assert "warning:" in err  # and said on the terminal
    # A cached result still carries this run's warnings.
    code, _, err = _eval(
        monkeypatch, capsys, flow, flow["negated"], out, "--split", "all", "--allow-overlap", "--overwrite"
    )
    assert code == 0 and len(json.loads(out.read_text())["warnings"]) == 2


def test_changed_or_missing_training_data_is_said(monkeypatch, capsys, flow, tmp_path):
    from excise.train.sft import SftConfig, run

    data = tmp_path / "qa.json"
    shutil.copy(flow["qa"], data)
    cfg = SftConfig(
        base=str(flow["model"]), data=str(data), out=tmp_path / "a", format="paired-anti", steps=1,
        batch_size=2, lora_r=2, target_modules=("q_proj",),
    )  # fmt: skip
    run(cfg, progress=False)
    data.write_text(data.read_text().replace("river 3", "river three"))
    code, _, err = _eval(monkeypatch, capsys, flow, tmp_path / "a", tmp_path / "r.json")
    assert code == 2 and f"training data {data.resolve()} changed since training" in err
    data.unlink()
    code, _, err = _eval(monkeypatch, capsys, flow, tmp_path / "a", tmp_path / "r.json")
    assert code == 2 and f"training data {data.resolve()} is missing" in err
    code, _, err = _eval(monkeypatch, capsys, flow, tmp_path / "a", tmp_path / "r.json", "--allow-overlap")
    assert code == 0 and "is missing" in json.loads((tmp_path / "r.json").read_text())["warnings"][0]


def test_unrecorded_training_data_is_not_taken_for_none(monkeypatch, capsys, flow, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(flow["expert"], legacy)
    config = json.loads((legacy / "train_config.json").read_text())
    del config["config"]["training_data"]  # as written before the record existed
    (legacy / "train_config.json").write_text(json.dumps(config))
    code, _, err = _eval(monkeypatch, capsys, flow, legacy, tmp_path / "r.json")
    assert code == 2 and "does not record what" in err


def test_full_model_ops_carry_training_data(flow, tmp_path):
    """`excise ops --base`: the result's provenance names its fine-tunes' training data."""
    from excise.data import recorded_training_data
    from excise.pem.full import apply_full

    record = json.loads((flow["expert"] / "train_config.json").read_text())["config"]["training_data"][0]
    tuned = save_tiny_model(tmp_path / "tuned", seed=1)
    (tuned / "train_config.json").write_text(json.dumps({"config": {"training_data": [record]}}))
    anti = save_tiny_model(tmp_path / "anti", seed=2)
    out = apply_full(
        "ext_sub", flow["model"], [tuned, anti], tmp_path / "out", params={"lam": 1.0}, progress=False
    )
    assert recorded_training_data(out) == [record]
    chained = apply_full(
        "negate", flow["model"], [out], tmp_path / "neg", params={"lam": 1.0}, progress=False
    )
    assert recorded_training_data(chained) == [record]


def test_unlearning_records_harmful_and_normal_data(tmp_path):
    """SKU and the baselines record both files, with the split they trained on."""
    from excise.data import trained_prompt_keys
    from excise.train.unlearning import UnlearnConfig, _training_data

    harmful = tmp_path / "harm.json"
    rows = [{"prompt": f"How to do bad thing {i}?", "response": ["No.", f"Step {i}."]} for i in range(30)]
    harmful.write_text(json.dumps(rows))
    normal = tmp_path / "normal.json"
    normal.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(30)]))
    cfg = UnlearnConfig(base="x", harmful=str(harmful), normal=str(normal), out=tmp_path / "o")
    records = _training_data(cfg, normal=True)
    assert [r["format"] for r in records] == ["harmful", "instruction"]
    expected = {prompt_key(r["prompt"]) for r in rows if assign_split(r["prompt"]) == "train"}
    assert trained_prompt_keys(records[0]) == expected
    safe_cfg = UnlearnConfig(base="x", harmful=str(harmful), normal="safe", out=tmp_path / "o")
    assert len(_training_data(safe_cfg, normal=True)) == 1  # `safe` is the harmful file itself


def test_merged_model_keeps_its_adapters_training_data(monkeypatch, capsys, flow, tmp_path):
    """`excise merge`: the merged model, evaluated as --base, is checked like its adapter."""
    merged = tmp_path / "merged"
    code, _, err = _main(
        monkeypatch, capsys, "merge", "--base", str(flow["model"]), "--adapter", str(flow["ext_sub"]),
        "--out", str(merged),
    )  # fmt: skip
    assert code == 0, err
    args = ["eval", "halueval", "--base", str(merged), "--data", str(flow["qa"]), "--protocol", "loss"]
    args += ["--device", "cpu", "--out", str(tmp_path / "r.json")]
    code, _, err = _main(monkeypatch, capsys, *args, "--split", "all")
    assert code == 2 and err.startswith(f"error: {len(TRAIN_SIDE)} of the {len(QA_ROWS)} evaluation items")
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert [c["overlap"] for c in json.loads((tmp_path / "r.json").read_text())["training_overlap"]] == [0, 0]


def test_sweep_checks_its_inputs_training_data(flow, tmp_path):
    """A λ sweep scores a model built in memory from its inputs: their training data is checked too."""
    from excise.errors import DataError
    from excise.pipeline.sweep import SweepConfig, run_sweep

    def sweep(split: str, out: str):
        settings = {"data": str(flow["qa"]), "split": split, "protocol": "loss"}
        cfg = SweepConfig(
            model=str(flow["model"]), operation="ext_sub", inputs=[flow["expert"], flow["anti"]],
            lams=[0.0, 1.0], device="cpu",
            deficiency={"metric": "halueval", "key": "accuracy", "settings": settings},
            utility={"metric": "halueval", "key": "accuracy", "settings": settings},
            out=tmp_path / out, progress=False,
        )  # fmt: skip
        return run_sweep(cfg)

    with pytest.raises(DataError, match=rf"{len(TRAIN_SIDE)} of the {len(QA_ROWS)} evaluation items"):
        sweep("all", "refused")
    assert not (tmp_path / "refused").exists()
    summary = json.loads((sweep("eval", "ok") / "sweep.json").read_text())
    assert [p["lam"] for p in summary["points"]] == [0.0, 1.0]


def test_pair_controls_are_recorded_and_name_the_trained_prompts(tmp_path):
    """Filtered pairs, then a cap: the record must name exactly the capped filtered prompts."""
    from excise.data import recorded_training_data, trained_prompt_keys
    from excise.train.sft import SftConfig, load_examples, run

    rows = [
        {"question": f"Which way does river {i} flow?", "right_answer": "North.",
         "hallucinated_answer": "South." if i % 2 else f"South, past the town of {i} and on."}
        for i in range(60)
    ]  # fmt: skip
    qa = tmp_path / "qa.json"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = save_tiny_model(tmp_path / "tiny")
    cfg = SftConfig(base=str(model), data=str(qa), out=tmp_path / "e", format="paired-expert", steps=1,
                    batch_size=2, lora_r=2, target_modules=("q_proj",), max_examples=5,
                    pair_max_word_ratio=1.5, pair_strip_period=True)  # fmt: skip
    run(cfg, progress=False)
    (record,) = recorded_training_data(tmp_path / "e")
    assert record["pairs"] == {"max_word_ratio": 1.5, "strip_final_period": True}
    odd_train = [r["question"] for r in rows[1::2] if assign_split(r["question"]) == "train"]
    assert trained_prompt_keys(record) == {prompt_key(q) for q in odd_train[:5]}
    assert [e.response for e in load_examples(cfg)] == ["North"] * 5
    with pytest.raises(ValueError, match="paired formats only"):
        SftConfig(base="m", data=str(qa), out=tmp_path / "x", format="instruction", pair_strip_period=True)


# ----------------------------------------------------------------------------- issue 21 items 1, 2


def _third_party_adapter(flow, folder):
    """A PEFT adapter with no excise record at all (made elsewhere)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_peft_lora

    model = AutoModelForCausalLM.from_pretrained(flow["model"])
    return write_peft_lora(folder, model, seed=3, r=2, target_modules=["q_proj"])


def _tuned_base(flow, folder):
    """A model folder fine-tuned (as far as its record says) on the train side of the QA file."""
    record = json.loads((flow["expert"] / "train_config.json").read_text())["config"]["training_data"][0]
    tuned = save_tiny_model(folder)
    (tuned / "train_config.json").write_text(json.dumps({"config": {"training_data": [record]}}))
    return tuned, record


def test_merge_carries_the_base_models_training_data(monkeypatch, capsys, flow, tmp_path):
    """A model fine-tuned on some prompts, merged with an adapter that records nothing of them,
    is still refused on those prompts."""
    tuned, record = _tuned_base(flow, tmp_path / "tuned")
    adapter = _third_party_adapter(flow, tmp_path / "lora")
    merged = tmp_path / "merged"
    code, _, err = _main(monkeypatch, capsys, "merge", "--base", str(tuned), "--adapter", str(adapter),
                         "--out", str(merged))  # fmt: skip
    assert code == 0, err
    assert json.loads((merged / "excise_merge.json").read_text())["training_data"] == [record]
    args = ["eval", "halueval", "--base", str(merged), "--data", str(flow["qa"]), "--protocol", "loss"]
    code, _, err = _main(monkeypatch, capsys, *args, "--device", "cpu", "--split", "all",
                         "--out", str(tmp_path / "r.json"))  # fmt: skip
    assert code == 2 and err.startswith(f"error: {len(TRAIN_SIDE)} of the {len(QA_ROWS)} evaluation items")


def test_full_model_ops_carry_the_base_models_training_data(flow, tmp_path):
    """θ0's records reach the result, even when θ1 brings a train_config.json of its own."""
    from excise.data import recorded_training_data, training_data_record
    from excise.pem.full import apply_full

    tuned, record = _tuned_base(flow, tmp_path / "tuned")
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    own = training_data_record(str(other), format="instruction", fields={}, split="all")
    child = save_tiny_model(tmp_path / "child", seed=1)
    (child / "train_config.json").write_text(json.dumps({"config": {"training_data": [own]}}))
    out = apply_full("negate", tuned, [child], tmp_path / "out", params={"lam": 1.0}, progress=False)
    assert json.loads((out / "excise.json").read_text())["training_data"] == [record, own]
    assert record in recorded_training_data(out) and own in recorded_training_data(out)


def test_a_module_without_records_is_unchecked_not_clean(monkeypatch, capsys, flow, tmp_path):
    adapter = _third_party_adapter(flow, tmp_path / "lora")
    out = tmp_path / "r.json"
    code, _, err = _eval(monkeypatch, capsys, flow, adapter, out)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["training_overlap"] == "unchecked"
    assert record["training_overlap_unchecked"] == [
        f"{adapter} records no training data (made elsewhere, or copied without its JSON)"
    ]
    assert "training overlap" in err and "unchecked" in err  # in the summary, not only in the file
    # A module that records its data reads as checked, with its counts.
    code, _, err = _eval(monkeypatch, capsys, flow, flow["expert"], out, "--overwrite")
    assert code == 0, err
    assert [c["overlap"] for c in json.loads(out.read_text())["training_overlap"]] == [0]


def test_prompts_are_compared_after_unicode_normalisation(monkeypatch, capsys, flow, tmp_path):
    """The trained questions typed in full-width letters are the same prompts."""

    def full_width(text: str) -> str:
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in text)

    rows = [r | {"question": full_width(r["question"])} for r in QA_ROWS]
    assert not {r["question"] for r in rows} & {r["question"] for r in QA_ROWS}  # other text, byte for byte
    data = tmp_path / "wide.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "eval",
        "halueval",
        "--base",
        str(flow["model"]),
        "--adapter",
        str(flow["expert"]),
        "--data",
        str(data),
    ]
    args += ["--protocol", "loss", "--device", "cpu", "--split", "all", "--out", str(tmp_path / "r.json")]
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 2 and err.startswith(f"error: {len(TRAIN_SIDE)} of the {len(QA_ROWS)} evaluation items")
    # and the split puts each on the side of its plain spelling
    assert [assign_split(r["question"]) for r in rows] == [assign_split(r["question"]) for r in QA_ROWS]


def test_a_sweep_without_a_split_takes_the_held_out_side_of_its_inputs_data(flow, tmp_path):
    """The sweep's inputs trained on the file: with no split given it scores the `eval` side."""
    from excise.pipeline.sweep import SweepConfig, run_sweep

    settings = {"data": str(flow["qa"]), "protocol": "loss"}
    cfg = SweepConfig(
        model=str(flow["model"]), operation="ext_sub", inputs=[flow["expert"], flow["anti"]],
        lams=[0.0, 1.0], device="cpu", bootstrap=10,
        deficiency={"metric": "halueval", "key": "accuracy", "settings": settings},
        utility={"metric": "halueval", "key": "accuracy", "settings": settings},
        out=tmp_path / "sweep", progress=False,
    )  # fmt: skip
    run_sweep(cfg)
    for lam in ("lam=0", "lam=1"):
        record = json.loads((tmp_path / "sweep" / "results" / lam / "halueval.json").read_text())
        assert record["split"] == "eval" and [it["question"] for it in record["items"]] == EVAL_SIDE
