"""Evaluation: lm-evaluation-harness on a checkpoint, written to a fixed-path ``eval.json``.

lm-eval's own output files carry timestamps, which a workflow cannot declare, so
``lm_eval.simple_evaluate`` is called from Python and its result written to the path given.
Local tasks live in ``workflows/tasks``; their ``__DATA_DIR__`` placeholder is rendered to the
absolute eval-data folder first.

``eval.json``::

    {"model_dir": ..., "tasks": {task: {metric: value, metric + "_stderr": value}},
     "lm_eval": {"version", "n-samples", "higher_is_better", "config"}, "timing": {"seconds"}}
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

from ctdbench.data import segment_text

TASKS_DIR = Path(__file__).resolve().parents[1] / "workflows" / "tasks"


def _docs(test_docs) -> list[tuple[str, str]]:
    return [(d["id"], d["text"]) if isinstance(d, dict) else (d.id, d.text) for d in test_docs]


def _cloze_items(lines: list[str], n: int, seed: int) -> list[dict]:
    """Context = two lines + the first half of a line; choices = its second half vs 3 others."""
    rng = random.Random(seed)
    candidates = [i for i in range(2, len(lines)) if len(lines[i]) >= 30 and " " in lines[i][10:-5]]
    halves = {}
    for i in candidates:
        line = lines[i]
        cut = line.rfind(" ", 0, len(line) // 2 + 1)
        cut = cut if cut > 0 else line.find(" ", len(line) // 2)
        halves[i] = (line[:cut], line[cut:])  # the second half keeps its leading space
    items = []
    for i in rng.sample(candidates, min(n, len(candidates))):
        head, tail = halves[i]
        # Distractors of similar byte length, so length alone does not give the answer away.
        pool = [j for j in candidates if j != i and 0.7 <= len(halves[j][1]) / len(tail) <= 1.3
                and halves[j][1] != tail]
        if len(pool) < 3:
            continue
        choices = [tail] + [halves[j][1] for j in rng.sample(pool, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": f"{lines[i - 2]}\n{lines[i - 1]}\n{head}",
                      "choices": [choices[k] for k in order], "gold": order.index(0)})
    return items


def build_eval_data(test_docs, out_dir: Path, *, n_cloze: int = 200, seed: int = 0, passage_bytes: int = 2048) -> dict:
    """Write ``heldout.jsonl`` and ``cloze.jsonl`` for the local tasks from the held-out split.

    Passages of about ``passage_bytes`` bytes (cut at line ends) keep per-document windows short
    enough to batch well while covering the whole split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = _docs(test_docs)
    passages = [{"id": f"{doc_id}/{k}", "text": p} for doc_id, text in docs
                for k, p in enumerate(segment_text(text, passage_bytes))]
    lines = [line for _, text in docs for line in text.splitlines() if line.strip()]
    cloze = _cloze_items(lines, n_cloze, seed)
    for name, rows in (("heldout", passages), ("cloze", cloze)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"heldout_passages": len(passages), "heldout_bytes": sum(len(p["text"].encode()) for p in passages),
            "cloze_items": len(cloze)}


def _render_tasks(data_dir: Path, target: Path) -> None:
    for path in TASKS_DIR.glob("*.yaml"):
        (target / path.name).write_text(path.read_text().replace("__DATA_DIR__", str(Path(data_dir).resolve())))


def _flatten(results: dict) -> dict:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": x, "acc_stderr": s}``."""
    out = {}
    for task, metrics in results.items():
        out[task] = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name not in ("alias", "sample_len") and isinstance(value, (int, float)):
                out[task][name] = None if isinstance(value, float) and math.isnan(value) else value
    return out


def evaluate_model(model_dir, data_dir, out_path, *, tasks=("ctd_heldout", "ctd_cloze"), batch_size: int = 16,
                   max_length: int | None = None, limit: int | None = None, device: str = "cpu") -> dict:
    """Run lm-eval on the checkpoint in ``model_dir`` and write ``out_path`` (see module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints and tasks only
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ctdbench.models import load_model
    from ctdbench.tokenizers import load_tokenizer

    t0 = time.perf_counter()
    model = load_model(model_dir).to(device).eval()
    tokenizer = load_tokenizer(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    with tempfile.TemporaryDirectory() as include:
        _render_tasks(Path(data_dir), Path(include))
        result = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=include, include_defaults=False),
            limit=limit, log_samples=False, bootstrap_iters=1000,
        )
    report = {
        "model_dir": str(model_dir),
        "tasks": _flatten(result["results"]),
        "lm_eval": {
            "version": getattr(lm_eval, "__version__", None),
            "n-samples": result.get("n-samples"),
            "higher_is_better": result.get("higher_is_better"),
            "config": {"batch_size": batch_size, "max_length": lm.max_length, "limit": limit, "device": device,
                       "prefix_token_id": lm.prefix_token_id},
        },
        "timing": {"seconds": time.perf_counter() - t0},
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def read_eval(path) -> dict:
    return json.loads(Path(path).read_text())
