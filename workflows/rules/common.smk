# Helpers shared by the rules: paths, target lists and per-job specs. No rules here.
import json
import os
import re
import shlex

from snakemake.exceptions import WorkflowError

from ctdbench import layout
from ctdbench import specs as ctd_specs
from ctdbench.config import accelerate_config, pair_methods, trained_teachers
from ctdbench.config import pairs as config_pairs

# Every path comes from ctdbench.layout, which the specs and `ctdbench bench` also use.
RESULTS = layout.results_dir(config)
DATA = layout.data_dir(RESULTS)
LOGS = layout.logs_dir(RESULTS)
BENCH = layout.benchmarks_dir(RESULTS)
RUN = layout.run_dir(RESULTS, "{pair}", "{method}", "{seed}")
PAIRS = config_pairs(config)
METHODS = sorted({m for p in PAIRS for m in pair_methods(config, p)})
SEEDS = config["run"]["seeds"]

# The software of every job under `--sdm conda` (relative to the rule files).
CONDA_ENV = "../envs/ctdbench.yaml"

# Names are validated safe words (ctdbench.config); escaped, '.' and '+' match only themselves.
wildcard_constraints:
    pair="|".join(map(re.escape, PAIRS)),
    method="|".join(map(re.escape, METHODS)),
    seed=r"\d+",
    teacher="|".join(map(re.escape, config["teachers"])),
    tokenizer="|".join(map(re.escape, config["tokenizers"])),


def as_arg(obj):
    """A spec as one shell-quoted JSON argument (params: Snakemake reruns a job when it changes).

    Config text reaches a shell command only this way or as a validated name inside a path, and
    every path in a command is quoted (``{...:q}``).
    """
    return shlex.quote(json.dumps(obj, sort_keys=True))


def input_folder(name):
    """params: the folder of the job's input ``name`` (follows the input, unlike a written-out prefix)."""
    return lambda wildcards, input: os.path.dirname(getattr(input, name))


def output_folder(name):
    """params: the folder of the job's output ``name``."""
    return lambda wildcards, output: os.path.dirname(getattr(output, name))


def teacher_of(pair):
    return config["pairs"][pair]["teacher"]


def tokenizer_of_teacher(teacher):
    return config["teachers"][teacher]["tokenizer"]


def teacher_tokenizer_dir(wildcards):
    return layout.tokenizer_dir(RESULTS, tokenizer_of_teacher(teacher_of(wildcards.pair)))


def student_tokenizer_dir(wildcards):
    return layout.tokenizer_dir(RESULTS, config["pairs"][wildcards.pair]["student_tokenizer"])


def teacher_dir(teacher):
    return layout.teacher_dir(RESULTS, teacher)


def all_runs(filename):
    return [
        f"{layout.run_dir(RESULTS, pair, method, seed)}/{filename}"
        for pair in PAIRS for method in pair_methods(config, pair) for seed in SEEDS
    ]


def used_teachers():
    return sorted({teacher_of(p) for p in PAIRS})


def job_gpus(trains=True):
    """GPUs a job requests: `gpus_per_run` for a training job, else one; none off CUDA."""
    if config["device"] != "cuda":
        return 0
    return config["gpus_per_run"] if trains else 1


# Snakemake lowers a job's `gpu` request to the --resources limit (profiles/default: 1), which
# would quietly start fewer processes than gpus_per_run.
GPU_LIMIT = workflow.global_resources.get("gpu")
if job_gpus() > 1 and GPU_LIMIT is not None and GPU_LIMIT.value < job_gpus():
    raise WorkflowError(
        f"gpus_per_run is {job_gpus()} but Snakemake may use {GPU_LIMIT.value} GPU(s) at once; "
        f"pass --resources gpu={job_gpus()}"
    )


def ctdbench_command(multi_gpu):
    """How a training job starts ctdbench, directly or as one process per GPU of the job.

    Chosen when the workflow is parsed, so one-GPU configs keep their exact shell command
    (Snakemake reruns the jobs whose command changed).
    """
    if not multi_gpu:
        return "ctdbench"
    return (
        f"accelerate launch --config_file {shlex.quote(str(accelerate_config(config)))} --num_machines 1"
        " --num_processes {resources.gpu} -m ctdbench.cli"
    )
