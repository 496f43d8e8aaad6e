"""An adapter is checked against its base once, up front, from configs and file headers."""

from __future__ import annotations

import json
import warnings

import pytest

from excise.errors import AdapterError, ExciseWarning
from excise.evaluate.subject import load_subject
from excise.models.adapter_fit import adapter_shapes, check_adapter_fits
from tests.conftest import save_tiny_model, write_peft_lora


@pytest.fixture
def small_base(tmp_path):
    return save_tiny_model(tmp_path / "base")


def _adapter(tmp_path, base_dir, name="adapter", **overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    folder = write_peft_lora(tmp_path / name, model, seed=1, r=2, target_modules=["q_proj", "v_proj"])
    if overrides:
        config = json.loads((folder / "adapter_config.json").read_text()) | overrides
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_shapes_come_from_the_header(tmp_path, small_base):
    shapes = adapter_shapes(_adapter(tmp_path, small_base))
    q = shapes["model.layers.0.self_attn.q_proj"]
    assert q == {"lora_A": (2, 64), "lora_B": (64, 2)}
    assert shapes["model.layers.1.self_attn.v_proj"]["lora_B"] == (32, 2)  # 2 kv heads × 16


def test_other_base_fails_before_loading_and_names_the_module(tmp_path, small_base, monkeypatch):
    wide = save_tiny_model(tmp_path / "wide", hidden_size=96)
    adapter = _adapter(tmp_path, wide)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr("excise.evaluate.subject.load_model", no_load)
    with pytest.raises(AdapterError) as info:
        load_subject(str(small_base), adapter)
    message = str(info.value)
    assert "\n" not in message
    assert "self_attn.q_proj maps 64 -> 64 features in the base, 96 -> 96 in the adapter" in message
    assert "(and 3 more)" in message  # q and v of two layers


def test_fitting_adapter_naming_another_base_warns(tmp_path, small_base):
    adapter = _adapter(tmp_path, small_base, base_model_name_or_path="someone/another-model")
    with pytest.warns(ExciseWarning, match="made for 'someone/another-model'.*shapes fit"):
        check_adapter_fits(str(small_base), adapter)


def test_fitting_adapter_of_this_base_is_silent(tmp_path, small_base):
    adapter = _adapter(tmp_path, small_base, base_model_name_or_path=str(small_base))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_adapter_fits(str(small_base), adapter)


def test_missing_folder_is_not_found(tmp_path, small_base):
    with pytest.raises(AdapterError, match=r"adapter folder .*missing not found$"):
        check_adapter_fits(str(small_base), tmp_path / "missing")
    with pytest.raises(AdapterError, match=r"adapter folder .*missing not found$"):
        load_subject(str(small_base), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        check_adapter_fits(str(small_base), tmp_path / "empty")
