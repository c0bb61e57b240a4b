"""Train or load tokenizers, as ``PreTrainedTokenizerFast``.

Kinds (all share the specials ``<|endoftext|>`` = BOS = EOS and ``<pad>``; no post-processor,
so ``tokenizer(text)`` never adds BOS: the data layer puts it in front itself):
    bytelevel_bpe      GPT-2 / Llama-3 family: ByteLevel pre-tokenizer (GPT-2 regex, no prefix
                       space) and decoder, all 256 byte symbols in the base alphabet so any text
                       encodes. Ids: 0 ``<|endoftext|>``, 1 ``<pad>``, then the learned vocabulary.
    sentencepiece_bpe  Llama-2 / Gemma family: "▁" for spaces and a dummy-prefix "▁" in front of
                       every text, BPE with byte fallback. The 256 ``<0xNN>`` pieces are ordinary
                       vocabulary entries (as special tokens, decoding would silently drop
                       non-ASCII text). Ids: 0, 1 the specials, 2..257 ``<0x00>``..``<0xFF>``, then
                       the learned pieces.
    byte               256 byte tokens at ids 0..255 (id = byte value), then 256 ``<|endoftext|>``,
                       257 ``<pad>``.
The fourth kind, ``pretrained``, is not trained: a real family's vocabulary (GPT-2, cl100k,
Qwen2, Qwen3.6) with its own specials and ids, built by ``ctdbench.families``.

The dummy prefix is Llama-2's normalizer ``Prepend("▁")`` + ``Replace(" ", "▁")`` rather than
``Metaspace(prepend_scheme="first")``: Metaspace skips the prefix when the text already starts
with a space, and the decoder's ``Strip`` would then eat a real space, so decoding would not be
lossless. Metaspace (``prepend_scheme="never"``) stays as the pre-tokenizer that splits words.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ctdbench.tokbytes import byte_to_unicode

BOS = EOS = "<|endoftext|>"
PAD = "<pad>"
SPECIALS = [BOS, PAD]
KINDS = ("bytelevel_bpe", "sentencepiece_bpe", "byte")
_MIN_VOCAB = len(SPECIALS) + 256


def _bytelevel_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _sentencepiece_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    return tok


def _sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    # Learn the merges first, then rebuild the vocabulary with the byte pieces in front.
    n_learned = vocab_size - _MIN_VOCAB
    draft = _sentencepiece_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=n_learned, limit_alphabet=min(200, n_learned), show_progress=False)
    draft.train_from_iterator(texts, trainer)
    learned = sorted(draft.get_vocab().items(), key=lambda kv: kv[1])
    pieces = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in learned]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m) for m in json.loads(draft.to_str())["model"]["merges"]]
    tok = _sentencepiece_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True)))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    return tok


def _byte() -> Tokenizer:
    vocab = {u: b for b, u in byte_to_unicode().items()}
    vocab.update({s: 256 + k for k, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer of ``kind`` on ``texts``.

    Args:
        kind: one of ``KINDS`` (see the module docstring).
        texts: training texts; ignored by ``byte``, which needs no training.
        vocab_size: total vocabulary size including the specials and the 256 byte entries
            (at most this many ids; fewer if the texts run out of merges). Required for the BPE
            kinds, ignored by ``byte``.

    Raises:
        ValueError: for an unknown kind or a missing / too small vocab_size.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; available: {', '.join(KINDS)}")
    if kind == "byte":
        tok = _byte()
    elif vocab_size is None or vocab_size <= _MIN_VOCAB:
        raise ValueError(f"tokenizer kind {kind!r} needs a vocab_size above {_MIN_VOCAB} (specials + 256 bytes), "
                         f"got {vocab_size}")
    else:
        tok = (_bytelevel_bpe if kind == "bytelevel_bpe" else _sentencepiece_bpe)(texts, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved with ``save_pretrained`` (or a hub name, for users with internet).

    A local directory with a ``tokenizer.json`` loads exactly that pipeline: transformers 5's
    ``AutoTokenizer`` may substitute a model-specific class that rebuilds its own pre-tokenizer
    (``qwen2``, or ``gpt_neox`` when ``tokenizer_config.json`` names no class), silently changing
    the ids.

    Raises:
        ValueError: if the tokenizer is not a fast (``tokenizers``-backed) one.
    """
    path = Path(name_or_path)
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if not tok.is_fast:
        raise ValueError(f"{name_or_path}: ctdbench needs a fast (tokenizers-backed) tokenizer")
    return tok
