"""Config validation: defaults filled, and every error names the offending key."""

import copy
from pathlib import Path

import pytest
import yaml

from ctdbench import config as ctd_config

CONFIGS = Path(__file__).resolve().parents[1] / "workflows" / "config"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml"])
def test_shipped_configs_validate(name):
    cfg = ctd_config.validate(load(name))
    assert cfg["distill"]["train"]["grad_accum"] == 1  # default filled
    assert cfg["distill"]["train"]["betas"] == [0.9, 0.95]


def test_defaults_are_not_shared_between_configs():
    a, b = ctd_config.validate(load("smoke.yaml")), ctd_config.validate(load("smoke.yaml"))
    a["distill"]["train"]["betas"].append(1.0)
    assert b["distill"]["train"]["betas"] == [0.9, 0.95]


def edited(path: str, value, base="smoke.yaml") -> dict:
    cfg = copy.deepcopy(load(base))
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("distill.train.stpes", 3, "distill.train.stpes"),
        ("distill.train.steps", "many", "distill.train.steps"),
        ("distill.train.lr", -1, "distill.train.lr"),
        ("models.student.arch", "mamba", "models.student.arch"),
        ("pairs.bpe_to_sp.teacher", "nobody", "pairs.bpe_to_sp.teacher"),
        ("tokenizers.sp.kind", "wordpiece", "tokenizers.sp.kind"),
        ("evaluate.batch_sise", 4, "evaluate.batch_sise"),
        ("colour", "blue", "colour"),
    ],
)
def test_invalid_config_names_the_key(path, value, expected):
    with pytest.raises(ctd_config.ConfigError, match=f"'{expected}'"):
        ctd_config.validate(edited(path, value))


def test_unknown_method_lists_available():
    cfg = edited("run.methods", ["sft", "magic"])
    with pytest.raises(ctd_config.ConfigError, match=r"run.methods.1.*unknown method 'magic'; available: .*sft"):
        ctd_config.validate(cfg)


def test_unknown_method_hyperparameter_is_named():
    cfg = edited("methods.sft", {"temprature": 2.0})
    with pytest.raises(ctd_config.ConfigError, match="methods.sft.*temprature"):
        ctd_config.validate(cfg)


def test_missing_teacher_budget():
    cfg = load("smoke.yaml")
    del cfg["teachers"]["t"]["train"]
    with pytest.raises(ctd_config.ConfigError, match="teachers.t.train"):
        ctd_config.validate(cfg)


def test_reserved_pair_name():
    cfg = load("smoke.yaml")
    cfg["pairs"]["data"] = cfg["pairs"].pop("bpe_to_sp")
    with pytest.raises(ctd_config.ConfigError, match="pairs.data"):
        ctd_config.validate(cfg)


def test_pair_method_lists_are_validated():
    cfg = edited("pairs.bpe_to_sp.methods", ["sft", "nope"])
    with pytest.raises(ctd_config.ConfigError, match=r"pairs.bpe_to_sp.methods.1.*unknown method 'nope'"):
        ctd_config.validate(cfg)
    cfg = ctd_config.validate(edited("pairs.bpe_to_sp.methods", ["sft"]))
    assert ctd_config.pair_methods(cfg, "bpe_to_sp") == ["sft"]
    assert ctd_config.pair_methods(cfg, "bpe_to_byte") == cfg["run"]["methods"]


def test_same_tokenizer_method_refused_on_a_mismatched_pair(monkeypatch):
    import methods
    from methods.sft import SFT

    monkeypatch.setattr(SFT, "requires_same_tokenizer", True)
    with pytest.raises(ctd_config.ConfigError, match="method 'sft' needs the teacher's tokenizer.*bpe_to_sp"):
        ctd_config.validate(load("smoke.yaml"))


def test_several_gpus_per_run_need_cuda():
    with pytest.raises(ctd_config.ConfigError, match="'gpus_per_run'.*device: cuda"):
        ctd_config.validate({**load("smoke.yaml"), "device": "cpu", "gpus_per_run": 2})


def test_several_gpus_per_run_split_the_batch_evenly():
    cfg = {**load("smoke.yaml"), "device": "cuda", "gpus_per_run": 8}  # batch_size 4
    with pytest.raises(ctd_config.ConfigError, match="'distill.train.batch_size'.*gpus_per_run 8"):
        ctd_config.validate(cfg)


def test_missing_accelerate_config_is_named():
    cfg = {**load("smoke.yaml"), "device": "cuda", "gpus_per_run": 2, "accelerate_config": "profiles/nope.yaml"}
    with pytest.raises(ctd_config.ConfigError, match="'accelerate_config'"):
        ctd_config.validate(cfg)
