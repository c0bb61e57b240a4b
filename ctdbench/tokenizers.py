"""Train or load tokenizers, saved as ``PreTrainedTokenizerFast``.

Kinds (all share the specials ``<|endoftext|>`` = BOS = EOS and ``<pad>``):
    bytelevel_bpe      GPT-2 / Llama-3 family: ByteLevel pre-tokenizer (GPT-2 regex), all 256
                       byte symbols in the base alphabet.
    sentencepiece_bpe  Llama-2 / Gemma family: Metaspace ("▁", dummy prefix like Llama-2), BPE
                       with byte fallback; the 256 ``<0xNN>`` tokens are ordinary vocabulary
                       entries (as special tokens, decoding would silently drop non-ASCII text).
    byte               256 byte tokens at ids 0..255, then the specials.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ctdbench.tokbytes import _unicode_to_byte

BOS = EOS = "<|endoftext|>"
PAD = "<pad>"
SPECIALS = [BOS, PAD]
KINDS = ("bytelevel_bpe", "sentencepiece_bpe", "byte")


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def _bytelevel_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = metaspace
    n_learned = vocab_size - 256 - len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=n_learned, limit_alphabet=min(200, n_learned), show_progress=False)
    draft.train_from_iterator(texts, trainer)
    learned = sorted(draft.get_vocab().items(), key=lambda kv: kv[1])
    # Specials, then the 256 byte-fallback pieces, then the learned pieces: one ordinary vocabulary.
    pieces = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in learned]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(draft)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    return tok


def _merges(tok: Tokenizer) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def _byte() -> Tokenizer:
    b2u = {b: u for u, b in _unicode_to_byte().items()}
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({s: 256 + k for k, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer of ``kind`` on ``texts`` (the byte tokenizer needs no training)."""
    if kind == "byte":
        return _wrap(_byte())
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind '{kind}'; available: {', '.join(KINDS)}")
    if vocab_size is None:
        raise ValueError(f"tokenizer kind '{kind}' needs a vocab_size")
    build = _bytelevel_bpe if kind == "bytelevel_bpe" else _sentencepiece_bpe
    return _wrap(build(texts, vocab_size))


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A tokenizer saved with ``save_pretrained`` (or a hub name, for users with internet)."""
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if not tok.is_fast:
        raise ValueError(f"{name_or_path}: ctdbench needs a fast (tokenizers-backed) tokenizer")
    return tok
