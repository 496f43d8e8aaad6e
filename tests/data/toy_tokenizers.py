"""Tiny in-memory tokenizers shaped like real families, for mask and boundary tests.

- :func:`llama_style`: SentencePiece-like (``▁`` word-start marker, a BOS added in front,
  no pad token: callers pad with EOS, as Llama checkpoints are usually used);
- :func:`opt_style`: GPT-2 byte-level BPE as OPT ships it: ``</s>`` is both BOS (added in
  front) and EOS, ``<pad>`` (id 1) is a different token.
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
