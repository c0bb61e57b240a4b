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
checkpoint; nothing non-finite is ever applied or saved. The losses stay on the device until then:
the step reads the host once for this check (a fused flag over its micro-batches and the gradient
norm), and the losses, terms and gradient norm themselves only at log and validation points. The
budget counts come from the collated batches on the CPU.

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


def heldout_nll(student: torch.nn.Module, method: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed next-token negative log-likelihood (nats) of the student side of ``batch`` (a
    :class:`TrainingModule` objective; the method plays no part)."""
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
        batch = collate([data[i] for i in range(start, min(len(data), start + batch_size))], data)
        n_bytes += int(batch["n_bytes"].sum())
        nll += model(_to(batch, device), heldout_nll).item()
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


def training_loss(teacher):
    """The :class:`TrainingModule` objective of a training micro-batch: the method's loss, with
    ``teacher``'s outputs (:func:`step_loss`)."""
    return lambda student, method, batch: step_loss(student, method, teacher, batch)


class TrainingModule(torch.nn.Module):
    """The student and the method's own parts as one module whose forward computes an objective
    (:func:`training_loss`, :func:`heldout_nll`) of one micro-batch.

    Several processes wrap this module: DDP synchronises the method's parameters (BLD's byte head,
    DSKD's projectors) with the student's; FSDP shards the student only, and a loss that reads
    student weights directly (DSKD) runs inside the wrapped forward, where FSDP has them
    unsharded. The frozen teacher is an argument of the objective, not a submodule: it is never
    wrapped.
    """

    def __init__(self, student: torch.nn.Module, method: torch.nn.Module):
        super().__init__()
        self.student, self.method = student, method
        # FSDP's transformer-layer auto wrap finds the layer classes by these names.
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def forward(self, batch: dict, objective):
        """``objective(student, method, batch)``, inside the wrapper's forward."""
        return objective(self.student, self.method, batch)


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
    device = next(student.parameters()).device
    procs = processes or parallel.SingleProcess(device)
    _check_run(method, teacher, data, cfg, procs)
    method.to(device)
    module, optimizer = procs.prepare(TrainingModule(student, method).train(), make_optimizer(student, method, cfg),
                                      whole=method)
    digest = run_digest(spec, cfg, seed=seed, method_name=getattr(method, "name", type(method).__name__), data=data)
    ckpt, log = Checkpointer(out_dir, digest), RunLog(out_dir, procs.is_main)
    counters, elapsed = _resume(ckpt, module, optimizer, log, procs)
    start = counters["optimizer_steps"]
    schedule = Schedule(len(data), cfg.batch_size, seed)
    batches, objective = _micro_batches(data, method, schedule, cfg, procs, start), training_loss(teacher)

    if val_data is not None and start == 0 and cfg.eval_every:
        log({"step": 0, "bytes_seen": 0, "val_bpb": validation_bpb(module, val_data, device)})
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and procs.is_main),
               desc=getattr(method, "name", ""), mininterval=2.0, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg)
        micro = _forward_backward(module, objective, batches, method, teacher, cfg.grad_accum, device, procs)
        procs.average_whole_gradients()
        grad_norm = procs.clip_grad_norm(module, optimizer, cfg.grad_clip)
        _stop_if_non_finite(micro, grad_norm, step, module, objective, optimizer, procs)  # before the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        logged = done % cfg.log_every == 0 or done == cfg.steps
        whole = _whole_step(procs.gather(micro.share(cfg.grad_accum, with_loss=logged)))
        _count_step(counters, whole, [data[i].text for i in schedule.indices(step)])
        dt = time.perf_counter() - t0
        elapsed += dt
        bar.update(1)
        if logged:  # the step's loss, terms and gradient norm reach the host here
            log({"step": done, "bytes_seen": counters["text_bytes"], "lr": optimizer.param_groups[0]["lr"],
                 "loss": whole["loss"], "grad_norm": float(grad_norm),
                 "tokens_per_second": whole["student_tokens"] / dt, "terms": whole["terms"]})
            bar.set_postfix(loss=f"{whole['loss']:.3f}", tok_s=f"{whole['student_tokens'] / dt:.0f}")
        if val_data is not None and (done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
            last_val = validation_bpb(module, val_data, device)
            log({"step": done, "bytes_seen": counters["text_bytes"], "val_bpb": last_val})
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            state = parallel.training_state(module, optimizer)
            if procs.is_main:
                ckpt.save({**state, "counters": counters, "elapsed": elapsed, "rng": torch.get_rng_state()})
    bar.close()
    log.publish()
    final_val = last_val if val_data is not None and start < cfg.steps else None
    return _summary(counters, elapsed, cfg, procs, digest, final_val)


def _check_run(method, teacher, data: PairedDataset, cfg: TrainConfig, procs) -> None:
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method '{getattr(method, 'name', type(method).__name__)}' needs a teacher")
    if method.needs_teacher and data.teacher is None:
        raise ValueError("the method needs a teacher but the dataset has no teacher tokenization")
    if cfg.batch_size % (cfg.grad_accum * procs.world_size):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum} "
                         f"x {procs.world_size} processes")


class RunLog:
    """A run's ``train_log.jsonl``: rows appended beside the checkpoint while it trains (by the main
    process), published to the run directory when training ends."""

    def __init__(self, out_dir: Path, is_main: bool):
        self.out_dir, self.path, self.is_main = Path(out_dir), running_log_path(out_dir), is_main

    def __call__(self, row: dict) -> None:
        if self.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def publish(self) -> None:
        if self.is_main:
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            write_atomic(self.out_dir / "train_log.jsonl", text)


def _resume(ckpt: Checkpointer, module, optimizer, log: RunLog, procs) -> tuple[dict, float]:
    """The run's budget counters and seconds trained so far: its own checkpoint's, loaded into
    ``module`` and ``optimizer`` (the log cut back to it), or fresh ones in a cleaned run directory."""
    log.out_dir.mkdir(parents=True, exist_ok=True)
    state, refused = ckpt.load()
    if state is not None:
        parallel.load_training_state(module, optimizer, state)
        torch.set_rng_state(state["rng"])
        if procs.is_main:
            _truncate_log(log.path, state["counters"]["optimizer_steps"])
            log({"step": state["counters"]["optimizer_steps"], "event": "resumed"})
        return state["counters"], state["elapsed"]
    if procs.is_main:
        remove_checkpoint(log.out_dir)  # never resume what another spec (or an unreadable file) left behind
        (log.out_dir / "train_log.jsonl").unlink(missing_ok=True)
        log.path.parent.mkdir(parents=True, exist_ok=True)
        if refused:
            print(f"starting fresh: {refused}", file=sys.stderr)
            log({"step": 0, "event": "fresh_start", "reason": refused})
    return {"optimizer_steps": 0, **dict.fromkeys(COUNTED, 0), "stream_sha256": ""}, 0.0


def _micro_batches(data: PairedDataset, method, schedule: Schedule, cfg: TrainConfig, procs, start_step: int):
    """This rank's micro-batches of the steps from ``start_step`` on, collated on the CPU: the global
    batch is cut into ``grad_accum`` x N micro-batches and rank r takes micro-batches r, r + N, ..."""
    n_micro = cfg.grad_accum * procs.world_size
    size = cfg.batch_size // n_micro
    sampler = [
        idx[k * size : (k + 1) * size]
        for step in range(start_step, cfg.steps)
        for idx in [schedule.indices(step)]
        for k in range(procs.rank, n_micro, procs.world_size)
    ]
    return iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers,
                                            collate_fn=partial(collate, dataset=data, method=method)))


@dataclass
class _Step:
    """This rank's micro-batches of one step and what they gave: budget counts (host), losses and
    logged terms (losses on the device: reading them is a host sync)."""

    counts: dict
    batches: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    logs: list = field(default_factory=list)

    def share(self, grad_accum: int, with_loss: bool) -> dict:
        """This rank's share of the step: its counts, and (``with_loss``) its mean loss and terms."""
        share = dict(self.counts)
        if with_loss:
            share["loss"], share["terms"] = 0.0, {}
            for loss, logs in zip(self.losses, self.logs):
                share["loss"] += loss.item() / grad_accum
                for k, v in logs.items():
                    share["terms"][k] = share["terms"].get(k, 0.0) + v / grad_accum
        return share


def _forward_backward(module, objective, batches, method, teacher, grad_accum: int, device, procs) -> _Step:
    """Forward and backward of this rank's ``grad_accum`` micro-batches of a step (gradients
    accumulated; synchronised across ranks on the last). No host sync: a non-finite loss is found
    by :func:`_stop_if_non_finite` before the update."""
    step = _Step(dict.fromkeys(COUNTED, 0))
    for m in range(grad_accum):
        batch = next(batches)
        for key, n in _budget_of(batch, method, teacher).items():
            step.counts[key] += n
        batch = _to(batch, device)
        with contextlib.nullcontext() if m == grad_accum - 1 else procs.no_sync(module):
            loss, logs = module(batch, objective)
            (loss / grad_accum).backward()
        step.batches.append(batch)
        step.losses.append(loss.detach())
        step.logs.append(logs)
    return step


def _budget_of(batch: dict, method, teacher) -> dict:
    """A micro-batch's counts, read from the collated CPU batch (no device sync)."""
    uses_teacher = method.needs_teacher
    return {"documents": len(batch["index"]), "text_bytes": int(batch["n_bytes"].sum()),
            "student_tokens": int(batch["student_attention_mask"].sum()),
            "teacher_tokens": int(batch["teacher_attention_mask"].sum()) if uses_teacher else 0,
            "teacher_forward_passes": int(uses_teacher and not teacher.cached)}


def _whole_step(shares: list[dict]) -> dict:
    """The ranks' shares of one step combined: counts added up, loss and logged terms (if there)
    averaged.

    Each rank averaged its own ``grad_accum`` micro-batches, so the mean over ranks is the mean
    over all micro-batches of the step (exactly the rank's value with one process).
    """
    whole = {key: sum(s[key] for s in shares) for key in COUNTED}
    if "loss" in shares[0]:
        whole["loss"] = sum(s["loss"] for s in shares) / len(shares)
        names = dict.fromkeys(k for s in shares for k in s["terms"])
        whole["terms"] = {k: sum(s["terms"].get(k, 0.0) for s in shares) / len(shares) for k in names}
    return whole


def _count_step(counters: dict, whole: dict, texts: list) -> None:
    """Add a finished step to the budget counters (``texts``: its global batch, for the stream digest)."""
    for key in COUNTED:
        counters[key] += whole[key]
    counters["optimizer_steps"] += 1
    counters["stream_sha256"] = chain_digest(counters["stream_sha256"], texts)


def _summary(counters: dict, elapsed: float, cfg: TrainConfig, procs, digest: str, final_val: float | None) -> dict:
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
    if final_val is not None:
        summary["final_val_bpb"] = final_val
    summary["run_digest"] = digest
    return summary


def _stop_if_non_finite(step: _Step, grad_norm: torch.Tensor, number: int, module, objective, optimizer,
                        procs) -> None:
    """Raise if a micro-batch's loss or the gradient norm of step ``number`` is NaN or infinite,
    naming the step and the micro-batch. One host sync for the whole step: the losses stay on the
    device until then (and were backpropagated: their gradients are never applied)."""
    losses = torch.stack([loss.float() for loss in step.losses] + [grad_norm.float().to(step.losses[0].device)])
    if torch.isfinite(losses).all():
        return
    for m, (loss, batch) in enumerate(zip(step.losses, step.batches)):
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {number} (micro-batch {m}); "
                                     f"segments {batch['index'].tolist()}; terms {step.logs[m]}")
    raise NonFiniteGradientError(_gradient_culprit(module, objective, optimizer, step.batches, number,
                                                   float(grad_norm), procs))


def _gradient_culprit(module, objective, optimizer, batches: list[dict], step: int, norm: float, procs) -> str:
    """Why a step's gradient norm is non-finite: the first of this step's micro-batches whose own
    gradient is (found by recomputing them one at a time; with several processes, whose shares are
    reduced together, the step's micro-batches are listed instead)."""
    number = lambda m: procs.rank + m * procs.world_size  # noqa: E731 - this rank's m-th micro-batch of the step
    where = "; ".join(f"micro-batch {number(m)}: segments {b['index'].tolist()}" for m, b in enumerate(batches))
    if procs.world_size == 1:
        for m, batch in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss, logs = module(batch, objective)
            loss.backward()
            if not all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None):
                where = f"micro-batch {m} (segments {batch['index'].tolist()}; loss {loss.item()}, terms {logs})"
                break
        optimizer.zero_grad(set_to_none=True)
    return f"gradient norm is {norm} at step {step}: {where}; nothing of this step was applied or saved"
