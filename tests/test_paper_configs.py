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
    result = run_snakemake(tmp_path, "-n", "--configfile", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = ctd_config.load(path)
    n_runs = len(config["run"]["methods"]) * len(config["run"]["seeds"])
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M))
    assert int(jobs["distill"]) == n_runs and int(jobs["evaluate_student"]) == n_runs
    assert int(jobs["teacher"]) == 1  # copies the hub checkpoint, no pretraining
