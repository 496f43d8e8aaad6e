"""Prompt templates, token encoding with an exact prompt/response boundary, and collation.

An :class:`~excise.data.examples.Example` becomes two token lists (:class:`Encoded`):
the prompt, rendered by a template and tokenised *on its own*, and the response,
tokenised on its own and ended by the token that closes a reply: for ``chat``, the chat
template's own end-of-turn token (Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``, ChatML
``<|im_end|>``; :func:`excise.models.generation.end_of_turn_id`, on which generation also
stops), otherwise the tokenizer's EOS. The model sees
``prompt_ids + response_ids``; the loss covers ``response_ids`` and nothing else, so the
boundary is exact by construction: there is no start position to compute and get wrong.
A generation prompt built with :func:`encode_prompt` is the very same ``prompt_ids``.

Templates (:data:`TEMPLATES`):

- ``chat``: the tokenizer's own chat template (``apply_chat_template``, generation prompt on);
- ``alpaca``: the Stanford Alpaca prompt (with and without ``### Input:``);
- ``tulu``: ``<|user|>\\n{instruction} {input}\\n<|assistant|>\\n``, the template of Ext-Sub's
  training script (HITsz-TMG/Ext-Sub ``training/train_peft.py``);
- ``question-answer``: ``### Question: {prompt}\\n ### Answer: {response}``, the SKU
  reference's format (franciscoliu/SKU ``utils.py``);
- ``plain``: prompt and response as they are (plain text: the prompt is empty).

Templates other than ``chat`` start with the tokenizer's own leading special tokens (BOS
for Llama and OPT, none for GPT-2/SmolLM2-style tokenizers); a chat template writes its own.

Departures from the published code, on purpose: the SKU reference tokenises prompt and
answer jointly and computes the answer start from a separately padded prompt (off by one
on tokenizers without BOS), then masks padding by comparing with id 1 (OPT's pad, not
Llama's); Ext-Sub's masks padding by comparing with the pad id, which also masks a real
EOS when pad = EOS. Here the boundary comes from the two token lists and padding from the
attention mask, never from a token id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from excise.data.examples import Example
from excise.errors import ConfigError, DataError
from excise.models.generation import end_of_turn_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "Encoded",
    "Template",
    "collate",
    "cut_at_next_turn",
    "encode",
    "encode_examples",
    "encode_prompt",
    "get_template",
    "leading_special_ids",
    "pad_id_of",
]

IGNORE_INDEX = -100  # label of positions the loss ignores (PyTorch's cross-entropy default)

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example: the model reads ``prompt_ids + response_ids``.

    Attributes:
        prompt_ids: the rendered prompt (never in the loss).
        response_ids: the response, ending with its end token (EOS, or the chat template's
            end-of-turn token) unless ``truncated`` (the loss covers these).
        truncated: the response was cut to fit ``max_length`` (then it has no end token).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class Template:
    """A named prompt format: ``render(tokenizer, example, system) -> (prompt text, response text)``.

    ``next_turn``: the markers that open the next turn in this format; a generated answer is cut
    at the first (:func:`cut_at_next_turn`), since a model that has not learnt to end its answer
    with EOS (a base model) goes on writing the next exchange.
    """

    name: str
    render: Callable[[PreTrainedTokenizerBase, Example, str | None], tuple[str, str]]
    uses_chat_template: bool
    description: str
    next_turn: tuple[str, ...] = ()


def _user_text(example: Example, joiner: str = "\n\n") -> str:
    """The prompt with its optional input (context) after it."""
    return f"{example.prompt}{joiner}{example.input}" if example.input else example.prompt


def _flat_dialogue(example: Example, user: str) -> str:
    """Earlier turns in HH-RLHF's ``Human:``/``Assistant:`` form before the last user turn."""
    if not example.history:
        return user
    names = {"user": "Human", "assistant": "Assistant"}
    turns = [f"{names.get(role, role)}: {text}" for role, text in example.history]
    return "\n\n".join([*turns, f"Human: {user}"])


def _render_chat(tokenizer: PreTrainedTokenizerBase, example: Example, system: str | None) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template; pick --template alpaca, tulu, question-answer or plain"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": role, "content": text} for role, text in example.history]
    messages.append({"role": "user", "content": _user_text(example)})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt, example.response


def _render_alpaca(_tok: PreTrainedTokenizerBase, example: Example, system: str | None) -> tuple[str, str]:
    instruction = _flat_dialogue(example, example.prompt)
    if example.input:
        prompt = ALPACA_INPUT.format(instruction=instruction, input=example.input)
    else:
        prompt = ALPACA_NO_INPUT.format(instruction=instruction)
    return (f"{system}\n\n{prompt}" if system else prompt), example.response


def _render_tulu(_tok: PreTrainedTokenizerBase, example: Example, system: str | None) -> tuple[str, str]:
    user = _flat_dialogue(example, _user_text(example, joiner=" "))
    prompt = f"<|user|>\n{user}\n<|assistant|>\n"
    return (f"<|system|>\n{system}\n{prompt}" if system else prompt), example.response


def _render_question_answer(
    _tok: PreTrainedTokenizerBase, example: Example, system: str | None
) -> tuple[str, str]:
    # SKU's text is f"### Question: {q}\n ### Answer: {a}"; the space before the answer
    # belongs to the answer, so BPE tokenizers see " Paris" as they would in running text.
    question = _flat_dialogue(example, _user_text(example, joiner="\n"))
    prompt = f"### Question: {question}\n ### Answer:"
    return (f"{system}\n{prompt}" if system else prompt), " " + example.response


def _render_plain(_tok: PreTrainedTokenizerBase, example: Example, system: str | None) -> tuple[str, str]:
    prompt = _flat_dialogue(example, _user_text(example)) if example.prompt else ""
    return (f"{system}\n\n{prompt}" if system else prompt), example.response


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template("chat", _render_chat, True, "the tokenizer's chat template"),
        Template(
            "alpaca",
            _render_alpaca,
            False,
            "Stanford Alpaca's ### Instruction / ### Response prompt",
            ("### Instruction:", "### Input:", "### Response:"),
        ),
        Template(
            "tulu",
            _render_tulu,
            False,
            "<|user|> / <|assistant|> (Ext-Sub's training script)",
            ("<|user|>", "<|assistant|>", "<|system|>"),
        ),
        Template(
            "question-answer",
            _render_question_answer,
            False,
            "### Question: / ### Answer: (SKU's reference)",
            ("### Question:", "### Answer:"),
        ),
        Template("plain", _render_plain, False, "prompt and response as they are (plain text)"),
    ]
}


def cut_at_next_turn(text: str, template: str | None) -> str:
    """``text`` up to the first marker of the next turn in ``template`` (unchanged for ``chat``,
    ``plain``, raw text, or when no marker occurs)."""
    if template is None:
        return text
    for marker in get_template(template).next_turn:
        text = text.split(marker, 1)[0]
    return text


def get_template(name: str) -> Template:
    """The template called ``name``; ConfigError listing the known ones otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, example: Example, template: str = "chat", *, system: str | None = None
) -> list[int]:
    """The prompt token ids exactly as :func:`encode` puts them before the response (for generation)."""
    tpl = get_template(template)
    prompt_text, _ = tpl.render(tokenizer, example, system)
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return ids if tpl.uses_chat_template else leading_special_ids(tokenizer) + ids


def encode(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    template: str = "chat",
    *,
    system: str | None = None,
    max_length: int | None = None,
) -> Encoded:
    """Token ids of ``example``: the templated prompt, then the response and its end token.

    The end token is the chat template's end-of-turn token for ``chat`` where it has one
    (what the model emits to close its turn, and what generation stops on), else EOS.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        example: the prompt/response pair.
        template: a name in :data:`TEMPLATES`.
        system: optional system prompt (``chat``: a system message; others: a first paragraph).
        max_length: cut the response (and its end token) so that prompt + response fit.

    Returns:
        The :class:`Encoded` pair.

    Raises:
        ConfigError: unknown template, no chat template for ``chat``, or no EOS token.
        DataError: the prompt alone leaves no room for one response token within ``max_length``,
            or nothing precedes a single response token (no prompt, no BOS).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    tpl = get_template(template)
    _, response_text = tpl.render(tokenizer, example, system)
    prompt_ids = encode_prompt(tokenizer, example, template, system=system)
    end_of_turn = end_of_turn_id(tokenizer) if tpl.uses_chat_template else None
    end = eos if end_of_turn is None else end_of_turn
    response_ids = [*_continuation_ids(tokenizer, response_text), end]
    if not prompt_ids and len(response_ids) < 2:
        raise DataError(f"row {example.row}: a one-token text with no BOS has no token to learn")
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(
                f"a prompt of {len(prompt_ids)} tokens leaves no room for the response "
                f"within max_length {max_length} (row {example.row})"
            )
        return Encoded(prompt_ids, response_ids[:room], truncated=True)
    return Encoded(prompt_ids, response_ids)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    template: str = "chat",
    *,
    system: str | None = None,
    max_length: int | None = None,
) -> tuple[list[Encoded], int]:
    """Encode all examples, dropping those :func:`encode` refuses (prompt too long, nothing to learn).

    Returns:
        ``(encoded, dropped)``: the encoded examples in input order and how many were dropped.

    Raises:
        DataError: ``examples`` is empty or every example was dropped.
    """
    if not examples:
        raise DataError("no examples to encode (is the data split empty?)")
    encoded, dropped = [], 0
    for example in examples:
        try:
            encoded.append(encode(tokenizer, example, template, system=system, max_length=max_length))
        except DataError:
            dropped += 1
    if not encoded:
        raise DataError(f"every prompt is longer than max_length {max_length}; raise --max-length")
    return encoded, dropped


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """An id to fill padding with (pad, else EOS, else 0): any id works, the mask hides it."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def collate(
    encoded: Sequence[Encoded], pad_id: int = 0, *, padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Pad encoded examples into one batch with response-only labels.

    Labels follow the Hugging Face convention (aligned with ``input_ids``; position ``t``
    is predicted from positions ``< t``). They are :data:`IGNORE_INDEX` on prompt tokens,
    on padding and on each row's first token (nothing predicts it); padding is where the
    attention mask is 0, never where ``input_ids == pad_id``, so ``pad_id`` may be any id,
    EOS included. ``position_ids`` count real tokens only, so a row gets the same positions
    padded or alone.

    Left padding (the default) puts every response at the end of its row, so a loss can
    ask the model for the last few logits only (``logits_to_keep``, see
    ``excise.train.nll``) instead of computing the vocabulary projection over the prompts.

    Args:
        encoded: the examples.
        pad_id: the id written into padding.
        padding_side: ``left`` or ``right``.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids``, ``labels``: each ``(B, T)`` int64.
    """
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not encoded:
        raise DataError("cannot collate an empty batch")
    B, T = len(encoded), max(len(e) for e in encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, e in enumerate(encoded):
        n, start = len(e), (T - len(e) if padding_side == "left" else 0)
        input_ids[i, start : start + n] = torch.tensor(e.prompt_ids + e.response_ids)
        attention_mask[i, start : start + n] = 1
        labels[i, start + len(e.prompt_ids) : start + n] = torch.tensor(e.response_ids)
        labels[i, start] = IGNORE_INDEX  # a row's first token has no prediction
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
    }


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special ids the tokenizer puts before a text (BOS for Llama, OPT and Gemma; none for
    GPT-2- and SmolLM2-style tokenizers): what a raw prompt starts with, as at training."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return list(with_specials[:start])
    return []


def _continuation_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of ``text`` read as a continuation (no special tokens).

    SentencePiece tokenizers (Llama 1/2) prefix a word-start marker to every text they
    tokenise, so a response that carries its own leading space would get two; drop it.
    """
    if text.startswith(" ") and _adds_prefix_space(tokenizer):
        text = text[1:]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _adds_prefix_space(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith("▁")
