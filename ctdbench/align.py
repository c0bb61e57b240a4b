"""Exact chunk alignment of two tokenizations of the same text (shared by every chunk method).

A chunk is a minimal pair of token ranges, one per side, covering exactly the same bytes: chunks
end wherever the cumulative byte offsets of both sides coincide (tokenkit's
``get_alignment_indices``, computed here from byte lengths in O(n) with numpy instead of a
per-token string walk). Special tokens (``None``) carry no bytes and belong to no chunk.

The SentencePiece dummy prefix: if one side's bytes are the other's with one extra leading space
(``▁The`` vs ``The``), that space is dropped from the longer side's first token before aligning,
as tokenkit's leading-space fix does.
"""

from __future__ import annotations

import numpy as np


def _lengths(token_bytes: list[bytes | None]) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Positions of the non-special tokens, their byte lengths, and the side's bytes."""
    keep = np.array([b is not None for b in token_bytes], dtype=bool)
    pos = np.flatnonzero(keep)
    lengths = np.array([len(token_bytes[i]) for i in pos], dtype=np.int64)
    return pos, lengths, b"".join(token_bytes[i] for i in pos)


def chunks(teacher_token_bytes: list[bytes | None], student_token_bytes: list[bytes | None]) -> list[tuple[int, int, int, int]]:
    """The finest common chunking of two tokenizations of one text.

    Args:
        teacher_token_bytes: bytes of each teacher token in order (None for special tokens).
        student_token_bytes: the same for the student.

    Returns:
        Chunks ``(i0, i1, j0, j1)``: half-open token ranges of the teacher and the student whose
        non-special tokens' bytes are equal. They tile every non-special token of both sides in
        order. A range may include a special token sitting inside a chunk (it has no bytes).

    Raises:
        ValueError: if the two sides do not spell the same bytes.
    """
    t_pos, t_len, t_text = _lengths(teacher_token_bytes)
    s_pos, s_len, s_text = _lengths(student_token_bytes)
    if t_text != s_text:
        if t_text == b" " + s_text and len(t_len):
            t_len[0] -= 1
        elif s_text == b" " + t_text and len(s_len):
            s_len[0] -= 1
        else:
            raise ValueError("the two tokenizations spell different bytes; they cannot be aligned")
    t_end, s_end = np.cumsum(t_len), np.cumsum(s_len)
    # Boundaries shared by both sides; zero-length tokens (a bare dummy prefix) repeat an offset
    # and join the chunk that contains their position.
    bounds = np.intersect1d(t_end, s_end)
    bounds = bounds[bounds > 0]
    if len(bounds) == 0:
        return []
    # Last token of each side ending at each boundary (side="right" takes zero-length followers).
    t_last = np.searchsorted(t_end, bounds, side="right")
    s_last = np.searchsorted(s_end, bounds, side="right")
    t_first = np.concatenate([[0], t_last[:-1]])
    s_first = np.concatenate([[0], s_last[:-1]])
    return [
        (int(t_pos[a]), int(t_pos[b - 1]) + 1, int(s_pos[c]), int(s_pos[d - 1]) + 1)
        for a, b, c, d in zip(t_first, t_last, s_first, s_last)
    ]


def target_chunks(found: list[tuple[int, int, int, int]], teacher_loss: list[bool] | None,
                  student_loss: list[bool] | None) -> list[tuple[int, int, int, int]]:
    """The chunks whose tokens are all training targets on both sides (chat data trains on the
    assistant turns only, ``ctdbench.data.Side.encode``); ``None`` = every token is a target."""
    keep = np.ones(len(found), dtype=bool)
    c = np.array(found, dtype=np.int64).reshape(-1, 4)
    for loss, lo, hi in ((teacher_loss, 0, 1), (student_loss, 2, 3)):
        if loss is not None:
            misses = np.concatenate([[0], np.cumsum(~np.asarray(loss, dtype=bool))])  # non-targets before each token
            keep &= misses[c[:, hi]] == misses[c[:, lo]]
    return [ch for ch, k in zip(found, keep) if k]
