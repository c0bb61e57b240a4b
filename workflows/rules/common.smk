# Helpers shared by the rules: paths, target lists and per-job specs. No rules here.
import json
import re
import shlex

from snakemake.exceptions import WorkflowError

from ctdbench import specs as ctd_specs
from ctdbench.config import accelerate_config, pair_methods, trained_teachers
from ctdbench.config import pairs as config_pairs

RESULTS = f"results/{config['name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
PAIRS = config_pairs(config)
METHODS = sorted({m for p in PAIRS for m in pair_methods(config, p)})
SEEDS = config["run"]["seeds"]
RUN = RESULTS + "/{pair}/{method}/seed{seed}"

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
    """How a training rule starts ctdbench: directly, or one process per GPU of the job.

    Chosen when the workflow is parsed, so one-GPU configs keep their exact shell command
    (Snakemake reruns the jobs whose command changed).
    """
    if not multi_gpu:
        return "ctdbench"
    return (
        f"accelerate launch --config_file {shlex.quote(str(accelerate_config(config)))} --num_machines 1"
        " --num_processes {resources.gpu} -m ctdbench.cli"
    )
