"""Evaluation with lm-evaluation-harness: local task data, and a fixed-path ``eval.json``.

Two local tasks live in ``workflows/tasks/`` (see its README):

    ctd_heldout  ``loglikelihood_rolling`` over passages of the held-out split:
                 word_perplexity, byte_perplexity, bits_per_byte (tokenizer-agnostic).
    ctd_cloze    4-way multiple choice: which continuation finishes a held-out line?
                 acc, acc_norm (per character), acc_bytes (per UTF-8 byte).

lm-eval names its own output files with timestamps, which Snakemake cannot track, so
:func:`evaluate_model` calls ``lm_eval.simple_evaluate`` from Python and writes a small flat JSON
at the path it is given. Nothing touches the Hugging Face hub (unless a built-in lm-eval task is
asked for): the model and tokenizer are loaded from their directory and handed to lm-eval as
objects, and the datasets are local JSON files.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ctdbench.data import segment_text
from ctdbench.files import write_atomic

TASK_DIR = Path(__file__).resolve().parents[1] / "workflows" / "tasks"
DEFAULT_TASKS = ("ctd_heldout", "ctd_cloze")
# Placeholders in the task YAMLs: lm-eval resolves relative data_files against its working
# directory, not the YAML, so the absolute paths are filled in per run.
DATA_DIR_PLACEHOLDER = "__DATA_DIR__"
CACHE_DIR_PLACEHOLDER = "__CACHE_DIR__"

N_CHOICES = 4
CONTEXT_LINES = 2
# Distractors come from the continuations closest in byte length to the true one; this many
# neighbours form the "length bucket" they are drawn from.
LENGTH_NEIGHBOURS = 16


def build_eval_data(test_docs: list, out_dir: Path, *, n_cloze: int = 200, seed: int = 0,
                    passage_bytes: int = 512) -> dict:
    """Write the data files of the local tasks from the held-out documents.

    ``heldout.jsonl`` holds the whole held-out text, cut into passages of at most ``passage_bytes``
    bytes at line boundaries exactly like the training segments (``ctdbench.data.segment_text``).
    lm-eval scores each passage with the BOS token in front, as in training. The default of 512
    bytes matches the default ``segment_bytes`` and fits in one ``max_length=512`` window even for
    the byte tokenizer, so every model, whatever its tokenizer, predicts each byte from the same
    text context; passages also make ``limit`` meaningful (a prefix of the split, not one play).

    ``cloze.jsonl`` holds ``n_cloze`` multiple-choice items: the context is the previous
    ``CONTEXT_LINES`` lines plus the start of a line cut at a space; the true continuation (rest
    of the line, starting with that space) competes with 3 continuations of other held-out lines
    of nearly the same byte length, so length gives nothing away; the gold position is random.

    Everything is a pure function of the documents, ``n_cloze``, ``seed`` and ``passage_bytes``.

    Args:
        test_docs: Held-out documents: objects with ``.id`` and ``.text``, or dicts with those keys.
        out_dir: Folder to write ``heldout.jsonl`` and ``cloze.jsonl`` into (created).
        n_cloze: Number of cloze items (fewer if the text has fewer usable lines).
        seed: Seed of the cloze sampling.
        passage_bytes: Maximum UTF-8 bytes per held-out passage.

    Returns:
        Counts: ``heldout_passages``, ``heldout_bytes``, ``cloze_items``.
    """
    docs = [_id_text(d) for d in test_docs]
    passages = [{"id": f"{doc_id}#{k}", "text": piece}
                for doc_id, text in docs for k, piece in enumerate(segment_text(text, passage_bytes))]
    items = cloze_items(docs, n_cloze=n_cloze, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "heldout.jsonl", passages)
    _write_jsonl(out_dir / "cloze.jsonl", items)
    return {"heldout_passages": len(passages),
            "heldout_bytes": sum(len(p["text"].encode("utf-8")) for p in passages),
            "cloze_items": len(items)}


def cloze_items(docs: list[tuple[str, str]], *, n_cloze: int, seed: int = 0) -> list[dict]:
    """Deterministic 4-way continuation items (see :func:`build_eval_data`).

    Args:
        docs: ``(id, text)`` pairs.
        n_cloze: Number of items wanted.
        seed: Seed of every random choice (lines, cut points, distractors, gold positions).

    Returns:
        Items ``{"id", "context", "choices", "gold"}``, ``choices[gold]`` being the true one.
    """
    rng = np.random.default_rng(seed)
    pool = _cloze_pool(docs, rng)
    if not pool:
        return []
    lengths = np.array([len(p["continuation"].encode("utf-8")) for p in pool])
    tiebreak = rng.random(len(pool))
    chosen = np.sort(rng.choice(len(pool), size=min(n_cloze, len(pool)), replace=False))
    items = []
    for i in chosen:
        target = pool[i]
        order = np.lexsort((tiebreak, np.abs(lengths - lengths[i])))
        bucket = []
        for j in order:
            if len(bucket) == LENGTH_NEIGHBOURS:
                break
            other = pool[j]
            near = other["doc"] == target["doc"] and abs(other["line"] - target["line"]) <= CONTEXT_LINES
            if not near and other["continuation"] not in {target["continuation"], *bucket}:
                bucket.append(other["continuation"])
        if len(bucket) < N_CHOICES - 1:
            continue
        distractors = [bucket[k] for k in rng.choice(len(bucket), size=N_CHOICES - 1, replace=False)]
        gold = int(rng.integers(N_CHOICES))
        items.append({"id": f"{target['doc']}:{target['line'] + 1}", "context": target["context"],
                      "choices": distractors[:gold] + [target["continuation"]] + distractors[gold:],
                      "gold": gold})
    return items


def _cloze_pool(docs: list[tuple[str, str]], rng: np.random.Generator) -> list[dict]:
    """One (context, continuation) candidate per usable line, cut at a random inner space."""
    pool = []
    for doc_id, text in docs:
        lines = text.splitlines()
        for n in range(CONTEXT_LINES, len(lines)):
            previous = lines[n - CONTEXT_LINES:n]
            line = lines[n].rstrip()
            # Cut before a space that leaves >= 1 word before and >= 2 words after it.
            cuts = [k for k, ch in enumerate(line) if ch == " " and line[:k].strip()][:-1]
            if not cuts or not all(p.strip() for p in previous):
                continue
            cut = cuts[int(rng.integers(len(cuts)))]
            pool.append({"doc": doc_id, "line": n, "context": "\n".join(previous + [line[:cut]]),
                         "continuation": line[cut:]})
    return pool


def _id_text(doc) -> tuple[str, str]:
    if isinstance(doc, dict):
        return str(doc["id"]), doc["text"]
    return str(doc.id), doc.text


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def render_tasks(data_dir: Path, out_dir: Path, task_dir: Path = TASK_DIR) -> Path:
    """Copy the task YAMLs into ``out_dir`` with the absolute data and cache folders filled in.

    Args:
        data_dir: Folder holding ``heldout.jsonl`` and ``cloze.jsonl``.
        out_dir: Include folder to create; the datasets cache goes to ``out_dir/hf_datasets``.
        task_dir: Folder of the template YAMLs.

    Returns:
        ``out_dir``, ready for ``TaskManager(include_path=...)``.
    """
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"eval data folder {data_dir} does not exist (run `ctdbench eval-data`)")
    templates = sorted(Path(task_dir).glob("*.yaml"))
    if not templates:
        raise FileNotFoundError(f"no task YAMLs in {task_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # json.dumps escapes the path for the double-quoted YAML strings holding the placeholders.
    quoted = lambda p: json.dumps(str(p))[1:-1]
    for template in templates:
        text = template.read_text(encoding="utf-8")
        text = text.replace(DATA_DIR_PLACEHOLDER, quoted(data_dir))
        text = text.replace(CACHE_DIR_PLACEHOLDER, quoted(out_dir / "hf_datasets"))
        (out_dir / template.name).write_text(text, encoding="utf-8")
    return out_dir


def evaluate_model(model_dir, data_dir, out_path, *, tasks=DEFAULT_TASKS, batch_size: int = 16,
                   max_length: int | None = None, limit: int | None = None, device: str = "cpu",
                   apply_chat_template: bool = False, fewshot_as_multiturn: bool = False) -> dict:
    """Run lm-eval on a saved causal LM and write ``out_path`` (see :func:`read_eval`).

    A model with a NaN or infinite weight is refused before scoring, and a result with a
    non-finite metric is never written (:func:`check_finite`).

    Args:
        model_dir: Folder with the model and its tokenizer (``save_pretrained``).
        data_dir: Folder written by :func:`build_eval_data`.
        out_path: The JSON file to write (a fixed name, for Snakemake); None: only return it.
        tasks: lm-eval task names. Those of ``workflows/tasks`` are local; naming any other
            (e.g. ``arc_easy``) also loads lm-eval's own task index, whose datasets need the hub
            (set ``HF_HUB_OFFLINE=0`` and ``HF_DATASETS_OFFLINE=0`` for those).
        batch_size: lm-eval batch size (rolling windows or choices per forward pass).
        max_length: Tokens per window; longer documents are scored in disjoint windows of this
            many predicted tokens. ``None`` uses the model's maximum positions.
        limit: Documents per task (a prefix, for smoke tests); ``None`` for all.
        device: Torch device for the model.
        apply_chat_template, fewshot_as_multiturn: lm-eval's chat settings, for instruction-tuned
            models at paper scale (recorded in ``lm_eval.chat``); the tokenizer's own template.

    Returns:
        The dictionary written to ``out_path``.
    """
    _offline()
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctdbench.models import non_finite_parameters

    start = time.perf_counter()
    model_dir = Path(model_dir).resolve()
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    if bad := non_finite_parameters(model):
        raise FloatingPointError(f"{model_dir}: non-finite weights in {', '.join(bad[:5])}; not evaluating it")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = _bos_context_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             max_length=max_length)
    with tempfile.TemporaryDirectory(prefix="ctd_tasks_") as tmp:
        include = render_tasks(Path(data_dir), Path(tmp))
        # Indexing lm-eval's hundreds of built-in tasks takes seconds: only when one is asked for.
        builtin = set(tasks) - {p.stem for p in TASK_DIR.glob("*.yaml")}
        manager = TaskManager(include_path=str(include), include_defaults=bool(builtin))
        with torch.inference_mode():
            raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          batch_size=batch_size, device=device, log_samples=False,
                                          apply_chat_template=apply_chat_template,
                                          fewshot_as_multiturn=fewshot_as_multiturn)
    result = {
        "model_dir": str(model_dir),
        "tasks": {task: _flat_metrics(metrics) for task, metrics in raw["results"].items()},
        "lm_eval": {
            "version": getattr(lm_eval, "__version__", None) or raw.get("lm_eval_version"),
            "n-samples": raw.get("n-samples", {}),
            "higher_is_better": raw.get("higher_is_better", {}),
            "versions": raw.get("versions", {}),
            "config": {**raw.get("config", {}), "max_length": lm.max_length,
                       "prefix_token_id": lm.prefix_token_id, "tokenizer_class": type(tokenizer).__name__},
            "date": datetime.datetime.fromtimestamp(raw["date"], datetime.timezone.utc).isoformat(),
            "chat": {"apply_chat_template": apply_chat_template, "fewshot_as_multiturn": fewshot_as_multiturn,
                     "chat_template": getattr(tokenizer, "chat_template", None) if apply_chat_template else None},
        },
        "timing": {"seconds": round(time.perf_counter() - start, 3)},
    }
    result = json.loads(json.dumps(result, default=str))  # lm-eval's config holds e.g. torch dtypes
    if out_path is not None:
        write_eval(result, out_path)
    return result


def check_finite(result: dict, where) -> None:
    """Refuse a result with a NaN or infinite metric (a broken model's numbers must not be reported)."""
    bad = [f"{task}/{metric}" for task, metrics in result["tasks"].items() for metric, value in metrics.items()
           if not metric.endswith("_stderr") and isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"{where}: non-finite metrics {', '.join(bad)}; not writing them")


def write_eval(result: dict, out_path) -> None:
    """Write ``eval.json`` whole or not at all, and only with finite metrics."""
    check_finite(result, out_path)
    write_atomic(out_path, json.dumps(result, indent=2) + "\n")


def read_eval(path) -> dict:
    """Load an ``eval.json`` written by :func:`evaluate_model`.

    Schema::

        {"model_dir": str,
         "tasks": {task: {metric: float, metric + "_stderr": float | None}},
         "lm_eval": {"version", "n-samples", "higher_is_better", "versions", "config", "date"},
         "timing": {"seconds": float}}

    Raises:
        ValueError: If the file lacks the ``tasks`` mapping.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path}: not an eval.json (no 'tasks' mapping)")
    return data


def _flat_metrics(metrics: dict) -> dict:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": x, ...}``."""
    flat = {}
    for key, value in metrics.items():
        if "," not in key:
            continue  # "alias" and other labels
        name, filt = key.split(",", 1)
        name = name if filt == "none" else f"{name}[{filt}]"
        # lm-eval has no closed-form stderr for weighted aggregations (bits_per_byte): "N/A".
        flat[name] = float(value) if isinstance(value, (int, float)) else None
    return flat


def _offline() -> None:
    """Make any accidental hub lookup fail at once instead of waiting on the network.

    Nothing here needs the hub; the variables act on the HF libraries not imported yet.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lm-eval logs every request at INFO; the warnings are what a log reader needs.
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


@functools.cache
def _bos_context_hflm():
    """``HFLM`` whose non-empty contexts start with the BOS token, as every training segment does.

    lm-eval prepends ``prefix_token_id`` only to rolling windows and empty contexts and otherwise
    relies on the tokenizer to add BOS. Ours (like GPT-2's) add none, so cloze contexts would
    start at a position the models never saw in training. Tokenizers that do add BOS are left as
    they are.
    """
    from lm_eval.models.huggingface import HFLM

    class BosContextHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            context_enc, continuation_enc = super()._encode_pair(context, continuation)
            if context_enc[:1] != [self.prefix_token_id]:
                context_enc = [self.prefix_token_id] + context_enc
            return context_enc, continuation_enc

    return BosContextHFLM
