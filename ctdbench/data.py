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
from dataclasses import dataclass

import torch

from ctdbench.tokbytes import TokenSpans, encode_with_spans


def segment_text(text: str, segment_bytes: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``segment_bytes`` UTF-8 bytes.

    Pieces end at line boundaries where possible; a longer line is cut at its last space that
    fits, else at a character boundary. Concatenating the pieces gives back ``text``.
    """
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
    return [p for p in pieces if p.strip()]


def _cut(line: str, limit: int) -> str:
    """Longest prefix of ``line`` within ``limit`` bytes, preferably ending after a space."""
    head = line.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    space = head.rfind(" ")
    return head[: space + 1] if space > 0 else head


def take_segments(texts: list[str], segment_bytes: int, max_bytes: int | None) -> list[str]:
    """Segments of the documents in order, stopping once ``max_bytes`` bytes are collected."""
    out: list[str] = []
    total = 0
    for text in texts:
        for seg in segment_text(text, segment_bytes):
            if max_bytes is not None and total >= max_bytes:
                return out
            out.append(seg)
            total += len(seg.encode("utf-8"))
    return out


@dataclass
class Side:
    """One tokenizer's view of the data: the tokenizer, its byte table, its BOS id."""

    tokenizer: object
    token_bytes: list[bytes | None]

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encode(self, text: str) -> TokenSpans:
        """Tokens of ``text`` with BOS in front; BOS has the empty span [0, 0)."""
        enc = encode_with_spans(self.tokenizer, text, self.token_bytes)
        return TokenSpans([self.bos_id, *enc.ids], [0, *enc.starts], [0, *enc.ends])


@dataclass
class PairedExample:
    """One segment as both sides see it."""

    index: int
    text: bytes
    student: TokenSpans
    teacher: TokenSpans | None


class PairedDataset(torch.utils.data.Dataset):
    """Segments tokenized once by the student side and, optionally, the teacher side."""

    def __init__(self, segments: list[str], student: Side, teacher: Side | None = None):
        self.student, self.teacher = student, teacher
        self.examples = [
            PairedExample(
                i, seg.encode("utf-8"), student.encode(seg), teacher.encode(seg) if teacher else None
            )
            for i, seg in enumerate(segments)
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PairedExample:
        return self.examples[i]

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
    return {
        f"{prefix}_input_ids": _pad([s.ids for s in spans], pad_id),
        f"{prefix}_attention_mask": _pad([[1] * len(s.ids) for s in spans], 0),
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
