"""Teacher outputs for a batch: run the frozen model online, or read a precomputed cache.

Both sources answer ``teacher(batch, hidden_states=False)`` with an object holding ``logits``
[B, Lt, V] (float32) and, if asked, ``hidden_states`` (a tuple whose last entry is [B, Lt, d]).

The cache stores the teacher's full next-token logits in float16 for every training segment, once
per teacher and data spec, so every method and seed reuses one teacher pass (calibration: top-k
truncation loses ~40% of the KD effect, so the cache keeps the full vocabulary). It is memory-
mapped, so parallel jobs share one copy in the page cache. Only the last hidden state is cached.
Full-vocabulary caches only fit small vocabularies and corpora; large runs use the online teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

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


@torch.no_grad()
def build_cache(model: torch.nn.Module, data: PairedDataset, out_dir: Path, *, batch_size: int = 16) -> dict:
    """Run ``model`` once over every segment's teacher tokens; save logits and last hidden states."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    device = next(model.parameters()).device
    logits, hidden, lengths = [], [], []
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(len(data), start + batch_size))], data)
        out = model(input_ids=batch["teacher_input_ids"].to(device),
                    attention_mask=batch["teacher_attention_mask"].to(device), output_hidden_states=True)
        for b, n in enumerate(batch["teacher_attention_mask"].sum(1).tolist()):
            logits.append(out.logits[b, :n].to(torch.float16).cpu())
            hidden.append(out.hidden_states[-1][b, :n].to(torch.float16).cpu())
            lengths.append(n)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    torch.save({"logits": torch.cat(logits), "hidden": torch.cat(hidden), "offsets": offsets}, out_dir / "cache.pt")
    meta = {"segments": len(data), "rows": int(offsets[-1]), "vocab": int(logits[0].shape[-1]),
            "token_digest": _token_digest(data), "dtype": "float16"}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class CachedTeacher:
    """Teacher outputs read from a cache built by :func:`build_cache` for the same segments."""

    cached = True

    def __init__(self, cache_dir: Path, data: PairedDataset, device: torch.device | str = "cpu"):
        cache_dir = Path(cache_dir)
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta["segments"] != len(data) or meta["token_digest"] != _token_digest(data):
            raise ValueError(
                f"teacher cache {cache_dir} was built for other segments or another teacher tokenizer "
                f"({meta['segments']} cached vs {len(data)} now); rebuild it"
            )
        store = torch.load(cache_dir / "cache.pt", mmap=True, weights_only=True)
        self.logits, self.hidden, self.offsets = store["logits"], store["hidden"], store["offsets"].tolist()
        self.device = torch.device(device)

    def _rows(self, table: torch.Tensor, batch: dict) -> torch.Tensor:
        idx, width = batch["index"].tolist(), batch["teacher_input_ids"].shape[1]
        out = torch.zeros(len(idx), width, table.shape[-1], dtype=torch.float32)
        for b, i in enumerate(idx):
            rows = table[self.offsets[i] : self.offsets[i + 1]]
            out[b, : len(rows)] = rows
        return out.to(self.device, non_blocking=True)

    def __call__(self, batch: dict, hidden_states: bool = False):
        hidden = (self._rows(self.hidden, batch),) if hidden_states else None
        return SimpleNamespace(logits=self._rows(self.logits, batch), hidden_states=hidden)
