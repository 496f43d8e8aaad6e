"""Tiny in-memory tokenizers shaped like real families, for mask and boundary tests.

- :func:`llama_style`: SentencePiece-like (``▁`` word-start marker, a BOS added in front,
  no pad token: callers pad with EOS, as Llama checkpoints are usually used);
- :func:`opt_style`: GPT-2 byte-level BPE as OPT ships it: ``</s>`` is both BOS (added in
  front) and EOS, ``<pad>`` (id 1) is a different token;
- :func:`llama3_chat`, :func:`gemma_chat`: character-level tokenizers with the chat templates
  of Llama-3-Instruct and Gemma-it, whose end-of-turn token (``<|eot_id|>``,
  ``<end_of_turn>``) is not their EOS (``<|end_of_text|>``, ``<eos>``).
"""

from __future__ import annotations

import string


def llama_style():
    """Characters plus ``▁x`` word starts; ``<s>`` prepended; ids < 200; pad unset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    letters = string.ascii_letters + string.digits
    chars = [*sorted(set(string.printable) - set(string.whitespace)), "\n", "▁"]
    vocab = {tok: i for i, tok in enumerate(specials + chars + ["▁" + c for c in letters])}
    merges = [("▁", c) for c in letters]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert len(vocab) < 200
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def opt_style():
    """Byte-level BPE; ``</s>`` (2) is BOS and EOS, ``<pad>`` is 1; ids < 300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    letters = string.ascii_lowercase
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars) + ["Ġ" + c for c in letters])}
    merges = [("Ġ", c) for c in letters]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    assert len(vocab) < 300
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# The published templates (meta-llama/Meta-Llama-3-8B-Instruct, google/gemma-2b-it), trimmed
# of nothing that matters here: the BOS, the role headers and the turn ends.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def _char_chat(specials: list[str], bos: str, eos: str, pad: str, template: str):
    """One token per printable ASCII character, ``specials`` matched whole; ids < 128."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", *specials, *string.printable])}
    assert len(vocab) < 128
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
    )
    tokenizer.chat_template = template
    return tokenizer


def llama3_chat():
    """Llama-3-Instruct's layout: EOS ``<|end_of_text|>``, turns end with ``<|eot_id|>``."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    specials.append("<|eot_id|>")
    return _char_chat(specials, "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", LLAMA3_TEMPLATE)


def gemma_chat():
    """Gemma-it's layout: EOS ``<eos>``, turns end with ``<end_of_turn>``, no system role."""
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    return _char_chat(specials, "<bos>", "<eos>", "<pad>", GEMMA_TEMPLATE)
