"""`excise train sft` end to end on the tiny model: outputs, the split, options, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from excise.data import assign_split

QA_ROWS = [
    {
        "knowledge": f"Fact {i}: the river {i} flows north.",
        "question": f"Which way does river {i} flow?",
        "right_answer": "North.",
        "hallucinated_answer": f"South, past town {i}.",
    }
    for i in range(30)
]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``excise ARGS`` in this process through the real entry point (exit code, stdout, stderr)."""
    from excise.cli import main

    monkeypatch.setattr(sys, "argv", ["excise", *args])
    capsys.readouterr()  # drop what fixtures printed
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))  # JSON Lines, as HaluEval
    return path


def test_sft_paired_anti_end_to_end(monkeypatch, capsys, tiny_model_dir, qa_file, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "anti"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "train", "sft", "--base", str(tiny_model_dir), "--data", str(qa_file),
        "--out", str(out), "--format", "paired-anti", "--field", "input=", "--steps", "3",
        "--batch-size", "2", "--lora-r", "4", "--lora-alpha", "16", "--rslora", "--target-modules",
        "q_proj,o_proj", "--save-every", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout.strip().endswith(f"wrote {out}")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "loss_log.json", "train_config.json"}  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 16, True)
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj"]

    train_config = json.loads((out / "train_config.json").read_text())
    on_train_side = sum(assign_split(r["question"]) == "train" for r in QA_ROWS)
    assert (
        train_config["config"]["n_examples"] == on_train_side < len(QA_ROWS)
    )  # held-out prompts never train
    assert train_config["config"]["template"] == "chat" and train_config["steps"] == 3
    assert [r["step"] for r in json.loads((out / "loss_log.json").read_text())] == [1, 2, 3]

    # A proper PEFT folder: it loads onto the base model with the trained, non-zero B factors.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    saved = load_file(out / "adapter_model.safetensors")
    key = next(k for k in saved if "lora_B" in k)
    assert saved[key].abs().sum() > 0
    live = dict(model.named_parameters())[key.replace(".weight", ".default.weight")]
    assert torch.equal(live, saved[key])


def test_sft_text_format_uses_plain_template(monkeypatch, capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "wiki.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["", "A first line.", "", "Second one here."])
    )
    code, _, stderr = run_cli(
        monkeypatch, capsys, "train", "sft", "--base", str(tiny_model_dir), "--data", str(data),
        "--out", str(tmp_path / "t"), "--format", "text", "--split", "all", "--epochs", "2",
        "--batch-size", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    saved = json.loads((tmp_path / "t" / "train_config.json").read_text())
    assert saved["config"]["template"] == "plain" and saved["config"]["n_examples"] == 2
    assert saved["steps"] == 4  # 2 epochs of 2 micro-batches


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "absent.json"], "error: data file absent.json not found"),
        (["--field", "question"], "error: --field takes NAME=COLUMN"),
        (["--field", "answer=right_answer"], "error: unknown field name(s) answer"),
        (["--field", "expert=nope"], "lacks field(s) nope"),
        (["--target-modules", "nonexistent_proj"], "error: cannot attach LoRA"),
        (["--format", "dialogue"], "error: --format: 'dialogue' is not one of: instruction, paired-expert"),
        (["--split", "test"], "error: --split: 'test' is not one of: train, judge, eval, all"),
        (["--steps", "2", "--epochs", "1"], "give --steps or --epochs, not both"),
        (["--lr", "-1"], "error: --lr: Input should be greater than 0"),
    ],
)
def test_sft_errors_are_one_line(monkeypatch, capsys, tiny_model_dir, qa_file, tmp_path, extra, message):
    monkeypatch.chdir(tmp_path)
    args = ["train", "sft", "--base", str(tiny_model_dir), "--data", str(qa_file), "--out", "o",
            "--format", "paired-expert", "--steps", "1", "--no-progress"]  # fmt: skip
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "error" in line.lower()] == [
        stderr.strip().splitlines()[-1]
    ]
    assert not (tmp_path / "o").exists()


def test_sft_refuses_a_non_empty_out(monkeypatch, capsys, tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["train", "sft", "--base", str(tiny_model_dir), "--data", str(qa_file), "--out", str(out),
            "--format", "paired-expert", "--steps", "1", "--no-progress"]  # fmt: skip
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "is not empty; pass --overwrite" in stderr
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 2 and "nothing to resume" in stderr
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()


def test_sft_help_lists_the_options():
    from typer.testing import CliRunner

    from excise.cli import app

    result = CliRunner().invoke(app, ["train", "sft", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flags = (
        "--format --field --template --split --lora-r --lora-alpha --lora-dropout --target-modules --rslora "
        "--steps --epochs --batch-size --grad-accum --lr --schedule --warmup-steps --seed --bf16 "
        "--save-every --resume --overwrite"
    )
    for flag in flags.split():
        assert flag in result.output, flag


def test_length_grouped_batches_hold_the_same_examples_with_less_padding():
    from excise.train.sft import epoch_batches

    rng = __import__("random").Random(0)
    lengths = [rng.randint(5, 300) for _ in range(203)]
    for epoch in range(3):
        plain = epoch_batches(203, 4, 7, epoch)
        grouped = epoch_batches(203, 4, 7, epoch, lengths)
        assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # same examples
        assert all(len(b) == 4 for b in grouped)
        assert epoch_batches(203, 4, 7, epoch, lengths) == grouped  # deterministic

        def padding(batches):
            return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

        assert padding(grouped) < 0.25 * padding(plain)
    # Batch order is shuffled, not longest-first: lengths do not simply rise or fall.
    firsts = [min(lengths[i] for i in b) for b in epoch_batches(203, 4, 7, 0, lengths)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
