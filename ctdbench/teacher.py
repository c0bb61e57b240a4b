"""Teacher outputs for a batch: run the frozen model online, or read a precomputed cache.

Both sources answer ``teacher(batch, hidden_states=False)`` with an object holding ``logits``
[B, Lt, V] (float32) and, if asked, ``hidden_states`` (a tuple whose last entry is [B, Lt, d]).

A cache holds the teacher's outputs on every training segment, once per teacher and data spec, so
every method and seed reuses one teacher pass. It is memory-mapped, so parallel jobs share one copy
in the page cache. Two layouts:

- full (``cache.pt``): the next-token logits over the whole vocabulary in float16 and the last
  hidden state. Exact (a top-64 truncation kept only ~60% of the KD effect in a measurement on a
  setting like the default), but rows x V x 2 bytes only fit small vocabularies and corpora.
- top-k (``*.npy``, ``top_k`` in ``meta.json``): per position the k largest log-softmax values
  (float16) and their ids (int32), plus the log-probability of the observed next token, and the
  last hidden state only when a method of the config reads it. About rows x (6k + 2) bytes, which
  scales to 128k-256k vocabularies. The batch's dense logits are rebuilt from it: the stored
  log-probabilities, -inf elsewhere, so every softmax renormalises over the stored ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ctdbench.data import PairedDataset, collate


class OnlineTeacher:
    """The frozen teacher model, run on each batch's teacher tokenization."""

    cached = False

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict, hidden_states: bool = False):
        return self.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                          output_hidden_states=hidden_states)


def _token_digest(data: PairedDataset) -> str:
    h = hashlib.sha256()
    for ex in data:
        h.update(torch.tensor(ex.teacher.ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _teacher_outputs(model: torch.nn.Module, data: PairedDataset, batch_size: int, hidden_states: bool):
    """``(segment index, teacher ids [n], logits [n, V], last hidden state [n, d] or None)`` of every
    segment in order, run in batches of ``batch_size``."""
    device = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(len(data), start + batch_size))], data)
        out = model(input_ids=batch["teacher_input_ids"].to(device),
                    attention_mask=batch["teacher_attention_mask"].to(device), output_hidden_states=hidden_states)
        for b, n in enumerate(batch["teacher_attention_mask"].sum(1).tolist()):
            hidden = out.hidden_states[-1][b, :n] if hidden_states else None
            yield start + b, batch["teacher_input_ids"][b, :n], out.logits[b, :n], hidden


@torch.no_grad()
def build_cache(model: torch.nn.Module, data: PairedDataset, out_dir: Path, *, batch_size: int = 16,
                top_k: int | None = None, hidden_states: bool = True) -> dict:
    """Run ``model`` once over every segment's teacher tokens and save what the methods read.

    Args:
        top_k: keep the k most likely next tokens per position (module docstring); None keeps
            the full vocabulary (and always the hidden states).
        hidden_states: top-k caches only: also store the last hidden states.

    Returns:
        The cache's ``meta.json`` content.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    meta = {"segments": len(data), "token_digest": _token_digest(data), "dtype": "float16", "top_k": top_k}
    if top_k is None:
        meta.update(_write_full(model, data, out_dir, batch_size), hidden_states=True)
    else:
        meta.update(_write_top_k(model, data, out_dir, batch_size, top_k, hidden_states), hidden_states=hidden_states)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write_full(model, data, out_dir: Path, batch_size: int) -> dict:
    logits, hidden, lengths = [], [], []
    for _, _, seg_logits, seg_hidden in _teacher_outputs(model, data, batch_size, hidden_states=True):
        logits.append(seg_logits.to(torch.float16).cpu())
        hidden.append(seg_hidden.to(torch.float16).cpu())
        lengths.append(len(seg_logits))
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    torch.save({"logits": torch.cat(logits), "hidden": torch.cat(hidden), "offsets": offsets}, out_dir / "cache.pt")
    return {"rows": int(offsets[-1]), "vocab": int(logits[0].shape[-1])}


def _write_top_k(model, data, out_dir: Path, batch_size: int, top_k: int, hidden_states: bool) -> dict:
    """Stream the top-k arrays into preallocated memory-mapped files: memory stays one batch."""
    offsets = np.cumsum([0, *(len(ex.teacher.ids) for ex in data)])
    rows = int(offsets[-1])
    vocab = model.get_output_embeddings().weight.shape[0]
    k = min(top_k, vocab)

    def array(name, dtype, *width):
        return np.lib.format.open_memmap(out_dir / f"{name}.npy", mode="w+", dtype=dtype, shape=(rows, *width))

    # float16 log-probabilities: for every p > e^-16 (~1e-7) rounding moves log p by at most 2^-8,
    # p by under 0.4%, as the full cache's float16 logits; float32 would cost 8 instead of 6 bytes
    # per entry for no measurable gain.
    logprobs = array("topk_logprobs", np.float16, k)
    ids = array("topk_ids", np.int32, k)
    next_lp = array("next_logprob", np.float16)
    hidden = array("hidden", np.float16, model.config.hidden_size) if hidden_states else None
    for i, seg_ids, seg_logits, seg_hidden in _teacher_outputs(model, data, batch_size, hidden_states):
        lp = seg_logits.float().log_softmax(-1)
        top = lp.topk(k, dim=-1)
        r0, r1 = offsets[i], offsets[i + 1]
        logprobs[r0:r1] = top.values.to(torch.float16).cpu().numpy()
        ids[r0:r1] = top.indices.to(torch.int32).cpu().numpy()
        # The observed next token's log-probability, also when it is not among the top k: ALM's
        # chunk likelihoods and BLD's cover weights read the teacher's probability of the real
        # text. The segment's last position predicts nothing (0, never read).
        nxt = lp[:-1].gather(-1, seg_ids[1:, None].to(lp.device)).squeeze(-1)
        next_lp[r0:r1] = F.pad(nxt, (0, 1)).to(torch.float16).cpu().numpy()
        if hidden is not None:
            hidden[r0:r1] = seg_hidden.to(torch.float16).cpu().numpy()
    for a in (logprobs, ids, next_lp, hidden):
        if a is not None:
            a.flush()
    np.save(out_dir / "offsets.npy", offsets)
    return {"rows": rows, "vocab": vocab}


def _describe(top_k: int | None) -> str:
    return "the full vocabulary" if top_k is None else f"the top-{top_k} teacher tokens"


class CachedTeacher:
    """Teacher outputs read from a cache built by :func:`build_cache` for the same segments.

    Args:
        top_k: the k the run expects (its spec's ``teacher_cache_top_k``; None: a full cache).
    """

    cached = True

    def __init__(self, cache_dir: Path, data: PairedDataset, device: torch.device | str = "cpu", *,
                 top_k: int | None = None):
        cache_dir = Path(cache_dir)
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta["segments"] != len(data) or meta["token_digest"] != _token_digest(data):
            raise ValueError(
                f"teacher cache {cache_dir} was built for other segments or another teacher tokenizer "
                f"({meta['segments']} cached vs {len(data)} now); rebuild it"
            )
        if meta.get("top_k") != top_k:
            raise ValueError(f"teacher cache {cache_dir} holds {_describe(meta.get('top_k'))}, but this run expects "
                             f"{_describe(top_k)} (distill.teacher_cache_top_k); rebuild it")
        self.top_k, self.vocab, self.device = top_k, meta["vocab"], torch.device(device)
        if top_k is None:
            store = torch.load(cache_dir / "cache.pt", mmap=True, weights_only=True)
            self.logits, self.hidden, self.offsets = store["logits"], store["hidden"], store["offsets"].tolist()
        else:
            # Copy-on-write maps: torch needs writable arrays, and nothing is ever written.
            load = lambda name: torch.from_numpy(np.load(cache_dir / f"{name}.npy", mmap_mode="c"))  # noqa: E731
            self.topk_logprobs, self.topk_ids, self.next_logprob = (load(name) for name in (
                "topk_logprobs", "topk_ids", "next_logprob"))
            self.hidden = load("hidden") if meta["hidden_states"] else None
            self.offsets = np.load(cache_dir / "offsets.npy").tolist()

    def _rows(self, table: torch.Tensor, batch: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The batch's rows of ``table`` [rows, ...], right-padded with zeros: [B, Lt, ...]."""
        idx, width = batch["index"].tolist(), batch["teacher_input_ids"].shape[1]
        out = torch.zeros(len(idx), width, *table.shape[1:], dtype=dtype)
        for b, i in enumerate(idx):
            rows = table[self.offsets[i] : self.offsets[i + 1]]
            out[b, : len(rows)] = rows
        return out.to(self.device, non_blocking=True)

    def _top_k_logits(self, batch: dict) -> torch.Tensor:
        """Dense [B, Lt, V] logits: the stored log-probabilities (top k and the observed next token),
        -inf at every other id, zeros at padding (as the full cache)."""
        real = batch["teacher_attention_mask"].to(self.device).bool()
        logits = torch.full((*real.shape, self.vocab), float("-inf"), device=self.device)
        logits.scatter_(-1, self._rows(self.topk_ids, batch, torch.int64), self._rows(self.topk_logprobs, batch))
        has_next = real & F.pad(real[:, 1:], (0, 1))
        b, t = has_next.nonzero(as_tuple=True)
        next_ids = batch["teacher_input_ids"].to(self.device)[b, t + 1]
        logits[b, t, next_ids] = self._rows(self.next_logprob, batch)[b, t]
        return logits.masked_fill_(~real[..., None], 0.0)

    def __call__(self, batch: dict, hidden_states: bool = False):
        if hidden_states and self.hidden is None:
            raise ValueError("this top-k teacher cache was built without hidden states (no method of its config "
                             "read them); rebuild it for a config that runs such a method")
        hidden = (self._rows(self.hidden, batch),) if hidden_states else None
        logits = self._rows(self.logits, batch) if self.top_k is None else self._top_k_logits(batch)
        return SimpleNamespace(logits=logits, hidden_states=hidden)
