"""Where a config's files live under ``results/<config>/``, defined once.

The workflow's rules, the run specs and ``ctdbench bench`` take their paths from here. Each
function takes the results folder (:func:`results_dir`) and names; the rules pass wildcards
(``"{pair}"``) as names to get their path patterns.
"""

from __future__ import annotations

# The folders beside the pair folders; config validation refuses a pair of one of these names.
RESERVED = {"data", "tokenizers", "teachers", "maps", "figures", "logs", "benchmarks"}


def results_dir(config: dict) -> str:
    return f"results/{config['name']}"


def data_dir(results: str) -> str:
    """The corpus splits (``train/validation/test.jsonl``); lm-eval's task data in ``eval/``."""
    return f"{results}/data"


def logs_dir(results: str) -> str:
    """One log per job (``distill/<pair>/<method>/seed<k>.log``, ...)."""
    return f"{results}/logs"


def benchmarks_dir(results: str) -> str:
    """Snakemake's ``benchmark:`` files: each job's time and memory."""
    return f"{results}/benchmarks"


def tokenizer_dir(results: str, tokenizer: str) -> str:
    return f"{results}/tokenizers/{tokenizer}"


def teacher_dir(results: str, teacher: str) -> str:
    """A teacher's ``model/``, ``run.json``, ``eval.json`` and ``cache/``."""
    return f"{results}/teachers/{teacher}"


def precomputed_path(results: str, pair: str, method: str, suffix: str) -> str:
    """A method's per-pair file (``DistillationMethod.precompute``); its receipt is this + ``.json``."""
    return f"{results}/maps/{pair}/{method}{suffix}"


def run_dir(results: str, pair: str, method: str, seed: int | str) -> str:
    """One student's ``student/``, ``run.json``, ``train_log.jsonl`` and ``eval.json``."""
    return f"{results}/{pair}/{method}/seed{seed}"
