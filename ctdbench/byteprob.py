"""Teacher next-token distributions -> next-byte distributions (the teacher side of BLD).

Notation: the text's bytes x; the teacher's tokens u_0..u_{M-1} with byte spans
[st_k, en_k); p_k = exp(row k of ``logprobs``) = p_T(. | u_<k). Byte a lies in token k at offset
o = a - st_k. R(q) is the set of vocabulary entries whose bytes start with the byte string q.

Mode ``a0`` (one teacher token: the prefix marginal of the token that contains the byte, with
ended tokens dropped, "Marginalize-It" of Marathe et al., arXiv 2609.12303), for q = x[st_k : a]:

    N_a(b) = sum_{v in R(q + b)} p_k(v)          P_a(b) = N_a(b) / sum_b' N_a(b')

The normaliser is the mass of the entries that start with q and are longer than q: an entry equal
to q (a token that would end exactly at a) is dropped and the rest renormalised. Duplicate byte
strings (a piece and its byte-fallback twin) are separate entries, so their masses add up.

Mode ``a1`` also counts covers whose last token starts at an earlier teacher boundary of the
same pretoken. With k0 the first token of the pretoken containing token k:

    N_a(b) = sum_{k'=k0..k} w(k') * sum_{v in R(x[st_k' : a] + b)} p_k'(v)
    w(k') = prod_{i=k0..k'-1} p_i(u_i)                                   (w(k0) = 1)

Each term is the joint probability of the cover "teacher tokens u_k0..u_{k'-1}, then one token
v that spans byte a", divided by the common factor P(u_<k0), so the sum is a prefix probability
and N_a / sum_b N_a is the next-byte conditional over these covers. (A weight written as
prod_{i=k'..k-1} p_i(u_i) would be the inverse of the correct ratio w(k') / w(k): a cover that
leaves the teacher's path earlier has skipped those tokens' probabilities, it is not charged them.)
The weights are products over the pretoken so far, which in a long whitespace-free run (CJK, code,
URLs) fall below float64's range (log w < -708). So they are taken relative to a reference per
output row, ref(a) = the largest log w(k') among the row's terms with positive mass: every term of
row a is multiplied by exp(-ref(a)), which the row's normalisation cancels; one term then has weight
1, so every row whose conditional is defined sums to 1, at any segment length.

Pretoken rule: token k starts a new pretoken when it is the first token, when it or its
predecessor carries no bytes (a special token), or when its first byte is one of
``PRETOKEN_BOUNDARY_BYTES`` (space, tab, newline, carriage return). This never splits a real
pretoken; it may join two (``"word" + "."``), which only adds covers of mass 0 when no vocabulary
entry spans both, as in byte-level BPE.

Special symbols: output column 256 + j holds p_k(special_ids[j]) at offset o = 0 only (the teacher's
probability that the special token comes next instead of the token starting at a) and is part of
the normaliser there, so a row at o = 0 is a distribution over the 256 bytes and the special
symbols. Other byte-less ids (unlisted specials, padding) are dropped and renormalised away.

Masking: a row whose normaliser is 0 (no entry with positive probability extends the prefix) is
all zeros, never NaN: ``out.sum(-1) > 0`` is the validity mask.

Algorithm. Once per vocabulary (``VocabByteIndex.build``): the entries with
bytes sorted lexicographically, so R(q) is a contiguous range [lo, hi) of that order; the byte
trie of all their prefixes, nodes numbered breadth-first so that the children of a node are a
contiguous run of node ids (CSR), each node with its range and its last byte; the ragged table
path[v][o] = node of the first o bytes of entry v (o = 0..len(v)). Per call, for a chunk of
teacher rows: P = exp(logprobs[rows][:, order]), C = cumsum(P) in float64 (masses are differences
of values near 1.0, which float32 would cancel), and every needed range mass is one difference
C[hi-1] - C[lo-1] (exact to ~1e-16 absolute: the conditional after a prefix of mass below
~1e-10 in its row is exact to ~1e-16 / mass relative only). Byte row a needs the children of node(a) = path[u_k][o] from row k (plus, in
a1, the children of the trie nodes reached by walking x[st_k' : a] from row k'). Cost per teacher
row: one gather, one exp and one float64 cumsum over V (memory-bound, about 3 passes over the
row), plus O(children) gathers per byte: up to 256 at o = 0, a handful deeper. a1 adds W walks per
pretoken (W = tokens per pretoken) advanced one trie level per step, vectorised over all walks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

PRETOKEN_BOUNDARY_BYTES = b" \t\n\r"
MODES = ("a0", "a1")


@dataclass(eq=False)
class VocabByteIndex:
    """Per-vocabulary tables of the sorted-vocabulary / prefix-range algorithm (module docstring).

    Vb is the number of ids with at least one byte, n the number of trie nodes (node 0 = the
    root, the empty prefix), L = sum over ids of (len(bytes) + 1).

    Attributes:
        vocab_size: V, the length of the byte table.
        order: [Vb] ids with bytes, sorted lexicographically by bytes (shorter first on ties).
        token_len: [V] byte length of every id (0 for None / special / padding).
        tok_off: [V] offset of id v's rows in ``path_node`` / ``tok_byte``.
        path_node: [L] at tok_off[v] + o: the node of the first o bytes of v, o = 0..len(v).
        tok_byte: [L] at tok_off[v] + o: byte o of v (0 past its end).
        node_lo, node_hi: [n] the range [lo, hi) of ``order`` whose entries start with the
            node's prefix.
        node_byte: [n] the last byte of the node's prefix (0 for the root).
        child_ptr: [n + 1] the children of node m are nodes child_ptr[m] .. child_ptr[m+1]-1.
        edge_key: [n] parent * 256 + last byte, strictly increasing (-1 for the root): the
            child of (m, b) is the node whose key is m * 256 + b, found by binary search.
        max_len: the longest entry in bytes.
    """

    vocab_size: int
    order: Tensor
    token_len: Tensor
    tok_off: Tensor
    path_node: Tensor
    tok_byte: Tensor
    node_lo: Tensor
    node_hi: Tensor
    node_byte: Tensor
    child_ptr: Tensor
    edge_key: Tensor
    max_len: int
    _devices: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, token_bytes: Sequence[bytes | None]) -> "VocabByteIndex":
        """Build the index (CPU, numpy; about a second for 128k entries).

        Args:
            token_bytes: the bytes of every id, None for ids without bytes (an empty byte
                string is treated the same way).
        """
        V = len(token_bytes)
        lengths = np.fromiter((len(b) if b else 0 for b in token_bytes), np.int64, V)
        order = np.array(sorted(np.flatnonzero(lengths).tolist(), key=token_bytes.__getitem__), np.int64)
        Vb = len(order)
        if Vb == 0:
            raise ValueError("the byte table has no entry with bytes")
        L = lengths[order]
        max_len = int(L.max())
        # Sorted entries as a zero-padded byte matrix; lcp[r] = common prefix length of rows r-1, r.
        mat = np.frombuffer(b"".join(token_bytes[i].ljust(max_len, b"\0") for i in order), np.uint8)
        mat = mat.reshape(Vb, max_len)
        neq = mat[1:] != mat[:-1]
        first_diff = np.where(neq.any(1), neq.argmax(1), max_len)
        lcp = np.concatenate([[0], np.minimum(first_diff, np.minimum(L[1:], L[:-1]))])

        # The depth-d nodes (prefixes of length d) start at the sorted rows r with lcp[r] < d <= L[r];
        # a node's range ends at the next row sharing fewer than d bytes with its predecessor.
        los, his, bytes_, parents = [np.zeros(1, np.int64)], [np.array([Vb])], [np.zeros(1, np.int64)], []
        base, prev_lo, prev_base = 1, np.zeros(1, np.int64), 0
        path_sorted = np.zeros((Vb, max_len + 1), np.int64)  # node of row r's first d bytes
        for d in range(1, max_len + 1):
            lo = np.flatnonzero((lcp < d) & (L >= d))
            breaks = np.append(np.flatnonzero(lcp < d), Vb)
            his.append(breaks[np.searchsorted(breaks, lo, side="right")])
            los.append(lo)
            bytes_.append(mat[lo, d - 1].astype(np.int64))
            parents.append(prev_base + np.searchsorted(prev_lo, lo, side="right") - 1)
            rows = np.flatnonzero(L >= d)
            path_sorted[rows, d] = base + np.searchsorted(lo, rows, side="right") - 1
            prev_lo, prev_base, base = lo, base, base + len(lo)
        node_lo, node_hi, node_byte = (np.concatenate(a) for a in (los, his, bytes_))
        parent = np.concatenate(parents)  # of nodes 1..n-1; nondecreasing (breadth-first order)
        n = len(node_lo)
        child_ptr = np.concatenate([[1], 1 + np.cumsum(np.bincount(parent, minlength=n))])
        edge_key = np.concatenate([[-1], parent * 256 + node_byte[1:]])

        # Ragged per-id tables in id order, len(v) + 1 rows per id.
        tok_off = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        tok_byte = np.frombuffer(b"".join((b or b"") + b"\0" for b in token_bytes), np.uint8).astype(np.int64)
        path_node = np.zeros(int(lengths.sum()) + V, np.int64)
        ragged = np.arange(max_len + 1) <= L[:, None]  # [Vb, max_len + 1]
        dest = tok_off[order][:, None] + np.arange(max_len + 1)
        path_node[dest[ragged]] = path_sorted[ragged]

        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.int64))
        return cls(V, t(order), t(lengths), t(tok_off), t(path_node), t(tok_byte), t(node_lo), t(node_hi),
                   t(node_byte), t(child_ptr), t(edge_key), max_len)

    def to(self, device: torch.device | str) -> "VocabByteIndex":
        """This index with its tables on ``device`` (cached per device)."""
        device = torch.device(device)
        if device == self.order.device:
            return self
        if device not in self._devices:
            tables = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
            self._devices[device] = VocabByteIndex(self.vocab_size, max_len=self.max_len, **tables)
        return self._devices[device]


@lru_cache(maxsize=4)
def _cached_index(token_bytes: tuple) -> VocabByteIndex:
    return VocabByteIndex.build(token_bytes)


def _resolve_index(token_bytes, index: VocabByteIndex | None) -> VocabByteIndex:
    if index is not None:
        return index
    if token_bytes is None:
        raise ValueError("pass token_bytes or a prebuilt index")
    return _cached_index(tuple(token_bytes))


@torch.no_grad()
def next_byte_distributions(
    logprobs: Tensor,
    token_ids: Tensor | Sequence[int],
    token_bytes: Sequence[bytes | None] | None,
    mode: str = "a0",
    *,
    special_ids: Sequence[int] = (),
    row_chunk: int | None = None,
    index: VocabByteIndex | None = None,
) -> Tensor:
    """The teacher's next-byte distribution at every byte of a tokenized text.

    Args:
        logprobs: [T, V] float (any float dtype, CPU or CUDA): row k holds the teacher's
            log-probabilities (log-softmax, temperature already applied) for the token at
            position k given the tokens before it; the caller does the causal shift.
        token_ids: [T] the teacher's tokenization of the text.
        token_bytes: the byte table (bytes per id, None for specials / padding); may be None
            when ``index`` is given. Without ``index`` the index is built once and cached per
            table content (hashing the table costs a few ms per call; pass ``index`` to skip it).
        mode: "a0" or "a1" (module docstring).
        special_ids: ids (with no bytes) modelled as the extra symbols 256, 257, ...
        row_chunk: teacher rows per chunk; the float64 cumulative sums use row_chunk x V x 8
            bytes. Default: 2^21 / V rows (24 MB of buffers, reusable by malloc
            across calls).
        index: ``VocabByteIndex.build(token_bytes)``, to share the precomputation.

    Returns:
        [n_bytes, 256 + len(special_ids)] with n_bytes the number of bytes of the concatenated
        tokens (special tokens contribute none); float32 (float64 for float64 input), on the
        device of ``logprobs``. Row i is the distribution of byte i given the bytes before it;
        rows with ``out.sum(-1) == 0`` are masked (no valid distribution), all others sum to 1.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [T, V], got shape {tuple(logprobs.shape)}")
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logprobs.device).reshape(-1)
    if len(ids) != logprobs.shape[0]:
        raise ValueError(f"{len(ids)} token ids for {logprobs.shape[0]} rows of logprobs")
    rows = torch.arange(len(ids), device=logprobs.device)
    return _convert(logprobs, rows, ids, None, _resolve_index(token_bytes, index), mode, special_ids, row_chunk)


@torch.no_grad()
def next_byte_distributions_batch(
    logprobs: Tensor,
    token_ids: Tensor,
    token_bytes: Sequence[bytes | None] | None,
    mode: str = "a0",
    *,
    lengths: Tensor | Sequence[int] | None = None,
    mask: Tensor | None = None,
    special_ids: Sequence[int] = (),
    row_chunk: int | None = None,
    index: VocabByteIndex | None = None,
    probs: bool = False,
) -> tuple[Tensor, Tensor]:
    """``next_byte_distributions`` for a padded batch, without copying the logprobs.

    Args:
        logprobs: [B, T, V] teacher log-probabilities (causally shifted as above).
        token_ids: [B, T] teacher token ids.
        token_bytes, mode, special_ids, row_chunk, index: as in ``next_byte_distributions``.
        lengths: [B] valid tokens per example (right padding), or
        mask: [B, T] bool, True at valid tokens; neither given: all tokens are valid. Rows of
            valid tokens that are not contiguous in memory are copied chunk by chunk: where
            speed matters, pass every row and give the invalid ones a byte-less id instead.
        probs: ``logprobs`` holds probabilities (a softmax) instead: saves the exponentials.

    Returns:
        (out, n_bytes): out [sum(n_bytes), 256 + len(special_ids)] is the concatenation of the
        examples' outputs; n_bytes [B] long holds each example's byte count. a1 walks never
        cross examples: every example's first valid token starts a pretoken.
    """
    if logprobs.dim() != 3 or token_ids.shape != logprobs.shape[:2]:
        raise ValueError(f"need logprobs [B, T, V] and token_ids [B, T], got {tuple(logprobs.shape)}, "
                         f"{tuple(token_ids.shape)}")
    B, T, V = logprobs.shape
    device = logprobs.device
    if lengths is not None and mask is not None:
        raise ValueError("pass lengths or mask, not both")
    if lengths is not None:
        mask = torch.arange(T, device=device) < torch.as_tensor(lengths, device=device).reshape(B, 1)
    elif mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
    rows = mask.to(device=device, dtype=torch.bool).reshape(-1).nonzero().squeeze(1)
    example = rows // T
    first = torch.ones_like(example, dtype=torch.bool)
    first[1:] = example[1:] != example[:-1]
    ix = _resolve_index(token_bytes, index)
    ids = token_ids.to(device).reshape(-1)[rows]
    out = _convert(logprobs.reshape(B * T, V), rows, ids, first, ix, mode, special_ids, row_chunk, probs)
    n_bytes = torch.zeros(B, dtype=torch.long, device=device)
    n_bytes.index_add_(0, example, ix.to(device).token_len[ids])
    return out, n_bytes


def text_rows(token_len: Tensor, span_len: Tensor) -> Tensor:
    """Which output rows are bytes of the text, for tokens whose spans may be shorter than their bytes.

    Each token gives ``token_len`` rows (its vocabulary bytes) but covers only ``span_len`` bytes
    of the text: a SentencePiece dummy-prefix space, at the start of the text or after a special
    token, is in the token and not in the text, so its row is dropped.

    Args:
        token_len / span_len: [N] per converted token, in output order.

    Returns:
        [sum(token_len)] bool.
    """
    tok = torch.repeat_interleave(torch.arange(len(token_len), device=token_len.device), token_len)
    within = torch.arange(len(tok), device=token_len.device) - (torch.cumsum(token_len, 0) - token_len)[tok]
    return within >= (token_len - span_len)[tok]


def _convert(lp: Tensor, rows: Tensor, ids: Tensor, first: Tensor | None, ix: VocabByteIndex, mode: str,
             special_ids: Sequence[int], row_chunk: int | None, is_probs: bool = False) -> Tensor:
    """Shared body. lp [*, V]; rows [M] the row of lp of each token; ids [M]; first [M] bool
    or None: tokens forced to start a pretoken (example starts in a batch); is_probs: lp holds
    probabilities, not log-probabilities."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if lp.shape[-1] != ix.vocab_size:
        raise ValueError(f"logprobs have {lp.shape[-1]} columns but the byte table has {ix.vocab_size} ids")
    device = lp.device
    ix = ix.to(device)
    specials = torch.as_tensor(list(special_ids), dtype=torch.long, device=device)
    if len(specials) and ((specials < 0) | (specials >= ix.vocab_size)).any():
        raise ValueError(f"special_ids {list(special_ids)} out of range for {ix.vocab_size} ids")
    if len(specials) and (ix.token_len[specials] > 0).any():
        raise ValueError(f"special_ids must be ids without bytes: {list(special_ids)}")
    if len(ids) and ((ids < 0) | (ids >= ix.vocab_size)).any():
        raise ValueError(f"token ids out of range for {ix.vocab_size} ids")
    n_sym = 256 + len(specials)
    dtype = torch.float64 if lp.dtype == torch.float64 else torch.float32  # of probabilities and output

    # Byte-level view of the text: token k(a), offset o(a), trie node(a) and byte x(a) of every byte a.
    M = len(ids)
    tok_len = ix.token_len[ids]
    n = int(tok_len.sum())
    if n == 0:
        return torch.zeros(0, n_sym, dtype=dtype, device=device)
    k_of = torch.repeat_interleave(torch.arange(M, device=device), tok_len, output_size=n)
    start = torch.cumsum(tok_len, 0) - tok_len
    o = torch.arange(n, device=device) - start[k_of]
    flat = ix.tok_off[ids][k_of] + o
    at_root = (o == 0).nonzero().squeeze(1)

    # Entries (byte a, row k, node) below the root: a0's bytes at offsets o > 0, and a1's walks.
    deep = (o > 0).nonzero().squeeze(1)
    e_a, e_k, e_node = deep, k_of[deep], ix.path_node[flat[deep]]
    log_w = None  # a1: log w(k) of every row k's terms (module docstring)
    if mode == "a1":
        pretoken = _pretoken_ids(ids, first, ix, tok_len)
        true = lp[rows, ids]
        log_w = _cover_log_weights(true.double().log() if is_probs else true, pretoken)
        walk = _walk_entries(ix, pretoken, tok_len, start, k_of, ids, ix.tok_byte[flat])
        if walk is not None:
            e_a, e_k, e_node = (torch.cat(pair) for pair in zip((e_a, e_k, e_node), walk))
            sort = torch.argsort(e_k, stable=True)
            e_a, e_k, e_node = e_a[sort], e_k[sort], e_node[sort]

    # One contribution per (entry, child of the entry's node): the child's mass in row k, to column
    # (a, child's byte). Entries are sorted by k, so a chunk of rows is a contiguous slice of them.
    Vb = len(ix.order)
    chunk = min(row_chunk or max(1, (1 << 21) // Vb), M)
    n_child = ix.child_ptr[e_node + 1] - ix.child_ptr[e_node]
    entry = torch.repeat_interleave(torch.arange(len(e_node), device=device), n_child)
    first_of_entry = torch.cumsum(n_child, 0) - n_child
    child = ix.child_ptr[e_node][entry] + torch.arange(len(entry), device=device) - first_of_entry[entry]
    c_k = e_k[entry]
    at = (c_k % chunk) * (Vb + 1)  # the row's offset in the flattened chunk of cumulative sums
    c_lo, c_hi = at + ix.node_lo[child], at + ix.node_hi[child]
    bounds = torch.searchsorted(c_k, torch.arange(0, M + chunk, chunk, device=device).clamp(max=M)).tolist()
    # The root's children (first bytes) partition the sorted order, identically for every row.
    root_kids = torch.arange(int(ix.child_ptr[0]), int(ix.child_ptr[1]), device=device)
    root_cuts = torch.cat([ix.node_lo[root_kids], ix.node_hi[root_kids[-1:]]])

    # Reused buffers: probabilities in sorted order, and their float64 cumulative sums C behind a
    # zero column, so that the mass of sorted range [lo, hi) is C[hi] - C[lo].
    probs = torch.empty(chunk, Vb, dtype=dtype, device=device)
    cum = torch.empty(chunk, Vb + 1, dtype=torch.float64, device=device)
    cum[:, 0] = 0
    root_mass = torch.empty(M, len(root_kids), dtype=torch.float64, device=device)
    mass = torch.empty(len(child), dtype=torch.float64, device=device)
    row_list = rows.tolist()
    for c0, (i0, i1) in zip(range(0, M, chunk), zip(bounds, bounds[1:])):
        r = row_list[c0:c0 + chunk]
        block = lp[r[0]:r[-1] + 1] if r[-1] - r[0] == len(r) - 1 else lp[rows[c0:c0 + chunk]]  # a view if contiguous
        p, c = probs[:len(r)], cum[:len(r)]
        if block.dtype == dtype:
            torch.index_select(block, 1, ix.order, out=p)
        else:
            p.copy_(block.index_select(1, ix.order))
        c[:, 1:].copy_(p if is_probs else p.exp_()).cumsum_(1)
        torch.diff(c.index_select(1, root_cuts), dim=1, out=root_mass[c0:c0 + chunk])
        c = c.view(-1)
        torch.sub(c[c_hi[i0:i1]], c[c_lo[i0:i1]], out=mass[i0:i1])
    # Clamp: a parallel (CUDA) scan need not be monotone.
    root_mass.clamp_(min=0)
    mass.clamp_(min=0)
    root = root_mass[k_of[at_root]]  # [bytes at o = 0, first bytes]
    if len(specials):
        # Specials only at the first byte of a token, from that token's own row.
        sp = lp[rows[k_of[at_root]][:, None], specials[None, :]].to(dtype)
        root = torch.cat([root, (sp if is_probs else sp.exp()).double()], 1)
    if log_w is not None:
        w_entry, w_root = _relative_weights(log_w, n, e_a, e_k, entry, mass, at_root, k_of[at_root], root)
        mass *= w_entry[entry]
        root *= w_root[:, None]
    num = torch.zeros(n, n_sym, dtype=torch.float64, device=device)
    root_cols = ix.node_byte[root_kids]
    if len(specials):
        root_cols = torch.cat([root_cols, torch.arange(256, n_sym, device=device)])
    num[at_root[:, None], root_cols[None, :]] = root
    num.view(-1).index_add_(0, e_a[entry] * n_sym + ix.node_byte[child], mass)
    # Masked rows are all zero and stay so: 0 / tiny = 0.
    return num.div_(num.sum(1, keepdim=True).clamp_(min=torch.finfo(torch.float64).tiny)).to(dtype)


def _pretoken_ids(ids, first, ix, tok_len):
    """[M] the pretoken of every token (module docstring: the pretoken rule)."""
    has_bytes = tok_len > 0
    first_byte = ix.tok_byte[ix.tok_off[ids]]
    boundary = torch.tensor(list(PRETOKEN_BOUNDARY_BYTES), device=ids.device)
    starts = ~has_bytes | torch.isin(first_byte, boundary)
    starts[1:] |= ~has_bytes[:-1]
    starts[0] = True
    if first is not None:
        starts |= first
    return torch.cumsum(starts.long(), 0) - 1


def _cover_log_weights(true_logprobs, pretoken):
    """[M] float64 log w(k) = sum of log p_i(u_i) over the tokens i of k's pretoken before k.

    A running float64 sum minus its value at the pretoken's first token. A token the teacher
    gives probability 0 (log p = -inf, e.g. outside a top-k cache) makes w = 0 for every later
    start of its pretoken: counted apart, so that -inf - -inf cannot make NaN.
    """
    lt = true_logprobs.double()
    zero = torch.isneginf(lt)
    lt = lt.masked_fill(zero, 0.0)
    first = torch.ones_like(pretoken, dtype=torch.bool)
    first[1:] = pretoken[1:] != pretoken[:-1]
    out = []
    for x in (lt, zero.double()):
        before = torch.cumsum(x, 0) - x  # sum over i < k
        out.append(before - before[first][pretoken])  # one value per pretoken, numbered 0, 1, ...
    log_w, zeros = out
    return log_w.masked_fill(zeros > 0, -torch.inf)


def _relative_weights(log_w, n, e_a, e_k, entry, mass, at_root, root_k, root):
    """a1's cover weights relative to a reference per output row: (per entry, per byte at o = 0).

    Absolute weights are products over the pretoken so far and underflow float64 in a long
    whitespace-free run (CJK, code, URLs: below log w = -708 every weight is 0). Every weight of a
    row is divided by the same factor exp(ref(a)), which the row's normalisation cancels, with
    ref(a) the largest log w(k') among the row's terms that carry mass. That term gets weight 1,
    so a row with any positive term has a positive sum; the others are at most 1, and a term
    small enough to underflow now is negligible beside it (masses come from float32
    probabilities, >= 1e-45, so a term that matters has a relative weight >= ~1e-45 too).

    Args:
        log_w: [M] log w(k) of every row (-inf: weight 0).
        n: number of output rows (bytes).
        e_a, e_k: [E] output row and teacher row of every entry below the root.
        entry, mass: [C] entry and unweighted mass of every child contribution.
        at_root, root_k: [R] output rows at offset 0 and their teacher rows.
        root: [R, S] their unweighted masses (first bytes and specials).
    """
    carries = torch.zeros(len(e_a), dtype=torch.float64, device=mass.device).index_add_(0, entry, mass) > 0
    rows_of = torch.cat([e_a, at_root])
    lw = torch.cat([log_w[e_k], log_w[root_k]])
    live = torch.cat([carries, root.sum(1) > 0]) & (lw > -torch.inf)
    ref = torch.full((n,), -torch.inf, dtype=torch.float64, device=mass.device)
    ref.scatter_reduce_(0, rows_of[live], lw[live], reduce="amax")
    ref = ref.masked_fill(torch.isneginf(ref), 0.0)  # rows without a live term: all zero anyway
    w = (lw - ref[rows_of]).exp()
    return w[: len(e_a)], w[len(e_a):]


def _walk_entries(ix, pretoken, tok_len, start, k_of, ids, x):
    """a1's extra entries (byte a, row k', node of x[st_k' : a]), or None.

    One walk per token k' that is followed by a token of the same pretoken: it starts at
    a = en_k' at the node of u_k''s full bytes, then steps one byte (one trie level) at a time
    until the trie has no such child, the pretoken ends or the text ends. All walks advance
    together, so the loop runs at most ``ix.max_len`` times.
    """
    device = ids.device
    M, n = len(ids), len(x)
    nxt = torch.arange(1, M + 1, device=device).clamp(max=M - 1)
    same_next = (pretoken[nxt] == pretoken) & (torch.arange(M, device=device) < M - 1)
    kp = ((tok_len > 0) & same_next).nonzero().squeeze(1)
    if len(kp) == 0:
        return None
    a = start[kp] + tok_len[kp]
    node = ix.path_node[ix.tok_off[ids[kp]] + tok_len[kp]]
    pre = pretoken[kp]
    out = []
    for _ in range(ix.max_len):
        out.append((a, kp, node))
        key = node * 256 + x[a]
        pos = torch.searchsorted(ix.edge_key, key).clamp(max=len(ix.edge_key) - 1)
        a_next = a + 1
        a_safe = a_next.clamp(max=n - 1)
        alive = ((ix.edge_key[pos] == key) & (a_next < n) & (pretoken[k_of[a_safe]] == pre)).nonzero().squeeze(1)
        if len(alive) == 0:
            break
        a, node, pre, kp = a_next[alive], pos[alive], pre[alive], kp[alive]
    return tuple(torch.cat(parts) for parts in zip(*out))
