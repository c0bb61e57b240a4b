"""The paper-scale configs validate and Snakemake plans them, offline (they run on GPUs only)."""

import re
from pathlib import Path

import pytest

from ctdbench import config as ctd_config
from ctdbench import specs

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "workflows/config/paper").glob("*.yaml"))


def test_there_is_one_config_per_paper_setup():
    assert {p.stem for p in PAPER} == {"llama3_to_qwen2", "llama3_to_byte", "openmath2_to_gemma2"}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_follows_the_alm_recipe(path):
    config = ctd_config.load(path)
    train = config["distill"]["train"]
    assert (train["steps"], train["batch_size"], train["grad_accum"]) == (5000, 64, 4)
    assert config["device"] == "cuda" and config["corpus"]["source"].startswith("hf:")
    assert config["evaluate"]["apply_chat_template"] is True
    assert all(m.get("dtype") == "bfloat16" for m in config["models"].values())
    pair = next(iter(config["pairs"]))
    spec = specs.distill_spec(config, pair, "sft", 0)
    assert ("lora" in spec) == (path.stem == "llama3_to_qwen2")  # tokenkit: LoRA for subword transfer only
    if "lora" in spec:
        assert (spec["lora"]["r"], spec["lora"]["alpha"]) == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_snakemake_plans_paper_config(path, tmp_path, run_snakemake):
    result = run_snakemake(tmp_path, "-n", "--resources", "gpu=8", "--configfile", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = ctd_config.load(path)
    n_runs = len(config["run"]["methods"]) * len(config["run"]["seeds"])
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M))
    assert int(jobs["distill"]) == n_runs and int(jobs["evaluate_student"]) == n_runs
    assert int(jobs["teacher"]) == 1  # copies the hub checkpoint, no pretraining


def distill_commands(stdout: str) -> list[str]:
    return [line.removeprefix("Shell command: ") for line in stdout.splitlines() if " distill --spec " in line]


@pytest.mark.slow
def test_multi_gpu_runs_are_started_by_accelerate(tmp_path, run_snakemake):
    path = REPO / "workflows/config/paper/openmath2_to_gemma2.yaml"
    assert ctd_config.load(path)["gpus_per_run"] == 4
    result = run_snakemake(tmp_path, "-n", "-p", "--resources", "gpu=4", "--configfile", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    launch = (f"accelerate launch --config_file {REPO}/profiles/accelerate/fsdp.yaml --num_machines 1"
              " --num_processes 4 -m ctdbench.cli distill --spec ")
    commands = distill_commands(result.stdout)
    assert len(commands) == 5 and all(c.startswith(launch) for c in commands)
    # One GPU per run: the plain command, exactly as before multi-GPU support (no reruns).
    one_gpu = REPO / "workflows/config/paper/llama3_to_qwen2.yaml"
    result = run_snakemake(tmp_path, "-n", "-p", "--configfile", str(one_gpu))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert distill_commands(result.stdout) and all(c.startswith("ctdbench distill --spec ")
                                                   for c in distill_commands(result.stdout))


@pytest.mark.slow
def test_too_few_gpus_for_a_run_is_an_error(tmp_path, run_snakemake):
    path = REPO / "workflows/config/paper/openmath2_to_gemma2.yaml"
    result = run_snakemake(tmp_path, "-n", "--configfile", str(path))  # profiles/default: gpu=1
    assert result.returncode != 0 and "pass --resources gpu=4" in result.stdout + result.stderr
