"""The contract every distillation method implements.

A method is an ``nn.Module``: it may own trainable parts (BLD's byte head, DSKD's projectors)
that train with the student and are never saved into the student checkpoint. The training loop
(``ctdbench.train``) calls, per optimizer micro-step::

    extras = method.prepare(examples)          # in the collator, on CPU
    loss, logs = method.loss(batch, student_out, teacher_out)

Class attributes declare what the loop has to compute for the method, so nothing else is run:
``needs_teacher`` (teacher forward pass on the teacher tokenization), ``needs_hidden_states``
(the student's last hidden state), ``needs_teacher_hidden_states`` (the teacher's: a top-k teacher
cache stores them only if a method of its config reads them), ``needs_full_teacher_vocab`` (the
method cannot train from a top-k teacher cache; checked at config validation and construction) and
``requires_same_tokenizer`` (checked at config validation).

A top-k teacher cache (``ctdbench.teacher``) gives teacher logits that are -inf outside the stored
ids: a method's loss must stay finite there (e.g. ``p * log p`` is 0 at p = 0, not NaN).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MethodContext:
    """What a method may know about the pair it distils.

    Attributes:
        student: the student model (trainable; do not register it as a submodule).
        teacher: the frozen teacher model, or None when the method needs no teacher.
        student_token_bytes: exact bytes of every student vocabulary id (None = special).
        teacher_token_bytes: the same for the teacher vocabulary.
        same_tokenizer: whether both sides use the same tokenizer.
        student_special_ids / teacher_special_ids: ids of special tokens (BOS/EOS/PAD ...).
        teacher_top_k: k when the teacher's outputs come from a top-k cache (its logits are -inf
            outside each position's stored ids), None for the full distribution.
    """

    student: nn.Module
    teacher: nn.Module | None
    student_token_bytes: list[bytes | None]
    teacher_token_bytes: list[bytes | None]
    same_tokenizer: bool
    student_special_ids: list[int] = field(default_factory=list)
    teacher_special_ids: list[int] = field(default_factory=list)
    teacher_top_k: int | None = None

    @property
    def student_vocab_size(self) -> int:
        return self.student.get_output_embeddings().weight.shape[0]

    @property
    def teacher_vocab_size(self) -> int:
        return self.teacher.get_output_embeddings().weight.shape[0]

    @property
    def student_hidden_size(self) -> int:
        return self.student.config.hidden_size

    @property
    def teacher_hidden_size(self) -> int:
        return self.teacher.config.hidden_size


class DistillationMethod(nn.Module):
    """Base class of all methods. Subclasses implement :meth:`loss`."""

    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_teacher_hidden_states: ClassVar[bool] = False
    needs_full_teacher_vocab: ClassVar[bool] = False
    requires_same_tokenizer: ClassVar[bool] = False  # e.g. plain KD over a shared vocabulary

    def __init__(self, ctx: MethodContext):
        super().__init__()
        if self.needs_full_teacher_vocab and ctx.teacher_top_k is not None:
            raise ValueError(
                f"{type(self).__name__} needs the teacher's full next-token distribution (see its docstring), but "
                f"the teacher comes from a top-{ctx.teacher_top_k} cache (distill.teacher_cache_top_k); use a full "
                "cache or the online teacher for it"
            )
        # A plain attribute, not a submodule: the student and teacher weights must not appear
        # in this module's parameters or state_dict.
        self.ctx = ctx

    @classmethod
    def from_config(cls, ctx: MethodContext, hparams: dict[str, Any], *, name: str):
        """Build from config hyperparameters, naming any unknown key."""
        check_hparams(cls, hparams, name=name)
        method = cls(ctx, **hparams)
        method.name = name
        return method

    def prepare(self, examples: list) -> dict[str, torch.Tensor]:
        """Collator hook (CPU, data-loader side): precompute alignments, byte targets, ...

        Args:
            examples: the batch's ``ctdbench.data.PairedExample`` objects.

        Returns:
            Extra tensors merged into the batch dict.
        """
        return {}

    def loss(self, batch: dict, student_out, teacher_out) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss and the floats to log.

        Args:
            batch: tensors from ``ctdbench.data.collate`` (``student_input_ids`` [B, Ls],
                ``student_attention_mask`` [B, Ls] (the model's input), ``student_loss_mask``
                [B, Ls] (the training targets: restrict every loss term to them), byte spans,
                the teacher's counterparts) plus whatever :meth:`prepare` returned.
            student_out: the student's Hugging Face output (``logits`` [B, Ls, Vs]; plus
                ``hidden_states`` if ``needs_hidden_states``).
            teacher_out: the teacher's output on the teacher tokenization (``logits``
                [B, Lt, Vt]; plus ``hidden_states`` if ``needs_teacher_hidden_states``), or None
                if ``needs_teacher`` is False.
        """
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups of the method's own trainable parts (may set ``lr``)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []


def check_hparams(cls: type, hparams: dict[str, Any], *, name: str) -> None:
    """Raise ValueError naming unknown or missing hyperparameters of method ``name``."""
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in list(sig.parameters)[2:]]  # skip self, ctx
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"methods.{name}: unknown hyperparameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    missing = [
        p.name for p in list(sig.parameters.values())[2:]
        if p.default is inspect.Parameter.empty and p.name not in hparams
    ]
    if missing:
        raise ValueError(f"methods.{name}: missing hyperparameter(s) {', '.join(missing)}")


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
