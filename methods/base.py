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
``requires_same_tokenizer`` (checked at config validation). A method that needs a file computed
once per tokenizer pair (MinED's vocabulary map) names it with ``precomputed_arg`` and writes it in
:meth:`DistillationMethod.precompute`; the workflow builds it before the pair's runs.

Hyperparameters are the constructor's keyword arguments. Config validation checks each value
against the constructor's annotation (``float`` takes integers too, ``int`` no floats, ``bool``,
``str``, ``X | None``, ``Literal[...]``; NaN and infinity never pass) and against the class's
``hparam_limits``, which maps a name to an interval (``"[0, 1]"``, ``"(0, inf)"``), a tuple of
allowed values, or a function returning the problem with a value (None if fine), e.g.
:func:`under_results` for a path the method writes to.

A top-k teacher cache (``ctdbench.teacher``) gives teacher logits that are -inf outside the stored
ids: a method's loss must stay finite there (e.g. ``p * log p`` is 0 at p = 0, not NaN).
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar

import torch
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

    @classmethod
    def from_sides(cls, student: nn.Module | None, teacher: nn.Module | None, student_side,
                   teacher_side=None, *, teacher_top_k: int | None = None) -> MethodContext:
        """The context of a pair from its two ``ctdbench.data.Side`` objects (tokenizer and byte
        table); without ``teacher_side`` the student's tokenizer is the teacher's (pretraining)."""
        teacher_side = teacher_side or student_side
        return cls(
            student=student, teacher=teacher,
            student_token_bytes=student_side.token_bytes, teacher_token_bytes=teacher_side.token_bytes,
            same_tokenizer=teacher_side.token_bytes == student_side.token_bytes,
            student_special_ids=list(student_side.tokenizer.all_special_ids),
            teacher_special_ids=list(teacher_side.tokenizer.all_special_ids),
            teacher_top_k=teacher_top_k,
        )

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
    # Allowed values of hyperparameters beyond their annotated type (module docstring).
    hparam_limits: ClassVar[dict[str, str | tuple | Callable[[Any], str | None]]] = {}
    # Per tokenizer pair precomputation (:meth:`precompute`): the constructor argument that takes
    # the file's path, and the file's suffix. None: the method precomputes nothing.
    precomputed_arg: ClassVar[str | None] = None
    precomputed_suffix: ClassVar[str] = ""

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
        """Build from config hyperparameters, naming any unknown, missing or mistyped one (their
        ``hparam_limits`` are checked at config validation: a method built by hand, in a test or a
        benchmark, may e.g. write its files outside results/)."""
        check_hparams(cls, hparams, name=name, limits=False)
        method = cls(ctx, **hparams)
        method.name = name
        return method

    @classmethod
    def precompute(cls, student_side, teacher_side, path: Path) -> dict:
        """Write what the method needs once per tokenizer pair (e.g. a vocabulary map) to ``path``.

        The workflow's ``precompute`` rule calls it (``ctdbench precompute``) for every pair the
        method runs on, and the run's spec passes ``path`` as the hyperparameter named by
        ``precomputed_arg`` (unless the config sets it), so each run only loads the file.

        Args:
            student_side / teacher_side: the pair's ``ctdbench.data.Side`` (tokenizer, byte table).
            path: the file to write, whole or not at all (a parallel reader never sees half of it).

        Returns:
            A receipt (JSON-serialisable: counts, what was found) written beside the file.
        """
        raise NotImplementedError(f"{cls.__name__} declares no per-pair precomputation")

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


class HparamError(ValueError):
    """A hyperparameter is unknown, missing, of the wrong type or out of range; ``key`` names it
    (``methods.<name>.<hyperparameter>``)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def check_hparams(cls: type, hparams: dict[str, Any], *, name: str, limits: bool = True) -> None:
    """Check method ``name``'s hyperparameters against ``cls``'s constructor and (``limits``) its
    ``hparam_limits``.

    Raises:
        HparamError: naming the first unknown, missing, mistyped or out-of-range hyperparameter.
    """
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # skip self, ctx
    accepted = [p.name for p in params]
    for key in hparams:
        if key not in accepted:
            raise HparamError(f"methods.{name}.{key}",
                              f"unknown hyperparameter of {name}; accepted: {', '.join(accepted) or '(none)'}")
    for p in params:
        if p.default is inspect.Parameter.empty and p.name not in hparams:
            raise HparamError(f"methods.{name}.{p.name}", "missing hyperparameter (it has no default)")
    hints = typing.get_type_hints(cls.__init__)
    for key, value in hparams.items():
        problem = _type_problem(value, hints.get(key, Any))
        limit = cls.hparam_limits.get(key) if limits else None
        if problem is None and limit is not None and value is not None:
            problem = _limit_problem(limit, value)
        if problem:
            raise HparamError(f"methods.{name}.{key}", problem)


def _type_problem(value, hint) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    return None if _has_type(value, hint) else f"{value!r} is not of type {_type_name(hint)}"


def _has_type(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint in (None, type(None)):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    kind = origin or hint
    return isinstance(value, kind) if isinstance(kind, type) else True  # Any and the like: unchecked


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint in (None, type(None)) else getattr(hint, "__name__", str(hint))


_INTERVAL = re.compile(r"([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])")


def _limit_problem(limit, value) -> str | None:
    if callable(limit):
        return limit(value)
    if isinstance(limit, tuple):
        return None if value in limit else f"{value!r} is not one of {', '.join(map(repr, limit))}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"{value!r} is not a number"
    opening, low, high, closing = _INTERVAL.fullmatch(limit).groups()
    low, high = float(low), float(high)
    inside = (value > low if opening == "(" else value >= low) and (value < high if closing == ")" else value <= high)
    return None if inside else f"{value} is outside {limit}"


def under_results(path: str) -> str | None:
    """``hparam_limits`` check of a path a method writes to: relative, under ``results/``, without
    ``..``, made of safe characters (``{key}`` placeholders allowed). Returns the problem or None."""
    parts = PurePosixPath(path).parts
    if (not re.fullmatch(r"[A-Za-z0-9_.+/-]+", path.replace("{key}", "k")) or parts[:1] != ("results",)
            or ".." in parts or len(parts) < 2):
        return f"{path!r} is not a path under results/ (relative, no '..', letters, digits and _ . + - / only)"
    return None
