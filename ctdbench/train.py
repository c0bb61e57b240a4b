"""THE training loop: every method of every pair trains through this one function.

Identical budgets by construction: the sample order comes from ``data.Schedule`` (seed, step),
the optimizer, schedule, number of optimizer steps and global batch come from one ``TrainConfig``,
and the method only supplies the loss. Each run records what it consumed (steps, documents, text
bytes, student and teacher tokens, teacher forward passes, wall time, peak memory).

Checkpoints hold the student, the method's own parameters, the optimizer and the counters; a
run started again in the same directory resumes from the last one and ends with the same final
weights as an uninterrupted run (the data order is a function of the step, and training has no
other randomness). A checkpoint records the digest of the run that wrote it (its spec, training
budget, seed, method and data): a run resumes only its own, and otherwise starts fresh, saying
so in ``train_log.jsonl`` and on stderr. While a run trains, its log lives beside the checkpoint
(``checkpoint/train_log.jsonl``) and is copied to ``train_log.jsonl`` when training ends: a
workflow manager that deletes an interrupted job's outputs (Snakemake does) leaves the history a
resume continues. Checkpoints hold tensors, numbers, strings, lists and
dicts only and are read with ``torch.load(weights_only=True)``: a crafted file executes nothing
(it is unreadable, so the run starts fresh). The caller removes the checkpoint once the trained
model and its record are saved (:func:`remove_checkpoint`).

Every optimizer step checks the loss of each micro-batch and the gradient norm: a NaN or
infinity stops the run naming the step and the micro-batch, before the update, before any
checkpoint; nothing non-finite is ever saved.

Under ``accelerate launch`` (or torchrun) N processes share each optimizer step: the global batch
is cut into ``grad_accum`` x N micro-batches, rank r taking micro-batches r, r + N, ...; DDP or
FSDP averages the gradients, so N ranks with ``grad_accum`` g train like one process with g x N.
Rank 0 writes the log and the checkpoints; the budget counters add up every rank's share
(``ctdbench.parallel``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ctdbench import parallel
from ctdbench.data import PairedDataset, Schedule, chain_digest, collate
from ctdbench.files import write_atomic
from ctdbench.kernels import token_cross_entropy


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


class NonFiniteGradientError(FloatingPointError):
    """The gradient norm became NaN or infinite; the message names the step and the micro-batch."""


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


def heldout_nll(student: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed next-token negative log-likelihood (nats) of the student side of ``batch``."""
    ids, mask = batch["student_input_ids"], batch["student_attention_mask"]
    return token_cross_entropy(student(input_ids=ids, attention_mask=mask).logits, ids, mask, reduction="sum")


@torch.no_grad()
def validation_bpb(model: torch.nn.Module, data: PairedDataset, device: torch.device, batch_size: int = 16
                   ) -> float:
    """Held-out bits per byte of the student on the student side of ``data``.

    Args:
        model: a :class:`TrainingModule`, possibly wrapped by DDP or FSDP (every rank then runs
            every batch, as FSDP's forward is collective).
    """
    was_training = model.training
    model.eval()
    nll, n_bytes = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = _to(collate([data[i] for i in range(start, min(len(data), start + batch_size))], data), device)
        nll += model(batch, heldout=True).item()
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


class TrainingModule(torch.nn.Module):
    """The student and the method's own parts as one module whose forward is one micro-batch's loss.

    Several processes wrap this module: DDP synchronises the method's parameters (BLD's byte head,
    DSKD's projectors) with the student's; FSDP shards the student only, and a loss that reads
    student weights directly (DSKD) runs inside the wrapped forward, where FSDP has them
    unsharded. The frozen teacher is an argument, not a submodule: it is never wrapped.
    """

    def __init__(self, student: torch.nn.Module, method: torch.nn.Module):
        super().__init__()
        self.student, self.method = student, method
        # FSDP's transformer-layer auto wrap finds the layer classes by these names.
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def forward(self, batch: dict, teacher=None, *, heldout: bool = False):
        """``step_loss`` of a training micro-batch, or (``heldout``) its :func:`heldout_nll`."""
        if heldout:
            return heldout_nll(self.student, batch)
        return step_loss(self.student, self.method, teacher, batch)


class Checkpointer:
    """Atomic save/load of the full training state in ``out_dir/checkpoint/last.pt``, tied to one run.

    Args:
        digest: the run's digest (:func:`run_digest`); only a checkpoint carrying it is loaded.
    """

    def __init__(self, out_dir: Path, digest: str):
        self.path, self.digest = checkpoint_path(out_dir), digest

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "run_digest": self.digest}, tmp)
        os.replace(tmp, self.path)  # a kill mid-write never leaves a corrupt checkpoint

    def load(self) -> tuple[dict | None, str | None]:
        """``(state, None)`` for this run's checkpoint; ``(None, why)`` for one it must not resume
        (another run's, or unreadable); ``(None, None)`` without any."""
        if not self.path.exists():
            return None, None
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it is not resumed
            return None, f"its checkpoint {self.path} is unreadable ({type(e).__name__}: {str(e)[:200]})"
        found = state.get("run_digest") if isinstance(state, dict) else None
        if found != self.digest:
            return None, (f"its checkpoint {self.path} belongs to another run (run digest {found}; this run's "
                          f"spec, budget, seed, method or data differ: {self.digest})")
        return state, None


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoint" / "last.pt"


def running_log_path(out_dir: Path) -> Path:
    """The log of a run in progress (kept with the checkpoint, outside the run's declared outputs)."""
    return Path(out_dir) / "checkpoint" / "train_log.jsonl"


def remove_checkpoint(out_dir: Path) -> None:
    """Delete a run's checkpoint and running log: call only once its trained model, record and
    ``train_log.jsonl`` are safely saved."""
    path = checkpoint_path(out_dir)
    path.unlink(missing_ok=True)
    running_log_path(out_dir).unlink(missing_ok=True)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


NOT_IN_DIGEST = ("grad_accum", "checkpoint_every", "eval_every", "log_every", "num_workers")


def run_digest(spec, cfg: TrainConfig, *, seed: int, method_name: str, data: PairedDataset) -> str:
    """sha256 of everything that defines a run's weights: the caller's ``spec`` (JSON; method
    hyperparameters, models, teacher identity ...), the budget, the seed, the method and the data.

    How the batch is split (micro-batches, processes) and how often the run logs, validates or
    checkpoints do not change the weights, so a run may resume with other values of these.
    """
    train = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_DIGEST}
    whole = {"spec": spec, "train": train, "seed": seed, "method": method_name, "data": data.digest()}
    return hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()


def _read_log(log_path: Path) -> list[dict]:
    """The readable rows of ``train_log.jsonl`` (a kill mid-write can leave a torn last line)."""
    rows = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Keep the log rows up to the checkpoint we resume from (and no torn line), atomically."""
    if not log_path.exists():
        return
    rows = [row for row in _read_log(log_path) if row["step"] <= last_step]
    write_atomic(log_path, "".join(json.dumps(row) + "\n" for row in rows))


# Per-step counts of the budget, added up over micro-batches and ranks.
COUNTED = ("documents", "text_bytes", "student_tokens", "teacher_tokens", "teacher_forward_passes")


def _whole_step(shares: list[dict]) -> dict:
    """The ranks' shares of one step combined: counts added up, loss and logged terms averaged.

    Each rank averaged its own ``grad_accum`` micro-batches, so the mean over ranks is the mean
    over all micro-batches of the step (exactly the rank's value with one process).
    """
    whole = {key: sum(s[key] for s in shares) for key in COUNTED}
    whole["loss"] = sum(s["loss"] for s in shares) / len(shares)
    names = dict.fromkeys(k for s in shares for k in s["terms"])
    whole["terms"] = {k: sum(s["terms"].get(k, 0.0) for s in shares) / len(shares) for k in names}
    return whole


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
    processes: parallel.SingleProcess | parallel.Ranks | None = None,
    spec: dict | None = None,
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
        processes: ``ctdbench.parallel.processes(...)``; default one process.
        spec: what else defines the run (the CLI's job spec plus the teacher's identity), for
            the checkpoint's run digest; the budget, seed, method name and data are added here.

    The checkpoint stays in ``out_dir``: remove it (:func:`remove_checkpoint`) once the student
    and its record are saved.

    Raises:
        NonFiniteLossError, NonFiniteGradientError: naming the step and micro-batch.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method '{getattr(method, 'name', type(method).__name__)}' needs a teacher")
    if method.needs_teacher and data.teacher is None:
        raise ValueError("the method needs a teacher but the dataset has no teacher tokenization")
    device = next(student.parameters()).device
    procs = processes or parallel.SingleProcess(device)
    n_micro = cfg.grad_accum * procs.world_size
    if cfg.batch_size % n_micro:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum} "
                         f"x {procs.world_size} processes")
    method.to(device)
    module = TrainingModule(student, method)
    module.train()

    schedule = Schedule(len(data), cfg.batch_size, seed)
    module, optimizer = procs.prepare(module, make_optimizer(student, method, cfg), whole=method)
    digest = run_digest(spec, cfg, seed=seed, method_name=getattr(method, "name", type(method).__name__), data=data)
    ckpt = Checkpointer(out_dir, digest)
    log_path = running_log_path(out_dir)
    counters = dict(optimizer_steps=0, documents=0, text_bytes=0, student_tokens=0,
                    teacher_tokens=0, teacher_forward_passes=0, stream_sha256="")
    elapsed = 0.0

    def log(row: dict) -> None:
        if procs.is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    state, refused = ckpt.load()
    if state is not None:
        parallel.load_training_state(module, optimizer, state)
        counters, elapsed = state["counters"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        if procs.is_main:
            _truncate_log(log_path, counters["optimizer_steps"])
    elif procs.is_main:
        remove_checkpoint(out_dir)  # never resume what another spec (or an unreadable file) left behind
        (out_dir / "train_log.jsonl").unlink(missing_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if refused:
            print(f"starting fresh: {refused}", file=sys.stderr)
            log({"step": 0, "event": "fresh_start", "reason": refused})
    start_step = counters["optimizer_steps"]

    # Rank r takes micro-batches r, r + N, ... of each global batch.
    micro = cfg.batch_size // n_micro
    sampler = [
        idx[k * micro : (k + 1) * micro]
        for step in range(start_step, cfg.steps)
        for idx in [schedule.indices(step)]
        for k in range(procs.rank, n_micro, procs.world_size)
    ]
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=partial(collate, dataset=data, method=method),
    )
    batches = iter(loader)

    if val_data is not None and start_step == 0 and cfg.eval_every:
        log({"step": 0, "bytes_seen": 0, "val_bpb": validation_bpb(module, val_data, device)})

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (progress and procs.is_main),
               desc=getattr(method, "name", ""), mininterval=2.0, dynamic_ncols=True)
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        factor = lr_factor(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        # This rank's share of the step; the ranks' shares are added up below.
        share = {"loss": 0.0, "terms": {}, **dict.fromkeys(COUNTED, 0)}
        step_batches = []
        for m in range(cfg.grad_accum):
            batch = _to(next(batches), device)
            step_batches.append(batch)
            last = m == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else procs.no_sync(module):
                loss, logs = module(batch, teacher)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step} (micro-batch {m}); "
                        f"segments {batch['index'].tolist()}; terms {logs}"
                    )
                (loss / cfg.grad_accum).backward()
            if method.needs_teacher:
                share["teacher_forward_passes"] += 0 if teacher.cached else 1
                share["teacher_tokens"] += int(batch["teacher_attention_mask"].sum())
            share["loss"] += loss.item() / cfg.grad_accum
            for k, v in logs.items():
                share["terms"][k] = share["terms"].get(k, 0.0) + v / cfg.grad_accum
            share["student_tokens"] += int(batch["student_attention_mask"].sum())
            share["documents"] += len(batch["index"])
            share["text_bytes"] += int(batch["n_bytes"].sum())
        procs.average_whole_gradients()
        grad_norm = procs.clip_grad_norm(module, optimizer, cfg.grad_clip)
        if not math.isfinite(grad_norm):  # before the update: nothing non-finite reaches the weights
            raise NonFiniteGradientError(_gradient_culprit(module, teacher, optimizer, step_batches, step, grad_norm,
                                                           procs))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        whole = _whole_step(procs.gather(share))
        for key in COUNTED:
            counters[key] += whole[key]
        counters["optimizer_steps"] = step + 1
        step_texts = [data[i].text for i in schedule.indices(step)]
        counters["stream_sha256"] = chain_digest(counters["stream_sha256"], step_texts)
        total_loss, terms, step_tokens = whole["loss"], whole["terms"], whole["student_tokens"]
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
            last_val = validation_bpb(module, val_data, device)
            log({"step": done, "bytes_seen": counters["text_bytes"], "val_bpb": last_val})
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            state = parallel.training_state(module, optimizer)
            if procs.is_main:
                ckpt.save({**state, "counters": counters, "elapsed": elapsed, "rng": torch.get_rng_state()})
    bar.close()
    if procs.is_main:
        write_atomic(out_dir / "train_log.jsonl", log_path.read_text(encoding="utf-8") if log_path.exists() else "")

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
        "processes": procs.world_size,
        "train_config": asdict(cfg),
    }
    if val_data is not None and start_step < cfg.steps:
        summary["final_val_bpb"] = last_val
    summary["run_digest"] = digest
    return summary


def _gradient_culprit(module, teacher, optimizer, batches: list[dict], step: int, norm: float, procs) -> str:
    """Why a step's gradient norm is non-finite: the first of this step's micro-batches whose own
    gradient is (found by recomputing them one at a time; with several processes, whose shares are
    reduced together, the step's micro-batches are listed instead)."""
    number = lambda m: procs.rank + m * procs.world_size  # noqa: E731 - this rank's m-th micro-batch of the step
    where = "; ".join(f"micro-batch {number(m)}: segments {b['index'].tolist()}" for m, b in enumerate(batches))
    if procs.world_size == 1:
        for m, batch in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss, logs = module(batch, teacher)
            loss.backward()
            if not all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None):
                where = f"micro-batch {m} (segments {batch['index'].tolist()}; loss {loss.item()}, terms {logs})"
                break
        optimizer.zero_grad(set_to_none=True)
    return f"gradient norm is {norm} at step {step}: {where}; nothing of this step was applied or saved"
