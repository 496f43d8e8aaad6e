"""Batched generation: length-sorted batches, left padding, KV cache, results in input order.

Shared by evaluation (toxicity, repetition, harmful rate, utility) and by the anti-expert
data maker. Prompts are token-id lists (already chat-templated by the caller) or plain
strings (tokenised as they are, with no special tokens added).

Decoding stops on every token that ends a reply (:func:`stop_token_ids`): the tokenizer's
EOS, the chat template's own end-of-turn token where it differs (Llama-3 ``<|eot_id|>``,
Gemma ``<end_of_turn>``; :func:`end_of_turn_id`, also what training appends to a chat
response) and the model's ``generation_config.eos_token_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from excise.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["GenerationSettings", "chat_prompt_ids", "end_of_turn_id", "generate", "stop_token_ids"]

# ``map_batches(fn, batches, desc=..., progress=...) -> [fn(b) for b in batches]`` (see :func:`generate`).
MapBatches = Callable[..., list[Any]]

# Stands for an assistant reply when the chat template is rendered to see what closes it.
_PROBE = "excise-end-of-turn-probe"


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; the defaults are greedy, as the papers' evaluations are.

    Attributes:
        max_new_tokens: tokens generated per prompt at most.
        batch_size: prompts per forward batch (sorted by length first, so little padding).
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (only with ``do_sample``).
        top_p: nucleus sampling mass (only with ``do_sample``).
        seed: seeds sampling, per batch, so a result does not depend on the batch order.
    """

    max_new_tokens: int = 128
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, user: str, *, system: str | None = None) -> list[int]:
    """Token ids of one user turn through the tokenizer's chat template, ready for the reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template closes an assistant turn with, or None.

    Renders a one-exchange dialogue and reads the first token after the reply: ``<|eot_id|>``
    for Llama-3, ``<end_of_turn>`` for Gemma, ``<|im_end|>`` for ChatML (SmolLM2, Qwen), EOS
    for Llama-2 and Mistral. None when there is no chat template, it fails on the probe, or
    what follows the reply is not a special token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template with its own rules (roles, alternation) refusing the probe
        return None
    if not isinstance(text, str) or _PROBE not in text:
        return None
    after = text[text.rindex(_PROBE) + len(_PROBE) :].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return int(ids[0]) if ids[0] in special else None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> list[int]:
    """Every id that ends a reply: EOS, the template's end-of-turn token, the model's own EOS ids."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int] | str],
    settings: GenerationSettings = GenerationSettings(),
    *,
    progress: bool = True,
    desc: str = "generate",
    map_batches: MapBatches | None = None,
) -> list[str]:
    """Decoded continuations of ``prompts`` (special tokens dropped, stripped), in input order.

    Prompts are sorted by length so each batch pads little; each batch is left-padded
    (positions count real tokens only) and decoded with the model's KV cache. Decoding
    stops at any of :func:`stop_token_ids` (EOS and the chat template's end-of-turn token).

    ``map_batches(fn, batches, desc=..., progress=...)`` runs ``fn`` over the batches and returns
    their results in order (default: one after the other, with a progress bar); a data-parallel
    evaluation passes one that shares them between processes (``excise.evaluate.parallel``).
    Each batch is made and seeded the same either way, so the answers are too.
    """
    if not prompts:
        return []
    ids = [
        tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
        for p in prompts
    ]
    if any(not row for row in ids):
        raise ConfigError("cannot generate from an empty prompt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    device = next(model.parameters()).device

    def run(start: int) -> list[str]:
        chunk = order[start : start + settings.batch_size]
        T = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        for row, i in enumerate(chunk):
            input_ids[row, T - len(ids[i]) :] = torch.tensor(ids[i])
            attention_mask[row, T - len(ids[i]) :] = 1
        sampling: dict[str, Any] = {"do_sample": settings.do_sample}
        if settings.do_sample:
            torch.manual_seed(settings.seed + start)
            sampling |= {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        else:
            sampling |= {"temperature": None, "top_p": None, "top_k": None}
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=stops,
            use_cache=True,
            **sampling,
        )  # (B, T + new)
        return [text.strip() for text in tokenizer.batch_decode(output[:, T:], skip_special_tokens=True)]

    starts = range(0, len(order), settings.batch_size)
    if map_batches is None:
        texts = [run(start) for start in tqdm(starts, desc=desc, unit="batch", disable=not progress)]
    else:
        texts = map_batches(run, starts, desc=desc, progress=progress)
    outputs: list[str] = [""] * len(ids)
    for start, batch in zip(starts, texts, strict=True):
        for i, text in zip(order[start : start + settings.batch_size], batch, strict=True):
            outputs[i] = text
    return outputs
