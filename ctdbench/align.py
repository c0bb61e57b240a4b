"""Exact chunk alignment of two tokenizations of the same text (shared by every chunk method).

A chunk is a minimal pair of token ranges, one per side, covering exactly the same bytes: chunks
end wherever the cumulative byte offsets of both sides coincide (tokenkit's
``get_alignment_indices``, computed here from byte lengths in O(n) with numpy instead of a
per-token string walk). Special tokens (``None``) carry no bytes and belong to no chunk.

The SentencePiece dummy prefix: if one side's bytes are the other's with one extra leading space
(``▁The`` vs ``The``), that space is dropped from the longer side's first token before aligning,
as tokenkit's leading-space fix does.

:func:`dtw_paths` is the other alignment the methods use: DSKD's dynamic time warping of two
token sequences under a pairwise cost (MinED's ``dtw`` option), vectorised over a batch.
"""

from __future__ import annotations

import numpy as np

from ctdbench.tokbytes import TokenSpans


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
    return [tuple(c) for c in _tile(t_pos, np.cumsum(t_len), s_pos, np.cumsum(s_len)).tolist()]


def span_chunks(teacher: TokenSpans, student: TokenSpans, teacher_keep: np.ndarray | None = None,
                student_keep: np.ndarray | None = None) -> np.ndarray:
    """:func:`chunks` of two tokenizations given as byte spans of one text, without touching bytes.

    The spans of each side tile the text (``ctdbench.data.Side.encode``: specials, BOS and a bare
    dummy prefix have empty spans), so token ends are the cumulative offsets :func:`chunks`
    computes from bytes, and the text needs no comparison.

    Args:
        teacher / student: each side's ``TokenSpans`` of the same text.
        teacher_keep / student_keep: [L] bool, the tokens that take part (default: non-empty spans;
            a kept empty span joins the chunk around its offset, as a zero-length token does).

    Returns:
        [C, 4] int64 chunks ``(i0, i1, j0, j1)`` as :func:`chunks` gives them.

    Raises:
        ValueError: if the two sides' participating tokens end at different offsets.
    """
    sides = []
    for spans, keep in ((teacher, teacher_keep), (student, student_keep)):
        ends = np.asarray(spans.ends, dtype=np.int64)
        pos = np.flatnonzero(ends > np.asarray(spans.starts, dtype=np.int64) if keep is None else keep)
        sides += [pos, ends[pos]]
    if sides[1][-1:].tolist() != sides[3][-1:].tolist():
        raise ValueError("the two tokenizations end at different byte offsets; they cannot be aligned")
    return _tile(*sides)


def _tile(t_pos: np.ndarray, t_end: np.ndarray, s_pos: np.ndarray, s_end: np.ndarray) -> np.ndarray:
    """[C, 4] chunks from the positions of each side's participating tokens and their end offsets."""
    # Boundaries shared by both sides; zero-length tokens (a bare dummy prefix) repeat an offset
    # and join the chunk that contains their position.
    bounds = np.intersect1d(t_end, s_end)
    bounds = bounds[bounds > 0]
    if len(bounds) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    # Last token of each side ending at each boundary (side="right" takes zero-length followers).
    t_last = np.searchsorted(t_end, bounds, side="right")
    s_last = np.searchsorted(s_end, bounds, side="right")
    t_first = np.concatenate([[0], t_last[:-1]])
    s_first = np.concatenate([[0], s_last[:-1]])
    return np.stack([t_pos[t_first], t_pos[t_last - 1] + 1, s_pos[s_first], s_pos[s_last - 1] + 1], axis=1)


def chunk_index(found: np.ndarray, width: int, side: int) -> np.ndarray:
    """[width] index of the chunk holding each token of one side (-1 = none).

    Args:
        found: [C, 4] chunks; side: 0 for the teacher's ranges, 1 for the student's.
    """
    start, end = found[:, 2 * side], found[:, 2 * side + 1]
    n = end - start
    out = np.full(width, -1, dtype=np.int64)
    out[np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(start, n)] = np.repeat(np.arange(len(found)), n)
    return out


def target_chunks(found: np.ndarray, teacher_loss: list[bool] | None, student_loss: list[bool] | None) -> np.ndarray:
    """The chunks whose tokens are all training targets on both sides (chat data trains on the
    assistant turns only, ``ctdbench.data.Side.encode``); ``None`` = every token is a target."""
    c = np.asarray(found, dtype=np.int64).reshape(-1, 4)
    keep = np.ones(len(c), dtype=bool)
    for loss, lo, hi in ((teacher_loss, 0, 1), (student_loss, 2, 3)):
        if loss is not None:
            misses = np.concatenate([[0], np.cumsum(~np.asarray(loss, dtype=bool))])  # non-targets before each token
            keep &= misses[c[:, hi]] == misses[c[:, lo]]
    return c[keep]


def dtw_paths(cost: np.ndarray, n_t: np.ndarray, n_s: np.ndarray) -> np.ndarray:
    """DSKD's DTW for a batch; [B, nS] teacher index matched alone to each student index (-1 = none).

    Args:
        cost: [B, nT, nS] pairwise costs (anything beyond an example's n_t x n_s is ignored).
        n_t / n_s: [B] real lengths.
    """
    B, nT, nS = cost.shape
    D = np.full((B, nT + 1, nS + 1), np.inf)
    D[:, 0, 0] = 0.0
    for r in range(1, nT + 1):
        # D[r, j] = c_j + min(D[r-1, j], D[r-1, j-1], D[r, j-1]) as a prefix scan: with P the
        # running cost sum, D[r] = P + cummin(U - P_shifted), U = min(up, diagonal).
        P = np.cumsum(cost[:, r - 1], 1)
        U = np.minimum(D[:, r - 1, 1:], D[:, r - 1, :-1])
        D[:, r, 1:] = P + np.minimum.accumulate(U - (P - cost[:, r - 1]), axis=1)
    # Backtrack pointers of every cell (diagonal, up, left; first minimum wins, as np.argmin upstream).
    move = np.stack([D[:, :-1, :-1], D[:, :-1, 1:], D[:, 1:, :-1]]).argmin(0)           # [B, nT, nS]
    cells = np.arange(B * nT * nS).reshape(B, nT, nS)
    nxt = np.choose(move, [cells - nS - 1, cells - nS, cells - 1]).ravel()
    nxt[cells[:, 0, 0]] = cells[:, 0, 0]                                                  # (0, 0) is terminal
    steps = nT + nS
    t = np.arange(steps)
    cur = np.broadcast_to(cells[np.arange(B), n_t - 1, n_s - 1][:, None], (B, steps)).copy()
    jump, k = nxt, 0
    while (1 << k) < steps:  # pointer doubling: cur[b, t] = nxt^t(end_b)
        cur = np.where((t >> k) & 1, jump[cur], cur)
        jump, k = jump[jump], k + 1
    first = np.concatenate([np.ones((B, 1), bool), cur[:, 1:] != cur[:, :-1]], 1)        # drop repeated (0, 0)
    b, i, j = np.unravel_index(cur[first], (B, nT, nS))
    counts, out = np.zeros((B, nS), np.int64), np.full((B, nS), -1, np.int64)
    np.add.at(counts, (b, j), 1)
    single = counts[b, j] == 1
    out[b[single], j[single]] = i[single]
    return out
