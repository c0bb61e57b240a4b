"""MinED: KD to minimum-edit-distance-mapped teacher logits at aligned positions.

From FuseLLM (Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024, arXiv 2401.10491;
fanqiwan/FuseAI), as re-implemented by DSKD (songmzhang/DSKD @ 077337ac98,
``code/criterions/min_edit_dis_kld.py``, ``scripts/*/minedit_*.sh``: kd_rate 0.5, kd_temperature
2.0) and by tokenkit (bminixhofer/tokenkit @ bcacdef43f, ``baseline_utils.compute_mined_mapping``,
``losses.compute_baseline_mined_loss``).

Vocabulary map (tokenkit's direction, computed once per tokenizer pair, :func:`mined_map`):
    map(s) = argmin over teacher strings t of (Levenshtein(bytes(s), t), id(t))
i.e. the exact byte match if there is one, else the nearest teacher token (ties: smallest id);
-1 for special student ids (their target logit is -1e5, as DSKD's unmapped ids). id(t) is the
teacher id spelling t: a normal piece before a byte-fallback ``<0xNN>`` piece with the same byte
(Llama-2, Mistral, Gemma hold many single bytes twice; the teacher never predicts the fallback
twin of a byte it has a piece for, and tokenkit's byteified vocabulary gives the normal piece
precedence), else the smallest id.

Alignment (positions i of the student and j of the teacher, HF convention: logits at i predict
token i + 1). Default ``chunks`` (tokenkit): student token i is aligned with teacher token j when
the two form a 1:1 chunk of ``ctdbench.align`` (same bytes, same end offset, so both next-token
distributions condition on the same text). Option ``dtw`` (DSKD/FuseLLM): DTW over the token
strings with cost editdistance(strings without spaces), i aligned with j when the path maps i to
exactly one j and map(x_i) = x_j. Both sides' BOS (position 0) are aligned: the same empty prefix.

    target_i = teacher_logits_j[map]  (-1e5 where map = -1)   at aligned i
             = +100 on y_i, -1e5 elsewhere (one-hot)          elsewhere
    KD = (1/N) sum_i KL(softmax(target_i / T) || softmax(z_i / T))    (= -log q_T(y_i) when one-hot)
    L  = (1 - kd_rate) CE + kd_rate KD,   kd_rate 0.5, T 2.0, no T^2 factor

The map is cached: ``map_path`` (may contain ``{key}``, a digest of both byte tables) is loaded
if present, else computed and saved there. The workflow builds it once per pair ahead of the runs
(:meth:`MinED.precompute`, rule ``precompute``) and passes its path as ``map_path``.

Deviations (each with the reason):
    - Edit distances on exact token bytes (tokenkit: byteified strings, the same thing); DSKD
      compares token strings with the space marker deleted. Reason: bytes are what both share.
    - Map direction student -> teacher (tokenkit's); DSKD reverses a teacher -> student map.
      Reason: every student id gets a target. Ties go to the smallest teacher id (upstream: the
      first found in its scan order), so the map does not depend on how the search is pruned;
      the search itself is exact (lower-bound pruning instead of tokenkit's length pruning).
    - BOS <-> BOS is aligned in both modes (tokenkit aligns special tokens both sides have; DSKD
      aligns response tokens only). Reason: our position 0 predicts the first real token.
    - DTW option: the DP is vectorised (row scans with a running minimum, the path by pointer
      doubling; ties as upstream: diagonal, up, left) and costs are memoised per id pair,
      instead of a Python double loop per example; the 1:1 check is map(x_i) = x_j.
    - The sums are divided by the micro-batch's target count, not the global batch's under
      gradient accumulation (identical for grad_accum = 1, the default). The targets are the
      loss mask's tokens (all real tokens of plain text, the assistant turns of chat data), as
      upstream's label -100 masks the prompt.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import editdistance
import numpy as np
import torch

from ctdbench.align import dtw_paths, span_chunks
from ctdbench.kernels import ce_kl, shifted_targets
from methods import register
from methods.base import DistillationMethod, under_results


def mined_map(teacher_token_bytes: list[bytes | None], student_token_bytes: list[bytes | None],
              return_distance: bool = False):
    """For every student id the teacher id of minimum edit distance (module docstring).

    Exact matches come from a dict. For the rest, a vectorised lower bound (bytes of s missing
    from t, plus t's excess length) orders the teacher strings; candidates are checked level by
    level with ``editdistance`` until the bound exceeds the best distance found.

    Returns:
        [Vs] int64 teacher ids (-1 for special student ids), and [Vs] distances if asked.
    """
    # One id per teacher string: a normal piece before its byte-fallback twin (the teacher never
    # predicts the twin), else the smallest id, with which any other duplicate could only tie.
    fallback = byte_fallback_ids(teacher_token_bytes)
    first: dict[bytes, int] = {}
    for i, b in enumerate(teacher_token_bytes):
        if b is not None and (b not in first or first[b] in fallback and i not in fallback):
            first[b] = i
    out, dist = (np.full(len(student_token_bytes), -1, np.int64) for _ in range(2))
    strings, ids = list(first), np.fromiter(first.values(), np.int64, len(first))
    lens = np.array([len(s) for s in strings], np.int32)
    hist = np.zeros((256, len(strings)), np.int16)  # byte counts, byte-major for fast row gathers
    np.add.at(hist, (np.frombuffer(b"".join(strings), np.uint8), np.repeat(np.arange(len(strings)), lens)), 1)
    for j, s in enumerate(student_token_bytes):
        if s is None or not strings:
            continue
        if s in first:
            out[j], dist[j] = first[s], 0
            continue
        byte, count = np.unique(np.frombuffer(s, np.uint8), return_counts=True)
        # int16 / int32, not int64: the bound sweeps the whole teacher vocabulary per student
        # piece, and a third of the memory traffic makes the 100k x 151k map 2-3x faster.
        bound = np.maximum(count.astype(np.int16)[:, None] - hist[byte], 0).sum(0, dtype=np.int32)
        bound += np.maximum(lens - len(s), 0)
        best, best_id, level = np.inf, -1, int(bound.min())
        while level <= best:
            for k in np.flatnonzero(bound == level).tolist():
                d = editdistance.eval(s, strings[k])
                if d < best or (d == best and ids[k] < best_id):
                    best, best_id = d, int(ids[k])
            level += 1
        out[j], dist[j] = best_id, best
    return (out, dist) if return_distance else out


def byte_fallback_ids(token_bytes: list[bytes | None]) -> range:
    """The ids of SentencePiece's byte-fallback pieces ``<0x00>`` .. ``<0xFF>`` (empty if none).

    SentencePiece stores them as 256 consecutive ids spelling the bytes 0 .. 255 in order
    (Llama-2 and Mistral at ids 3 .. 258, Gemma at 217 .. 472, our ``sentencepiece_bpe`` at
    2 .. 257); a byte-level BPE vocabulary orders its single bytes differently.
    """
    zero = [i for i, b in enumerate(token_bytes[: len(token_bytes) - 255]) if b == b"\0"]
    for i in zero:
        if all(token_bytes[i + k] == bytes([k]) for k in range(256)):
            return range(i, i + 256)
    return range(0)


def pair_key(teacher_token_bytes, student_token_bytes) -> str:
    """16-hex digest of both byte tables: names and validates a cached map."""
    h = hashlib.sha256()
    for table in (teacher_token_bytes, student_token_bytes):
        h.update(len(table).to_bytes(8, "little"))
        for b in table:
            h.update((-1).to_bytes(8, "little", signed=True) if b is None else len(b).to_bytes(8, "little") + b)
    return h.hexdigest()[:16]


def load_or_build_map(map_path: str | None, teacher_token_bytes, student_token_bytes) -> tuple[np.ndarray, Path | None]:
    """The cached map at ``map_path`` (``{key}`` filled in), else computed (and saved there)."""
    if map_path is None:
        return mined_map(teacher_token_bytes, student_token_bytes), None
    key = pair_key(teacher_token_bytes, student_token_bytes)
    path = Path(map_path.format(key=key))
    if path.exists():
        with np.load(path) as f:
            if str(f["key"]) != key:
                raise ValueError(f"{path} holds the MinED map of another tokenizer pair (key {f['key']}, this pair "
                                 f"{key}); put '{{key}}' in map_path or point it to a per-pair file")
            return f["map"], path
    vocab_map = mined_map(teacher_token_bytes, student_token_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:  # a file object keeps the exact name (np.savez would append .npz)
        np.savez(fh, map=vocab_map, key=np.array(key))
    os.replace(tmp, path)  # atomic: parallel runs of one pair never read a half-written map
    return vocab_map, path


def chunk_positions(examples) -> torch.Tensor:
    """[B, Ls] teacher position aligned with each student position by a 1:1 chunk (-1 = none)."""
    out = np.full((len(examples), max(len(e.student.ids) for e in examples)), -1, np.int64)
    for b, ex in enumerate(examples):
        c = span_chunks(ex.teacher, ex.student)
        one = (c[:, 1] - c[:, 0] == 1) & (c[:, 3] - c[:, 2] == 1)
        out[b, c[one, 2]] = c[one, 0]
        out[b, 0] = 0  # BOS <-> BOS
    return torch.from_numpy(out)


class _DTWAligner:
    """Student -> teacher positions by DTW; pairwise costs memoised across batches by id pair."""

    def __init__(self, teacher_token_bytes, student_token_bytes, vocab_map: np.ndarray):
        strip = lambda table: [b"" if b is None else b.replace(b" ", b"") for b in table]  # noqa: E731
        self.t, self.s, self.vs, self.map = strip(teacher_token_bytes), strip(student_token_bytes), len(student_token_bytes), vocab_map
        self.keys, self.vals = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def costs(self, keys: np.ndarray) -> np.ndarray:
        uniq, inv = np.unique(keys, return_inverse=True)
        at = np.searchsorted(self.keys, uniq).clip(max=max(len(self.keys) - 1, 0))
        known = (self.keys[at] == uniq) if len(self.keys) else np.zeros(len(uniq), bool)
        new = uniq[~known]
        new_vals = np.array([editdistance.eval(self.t[k // self.vs], self.s[k % self.vs]) for k in new.tolist()], np.int64)
        at = np.searchsorted(self.keys, new)  # both sorted: an O(n) merge keeps the memo sorted
        self.keys, self.vals = np.insert(self.keys, at, new), np.insert(self.vals, at, new_vals)
        return self.vals[np.searchsorted(self.keys, uniq)][inv].reshape(keys.shape)

    def __call__(self, examples) -> torch.Tensor:
        # Positions that predict a real token: all but the last of each side.
        n_t = np.array([len(e.teacher.ids) - 1 for e in examples])
        n_s = np.array([len(e.student.ids) - 1 for e in examples])
        tid = np.zeros((len(examples), n_t.max()), np.int64)
        sid = np.zeros((len(examples), n_s.max()), np.int64)
        for b, e in enumerate(examples):
            tid[b, : n_t[b]], sid[b, : n_s[b]] = e.teacher.ids[:-1], e.student.ids[:-1]
        pos = dtw_paths(self.costs(tid[:, :, None] * self.vs + sid[:, None, :]), n_t, n_s)
        b, j = np.nonzero(pos >= 0)
        keep = self.map[sid[b, j]] == tid[b, pos[b, j]]  # upstream: the 1:1 pair must map onto each other
        pos[b[~keep], j[~keep]] = -1
        out = np.full((len(examples), n_s.max() + 1), -1, np.int64)
        out[:, :-1], out[:, 0] = pos, 0  # BOS <-> BOS
        return torch.from_numpy(out)


def mined_loss(student_logits, input_ids, mask, teacher_logits, teacher_pos, vocab_map, *,
               kd_rate: float = 0.5, temperature: float = 2.0):
    """(loss, CE, KD, aligned fraction) of the module docstring.

    Args:
        student_logits: [B, Ls, Vs]; input_ids / mask: [B, Ls] the student's tokens.
        teacher_logits: [B, Lt, Vt].
        teacher_pos: [B, Ls] teacher position aligned with each student position (-1 = none).
        vocab_map: [Vs] teacher id per student id (-1 = none).
    """
    B, L, V = student_logits.shape
    targets = shifted_targets(input_ids, mask)                                          # [B * L]
    has = targets >= 0
    n = has.sum().clamp(min=1)
    tpos = teacher_pos.reshape(-1)
    safe_map, unmapped = vocab_map.clamp(min=0), vocab_map < 0

    def target_fn(r0, r1):
        # Mapped teacher logits where aligned (-1e5 for unmapped ids, and for ids a top-k teacher
        # cache does not store: their -inf would turn a row without any stored id into NaN);
        # elsewhere DSKD's one-hot logits (+100 on the target, -1e5 elsewhere: exactly one-hot in
        # fp32 at any T <= 100).
        y, tp = targets[r0:r1], tpos[r0:r1]
        u = torch.full((r1 - r0, V), -1e5, device=y.device)
        al = torch.nonzero((y >= 0) & (tp >= 0)).squeeze(1)
        u[al] = teacher_logits[(r0 + al) // L, tp[al]][:, safe_map].float().clamp(min=-1e5).masked_fill(unmapped, -1e5)
        hot = torch.nonzero(tp < 0).squeeze(1)
        u[hot, y[hot].clamp(min=0)] = 100.0
        return u

    loss, ce, kd = ce_kl(student_logits.reshape(-1, V), targets, target_fn, temperature,
                         (1 - kd_rate) / n, kd_rate / n, has.float())
    return loss, ce / n, kd / n, (has & (tpos >= 0)).sum() / n


@register("mined")
class MinED(DistillationMethod):
    needs_teacher = True
    hparam_limits = {"kd_rate": "[0, 1]", "temperature": "(0, inf)", "alignment": ("chunks", "dtw"),
                     "map_path": under_results}
    precomputed_arg, precomputed_suffix = "map_path", ".npy"  # np.savez's archive, under its historical name

    def __init__(self, ctx, kd_rate: float = 0.5, temperature: float = 2.0, alignment: str = "chunks",
                 map_path: str | None = None):
        super().__init__(ctx)
        if alignment not in ("chunks", "dtw"):
            raise ValueError(f"methods.mined: alignment must be 'chunks' or 'dtw', not {alignment!r}")
        vocab_map, self.map_file = load_or_build_map(map_path, ctx.teacher_token_bytes, ctx.student_token_bytes)
        vs = ctx.student_vocab_size
        if len(vocab_map) > vs:
            raise ValueError(f"methods.mined: the map covers {len(vocab_map)} student ids, the student has {vs}")
        vocab_map = np.concatenate([vocab_map, np.full(vs - len(vocab_map), -1, np.int64)])
        if ctx.teacher is not None and vocab_map.max() >= ctx.teacher_vocab_size:
            raise ValueError("methods.mined: the map points beyond the teacher's vocabulary")
        self.register_buffer("vocab_map", torch.from_numpy(vocab_map), persistent=False)
        self.kd_rate, self.temperature, self.alignment = kd_rate, temperature, alignment
        self._dtw = _DTWAligner(ctx.teacher_token_bytes, ctx.student_token_bytes, vocab_map) if alignment == "dtw" else None

    @classmethod
    def precompute(cls, student_side, teacher_side, path):
        """The pair's map at ``path`` (found there if already built), with exact / fuzzy / special counts."""
        t, s = teacher_side.token_bytes, student_side.token_bytes
        vocab_map, path = load_or_build_map(str(path), t, s)
        exact = int(sum(b is not None and b == t[i] for b, i in zip(s, vocab_map.tolist()) if i >= 0))
        special = int((vocab_map < 0).sum())
        return {"map": str(path), "key": pair_key(t, s), "student_ids": len(s), "special": special, "exact": exact,
                "fuzzy": len(s) - special - exact}

    def prepare(self, examples):
        return {"mined_teacher_pos": self._dtw(examples) if self._dtw else chunk_positions(examples)}

    def loss(self, batch, student_out, teacher_out):
        loss, ce, kd, frac = mined_loss(student_out.logits, batch["student_input_ids"], batch["student_loss_mask"],
                                        teacher_out.logits, batch["mined_teacher_pos"], self.vocab_map,
                                        kd_rate=self.kd_rate, temperature=self.temperature)
        return loss, {"ce": ce.item(), "kd": kd.item(), "aligned": frac.item()}
