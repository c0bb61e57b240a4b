"""The processes of one training run: a single one, or N ranks started by ``accelerate launch``.

``ctdbench.train.train`` runs the same loop either way and asks the object from :func:`processes`
only for what differs: where this process runs, how the trained module is wrapped, how per-rank
numbers are combined, which rank writes files, and gradient-norm clipping. With one process
every operation is the identity, so a single-process run is the plain loop.

With several ranks an ``accelerate.Accelerator`` reads what ``accelerate launch --config_file``
put in the environment (``profiles/accelerate/``): DDP (the default, and what plain ``torchrun``
gives), or FSDP with a full-shard, transformer-layer wrap; plus the mixed precision. Checkpoints
are full state dicts in every case (``torch.distributed.checkpoint.state_dict``), so a run
resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

# Gathered on rank 0 only, on the CPU: a full copy of a large model must not land on every GPU.
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def launched_processes() -> int:
    """How many processes the launcher started for this run (torchrun, under accelerate, sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes(device: torch.device):
    """This run's processes: :class:`SingleProcess` on ``device``, or :class:`Ranks` under a launcher.

    Args:
        device: the configured device; under a launcher only its type matters (each rank takes
            its own GPU, or runs on the CPU with the gloo backend).
    """
    if launched_processes() == 1:
        return SingleProcess(device)
    return Ranks(cpu=device.type == "cpu")


class SingleProcess:
    """One process does everything."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, whole: torch.nn.Module):
        return module, optimizer

    def no_sync(self, module: torch.nn.Module):
        return contextlib.nullcontext()

    def average_whole_gradients(self) -> None:
        pass

    def gather(self, obj) -> list:
        return [obj]

    def clip_grad_norm(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float
                       ) -> torch.Tensor:
        """Clip the gradients to ``max_norm``; their norm before clipping (a tensor: no host sync)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class Ranks:
    """N processes started by ``accelerate launch`` (or torchrun), one GPU each, coordinated by an Accelerator."""

    def __init__(self, cpu: bool):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # A method may leave some of its parameters out of a loss (DDP would wait for their gradients).
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
        if self.accelerator.mixed_precision == "fp16":
            raise ValueError("fp16 mixed precision needs loss scaling, which the training loop does not do; use bf16")
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.module, self.whole = None, []

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def prepare(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, whole: torch.nn.Module):
        """Wrap ``module`` in DDP or FSDP (which then also owns the optimizer's parameters).

        Args:
            whole: a submodule FSDP must leave alone: its parameters stay whole, in their own
                dtype, on every rank (FSDP would shard them into the student's group and cast them
                with its mixed precision); :meth:`average_whole_gradients` synchronises them.
        """
        if self.fsdp:
            self.accelerator.state.fsdp_plugin.ignored_modules = [whole]
            self.whole = [p for p in whole.parameters() if p.requires_grad]
        self.module, optimizer = self.accelerator.prepare(module, optimizer)
        return self.module, optimizer

    def no_sync(self, module: torch.nn.Module):
        # DDP all-reduces once per optimizer step; FSDP reduce-scatters every micro-batch, since
        # skipping that would hold a full unsharded gradient on every rank.
        return contextlib.nullcontext() if self.fsdp else self.accelerator.no_sync(module)

    def average_whole_gradients(self) -> None:
        """Average the accumulated gradients FSDP left alone (DDP averaged every gradient itself).

        A parameter no rank has a gradient for keeps none, as with one process; one rank's
        missing gradient counts as zero.
        """
        if not self.whole:
            return
        present = torch.tensor([p.grad is not None for p in self.whole], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(present)
        for p, n_ranks in zip(self.whole, present.tolist()):
            if n_ranks:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world_size

    def gather(self, obj) -> list:
        """``obj`` (picklable) of every rank, in rank order."""
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def clip_grad_norm(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float
                       ) -> torch.Tensor:
        # Gradients are already synchronised; under FSDP the norm is reduced over the shards.
        norm = self.accelerator.clip_grad_norm_(module.parameters(), max_norm)
        return torch.as_tensor(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def gathered_state_dict(self, prefix: str) -> dict:
        """Full weights of the prepared module's submodule ``prefix``, on rank 0 ({} elsewhere). Collective."""
        state = get_model_state_dict(self.module, options=_FULL_ON_RANK0)
        return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def training_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full model and optimizer state, keyed by parameter names (rank 0; empty elsewhere). Collective."""
    model_state, optimizer_state = get_state_dict(module, _unwrapped(optimizer), options=_FULL_ON_RANK0)
    return {"model": model_state, "optimizer": optimizer_state}


def load_training_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`training_state` into every rank (each reshards it if FSDP-wrapped)."""
    # Not strict: a parameter that never got a gradient (unused by the loss) has no optimizer state.
    set_state_dict(module, _unwrapped(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
