"""Every token id -> its exact bytes, and text -> tokens with their byte spans.

Families, detected from the backend tokenizer's JSON (model, pre-tokenizer, decoder, normalizer):
    bytelevel      byte-level BPE (GPT-2, Llama-3, Qwen2, our ``bytelevel_bpe`` and ``byte``
                   kinds): a ByteLevel pre-tokenizer or decoder. Token strings are spelled in
                   GPT-2's byte-to-unicode alphabet; inverting it gives the bytes.
    sentencepiece  SentencePiece-style (Llama-2, Gemma, Mistral, our ``sentencepiece_bpe``): "▁"
                   marks a space (Metaspace, or a Replace " " -> "▁" normalizer / "▁" -> " "
                   decoder). "▁" is byte 0x20, a byte-fallback piece ``<0xNN>`` is the single
                   byte NN, every other piece is UTF-8.
Special tokens (and padded ids beyond the tokenizer) have no bytes: ``None``.

Normalizers: both sides of a pair must tokenize the same bytes, so a normalizer that rewrites
ordinary text (NFKC, NFD, lowercasing, accent stripping, ...) is refused. Allowed are the
SentencePiece dummy prefix and space marker (Llama-2's ``Prepend("▁")`` and ``Replace(" ", "▁")``)
and NFC (Qwen2), which leaves NFC text untouched.

Text a tokenizer's own encoding does not spell byte for byte (a literal "▁" under a
SentencePiece tokenizer reads as a space; text NFC would change; whitespace a special token's
``lstrip`` swallows; an ``<unk>``) is never changed, dropped or refused: ``encode_with_spans``
keeps the tokens that spell the text and spells each stretch in between with the tokenizer's
single-byte tokens (the ``<0xNN>`` byte-fallback pieces of a SentencePiece vocabulary). The
tokens of a text are a function of the tokenizer and the text only, so every method of a pair,
and the teacher cache, see the same ones; ``TokenSpans.fallback_bytes`` counts the bytes so
spelled (``run.json``'s ``data.byte_fallback``). Only a tokenizer lacking a single-byte token
that such a stretch needs is refused (every byte-level and byte-fallback vocabulary has all 256).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


class UnsupportedTokenizerError(ValueError):
    """The tokenizer (or this text under it) cannot be mapped to exact bytes; the message says why."""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's ``bytes_to_unicode`` table: each byte as one printable character (space -> "Ġ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return dict(sorted(table.items()))


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {u: b for b, u in byte_to_unicode().items()}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _components(node: dict | None) -> list[dict]:
    """The leaf components of a (possibly nested ``Sequence``) normalizer / pre-tokenizer / decoder."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        parts = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [leaf for part in parts for leaf in _components(part)]
    return [node]


def _is_space_marker(n: dict) -> bool:
    """Llama-2's dummy prefix ``Prepend("▁")`` or its space marker ``Replace(" ", "▁")``."""
    if n["type"] == "Prepend":
        return n.get("prepend") == "▁"
    return n["type"] == "Replace" and n.get("pattern", {}).get("String") == " " and n.get("content") == "▁"


def _check_normalizer(spec: dict, family: str) -> None:
    for n in _components(spec.get("normalizer")):
        if n["type"] == "NFC" or (family == "sentencepiece" and _is_space_marker(n)):
            continue
        raise UnsupportedTokenizerError(
            f"the tokenizer's normalizer {n['type']} ({json.dumps(n, ensure_ascii=False)}) changes the text, so its "
            "tokens cannot be mapped to the raw bytes the other tokenizer of the pair sees"
        )


def tokenizer_family(tokenizer) -> str:
    """``"bytelevel"`` or ``"sentencepiece"`` (see the module docstring).

    Raises:
        UnsupportedTokenizerError: for any other model or pre-tokenizer (WordPiece, a whitespace
            splitter, ...) and for a normalizer that changes the text.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]["type"]
    decoders = _components(spec.get("decoder"))
    types = {c["type"] for c in _components(spec.get("pre_tokenizer")) + decoders}
    space_marker = (
        "Metaspace" in types
        or any(_is_space_marker(n) for n in _components(spec.get("normalizer")))
        or any(d["type"] == "Replace" and d.get("pattern", {}).get("String") == "▁" for d in decoders)
    )
    family = None
    # WordPiece and WordLevel drop the whitespace between words: there are no exact bytes to recover.
    if model in ("BPE", "Unigram"):
        if "ByteLevel" in types:
            family = "bytelevel"
        elif space_marker:
            family = "sentencepiece"
    if family is None:
        raise UnsupportedTokenizerError(
            f"unsupported tokenizer: model {model}, pre-tokenizer/decoder {sorted(types) or 'none'}; supported are "
            "byte-level BPE (ByteLevel) and SentencePiece-style (BPE/Unigram with a '▁' space marker) tokenizers"
        )
    _check_normalizer(spec, family)
    return family


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes | None]:
    """The exact bytes of every vocabulary id.

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        vocab_size: the model's vocabulary size when it pads its embedding matrix beyond
            ``len(tokenizer)``; the extra ids get ``None``.

    Returns:
        A list of length ``max(len(tokenizer), vocab_size)``: bytes per id, ``None`` for special
        tokens and padding ids.

    Raises:
        UnsupportedTokenizerError: see ``tokenizer_family``; also for a byte-level token outside
            the byte alphabet.
        ValueError: if ``vocab_size`` is smaller than the tokenizer.
    """
    family = tokenizer_family(tokenizer)
    n = len(tokenizer)
    if vocab_size is not None and vocab_size < n:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n} ids)")
    special = set(tokenizer.all_special_ids)
    added: dict[int, bytes] = {}
    for i, tok in tokenizer.added_tokens_decoder.items():
        if tok.special:
            special.add(i)
        else:
            added[i] = tok.content.encode("utf-8")  # added tokens match raw text, not the alphabet
    u2b = _unicode_to_byte()
    table: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if i in special or piece is None:
            table.append(None)
        elif i in added:
            table.append(added[i])
        elif family == "bytelevel":
            try:
                table.append(bytes(u2b[c] for c in piece))
            except KeyError as e:
                raise UnsupportedTokenizerError(f"token {i} {piece!r} is not spelled in the byte-level alphabet") from e
        else:
            m = _BYTE_FALLBACK.fullmatch(piece)
            table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
    return table + [None] * ((vocab_size or n) - n)


@dataclass
class TokenSpans:
    """Token ids of a text with each token's half-open byte span ``[start, end)`` in its UTF-8 bytes."""

    ids: list[int]
    starts: list[int]
    ends: list[int]
    loss: list[bool] | None = None  # per token: is it a training target (None = every token)
    fallback_bytes: int = 0  # bytes spelled by single-byte tokens where the tokenizer's own did not spell them


class _NotSpelled(Exception):
    """The tokenizer's own tokens do not spell the text (the byte fallback takes over)."""


def single_byte_ids(table: list[bytes | None]) -> list[int | None]:
    """For every byte value, the lowest id whose token is exactly that byte (None if there is none)."""
    out: list[int | None] = [None] * 256
    for i, b in enumerate(table):
        if b is not None and len(b) == 1 and out[b[0]] is None:
            out[b[0]] = i
    return out


def encode_with_spans(tokenizer, text: str, table: list[bytes | None],
                      byte_ids: list[int | None] | None = None) -> TokenSpans:
    """Tokenize ``text`` (no special tokens added) and locate every token in ``text.encode()``.

    Ordinary tokens' bytes spell the text exactly, except for a space the tokenizer puts in
    front of the text or of a section after a special token (the SentencePiece dummy prefix): it
    is not part of the text, so that token's span leaves it out (and is empty when the token is
    just the space). A special token written out in the text (a chat marker such as
    ``<|eot_id|>``; HF tokenizers split them out) spans its string. A token that ends inside a
    multi-byte character simply gets a span ending there. Where the tokenizer's own tokens do not
    spell the text, single-byte tokens do (module docstring).

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        text: the raw text.
        table: ``token_bytes(tokenizer)``.
        byte_ids: ``single_byte_ids(table)`` if at hand (computed when the fallback needs it).

    Raises:
        UnsupportedTokenizerError: if the fallback needs a byte the vocabulary has no token for.
    """
    try:
        return _own_spans(tokenizer, text, table)
    except _NotSpelled:
        return _fallback_spans(tokenizer, text, table, byte_ids or single_byte_ids(table))


def _own_spans(tokenizer, text: str, table: list[bytes | None]) -> TokenSpans:
    """The spans of the tokenizer's own tokens (the usual case), or :class:`_NotSpelled`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    data = text.encode("utf-8")
    starts, ends, pos, k = [], [], 0, 0
    while k < len(ids):
        if table[ids[k]] is None:  # a special token: its string must be right here
            marker = _marker(tokenizer, ids[k])
            if not data.startswith(marker, pos):
                raise _NotSpelled
            starts.append(pos)
            pos += len(marker)
            ends.append(pos)
            k += 1
            continue
        # A section: the ordinary tokens up to the next special token (or the end). It spells the
        # text up to that token's marker, possibly after a dummy-prefix space.
        m = k
        while m < len(ids) and table[ids[m]] is not None:
            m += 1
        pieces = [table[i] for i in ids[k:m]]
        joined = b"".join(pieces)
        after = _marker(tokenizer, ids[m]) if m < len(ids) else b""

        def spells(section: bytes) -> bool:
            end = pos + len(section)
            return data.startswith(section, pos) and (data.startswith(after, end) if after else end == len(data))

        skip = 0 if spells(joined) else 1 if joined[:1] == b" " and spells(joined[1:]) else None
        if skip is None:
            raise _NotSpelled
        p = pos - skip
        for piece in pieces:
            starts.append(max(p, pos))
            p += len(piece)
            ends.append(max(p, pos))
        pos, k = p, m
    return TokenSpans(list(ids), starts, ends)


def _fallback_spans(tokenizer, text: str, table: list[bytes | None], byte_ids: list[int | None]) -> TokenSpans:
    """Spans when the tokenizer's own tokens do not spell ``text``: in order, keep each token that
    spells the text at the current byte (a dummy-prefix space allowed at a section start) or a
    special token whose string follows; replace any other token by single-byte tokens spelling
    the characters it came from (its offsets), dropping the tokens of characters already spelled."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    data = text.encode("utf-8")
    code = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    at = np.concatenate([[0], np.cumsum(1 + (code >= 0x80) + (code >= 0x800) + (code >= 0x10000))]).tolist()
    ids: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    pos, spelled, section_start = 0, 0, True

    def keep(token: int, start: int, end: int) -> None:
        nonlocal pos
        ids.append(token)
        starts.append(start)
        ends.append(end)
        pos = end

    def spell(end: int) -> None:  # data[pos:end] as single-byte tokens
        nonlocal spelled
        for b in data[pos:end]:
            if byte_ids[b] is None:
                raise UnsupportedTokenizerError(
                    f"the tokenizer's own tokens do not spell {data[max(0, pos - 10):end + 10]!r}, and it has no "
                    f"token for the single byte {b:#04x} to spell it with")
            keep(byte_ids[b], pos, pos + 1)
            spelled += 1

    for token, (c0, c1) in zip(enc["input_ids"], enc["offset_mapping"]):
        piece, source_end = table[token], at[c1]
        if piece is None:
            marker = _marker(tokenizer, token)
            found = data.find(marker, pos, max(source_end, pos + len(marker)))
            if found >= 0:  # a special token written in the text (what its lstrip ate is spelled)
                spell(found)
                keep(token, found, found + len(marker))
                section_start = True
                continue
        elif data.startswith(piece, pos):
            keep(token, pos, pos + len(piece))
            section_start = False
            continue
        elif section_start and piece[:1] == b" " and data.startswith(piece[1:], pos):
            keep(token, pos, pos + len(piece) - 1)  # the dummy-prefix space is not in the text
            section_start = False
            continue
        spell(source_end)  # nothing if the characters it came from are already spelled
        section_start = False
    spell(len(data))  # what no token came from
    return TokenSpans(ids, starts, ends, fallback_bytes=spelled)


def _marker(tokenizer, token_id: int) -> bytes:
    """The text a special token stands for."""
    return tokenizer.convert_ids_to_tokens(token_id).encode("utf-8")
