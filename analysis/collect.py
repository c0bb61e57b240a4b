"""results/<config>/ -> tidy tables: one row per (pair, method, seed, task, metric).

Reads result files only (``run.json``, ``eval.json``, ``train_log.jsonl``; layout in the README),
so it runs without the training stack. Runs that have not finished (no ``run.json``) or whose
files are unreadable are skipped with a :class:`ResultsWarning`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["config", "pair", "method", "seed", "task", "metric", "value", "stderr"]
CURVE_COLUMNS = ["pair", "method", "seed", "step", "bytes_seen", "val_bpb"]
TEACHER, SFT = "teacher", "sft"
RUN_TASK = "run"  # cost rows: the numeric fields of run.json's sections below
RUN_SECTIONS = ("timing", "memory", "budget")
# Top-level folders of results/<config>/ that are not tokenizer pairs.
NOT_PAIRS = {"teachers", "data", "tokenizers", "figures", "logs", "benchmarks"}
SEED_DIR = re.compile(r"seed(\d+)")

# Two-sided 95% Student-t quantiles t(0.975; df) for df = 1..30.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


class ResultsWarning(UserWarning):
    """A result file is missing or unreadable; what depends on it is left out."""


def run_dirs(config_dir: Path) -> list[tuple[str, str, int, Path]]:
    """``(pair, method, seed, folder)`` of every ``<pair>/<method>/seed<k>/`` folder, sorted."""
    found = []
    for folder in Path(config_dir).glob("*/*/seed*"):
        match = SEED_DIR.fullmatch(folder.name)
        if match and folder.is_dir() and folder.parent.parent.name not in NOT_PAIRS:
            found.append((folder.parent.parent.name, folder.parent.name, int(match.group(1)), folder))
    return sorted(found, key=lambda r: r[:3])


def collect(config_dir: Path) -> pd.DataFrame:
    """Gather every student, teacher and cost result of one config into one tidy table.

    Student rows come from each seed's ``eval.json``; cost rows (task ``"run"``) from its
    ``run.json``; the teacher's ``eval.json`` gives rows with method ``"teacher"`` and seed 0,
    repeated for every pair whose ``run.json`` names it in ``pair_spec.teacher``.

    Args:
        config_dir: ``results/<config>``.

    Returns:
        Columns ``config, pair, method, seed, task, metric, value, stderr`` (stderr NaN if unknown).
    """
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        raise FileNotFoundError(f"{config_dir} is not a results folder")
    rows: list[dict] = []
    teacher_of: dict[str, str] = {}
    for pair, method, seed, folder in run_dirs(config_dir):
        run = _read_json(folder / "run.json", "training not finished; run skipped")
        if run is None:
            continue
        key = {"config": config_dir.name, "pair": pair, "method": method, "seed": seed}
        teacher = _teacher_name(run)
        if teacher and (teacher != Path(teacher).name or teacher in (".", "..")):
            warnings.warn(f"{folder / 'run.json'} names teacher {teacher!r}, not a folder name: its rows skipped",
                          ResultsWarning, stacklevel=2)
        elif teacher:
            teacher_of.setdefault(pair, teacher)
        rows += _cost_rows(run, key)
        evaluation = _read_json(folder / "eval.json", "not evaluated; cost rows only")
        if evaluation is not None:
            rows += _eval_rows(evaluation, key)
    for pair, teacher in sorted(teacher_of.items()):
        evaluation = _read_json(config_dir / "teachers" / teacher / "eval.json", "teacher not evaluated")
        if evaluation is not None:
            rows += _eval_rows(evaluation, {"config": config_dir.name, "pair": pair, "method": TEACHER, "seed": 0})
    return pd.DataFrame(rows, columns=COLUMNS).astype({"seed": int, "value": float, "stderr": float})


def pair_teachers(config_dir: Path) -> dict[str, str]:
    """``pair -> teacher name`` from the finished runs' ``run.json`` (``pair_spec.teacher``)."""
    teacher_of: dict[str, str] = {}
    for pair, _, _, folder in run_dirs(config_dir):
        if pair not in teacher_of:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResultsWarning)  # collect() already reported it
                run = _read_json(folder / "run.json", "")
            if run is not None and (teacher := _teacher_name(run)):
                teacher_of[pair] = teacher
    return teacher_of


def write_summary(config_dir: Path, table: pd.DataFrame | None = None) -> Path:
    """Write ``config_dir/summary.csv`` (the :func:`collect` table) and return its path.

    Args:
        config_dir: ``results/<config>``.
        table: An already collected table, to avoid reading the results twice.
    """
    table = collect(config_dir) if table is None else table
    path = Path(config_dir) / "summary.csv"
    return write_whole(path, lambda tmp: table.to_csv(tmp, index=False))


def write_whole(path: Path, write) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then renamed: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def learning_curves(config_dir: Path) -> pd.DataFrame:
    """Validation rows of every finished run's ``train_log.jsonl``.

    Returns:
        Columns ``pair, method, seed, step, bytes_seen, val_bpb``.
    """
    rows = []
    for pair, method, seed, folder in run_dirs(config_dir):
        log = folder / "train_log.jsonl"
        if not (folder / "run.json").exists() or not log.exists():
            continue
        for n, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{log}:{n}: unreadable line skipped", ResultsWarning, stacklevel=2)
                continue
            if isinstance(row, dict) and _is_number(row.get("val_bpb")) and _is_number(row.get("bytes_seen")):
                rows.append({"pair": pair, "method": method, "seed": seed, "step": row.get("step"),
                             "bytes_seen": row["bytes_seen"], "val_bpb": row["val_bpb"]})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile (Cornish-Fisher expansion beyond the table's 30 df)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def describe(values) -> tuple[int, float, float, float]:
    """``(n, mean, sd, ci95)`` of the finite values; ci95 is the half-width of the 95% Student-t
    interval of the mean. sd and ci95 are NaN below two values, everything below one."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    if n == 1:
        return 1, float(v[0]), math.nan, math.nan
    sd = float(v.std(ddof=1))
    return n, float(v.mean()), sd, float(t_quantile_975(n - 1) * sd / math.sqrt(n))


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of its 95% Student-t confidence interval (NaN for fewer than 2 values)."""
    _, mean, _, ci = describe(values)
    return mean, ci


STATS_COLUMNS = ["pair", "method", "task", "metric", "n", "mean", "sd", "ci95"]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Seeds aggregated: one row per (pair, method, task, metric) with ``n, mean, sd, ci95``
    (``ci95``: half-width of the 95% Student-t interval of the mean; ``sd``: over seeds)."""
    rows = []
    for (pair, method, task, metric), group in table.groupby(["pair", "method", "task", "metric"], sort=False):
        n, mean, sd, ci = describe(group["value"])
        rows.append({"pair": pair, "method": method, "task": task, "metric": metric, "n": n, "mean": mean,
                     "sd": sd, "ci95": ci})
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


def method_order(methods, preferred: list[str] | None = None) -> list[str]:
    """Stable display order: teacher, sft, then ``preferred`` (e.g. the config's), then alphabetical."""
    present = set(methods)
    head = [m for m in (TEACHER, SFT, *(preferred or [])) if m in present]
    return list(dict.fromkeys(head)) + sorted(present - set(head))


def headline(table: pd.DataFrame, metrics=(("ctd_heldout", "bits_per_byte"), ("ctd_cloze", "acc")),
             preferred: list[str] | None = None) -> pd.DataFrame:
    """Compact text table: ``mean ± 95% CI`` per pair x method for the headline metrics."""
    stats = summarize(table[table["task"] != RUN_TASK])
    columns = [f"{task}/{metric}" for task, metric in metrics]
    rows = []
    for pair in sorted(stats["pair"].unique()):
        in_pair = stats[stats["pair"] == pair]
        for method in method_order(in_pair["method"], preferred):
            row = {"pair": pair, "method": method, "seeds": 0}
            for (task, metric), column in zip(metrics, columns):
                hit = in_pair[(in_pair["method"] == method) & (in_pair["task"] == task) & (in_pair["metric"] == metric)]
                if len(hit):
                    s = hit.iloc[0]
                    row["seeds"] = max(row["seeds"], int(s["n"]))
                    row[column] = f"{s['mean']:.3f}" + (f" ± {s['ci95']:.3f}" if np.isfinite(s["ci95"]) else "")
            rows.append(row)
    return pd.DataFrame(rows, columns=["pair", "method", "seeds", *columns]).fillna("-")


def _read_json(path: Path, consequence: str) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        warnings.warn(f"{path} missing: {consequence}", ResultsWarning, stacklevel=3)
        return None
    except (OSError, ValueError) as e:
        warnings.warn(f"{path} unreadable ({e}): {consequence}", ResultsWarning, stacklevel=3)
        return None
    if not isinstance(data, dict):
        warnings.warn(f"{path} is not a JSON object: {consequence}", ResultsWarning, stacklevel=3)
        return None
    return data


def _teacher_name(run: dict) -> str | None:
    spec = run.get("pair_spec")
    teacher = spec.get("teacher") if isinstance(spec, dict) else None
    return str(teacher) if teacher else None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _cost_rows(run: dict, key: dict) -> list[dict]:
    rows = []
    for section in RUN_SECTIONS:
        for metric, value in (run.get(section) or {}).items():
            if _is_number(value):
                rows.append({**key, "task": RUN_TASK, "metric": metric, "value": value, "stderr": math.nan})
    return rows


def _eval_rows(evaluation: dict, key: dict) -> list[dict]:
    rows = []
    tasks = evaluation.get("tasks")
    for task, metrics in (tasks if isinstance(tasks, dict) else {}).items():
        for metric, value in (metrics if isinstance(metrics, dict) else {}).items():
            if metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = metrics.get(f"{metric}_stderr")
            rows.append({**key, "task": task, "metric": metric, "value": value,
                         "stderr": stderr if _is_number(stderr) else math.nan})
    return rows
