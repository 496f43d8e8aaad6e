"""Adapters from the hub (``org/name[@revision]``) and ``--push-to-hub``, against a hub on 127.0.0.1.

The real ``excise`` command runs in a subprocess with ``HF_ENDPOINT`` pointing at
:class:`tests.hub_server.LocalHub` (``huggingface_hub`` reads it at import) and its own cache
(``HF_HOME``), so the client is the real one, talking HTTP, not a patched one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from excise.errors import AdapterError
from excise.hub import ADAPTER_FILES, parse_hub_id, resolve_adapter
from excise.pem.io import load_adapter
from excise.pem.linalg import ext_sub_rows_reference
from tests.conftest import CLI_BATCH_SCRIPT, write_raw_lora
from tests.hub_server import LocalHub

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (4, 8)}


def _write_lora(folder: Path, seed: int, r: int = 3) -> Path:
    return write_raw_lora(folder, seed, SHAPES, r=r)


@pytest.fixture
def hub():
    with LocalHub() as server:
        yield server


@pytest.fixture
def adapters(tmp_path):
    """Expert and anti-expert folders; the expert's repo also holds a checkpoint never to be fetched."""
    expert, anti = _write_lora(tmp_path / "src" / "expert", 1), _write_lora(tmp_path / "src" / "anti", 2, r=2)
    (expert / "checkpoint-10").mkdir()
    (expert / "checkpoint-10" / "optimizer.pt").write_bytes(b"\0" * 4096)
    return expert, anti


def _env(tmp_path: Path, hub: LocalHub | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {
        "HF_ENDPOINT": hub.url if hub else "http://127.0.0.1:9",  # port 9: nothing listens
        "HF_HOME": str(tmp_path / "hf"),  # its own cache, and no stored token
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "EXCISE_CACHE": str(tmp_path / "excise-cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        **extra,
    }
    return env


def excise(tmp_path: Path, hub: LocalHub | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "excise", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp_path, hub, **env),
        cwd=tmp_path,
    )


def excise_many(tmp_path: Path, hub: LocalHub, *commands: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI_BATCH_SCRIPT, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp_path, hub),
        cwd=tmp_path,
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed run (and no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("org/name", ("org/name", None)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        ("Org-1/na.me_2@refs/pr/3", ("Org-1/na.me_2", "refs/pr/3")),
        ("name", None),  # adapters live under a namespace: a bare word is a (missing) folder
        ("a/b/c", None),
        ("./org/name", None),
        ("/abs/path", None),
        ("../up", None),
        ("org/name@", None),
        ("org/../name", None),
    ],
)
def test_parse_hub_id(spec, parsed):
    assert parse_hub_id(spec) == parsed


def test_a_local_folder_wins_over_the_hub_id_it_looks_like(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = _write_lora(tmp_path / "org" / "name", 1)
    assert resolve_adapter("org/name").resolve() == local  # no network: nothing is imported or asked


def test_a_missing_path_that_is_no_hub_id_says_not_found(tmp_path):
    with pytest.raises(AdapterError, match=r"adapter folder .*nowhere/a/b not found"):
        resolve_adapter(tmp_path / "nowhere" / "a" / "b")


# ----------------------------------------------------------------------------- the real CLI


def test_ops_reads_hub_ids_and_fetches_only_adapter_files(tmp_path, hub, adapters):
    expert, anti = adapters
    commit = hub.add_folder("org/expert", expert)
    hub.add_folder("org/anti", anti)
    out = tmp_path / "out"
    args = ["ops", "ext-sub", "--expert", "org/expert@main", "--anti-expert", "org/anti"]
    result = excise(tmp_path, hub, *args, "--lam", "0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr

    # The same numbers as from the local folders.
    got, e, a = (load_adapter(p) for p in (out, expert, anti))
    for name in SHAPES:
        expected = ext_sub_rows_reference(e.modules[name].dense(), a.modules[name].dense(), 0.5)
        np.testing.assert_allclose(got.modules[name].dense(), expected, rtol=1e-5, atol=1e-5)

    # Fetched into huggingface_hub's cache as a snapshot named by its commit: the provenance
    # record's input path pins the revision. The checkpoint folder was never downloaded.
    snapshot = tmp_path / "hf" / "hub" / "models--org--expert" / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any("checkpoint-10" in path for _, path in hub.requests)
    record = json.loads((out / "excise.json").read_text())
    assert record["inputs"][0]["path"] == str(snapshot)

    # Offline, the cached snapshot still serves (as PEFT users expect), without a request.
    before = len(hub.requests)
    again = excise(tmp_path, hub, *args, "--out", str(tmp_path / "out2"), HF_HUB_OFFLINE="1")
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == before


def test_a_revision_pins_the_commit(tmp_path, hub, adapters):
    expert, anti = adapters
    first = hub.add_folder("org/a", expert)
    hub.add_folder("org/a", anti)  # a later commit on main replaces the weights
    for spec, source in ((f"org/a@{first}", expert), ("org/a", anti)):
        out = tmp_path / spec.replace("/", "_")
        result = excise(tmp_path, hub, "ops", "scale", "--adapter", spec, "--weight", "1", "--out", str(out))
        assert result.returncode == 0, result.stderr
        for name in SHAPES:
            np.testing.assert_allclose(
                load_adapter(out).modules[name].dense(), load_adapter(source).modules[name].dense(), rtol=1e-6
            )


@pytest.mark.parametrize(
    ("setup", "spec", "env", "message"),
    [
        (
            "none",
            "org/missing",
            {},
            "adapter org/missing not found: no such local folder, and no model repository",
        ),
        ("adapter", "org/a@nope", {}, "adapter org/a@nope: the hub repository org/a has no revision 'nope'"),
        ("no-config", "org/a", {}, "hub repository org/a has no adapter_config.json at its root"),
        (
            "adapter",
            "org/a",
            {"HF_HUB_OFFLINE": "1"},
            "no such local folder, and as a hub id it is not in the Hugging Face cache and HF_HUB_OFFLINE",
        ),
        (
            "unreachable",
            "org/a",
            {},
            "not in the Hugging Face cache and cannot reach the hub at http://127.0.0.1:9",
        ),
        ("none", "no/such/folder", {}, "adapter folder no/such/folder not found"),
    ],
)
def test_hub_errors_are_one_line(tmp_path, hub, adapters, setup, spec, env, message):
    if setup == "adapter":
        hub.add_folder("org/a", adapters[0])
    elif setup == "no-config":
        hub.commit("org/a", {"README.md": b"not an adapter"})
    out = tmp_path / "out"
    args = ["ops", "negate", "--adapter", spec, "--out", str(out)]
    result = excise(tmp_path, None if setup == "unreachable" else hub, *args, **env)
    assert message in _one_line_error(result)
    assert not out.exists()


def test_push_to_hub_publishes_the_result_with_its_provenance(tmp_path, hub, adapters):
    expert, anti = adapters
    out = tmp_path / "out"
    args = ["ops", "subtract", "--a", str(expert), "--b", str(anti), "--out", str(out)]
    result = excise(tmp_path, hub, *args, "--push-to-hub", "me/result")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "pushed" in result.stdout

    (commit,) = hub.commits
    assert commit["repo"] == "me/result" and commit["header"]["summary"] == "excise ops subtract"
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(local) == {"adapter_config.json", "adapter_model.safetensors", "excise.json"}
    assert commit["files"] == local  # byte for byte, provenance record included
    assert set(local) <= set(ADAPTER_FILES)  # so a pull gets all of it back

    # And it reads back as a hub id.
    back = excise(tmp_path, hub, "ops", "scale", "--adapter", "me/result", "--weight", "1", "--out", "b")
    assert back.returncode == 0, back.stderr
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    np.testing.assert_array_equal(
        *(load_file(p / "adapter_model.safetensors")[key] for p in (out, tmp_path / "b"))
    )


@pytest.mark.parametrize(
    ("repo", "env", "message"),
    [
        ("me/result@dev", {}, "--push-to-hub 'me/result@dev' is not a repository id org/name"),
        (
            "me/result",
            {"HF_HUB_OFFLINE": "1"},
            "--push-to-hub me/result needs the network, but HF_HUB_OFFLINE",
        ),
    ],
)
def test_push_to_hub_is_checked_before_any_work(tmp_path, hub, adapters, repo, env, message):
    out = tmp_path / "out"
    args = ["ops", "negate", "--adapter", str(adapters[0]), "--out", str(out), "--push-to-hub", repo]
    assert message in _one_line_error(excise(tmp_path, hub, *args, **env))
    assert not out.exists() and not hub.requests


def test_push_failure_keeps_the_output_and_says_how_to_retry(tmp_path, adapters):
    out = tmp_path / "out"
    args = ["ops", "negate", "--adapter", str(adapters[0]), "--out", str(out), "--push-to-hub", "me/r"]
    line = _one_line_error(excise(tmp_path, None, *args))  # nothing listens at HF_ENDPOINT
    assert f"wrote {out}, but publishing it to me/r" in line and f"hf upload me/r {out}" in line
    assert (out / "excise.json").is_file()


def test_inspect_takes_hub_ids(tmp_path, hub, adapters):
    expert, anti = adapters
    hub.add_folder("org/expert", expert)
    from_hub = excise(tmp_path, hub, "inspect", "--expert", "org/expert", "--anti-expert", str(anti))
    local = excise(tmp_path, hub, "inspect", "--expert", str(expert), "--anti-expert", str(anti))
    assert from_hub.returncode == 0, from_hub.stderr
    assert from_hub.stdout == local.stdout and from_hub.stdout.strip()


def test_eval_and_merge_take_hub_ids(tmp_path, hub, tiny_model_dir, tiny_llama):
    """eval scores the hub adapter; merge folds it in and pushes the merged model."""
    import torch

    from tests.conftest import write_peft_lora

    base = load_file(tiny_model_dir / "model.safetensors")  # before write_peft_lora wraps the model
    adapter = write_peft_lora(
        tmp_path / "peft", tiny_llama, seed=3, r=2, lora_alpha=8, target_modules=["q_proj"]
    )
    hub.add_folder("org/peft", adapter)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i} of some text."}) + "\n" for i in range(3)))
    ev = ["eval", "perplexity", "--base", str(tiny_model_dir), "--data", str(data), "--window", "16"]
    ev += ["--stride", "8", "--device", "cpu", "--out", "ppl.json", "--adapter", "org/peft"]
    merged = tmp_path / "merged"
    merge = ["merge", "--base", str(tiny_model_dir), "--adapter", "org/peft", "--out", str(merged)]
    result = excise_many(tmp_path, hub, ev, [*merge, "--push-to-hub", "me/merged"])
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "ppl.json").read_text())
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert digest in json.dumps(record)  # the hub adapter was scored

    from safetensors.torch import load_file as load_torch

    weights = load_torch(merged / "model.safetensors")
    lora = load_torch(adapter / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    a, b = lora[f"base_model.model.{key}.lora_A.weight"], lora[f"base_model.model.{key}.lora_B.weight"]
    expected = torch.from_numpy(base[f"{key}.weight"]) + (b @ a) * (8 / 2)  # W + (alpha / r)·B·A
    torch.testing.assert_close(weights[f"{key}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert hub.commits[-1]["repo"] == "me/merged" and "excise_merge.json" in hub.commits[-1]["files"]


def test_eval_harness_resolves_its_adapter_first(tmp_path, hub):
    """The lm-eval command takes a hub id too: a missing one is one line, before any model loads."""
    args = ["eval", "harness", "--base", "nowhere/base", "--tasks", "arc_easy", "--out", "h.json"]
    line = _one_line_error(excise(tmp_path, hub, *args, "--adapter", "org/missing"))
    assert "adapter org/missing not found" in line
    assert hub.requests == [("GET", "/api/models/org/missing/revision/main")]


def test_sweep_and_recipe_paths_take_hub_ids(tmp_path, hub, tiny_model_dir, tiny_llama):
    """`excise sweep` and a recipe's `path:` adapter resolve hub ids as every other command does."""
    from tests.conftest import write_peft_lora

    expert = write_peft_lora(tmp_path / "e", tiny_llama, seed=3, r=2, lora_alpha=4, target_modules=["q_proj"])
    hub.add_folder("org/expert", expert)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i} of some text."}) + "\n" for i in range(3)))
    sets = ["--deficiency-set", f"data={data}", "--utility-set", f"data={data}", "--device", "cpu"]
    args = [
        "sweep",
        "negate",
        "org/expert",
        "--base",
        str(tiny_model_dir),
        "--lams",
        "0,1",
        "--bootstrap",
        "0",
    ]
    args += [
        "--deficiency",
        "perplexity:perplexity",
        "--utility",
        "perplexity:perplexity",
        *sets,
        "--out",
        "s",
    ]
    result = excise(tmp_path, hub, *args, "--threads", "1")
    assert result.returncode == 0, result.stderr
    swept = json.loads((tmp_path / "s" / "sweep.json").read_text())
    local = excise(tmp_path, hub, *[str(expert) if a == "org/expert" else a for a in args[:-1]], "s2")
    assert local.returncode == 0, local.stderr
    again = json.loads((tmp_path / "s2" / "sweep.json").read_text())
    assert [p["deficiency"]["value"] for p in swept["points"]] == [
        p["deficiency"]["value"] for p in again["points"]
    ]

    import yaml

    recipe = {
        "name": "hub", "base": str(tiny_model_dir), "out": str(tmp_path / "run"),
        "adapters": {"expert": {"path": "org/expert"}},
        "operations": {"negated": {"op": "negate", "inputs": ["expert"], "lam": 1.0}},
        "report": False,
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    checked = excise(tmp_path, hub, "run", "r.yaml", "--check")
    assert checked.returncode == 0, checked.stderr
    missing = excise(tmp_path, hub, "run", "r.yaml", "adapters.expert.path=org/nothing", "--check")
    assert (
        missing.returncode == 2
        and "adapters.expert.path" in missing.stderr
        and "Traceback" not in missing.stderr
    )
