"""SKU and baseline losses (excise/train/losses.py) against plain reference loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)

from excise.train.losses import (
    adapter_disabled_reference,
    frozen_model_reference,
    gradient_ascent_loss,
    guided_distortion_loss,
    kl_to_reference_loss,
    npo_loss,
    preservation_divergence_loss,
    random_disassociation_loss,
    response_logits,
    sequence_nll,
)
from tests.conftest import tiny_llama_config

# Two rows, (prompt, response) lengths (4, 5) and (3, 2).
ROWS = [([11, 12, 13, 14], [21, 22, 23, 24, 25]), ([31, 32, 33], [41, 42])]


def _batch(padding_side: str = "left") -> dict[str, torch.Tensor]:
    """A hand-collated batch: labels = ids on response tokens, -100 elsewhere."""
    T = max(len(p) + len(r) for p, r in ROWS)
    ids = torch.zeros((len(ROWS), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(ROWS):
        n = len(p) + len(r)
        s = T - n if padding_side == "left" else 0
        ids[i, s : s + n] = torch.tensor(p + r)
        mask[i, s : s + n] = 1
        labels[i, s + len(p) : s + n] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _row_logits(model, prompt, response) -> torch.Tensor:
    """Logits predicting each response token, from the row alone (no padding at all)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()  # (n, V)
    return logits[len(prompt) - 1 : -1]  # (len(response), V)


def _reference_nll(model) -> torch.Tensor:
    per_row = [F.cross_entropy(_row_logits(model, p, r), torch.tensor(r)) for p, r in ROWS]
    return torch.stack(per_row).mean()


def _reference_kl(ref_model, model) -> torch.Tensor:
    per_row = []
    for p, r in ROWS:
        lp = F.log_softmax(_row_logits(ref_model, p, r), -1)
        lq = F.log_softmax(_row_logits(model, p, r), -1)
        per_row.append((lp.exp() * (lp - lq)).sum(-1).mean())
    return torch.stack(per_row).mean()


@pytest.fixture
def lora_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _perturb_lora(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_response_logits_select_exactly_the_response_predictions(tiny_llama, padding_side):
    logits, targets, rows = response_logits(tiny_llama, _batch(padding_side))
    expected = torch.cat([_row_logits(tiny_llama, p, r) for p, r in ROWS])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert targets.tolist() == [t for _, r in ROWS for t in r]
    assert rows.tolist() == [0] * 5 + [1] * 2


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_cross_entropy_terms_average_per_response_then_over_rows(tiny_llama, padding_side):
    batch = _batch(padding_side)
    expected = _reference_nll(tiny_llama)
    torch.testing.assert_close(sequence_nll(tiny_llama, batch), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_distortion_loss(tiny_llama, batch), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(random_disassociation_loss(tiny_llama, batch), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gradient_ascent_loss(tiny_llama, batch), -expected, atol=1e-5, rtol=1e-5)
    # Per-row weighting differs from the token mean when responses differ in length.
    token_mean = torch.cat(
        [F.cross_entropy(_row_logits(tiny_llama, p, r), torch.tensor(r), reduction="none") for p, r in ROWS]
    ).mean()
    assert not torch.isclose(expected, token_mean)


def test_pd_is_exactly_zero_at_step_zero(lora_model):
    loss = preservation_divergence_loss(lora_model, _batch())
    assert loss.item() == 0.0  # LoRA B = 0: the adapter is a no-op, bit for bit


def test_pd_reference_is_the_adapter_disabled_model_and_no_copy_is_made(lora_model, monkeypatch):
    from transformers import LlamaForCausalLM, PreTrainedModel

    torch.manual_seed(0)
    untouched = LlamaForCausalLM(tiny_llama_config()).eval()  # the same weights as tiny_llama, no LoRA
    _perturb_lora(lora_model)
    batch = _batch()
    created = []
    monkeypatch.setattr(PreTrainedModel, "__init__", lambda *a, **k: created.append(1))
    monkeypatch.setattr("copy.deepcopy", lambda *a, **k: created.append(1))
    ref_hidden, ref_head = adapter_disabled_reference(lora_model)(batch)
    ref_logits = ref_head(ref_hidden)
    loss = preservation_divergence_loss(lora_model, batch)
    assert not created  # no second model was constructed or copied
    expected_ref = torch.cat([_row_logits(untouched, p, r) for p, r in ROWS])
    torch.testing.assert_close(ref_logits, expected_ref, atol=1e-5, rtol=1e-5)
    assert not ref_logits.requires_grad
    # The loss is −KL(p_base ‖ p_adapted), computed row by row without padding.
    per_row = []
    for p, r in ROWS:
        with lora_model.disable_adapter():
            lp = F.log_softmax(_row_logits(lora_model, p, r), -1)
        lq = F.log_softmax(_row_logits(lora_model, p, r), -1)
        per_row.append((lp.exp() * (lp - lq)).sum(-1).mean())
    expected_kl = torch.stack(per_row).mean()
    assert expected_kl > 1e-4
    torch.testing.assert_close(loss, -expected_kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kl_to_reference_loss(lora_model, batch), expected_kl, atol=1e-5, rtol=1e-4)


def test_pd_gradient_reaches_only_the_adapter_and_equals_the_plain_kl_gradient(lora_model):
    _perturb_lora(lora_model)
    batch = _batch()
    preservation_divergence_loss(lora_model, batch).backward()
    grads = {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
    # The same loss written plainly: F.kl_div on two log_softmax outputs, row by row.
    lora_model.zero_grad()
    per_row = []
    for p, r in ROWS:
        with torch.no_grad(), lora_model.disable_adapter():
            lp = F.log_softmax(_row_logits(lora_model, p, r), -1)
        lq = F.log_softmax(_row_logits(lora_model, p, r), -1)
        per_row.append(F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).mean())
    (-torch.stack(per_row).mean()).backward()
    for n, p in lora_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4)


def test_frozen_model_reference_equals_the_separate_model(tiny_llama):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    other = LlamaForCausalLM(tiny_llama_config()).eval()
    loss = preservation_divergence_loss(tiny_llama, _batch("right"), frozen_model_reference(other))
    torch.testing.assert_close(loss, -_reference_kl(other, tiny_llama), atol=1e-5, rtol=1e-4)


def test_a_batch_without_response_tokens_is_refused(tiny_llama):
    batch = _batch()
    batch["labels"].fill_(-100)
    with pytest.raises(ValueError, match="no response tokens"):
        sequence_nll(tiny_llama, batch)


# ----------------------------------------------------------------------------- chunked head


def _plain_losses(model, batch, ref_model=None) -> dict[str, torch.Tensor]:
    """Every loss from the full ``(B, T, V)`` logits of one forward (the pre-chunking computation)."""
    positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
    positions[:, :-1] = batch["labels"][:, 1:] != -100
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs, position_ids=position_ids).logits.float()[positions]  # (N, V)
    targets = batch["labels"][:, 1:][positions[:, :-1]]
    rows = positions.nonzero()[:, 0]
    with torch.no_grad():
        if ref_model is None:
            with model.disable_adapter():
                ref = model(**inputs, position_ids=position_ids).logits.float()[positions]
        else:
            ref = ref_model(**inputs, position_ids=position_ids).logits.float()[positions]
    nll = F.cross_entropy(logits, targets, reduction="none")
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(
        -1
    )
    per_row = lambda v: torch.stack([v[rows == r].mean() for r in rows.unique()]).mean()  # noqa: E731
    return {"ce": per_row(nll), "kl": per_row(kl), "token_ce": nll.mean()}


def _chunked_losses(model, batch, chunk, ref_model=None) -> dict[str, torch.Tensor]:
    from excise.train.nll import response_nll

    reference = None if ref_model is None else frozen_model_reference(ref_model)
    return {
        "ce": sequence_nll(model, batch, chunk_tokens=chunk),
        "kl": kl_to_reference_loss(model, batch, reference, chunk_tokens=chunk),
        "token_ce": response_nll(model, batch, chunk_tokens=chunk),
    }


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]])
@pytest.mark.parametrize("chunk", [1, 3, 512])
@pytest.mark.parametrize("term", ["ce", "kl", "token_ce"])
def test_chunked_losses_have_the_full_logits_value_and_gradient(tiny_llama, targets, chunk, term):
    """Chunks of 1, 3 and all tokens; a LoRA on the head or not: value and gradient to 1e-6."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    )
    _perturb_lora(model)
    batch = _batch()
    expected = _plain_losses(model, batch)[term]
    expected_grads = _grads(model, expected)
    got = _chunked_losses(model, batch, chunk)[term]
    got_grads = _grads(model, got)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert got_grads.keys() == expected_grads.keys()
    assert any("lm_head" in n for n in got_grads) == ("lm_head" in targets)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("term", ["ce", "kl"])
def test_chunked_losses_match_for_full_training_with_a_frozen_reference(term):
    """Every weight trains (head and tied embeddings included); p_θo from a separate model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    torch.manual_seed(1)
    ref_model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval().requires_grad_(False)
    batch = _batch("right")
    expected = _plain_losses(model, batch, ref_model)[term]
    expected_grads = _grads(model, expected)
    got = _chunked_losses(model, batch, 2, ref_model)[term]
    got_grads = _grads(model, got)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_the_head_never_sees_more_than_a_chunk_of_tokens(lora_model, monkeypatch):
    """No (N, V) logits: every head call, forward and recomputed backward, gets ≤ chunk rows."""
    _perturb_lora(lora_model)
    head = lora_model.get_output_embeddings()
    seen: list[int] = []
    head.register_forward_hook(lambda mod, args, out: seen.append(out.shape[:-1].numel()))
    batch = _batch()
    n = int((batch["labels"] != -100).sum())
    assert n == 7
    (
        sequence_nll(lora_model, batch, chunk_tokens=2)
        + kl_to_reference_loss(lora_model, batch, chunk_tokens=2)
    ).backward()
    assert seen and max(seen) <= 2  # the model's own forward ran it on one position per row (B = 2)


def test_a_model_that_rescales_its_logits_is_refused(tiny_llama):
    """The chunks apply the head alone: a head followed by soft-capping must not be trained silently wrong."""
    from excise.errors import ConfigError

    tiny_llama.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="soft-capping"):
        sequence_nll(tiny_llama, _batch())


# ----------------------------------------------------------------------------- NPO


def _reference_npo(model, ref_model, beta: float) -> torch.Tensor:
    """NPO written out from its paper (arXiv 2404.05868, eq. 3) row by row, from each row alone:
    log π(y|x) summed over the response tokens, −(2/β)·mean log σ(−β·(log πθ − log πref))."""
    per_row = []
    for p, r in ROWS:
        target = torch.tensor(r)
        log_p = -F.cross_entropy(_row_logits(model, p, r), target, reduction="sum")
        with torch.no_grad():
            log_ref = -F.cross_entropy(_row_logits(ref_model, p, r), target, reduction="sum")
        per_row.append(torch.log(torch.sigmoid(-beta * (log_p - log_ref))))
    return -(2 / beta) * torch.stack(per_row).mean()


@pytest.mark.parametrize(("beta", "chunk"), [(0.1, 512), (1.0, 2), (0.01, 1)])
def test_npo_equals_the_papers_formula_in_value_and_gradient(lora_model, beta, chunk):
    import copy

    _perturb_lora(lora_model)
    with torch.no_grad(), lora_model.disable_adapter():
        frozen = copy.deepcopy(lora_model.get_base_model()).requires_grad_(False)
    batch = _batch("left")
    expected = _reference_npo(lora_model, frozen, beta)
    expected_grads = _grads(lora_model, expected)
    got = npo_loss(lora_model, batch, beta=beta, chunk_tokens=chunk)  # reference: adapter disabled
    got_grads = _grads(lora_model, got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_npo_at_the_reference_is_2_ln2_over_beta_and_a_frozen_copy_is_the_same(tiny_llama):
    import copy
    import math

    batch = _batch("right")
    ref_model = copy.deepcopy(tiny_llama).requires_grad_(False)
    value = npo_loss(tiny_llama, batch, frozen_model_reference(ref_model), beta=0.5)
    assert float(value.detach()) == pytest.approx(2 / 0.5 * math.log(2), rel=1e-6)
    with pytest.raises(Exception, match="beta must be > 0"):
        npo_loss(tiny_llama, batch, frozen_model_reference(ref_model), beta=0.0)


def test_a_large_vocabulary_gets_smaller_chunks_so_no_chunk_exceeds_the_logits_budget():
    from excise.train.losses import CHUNK_LOGITS, CHUNK_TOKENS, _chunks

    smollm2, gemma = torch.nn.Linear(4, 49_152, bias=False), torch.nn.Linear(4, 262_144, bias=False)
    assert {c.stop - c.start for c in _chunks(2048, CHUNK_TOKENS, smollm2)} == {512}
    sizes = [c.stop - c.start for c in _chunks(2048, CHUNK_TOKENS, gemma)]
    assert max(sizes) == CHUNK_LOGITS // 262_144 == 96 and sum(sizes) == 2048
    assert [c.stop - c.start for c in _chunks(5, 3, None)] == [3, 2]  # no head known: as asked
