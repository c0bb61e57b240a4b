"""Paired data: the same raw text tokenized by the teacher and by the student.

The training text is cut into segments of at most ``segment_bytes`` UTF-8 bytes at line
boundaries. Every segment is tokenized once by each side, each token carrying its byte span in the
shared text, and gets the side's BOS token in front (so the first real token is predicted, as in
lm-eval's rolling log-likelihood). The sample schedule is a pure function of (seed, step): every
method of a pair sees the same segments in the same order, and a resumed run continues exactly
where it stopped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ctdbench.tokbytes import TokenSpans, encode_with_spans, single_byte_ids


def segment_text(text: str, segment_bytes: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``segment_bytes`` UTF-8 bytes.

    Pieces end at line boundaries where possible; a longer line is cut at its last space that
    fits, else at a character boundary. Concatenating the pieces gives back ``text``.
    """
    return [p for p in _pieces(text, segment_bytes) if p.strip()]


def _pieces(text: str, segment_bytes: int) -> list[str]:
    """:func:`segment_text` before dropping whitespace-only pieces (they keep the byte offsets)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > segment_bytes and current:
            pieces.append("".join(current))
            current, size = [], 0
        while n > segment_bytes:
            head = _cut(line, segment_bytes)
            pieces.append(head)
            line = line[len(head):]
            n = len(line.encode("utf-8"))
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current))
    return pieces


def _cut(line: str, limit: int) -> str:
    """Longest prefix of ``line`` within ``limit`` bytes, preferably ending after a space."""
    head = line.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    space = head.rfind(" ")
    return head[: space + 1] if space > 0 else head


Spans = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Segment:
    """A training text and the UTF-8 byte spans of it that are training targets (None = all of
    it; chat data trains on the assistant turns only, see ``ctdbench.chat``)."""

    text: str
    loss_spans: Spans | None = None


def segment_document(text: str, loss_spans: Spans | None, segment_bytes: int) -> list[Segment]:
    """:func:`segment_text` carrying ``loss_spans`` into each piece (clipped, shifted); a piece of
    a document with loss spans that holds no target byte is dropped: it would train nothing."""
    out, offset = [], 0
    for piece in _pieces(text, segment_bytes):
        n = len(piece.encode("utf-8"))
        spans = None if loss_spans is None else tuple(
            (max(a, offset) - offset, min(b, offset + n) - offset) for a, b in loss_spans
            if min(b, offset + n) > max(a, offset))
        if piece.strip() and spans != ():
            out.append(Segment(piece, spans))
        offset += n
    return out


def take_segments(docs, segment_bytes: int, max_bytes: int | None) -> list[Segment]:
    """Segments of the documents in order, stopping once ``max_bytes`` bytes are collected.

    ``docs``: strings, or objects with ``text`` and ``loss_spans`` (``ctdbench.corpus.Document``).
    """
    out: list[Segment] = []
    total = 0
    for doc in docs:
        text, spans = (doc, None) if isinstance(doc, str) else (doc.text, doc.loss_spans)
        for seg in segment_document(text, spans, segment_bytes):
            if max_bytes is not None and total >= max_bytes:
                return out
            out.append(seg)
            total += len(seg.text.encode("utf-8"))
    return out


@dataclass
class Side:
    """One tokenizer's view of the data: the tokenizer, its byte table, its BOS id.

    Special tokens written out in a text (chat markers such as ``<|eot_id|>``) are kept whole:
    the text is split at them and each becomes its own token without bytes, so the shared byte
    stream of a pair is the text *without* those strings (:meth:`content`); both sides of a pair
    must know the same markers (``PairedDataset`` checks).
    """

    tokenizer: object
    token_bytes: list[bytes | None]

    def __post_init__(self):
        self.special_ids = {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items()
                            if i < len(self.token_bytes) and self.token_bytes[i] is None}
        names = sorted(self.special_ids, key=len, reverse=True)  # longest first: no marker eats another
        self._specials = re.compile("|".join(map(re.escape, names))) if names else None

    @property
    def bos_id(self) -> int:
        """The BOS id, or EOS for tokenizers without one (Qwen2), as lm-eval's prefix token."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @cached_property
    def byte_ids(self) -> list[int | None]:
        """The single-byte token of every byte value (``encode_with_spans``'s byte fallback)."""
        return single_byte_ids(self.token_bytes)

    def markers(self, text: str) -> set[str]:
        """The special-token strings written out in ``text``."""
        return set(self._specials.findall(text)) if self._specials else set()

    def content(self, text: str) -> str:
        """``text`` without its special-token strings: the bytes the tokens' spans refer to."""
        return self._specials.sub("", text) if self._specials else text

    def encode(self, text: str, loss_spans: Spans | None = None) -> TokenSpans:
        """Tokens of ``text`` with BOS in front; BOS has the empty span [0, 0).

        Spans index :meth:`content`: special-token strings get empty spans there. ``loss_spans``
        (byte spans of ``text`` itself) give ``TokenSpans.loss``: a token is a target iff its
        bytes, a marker's string included, overlap a span.
        """
        enc = encode_with_spans(self.tokenizer, text, self.token_bytes, self.byte_ids)
        starts, ends = np.asarray(enc.starts, dtype=np.int64), np.asarray(enc.ends, dtype=np.int64)
        # Shift every span left by the marker bytes before it; a marker itself shrinks to empty.
        marker = np.array([self.token_bytes[i] is None for i in enc.ids], dtype=bool)
        removed = np.cumsum(np.where(marker, ends - starts, 0))
        before = removed - np.where(marker, ends - starts, 0)
        loss = None if loss_spans is None else [False, *span_token_mask(starts, ends, loss_spans).tolist()]
        return TokenSpans([self.bos_id, *enc.ids], [0, *(starts - before).tolist()], [0, *(ends - removed).tolist()],
                          loss, enc.fallback_bytes)


def span_token_mask(starts, ends, spans) -> np.ndarray:
    """Boolean mask over tokens: True iff the token's byte span ``[start, end)`` shares a byte with a span.

    A token straddling a span boundary is a target (its prediction produces target bytes); an
    empty token (BOS, a bare SentencePiece dummy prefix) never is. ``spans`` must not overlap;
    empty spans are ignored.
    """
    s, e = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    sp = np.array(sorted((a, b) for a, b in spans if b > a), dtype=np.int64).reshape(-1, 2)
    if len(sp) and np.any(sp[1:, 0] < sp[:-1, 1]):
        raise ValueError("loss spans overlap")
    if not len(sp):
        return np.zeros(s.shape, dtype=bool)
    # The first span ending after the token's start is the only candidate: later ones start later.
    k = np.searchsorted(sp[:, 1], s, side="right")
    inside = k < len(sp)
    k = np.minimum(k, len(sp) - 1)
    return inside & (sp[k, 0] < e) & (s < e)


@dataclass
class PairedExample:
    """One segment as both sides see it: ``text`` is the shared byte stream (the segment without
    special-token strings), the sides' spans index it."""

    index: int
    text: bytes
    student: TokenSpans
    teacher: TokenSpans | None


class PairedDataset(torch.utils.data.Dataset):
    """Segments tokenized once by the student side and, optionally, the teacher side."""

    def __init__(self, segments: list[str | Segment], student: Side, teacher: Side | None = None):
        self.student, self.teacher = student, teacher
        self.examples = [self._example(i, seg if isinstance(seg, Segment) else Segment(seg))
                         for i, seg in enumerate(segments)]

    def _example(self, index: int, seg: Segment) -> PairedExample:
        student, teacher = self.student.markers(seg.text), self.teacher.markers(seg.text) if self.teacher else None
        if teacher is not None and student != teacher:
            raise ValueError(
                f"segment {index}: special tokens {sorted(student ^ teacher)} are special for only one side "
                f"(student: {sorted(student) or 'none'}, teacher: {sorted(teacher) or 'none'}), so the two "
                "tokenizations would not spell the same bytes; add them to the other tokenizer "
                "(tokenizers.<name>.add_special_tokens)")
        return PairedExample(index, self.student.content(seg.text).encode("utf-8"),
                             self.student.encode(seg.text, seg.loss_spans),
                             self.teacher.encode(seg.text, seg.loss_spans) if self.teacher else None)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PairedExample:
        return self.examples[i]

    def digest(self) -> str:
        """sha256 of every segment's shared text and both sides' tokens and targets: what a run
        trains on, whatever produced it (corpus, segmentation, tokenizers)."""
        h = hashlib.sha256()

        def put(data: bytes) -> None:  # length-prefixed: no two sequences of parts hash alike
            h.update(len(data).to_bytes(8, "little") + data)

        for ex in self.examples:
            put(ex.text)
            for side in (ex.student, ex.teacher):
                put(b"" if side is None else np.asarray(side.ids, dtype=np.int64).tobytes())
                put(b"" if side is None or side.loss is None else np.asarray(side.loss, dtype=bool).tobytes())
        return h.hexdigest()

    def fallback_counts(self) -> dict:
        """Per side: the segments (of ``segments``) and bytes spelled by the byte fallback of
        ``ctdbench.tokbytes`` (text the tokenizer's own tokens do not spell)."""
        sides = {"student": [e.student for e in self.examples]}
        if self.teacher is not None:
            sides["teacher"] = [e.teacher for e in self.examples]
        return {"segments": len(self.examples), "byte_fallback": {
            side: {"segments": sum(s.fallback_bytes > 0 for s in spans), "bytes": sum(s.fallback_bytes for s in spans)}
            for side, spans in sides.items()}}

    def max_tokens(self) -> int:
        """Longest tokenized segment on either side (sizes the models' position tables)."""
        longest = max(len(e.student.ids) for e in self.examples)
        if self.teacher:
            longest = max(longest, max(len(e.teacher.ids) for e in self.examples))
        return longest


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _side_tensors(prefix: str, spans: list[TokenSpans], pad_id: int) -> dict[str, torch.Tensor]:
    """Ids, masks and byte spans of one side. ``attention_mask`` marks real tokens (the model's
    input); ``loss_mask`` the training targets among them, which every method's loss is
    restricted to (all real tokens, or chat data's assistant tokens)."""
    return {
        f"{prefix}_input_ids": _pad([s.ids for s in spans], pad_id),
        f"{prefix}_attention_mask": _pad([[1] * len(s.ids) for s in spans], 0),
        f"{prefix}_loss_mask": _pad([[1] * len(s.ids) if s.loss is None else [int(x) for x in s.loss]
                                     for s in spans], 0),
        f"{prefix}_byte_starts": _pad([s.starts for s in spans], 0),
        f"{prefix}_byte_ends": _pad([s.ends for s in spans], 0),
    }


def collate(examples: list[PairedExample], dataset: PairedDataset, method=None) -> dict:
    """Right-padded tensors of both sides plus the method's own precomputed extras."""
    batch = {
        "index": torch.tensor([e.index for e in examples]),
        "n_bytes": torch.tensor([len(e.text) for e in examples]),
        **_side_tensors("student", [e.student for e in examples], dataset.student.pad_id),
    }
    if dataset.teacher is not None:
        batch.update(_side_tensors("teacher", [e.teacher for e in examples], dataset.teacher.pad_id))
    if method is not None:
        batch.update(method.prepare(examples))
    return batch


class Schedule:
    """The deterministic sample order: epoch-wise permutations seeded by (seed, epoch).

    ``indices(step)`` gives the segments of global batch ``step`` (0-based). It depends only on
    the seed, the dataset size and the batch size, never on the method.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        if n_examples < batch_size:
            raise ValueError(f"{n_examples} training segments cannot fill a batch of {batch_size}")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.per_epoch = n_examples // batch_size  # drop the ragged tail of each epoch
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._cache[epoch]

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        return self._perm(epoch)[k * self.batch_size : (k + 1) * self.batch_size].tolist()


def chain_digest(previous: str, texts: list[bytes]) -> str:
    """Extend a running sha256 chain by the texts of one batch (resumable: it is just a string)."""
    h = hashlib.sha256(previous.encode())
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t)
    return h.hexdigest()


def stream_digest(dataset: PairedDataset, schedule: Schedule, steps: int) -> str:
    """The digest of the byte stream the schedule feeds in ``steps`` steps (budget proof)."""
    digest = ""
    for step in range(steps):
        digest = chain_digest(digest, [dataset[i].text for i in schedule.indices(step)])
    return digest
