"""THE training loop: every method of every pair trains through this one function.

Identical budgets by construction: the sample order comes from ``data.Schedule`` (seed, step),
the optimizer, schedule, number of optimizer steps and global batch come from one ``TrainConfig``,
and the method only supplies the loss. Each run records what it consumed (steps, documents, text
bytes, student and teacher tokens, teacher forward passes, wall time, peak memory).

Checkpoints hold the student, the method's own parameters, the optimizer and the counters; a
run started again in the same directory resumes from the last one and ends with the same final
weights as an uninterrupted run (the data order is a function of the step, and training has no
other randomness).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ctdbench.data import PairedDataset, Schedule, chain_digest, collate


@dataclass
class TrainConfig:
    """Optimisation budget shared by every method of a comparison."""

    steps: int
    batch_size: int
    lr: float
    grad_accum: int = 1
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 0
    log_every: int = 1
    num_workers: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the batch."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``final_lr_frac`` (step is 0-based)."""
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(student: torch.nn.Module, method: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on biases and norms (the usual GPT recipe).
    decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += method.param_groups()
    for g in groups:
        g["base_lr"] = g.get("lr", cfg.lr)
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def validation_bpb(model: torch.nn.Module, data: PairedDataset, batch_size: int = 16) -> float:
    """Held-out bits per byte of ``model`` on the student side of ``data``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, n_bytes = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = _to(collate([data[i] for i in range(start, min(len(data), start + batch_size))], data), device)
        ids, mask = batch["student_input_ids"], batch["student_attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        n_bytes += int(batch["n_bytes"].sum())
    model.train(was_training)
    return nll / math.log(2) / n_bytes


def step_loss(student, method, teacher, batch: dict, *, force_teacher: bool = False):
    """Forward passes of one micro-batch and the method's loss: ``(loss, logs)``.

    Args:
        teacher: an ``OnlineTeacher`` or ``CachedTeacher`` (``ctdbench.teacher``), or None.
        force_teacher: run the teacher even for a method that does not need it (the benchmark's
            floor step: teacher forward + student SFT).
    """
    teacher_out = None
    if method.needs_teacher or force_teacher:
        teacher_out = teacher(batch, hidden_states=method.needs_teacher_hidden_states)
    student_out = student(
        input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"],
        output_hidden_states=method.needs_hidden_states,
    )
    return method.loss(batch, student_out, teacher_out)


class Checkpointer:
    """Atomic save/load of the full training state in ``out_dir/checkpoint/last.pt``."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "checkpoint" / "last.pt"

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a kill mid-write never leaves a corrupt checkpoint

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()
            self.path.parent.rmdir()


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Drop log rows written after the checkpoint we resume from."""
    if not log_path.exists():
        return
    rows = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    log_path.write_text("".join(r + "\n" for r in rows))


def train(
    student: torch.nn.Module,
    method: torch.nn.Module,
    data: PairedDataset,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    seed: int,
    teacher=None,
    val_data: PairedDataset | None = None,
    progress: bool = True,
) -> dict:
    """Train ``student`` with ``method``'s loss; returns the budget and timing summary.

    Args:
        student: the model being trained (its device decides where everything runs).
        method: a ``methods.base.DistillationMethod``.
        data: paired training segments.
        cfg: the shared optimisation budget.
        out_dir: run directory (``train_log.jsonl``, ``checkpoint/``).
        seed: selects the sample order.
        teacher: teacher outputs source (``ctdbench.teacher``), required if ``method.needs_teacher``.
        val_data: segments for the validation bits-per-byte learning curve.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method '{getattr(method, 'name', type(method).__name__)}' needs a teacher")
    if method.needs_teacher and data.teacher is None:
        raise ValueError("the method needs a teacher but the dataset has no teacher tokenization")
    device = next(student.parameters()).device
    method.to(device)
    student.train()
    method.train()

    schedule = Schedule(len(data), cfg.batch_size, seed)
    optimizer = make_optimizer(student, method, cfg)
    ckpt = Checkpointer(out_dir)
    log_path = out_dir / "train_log.jsonl"
    counters = dict(optimizer_steps=0, documents=0, text_bytes=0, student_tokens=0,
                    teacher_tokens=0, teacher_forward_passes=0, stream_sha256="")
    elapsed = 0.0

    state = ckpt.load()
    if state is not None:
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        counters, elapsed = state["counters"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        _truncate_log(log_path, counters["optimizer_steps"])
    elif log_path.exists():
        log_path.unlink()
    start_step = counters["optimizer_steps"]

    micro = cfg.batch_size // cfg.grad_accum
    sampler = [
        idx[m * micro : (m + 1) * micro]
        for step in range(start_step, cfg.steps)
        for idx in [schedule.indices(step)]
        for m in range(cfg.grad_accum)
    ]
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=partial(collate, dataset=data, method=method),
    )
    batches = iter(loader)

    def log(row: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if val_data is not None and start_step == 0 and cfg.eval_every:
        log({"step": 0, "bytes_seen": 0, "val_bpb": validation_bpb(student, val_data)})

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress, desc=getattr(method, "name", ""),
               mininterval=2.0, dynamic_ncols=True)
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        factor = lr_factor(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        terms: dict[str, float] = {}
        total_loss, step_tokens, step_texts = 0.0, 0, []
        for m in range(cfg.grad_accum):
            batch = _to(next(batches), device)
            loss, logs = step_loss(student, method, teacher, batch)
            if method.needs_teacher:
                counters["teacher_forward_passes"] += 0 if teacher.cached else 1
                counters["teacher_tokens"] += int(batch["teacher_attention_mask"].sum())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {step} (micro-batch {m}); "
                    f"segments {batch['index'].tolist()}; terms {logs}"
                )
            (loss / cfg.grad_accum).backward()
            total_loss += loss.item() / cfg.grad_accum
            for k, v in logs.items():
                terms[k] = terms.get(k, 0.0) + v / cfg.grad_accum
            n_tok = int(batch["student_attention_mask"].sum())
            step_tokens += n_tok
            counters["student_tokens"] += n_tok
            counters["documents"] += len(batch["index"])
            step_texts += [data[i].text for i in batch["index"].tolist()]
            counters["text_bytes"] += int(batch["n_bytes"].sum())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counters["optimizer_steps"] = step + 1
        counters["stream_sha256"] = chain_digest(counters["stream_sha256"], step_texts)
        dt = time.perf_counter() - t0
        elapsed += dt
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.3f}", tok_s=f"{step_tokens / dt:.0f}")

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            log({"step": done, "bytes_seen": counters["text_bytes"], "lr": optimizer.param_groups[0]["lr"],
                 "loss": total_loss, "grad_norm": grad_norm, "tokens_per_second": step_tokens / dt,
                 "terms": terms})
        if val_data is not None and (done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
            last_val = validation_bpb(student, val_data)
            log({"step": done, "bytes_seen": counters["text_bytes"], "val_bpb": last_val})
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            ckpt.save({"student": student.state_dict(), "method": method.state_dict(),
                       "optimizer": optimizer.state_dict(), "counters": counters, "elapsed": elapsed,
                       "rng": torch.get_rng_state()})
    bar.close()

    steps = counters["optimizer_steps"]
    summary = {
        "budget": dict(counters),
        "timing": {
            "wall_seconds": elapsed,
            "seconds_per_step": elapsed / max(1, steps),
            "tokens_per_second": counters["student_tokens"] / elapsed if elapsed else 0.0,
        },
        "memory": {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        },
        "train_config": asdict(cfg),
    }
    if val_data is not None and start_step < cfg.steps:
        summary["final_val_bpb"] = last_val
    ckpt.remove()
    return summary
