# Helpers shared by the rules: paths, target lists and per-job specs. No rules here.
import json
import shlex

from ctdbench import specs as ctd_specs
from ctdbench.config import pair_methods
from ctdbench.config import pairs as config_pairs

RESULTS = f"results/{config['name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
PAIRS = config_pairs(config)
METHODS = sorted({m for p in PAIRS for m in pair_methods(config, p)})
SEEDS = config["run"]["seeds"]
RUN = RESULTS + "/{pair}/{method}/seed{seed}"

wildcard_constraints:
    pair="|".join(PAIRS),
    method="|".join(m.replace("+", r"\+") for m in METHODS),
    seed=r"\d+",
    teacher="|".join(config["teachers"]),
    tokenizer="|".join(config["tokenizers"]),


def as_arg(obj):
    """A spec as one shell-quoted JSON argument (params: Snakemake reruns a job when it changes)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def teacher_of(pair):
    return config["pairs"][pair]["teacher"]


def tokenizer_of_teacher(teacher):
    return config["teachers"][teacher]["tokenizer"]


def all_runs(filename):
    return [
        f"{RESULTS}/{pair}/{method}/seed{seed}/{filename}"
        for pair in PAIRS for method in pair_methods(config, pair) for seed in SEEDS
    ]


def used_teachers():
    return sorted({teacher_of(p) for p in PAIRS})
