"""Every token id -> its exact bytes, and text -> tokens with their byte spans.

Families (detected from the backend tokenizer's JSON):
    byte-level BPE (GPT-2, Llama-3, Qwen2, our byte tokenizer): token strings are in GPT-2's
        byte-to-unicode alphabet; inverting it gives the bytes.
    SentencePiece-style (Llama-2, Gemma, Mistral; Metaspace / byte fallback): "▁" is a space,
        ``<0xNN>`` is the single byte NN, other pieces are UTF-8.
Special tokens (and padded ids beyond the tokenizer) have no bytes: ``None``.

A tokenizer whose normalizer changes the text (NFKC, lowercasing, ...) is refused: the two sides
of a pair must tokenize the same bytes. The SentencePiece dummy-prefix space (Llama-2's Prepend
normalizer or Metaspace ``prepend_scheme``) is the one allowed change; ``encode_with_spans``
drops it from the spans.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


class UnsupportedTokenizerError(ValueError):
    """The tokenizer cannot be mapped to exact bytes; the message says why."""


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ALLOWED_NORMALIZERS = {"Prepend", "Replace"}  # the SentencePiece dummy prefix and "▁" spaces


def _types(node) -> list[dict]:
    """All component dicts of a (possibly Sequence) pre-tokenizer / decoder / normalizer."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        parts = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [t for p in parts for t in _types(p)]
    return [node]


def _check_normalizer(spec: dict) -> None:
    for n in _types(spec.get("normalizer")):
        ok = n["type"] == "Prepend" and n.get("prepend") == "▁" or (
            n["type"] == "Replace" and n.get("pattern", {}).get("String") == " " and n.get("content") == "▁"
        )
        if not ok:
            raise UnsupportedTokenizerError(
                f"the tokenizer's normalizer {n['type']} changes the text, so its tokens cannot be aligned "
                "to the raw bytes the other tokenizer sees"
            )


def tokenizer_family(tokenizer) -> str:
    """``"bytelevel"`` or ``"sentencepiece"``; raises UnsupportedTokenizerError otherwise."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    _check_normalizer(spec)
    parts = _types(spec.get("pre_tokenizer")) + _types(spec.get("decoder"))
    kinds = {p["type"] for p in parts}
    if "ByteLevel" in kinds:
        return "bytelevel"
    if kinds & {"Metaspace", "ByteFallback"} or spec["model"].get("byte_fallback"):
        return "sentencepiece"
    raise UnsupportedTokenizerError(
        f"unsupported tokenizer: model {spec['model']['type']} with pre-tokenizer/decoder {sorted(kinds) or 'none'}; "
        "supported are byte-level BPE and SentencePiece-style (Metaspace / byte fallback) tokenizers"
    )


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes | None]:
    """The exact bytes of every vocabulary id (None for special and padding ids).

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        vocab_size: the model's vocabulary size if it pads beyond ``len(tokenizer)``.
    """
    family = tokenizer_family(tokenizer)
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = {}
    for i, tok in tokenizer.added_tokens_decoder.items():
        if tok.special:
            special.add(i)
        else:
            added[i] = tok.content.encode("utf-8")  # added tokens match raw text, not the alphabet
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    u2b = _unicode_to_byte()
    table: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            table.append(None)
        elif i in added:
            table.append(added[i])
        elif family == "bytelevel":
            try:
                table.append(bytes(u2b[c] for c in piece))
            except KeyError as e:
                raise UnsupportedTokenizerError(f"token {i} {piece!r} is not in the byte-level alphabet") from e
        else:
            m = _BYTE_FALLBACK.fullmatch(piece)
            table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
    return table + [None] * max(0, (vocab_size or n) - n)


@dataclass
class TokenSpans:
    """Token ids of a text with each token's half-open byte span in the text's UTF-8 bytes."""

    ids: list[int]
    starts: list[int]
    ends: list[int]


def encode_with_spans(tokenizer, text: str, table: list[bytes | None]) -> TokenSpans:
    """Tokenize ``text`` (no special tokens added) and locate every token in its bytes.

    Raises:
        UnsupportedTokenizerError: if the tokens do not spell the text (a normalizer changed it,
            or the text contains a special token's string).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [table[i] for i in ids]
    if any(p is None for p in pieces):
        raise UnsupportedTokenizerError("the text contains a special token's string; it cannot be mapped to bytes")
    joined, data = b"".join(pieces), text.encode("utf-8")
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    ends = np.cumsum(lengths)
    if joined == data:
        pass
    elif joined == b" " + data:  # SentencePiece dummy prefix: not in the text
        ends -= 1
    else:
        raise UnsupportedTokenizerError(
            "the tokenizer changes the text (a normalizer?): its tokens do not spell the input bytes"
        )
    starts = np.maximum(ends - lengths, 0)
    return TokenSpans(list(ids), starts.tolist(), ends.tolist())
