"""A word-level tokenizer for the digit captions, built in code.

Why: there is no model hub to download a pretrained tokenizer from, and the
captions use a fixed vocabulary of a couple of dozen words, so a word-level
tokenizer (one id per word, no sub-word merges) is both sufficient and exact.
It is a ``tokenizers`` WordLevel model wrapped in
``transformers.PreTrainedTokenizerFast``, so ``save_pretrained`` /
``PreTrainedTokenizerFast.from_pretrained`` (or ``AutoTokenizer``) round-trip it
offline like any other tokenizer.  Text is lower-cased and split on whitespace
and punctuation; unknown words map to ``<unk>``; every sequence is
``<bos> words... <eos>`` padded with ``<pad>`` to :data:`MAX_LENGTH` tokens
(CLIP's text encoder is causal, so padding after ``<eos>`` does not change the
earlier tokens' features).
"""
from __future__ import annotations

import re

from .data import VOCABULARY

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
MAX_LENGTH = 16


def build_tokenizer(words=VOCABULARY, max_length: int = MAX_LENGTH):
    """A fresh ``PreTrainedTokenizerFast``: ids 0..3 are pad/bos/eos/unk, then ``words``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                  pad_token=PAD, model_max_length=max_length, padding_side="right")
    return tok


def check_prompt(prompt: str, name: str = "prompt", max_length: int = MAX_LENGTH) -> None:
    """Refuses a prompt the digits model cannot read whole: words it never saw, or too many of them.

    The tokenizer would map an unknown word to ``<unk>`` and cut a long prompt short without a word,
    so the model would quietly follow another prompt than the one asked for.
    """
    words = re.findall(r"\w+|[^\w\s]+", prompt.lower())  # the tokenizer's Whitespace pre-tokenizer
    unknown = sorted(set(words) - set(VOCABULARY), key=words.index)
    if unknown:
        raise ValueError(f"{name}: {', '.join(map(repr, unknown))} not in the digits model's vocabulary; "
                         f"use its words: {' '.join(VOCABULARY)}")
    if len(words) > max_length - 2:
        raise ValueError(f"{name}: {len(words)} words; the digits model reads at most {max_length - 2}")


def encode(tokenizer, texts, max_length: int | None = None):
    """int64 [len(texts), max_length] token ids, padded/truncated to a fixed length."""
    n = max_length or tokenizer.model_max_length
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=n, return_tensors="pt")
    return out["input_ids"]
