"""Shared loss kernels: the numerics several methods use, kept out of the method files.

Methods import these (``methods -> ctdbench.kernels``); a method never imports another method,
so a method file holds its paper's equations and the kernels here hold the speed.

- Token cross-entropy and its targets: :func:`token_cross_entropy`, :func:`shifted_targets`,
  :func:`logprob_cross_entropy`, and :func:`target_rows` (the rows predicting a training target).
- :func:`ce_kl` (:class:`FusedCEKL`): cross-entropy and KL to soft targets of one logit matrix in
  one pass over cache-sized row blocks, the gradient written during the forward (KD, DSKD, MinED).
- CPU sort kernels of the sorted L1 distance (ULD): :func:`descending_order`,
  :func:`split_sorted`, :func:`sorted_l1`, :func:`sorted_l1_to_split`, :func:`teacher_split`.
  The sort runs in numpy (exact, ~10x faster than ``torch.sort`` on CPU): the order and sorted
  values come from one int64 sort of packed value/column keys; the larger vocabulary is only
  partitioned to its top min(Vs, Vt) entries plus the summed rest, which is all that zero padding
  compares; the forward scatters the gradient's signs to their columns and keeps them as int8,
  1 byte per entry (:class:`_SortedL1`, a hand-written backward); rows are sorted in blocks of
  ~4 MB spread over torch's threads (numpy's sorts release the GIL).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over real target tokens: their mean (or ``reduction="sum"``).

    Args:
        logits: [B, L, V]; position t predicts ``input_ids[:, t + 1]``.
        input_ids: [B, L].
        mask: [B, L] loss mask; a target counts where it is 1.
    """
    # The flat, contiguous logits with shifted targets: slicing logits[:, :-1] instead costs a
    # copy forward and a zero-filled full-size gradient plus a copy backward.
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted_targets(input_ids, mask), ignore_index=-100,
                           reduction=reduction)


def shifted_targets(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B * L] next-token target of every position (-100 where there is none), for flat [B * L, V] logits."""
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.cat([targets, targets.new_full((len(targets), 1), -100)], 1).view(-1)


def logprob_cross_entropy(logp: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`token_cross_entropy` from precomputed log-probabilities [B, L, V] (shares the softmax)."""
    nll = -logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].to(nll.dtype)
    return (nll * valid).sum() / valid.sum().clamp(min=1)


def target_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits rows that predict a training target, left-aligned per example.

    For methods that compare the two sides position by position (ULD, MultiLevelOT): the k-th
    target of the student meets the k-th target of the teacher, as the official code compares
    the answer tokens. With every token a target this is just ``0 .. n - 1``.

    Args:
        mask: [B, L] loss mask; row t predicts token t + 1.

    Returns:
        ``rows`` [B, K] (-1 = none) and ``counts`` [B].
    """
    targets = mask[:, 1:].bool()
    counts = targets.sum(1)
    rows = torch.full((mask.shape[0], int(counts.max()) if len(counts) else 0), -1, dtype=torch.long,
                      device=mask.device)
    b, t = targets.nonzero(as_tuple=True)
    rows[b, targets.long().cumsum(1)[b, t] - 1] = t
    return rows, counts


# Fused cross-entropy and KL --------------------------------------------------------------------

FUSED_BLOCK = 1 << 18  # elements of one row block (1 MB in fp32): a block's temporaries stay in cache
# Finite stand-in for log 0: ids a top-k teacher cache does not store have p = 0 and log p = -inf,
# and must add p * (log p - log q) = 0 to the KL, not 0 * -inf = NaN.
LOG_ZERO = -1e30


class FusedCEKL(torch.autograd.Function):
    """``ce_weight * sum_i CE_i + kl_weight * sum_i KL_i`` of one logit matrix, its gradient made in the forward.

    CE_i = CE(z_i, y_i), KL_i = m_i KL(softmax(u_i / T) || softmax(z_i / T)). The loss is linear
    in the two sums, so its gradient, w_ce (softmax(z) - onehot(y)) + (w_kl m / T) (softmax(z / T)
    - softmax(u / T)), is known once the forward has its softmaxes: it is written block by block
    into one [N, V] buffer (the tensor autograd would allocate in the backward anyway) and the
    backward only scales it. Three softmaxes per element in all (the log-normalisers come from
    them: log sum exp x = x_max - log softmax(x)_max) instead of seven passes of exponentials over
    full [N, V] temporaries; everything except the gradient lives one cache-sized row block at a
    time.
    """

    @staticmethod
    def forward(ctx, z, targets, target_fn, temperature, ce_weight, kl_weight, kl_mask):
        grad = torch.empty_like(z) if ctx.needs_input_grad[0] else None
        ce_sum, kl_sum = (z.new_zeros((), dtype=torch.float) for _ in range(2))
        for r0, r1, zc in _row_blocks(z):
            # The gradient block is composed in place (fp32; copied if the logits are not).
            out = None if grad is None else grad[r0:r1] if grad.dtype == torch.float32 else torch.empty_like(zc)
            filled, z_max = False, zc.amax(-1)
            if targets is not None:
                y = targets[r0:r1]
                valid, y = y >= 0, y.clamp(min=0)[:, None]
                q = zc.softmax(-1)
                ce_sum += ((_logsumexp(z_max, q) - zc.gather(-1, y).squeeze(-1)) * valid).sum()
                if out is not None:  # w_ce (softmax(z) - onehot(y))
                    w = (ce_weight * valid)[:, None].float()
                    torch.mul(q, w, out=out).scatter_add_(-1, y, -w)
                    filled = True
            u = target_fn(r0, r1) if target_fn is not None else None
            if u is not None:
                zs, us = zc / temperature, u.float() / temperature
                # softmax, not exp(log_softmax): torch.exp takes a ~15x slower path on inputs below
                # -87 (underflow), which MinED's -1e5 one-hot targets fill almost entirely.
                qs, p = zs.softmax(-1), us.softmax(-1)
                # sum_v p (log p - log q) with sum_v p = 1; clamp: ids a top-k cache does not store
                # have u = -inf and p = 0, and must add 0, not 0 * -inf = NaN.
                kl = (torch.linalg.vecdot(p, (us - zs).clamp_(min=LOG_ZERO))
                      - _logsumexp(us.amax(-1), p) + _logsumexp(z_max / temperature, qs))
                m = kl_mask[r0:r1] if kl_mask is not None else torch.ones_like(kl)
                kl_sum += kl @ m
                if out is not None:  # (w_kl m / T) (softmax(z / T) - softmax(u / T))
                    w = (kl_weight / temperature * m)[:, None].float()
                    d = qs.sub_(p)
                    out.addcmul_(d, w) if filled else torch.mul(d, w, out=out)
                    filled = True
            if out is not None:
                if not filled:
                    out.zero_()
                if out.dtype != grad.dtype:
                    grad[r0:r1] = out
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return ce_weight * ce_sum + kl_weight * kl_sum, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kl):
        (grad,) = ctx.saved_tensors
        g = g_loss.to(grad.dtype)
        # Usually the loss is backpropagated as is: skip a pass over [N, V] (the check needs no
        # device sync on CPU, where the pass matters most).
        unit = grad.device.type == "cpu" and g.item() == 1.0
        return grad if unit else grad * g, None, None, None, None, None, None


def _logsumexp(x_max: torch.Tensor, softmax_x: torch.Tensor) -> torch.Tensor:
    """log sum exp of the rows of x from their maxima and their softmax, without exponentials.

    softmax is monotone, so its largest entry sits where x is largest: exp(x_max - lse) = p_max.
    (``amax``, not ``max``: the latter also finds the index and is ~7x slower on CPU.)
    """
    return x_max - softmax_x.amax(-1).log()


def row_blocks(n: int, width: int, elements: int | None = None) -> list[slice]:
    """Slices of ``n`` rows of ``width`` entries, about ``elements`` (default :data:`FUSED_BLOCK`)
    entries each, at least one row: the unit of kernels that never build a whole [n, width] tensor."""
    step = max(1, (elements or FUSED_BLOCK) // max(1, width))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _row_blocks(z: torch.Tensor):
    for sl in row_blocks(len(z), z.shape[-1]):
        yield sl.start, sl.stop, z[sl].float()


def ce_kl(z: torch.Tensor, targets: torch.Tensor | None = None, target_fn=None, temperature: float = 1.0,
          ce_weight: float | torch.Tensor = 1.0, kl_weight: float | torch.Tensor = 1.0,
          kl_mask: torch.Tensor | None = None):
    """Weighted sums of the row-wise cross-entropy and KL to soft targets of logits ``z``.

    Args:
        z: [N, V] logits (e.g. a flat view of [B, L, V]: no copy is made).
        targets: [N] next-token ids (-100: no CE), or None for no CE.
        target_fn: ``(r0, r1) -> u``, the target logits of rows r0:r1 ([r1 - r0, V], no gradient;
            None: no KL in this block), or None for no KL at all. Called once per block.
        temperature: T of both softmaxes in the KL.
        ce_weight / kl_weight: scalar weights of the two sums in the loss.
        kl_mask: [N] 0/1 weights of the KL rows (rows without a soft target), or None.

    Returns:
        (loss, ce, kl): ``loss = ce_weight * ce + kl_weight * kl``, differentiable to ``z`` only;
        ``ce`` = sum of CE over rows with a target and ``kl`` = masked sum of KL (fp32, detached).
    """
    return FusedCEKL.apply(z, targets, target_fn, temperature, ce_weight, kl_weight, kl_mask)


# CPU sort kernels of the sorted L1 distance ---------------------------------------------------

SORT_BLOCK = 1 << 20  # elements per row block (4 MB of fp32), the unit of work of a thread
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _sort_blocks(n: int, width: int, itemsize: int = 4) -> list[slice]:
    return row_blocks(n, width, SORT_BLOCK * 4 // itemsize)


def _map(fn, items: list) -> list:
    """``fn`` over items on torch's thread count (numpy's sorts release the GIL)."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    return list(_POOLS.setdefault(workers, ThreadPoolExecutor(workers)).map(fn, items))


def _split_values(a: np.ndarray, k: int) -> np.ndarray:
    """[n, k + 1]: the k largest values of each row in descending order, then the sum of the rest."""
    V = a.shape[1]
    a = np.partition(a, V - k, axis=-1) if k < V else a.copy()
    a[:, V - k:].sort(axis=-1)  # in place, on the strided view (a copy to sort contiguously costs more)
    out = np.empty((len(a), k + 1), dtype=a.dtype)
    out[:, :k] = a[:, V - k:][:, ::-1]
    out[:, k] = a[:, : V - k].sum(-1)
    return out


# An int64 sort key as two int32 halves: the high one orders (the complemented value bits), the
# low one is the column, so one ascending sort gives order, columns and values.
_HIGH, _LOW = (slice(1, None, 2), slice(0, None, 2)) if sys.byteorder == "little" else (slice(0, None, 2), slice(1, None, 2))


def _sort_keys(a: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``a`` [n, V] (non-negative float32), the k largest entries first, descending, then
    the others: as int32 halves [n, 2V] of sort keys, ``[:, _HIGH]`` the complemented value bits and
    ``[:, _LOW]`` the column."""
    # Non-negative float32 values order like their int32 bit patterns, so their complements order
    # them descending (numpy's argsort is not vectorised; its int64 sort is).
    n, V = a.shape
    keys = np.empty((n, V), dtype=np.int64)
    halves = keys.view(np.int32)
    np.invert(a.view(np.int32), out=halves[:, _HIGH])
    halves[:, _LOW] = np.arange(V, dtype=np.int32)
    if k < V:
        keys = np.partition(keys, k, axis=-1)
        keys[:, :k].sort(axis=-1)
    else:
        keys.sort(axis=-1)
    return keys.view(np.int32)


def _order(a: np.ndarray, k: int, columns: np.ndarray, values: np.ndarray) -> None:
    """Writes, per row of ``a`` [n, V], the k largest entries' columns in descending order of value,
    then the other columns, to ``columns`` [n, V] int64, and the entries in that order to ``values``."""
    halves = _sort_keys(a, k)
    np.invert(halves[:, _HIGH], out=values.view(np.int32))
    np.copyto(columns, halves[:, _LOW])


def _sorted_l1_rows(a: np.ndarray, top: np.ndarray, rest: np.ndarray, slope: np.ndarray) -> tuple:
    """:class:`_SortedL1` of rows ``a`` [n, V] (float32): their distances [n] and the signs [n, k] of
    their k largest entries minus ``top``; writes d distance / d a, in a's columns, into ``slope``."""
    k = top.shape[1]
    halves = _sort_keys(a, k)
    ordered = np.invert(halves[:, _HIGH]).view(np.float32)
    diff = ordered[:, :k] - top
    dist = np.abs(diff).sum(-1) + ordered[:, k:].sum(-1) + rest
    signs = np.sign(diff).astype(np.int8)
    slope.fill(1)  # the columns outside the k largest add their mass
    torch.from_numpy(slope).scatter_(-1, torch.from_numpy(halves[:, _LOW][:, :k]).long(), torch.from_numpy(signs))
    return dist, signs


def descending_order(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a non-negative matrix [N, V] in an order with its k largest entries first,
    descending (the other V - k in any order): the columns [N, V] and the values in that order
    (found without autograd)."""
    x = p.detach()
    N, V = x.shape
    if x.device.type != "cpu" or x.dtype != torch.float32 or N == 0:  # GPU; float64 (tests): a stable sort
        columns = x.sort(dim=-1, descending=True, stable=True).indices
        return columns, x.gather(-1, columns)
    x = x.contiguous().numpy()
    columns, values = np.empty((N, V), dtype=np.int64), np.empty((N, V), dtype=np.float32)
    _map(lambda sl: _order(x[sl], k, columns[sl], values[sl]), _sort_blocks(N, V, 8))
    return torch.from_numpy(columns), torch.from_numpy(values)


def split_sorted(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of a non-negative matrix, descending, and the sum of the rest.

    Differentiable: values are gathered from ``p`` at indices found without autograd.

    Args:
        p: [N, V] non-negative (probabilities, or probabilities times a positive scalar).
        k: how many entries to keep, 1 <= k <= V.

    Returns:
        top [N, k] with ``top[:, 0] >= top[:, 1] >= ...``, and rest [N], the sum of the other V - k.
    """
    N, V = p.shape
    if not p.requires_grad and p.device.type == "cpu" and N > 0:
        x = p.contiguous().numpy()
        out = torch.from_numpy(np.concatenate(_map(lambda sl: _split_values(x[sl], k), _sort_blocks(N, V, 8))))
        return out[:, :k], out[:, k]
    ordered = p.gather(-1, descending_order(p, k)[0])
    return ordered[:, :k], ordered[:, k:].sum(-1)


def _sorted_l1_forward(rows_of_p, N: int, V: int, top: torch.Tensor, rest: torch.Tensor, numpy_sort: bool):
    """The distances [N] of :class:`_SortedL1`, and what its backward needs: d distance / d p in p's
    own columns as int8 [N, V] (the sign of the difference at the k largest entries, 1 at the
    others) and the signs [N, k] in rank order. ``rows_of_p(sl)`` gives the rows ``sl`` of p [n, V];
    with ``numpy_sort`` (CPU float32) block by block on torch's threads, else in one torch sort."""
    k = top.shape[1]
    if numpy_sort and N > 0:
        t, r = top.float().contiguous().numpy(), rest.float().contiguous().numpy()
        slope, signs, dist = np.empty((N, V), np.int8), np.empty((N, k), np.int8), np.empty(N, np.float32)

        @torch.no_grad()  # grad mode is per thread: a worker's would be on
        def block(sl):
            dist[sl], signs[sl] = _sorted_l1_rows(rows_of_p(sl).contiguous().numpy(), t[sl], r[sl], slope[sl])
        _map(block, _sort_blocks(N, V, 8))
        return torch.from_numpy(dist), torch.from_numpy(slope), torch.from_numpy(signs)
    p = rows_of_p(slice(0, N))
    columns = p.sort(dim=-1, descending=True, stable=True).indices
    ordered = p.gather(-1, columns)
    diff = ordered[:, :k] - top
    signs = diff.sign().to(torch.int8)
    slope = torch.ones_like(p, dtype=torch.int8).scatter_(-1, columns[:, :k], signs)
    return diff.abs().sum(-1) + ordered[:, k:].sum(-1) + rest, slope, signs


class _SortedL1(torch.autograd.Function):
    """Per row: sum_{j < k} |p_(j) - top_j| + (the rest of p) + rest, with top [N, k], rest [N] and
    p_(j) the j-th largest entry of the row of p.

    The gradient with respect to p is saved as int8 [N, V] (:func:`_sorted_l1_forward`), 1 byte per
    entry where the order (int64) and the slopes (fp32) would take 12: the backward is one multiply.
    """

    @staticmethod
    def forward(ctx, p, top, rest):
        numpy_sort = p.device.type == "cpu" and p.dtype == torch.float32
        dist, slope, signs = _sorted_l1_forward(lambda sl: p[sl], *p.shape, top, rest, numpy_sort)
        ctx.save_for_backward(slope, signs)
        return dist

    @staticmethod
    def backward(ctx, g):
        slope, signs = ctx.saved_tensors
        g = g[:, None]
        return (slope * g if ctx.needs_input_grad[0] else None,
                -signs * g if ctx.needs_input_grad[1] else None, g[:, 0] if ctx.needs_input_grad[2] else None)


class _LogitsSortedL1(torch.autograd.Function):
    """:class:`_SortedL1` of p = softmax(z[rows] / T) * scale[:, None], differentiable in z and scale.

    The probabilities are built block by block of rows in the forward and again in the backward,
    so no [N, V] tensor is kept but the int8 slopes: autograd through ``index_select``, the
    softmax and the scaling kept p and built ~4 more in the backward (0.5 GB each at V = 248k and
    512 rows). The only vocabulary-sized tensor of the backward is z's gradient.
    """

    @staticmethod
    def forward(ctx, z, rows, temperature, top, rest, scale):
        def rows_of_p(sl):
            p = rows_probs(z, rows[sl], temperature)
            return p if scale is None else p.mul_(scale[sl, None])
        numpy_sort = z.device.type == "cpu" and z.dtype != torch.float64
        dist, slope, signs = _sorted_l1_forward(rows_of_p, len(rows), z.shape[1], top, rest, numpy_sort)
        ctx.save_for_backward(z, rows, scale, slope, signs)
        ctx.temperature = temperature
        return dist

    @staticmethod
    def backward(ctx, g):
        z, rows, scale, slope, signs = ctx.saved_tensors
        grad_z = torch.zeros_like(z)
        grad_scale = None if scale is None else torch.empty_like(scale)
        for sl in _sort_blocks(len(rows), z.shape[1]):
            q = rows_probs(z, rows[sl], ctx.temperature)
            dp = slope[sl] * g[sl, None].to(q.dtype)  # d distance / d p
            qdp = torch.linalg.vecdot(dp, q)
            if scale is not None:  # p = q * scale
                grad_scale[sl] = qdp
                dp.mul_(scale[sl, None])
                qdp = qdp * scale[sl]
            # softmax: d z = q * (dq - sum(dq * q)) / T
            grad_z.index_add_(0, rows[sl], dp.sub_(qdp[:, None]).mul_(q).div_(ctx.temperature).to(z.dtype))
        return (grad_z, None, None, -signs * g[:, None] if ctx.needs_input_grad[3] else None,
                g if ctx.needs_input_grad[4] else None, grad_scale)


def sorted_l1(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """L1 distance between two probability vectors sorted in descending order, per row.

    The smaller vocabulary is zero-padded to the larger one, so the larger side's entries beyond
    rank min(Vs, Vt) simply add their mass.

    Args:
        p_student: [N, Vs] non-negative rows.
        p_teacher: [N, Vt] non-negative rows.

    Returns:
        [N] distances (differentiable with respect to both inputs).
    """
    k = min(p_student.shape[-1], p_teacher.shape[-1])
    return sorted_l1_to_split(p_student, *split_sorted(p_teacher, k))


def sorted_l1_to_split(p: torch.Tensor, top: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """:func:`sorted_l1` of ``p`` [N, V] against a distribution given by :func:`split_sorted` (its
    k <= V largest entries, descending, and the sum of the rest)."""
    return _SortedL1.apply(p, top, rest)


def sorted_l1_of_logits(z: torch.Tensor, rows: torch.Tensor, temperature: float, top: torch.Tensor,
                        rest: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sorted_l1_to_split` of p = softmax(z[rows] / T), each row times ``scale`` if given,
    without keeping p (:class:`_LogitsSortedL1`).

    Args:
        z: [R, V] logits; rows: [N] row indices; top [N, k], rest [N]: the other side's split.
        scale: [N] positive factors of the rows (differentiable), or None.
    """
    return _LogitsSortedL1.apply(z, rows, temperature, top, rest, scale)


def scaled_rows(z: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """z[rows] / T in fp32 [N, V]."""
    z = z.index_select(0, rows).float()  # not z[rows]: advanced indexing is ~3x slower on CPU
    return z if temperature == 1.0 else z / temperature


def rows_probs(z, rows, temperature: float) -> torch.Tensor:
    """softmax(z[rows] / T) [N, V]."""
    return scaled_rows(z, rows, temperature).softmax(-1)


@torch.no_grad()
def teacher_split(z, rows, temperature: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_sorted` of the teacher's :func:`rows_probs`, built and sorted block by block
    (on torch's threads).

    Args:
        z: [R, V] teacher logits; rows: [N] row indices.
    """
    if z.device.type != "cpu":
        return split_sorted(rows_probs(z, rows, temperature), k)

    def block(sl):
        return _split_values(rows_probs(z, rows[sl], temperature).numpy(), k)
    parts = _map(block, _sort_blocks(len(rows), z.shape[1]))
    out = torch.from_numpy(np.concatenate(parts) if parts else np.zeros((0, k + 1), np.float32))
    return out[:, :k], out[:, k]
