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
    with pytest.raises(ctd_config.ConfigError, match="'methods.sft.temprature': unknown hyperparameter"):
        ctd_config.validate(cfg)


@pytest.mark.parametrize("hparams, expected", [
    ({"temperature": 2}, None),  # an integer where a float is annotated is fine
    ({"temperature": "2"}, "'methods.bld.temperature': '2' is not of type float"),
    ({"temperature": 0.0}, r"'methods.bld.temperature': 0.0 is outside \(0, inf\)"),
    ({"n_bytes": 4.0}, "'methods.bld.n_bytes': 4.0 is not of type int"),
    ({"n_bytes": True}, "'methods.bld.n_bytes': True is not of type int"),
    ({"head": "transformer", "head_layers": 0}, r"'methods.bld.head_layers': 0 is outside \[1, inf\)"),
    ({"conversion": "a0"}, None),
])
def test_method_hyperparameters_are_checked_by_type_and_range(hparams, expected):
    cfg = edited("methods.bld", hparams)
    if expected is None:
        ctd_config.validate(cfg)
    else:
        with pytest.raises(ctd_config.ConfigError, match=expected):
            ctd_config.validate(cfg)


def test_a_path_a_method_writes_stays_under_results():
    from methods.base import under_results

    assert under_results("results/smoke/maps/p/{key}.npy") is None
    for bad in ("/tmp/x.npy", "results/../x.npy", "x.npy", "results", "results/a b.npy", "results/{0}.npy"):
        assert under_results(bad), bad


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


MALICIOUS = {
    "shell": lambda c: c["tokenizers"].update({"byte;touch MARKER;": c["tokenizers"].pop("byte")}),
    "traversal": lambda c: c["tokenizers"].update({"../../MARKER": c["tokenizers"].pop("byte")}),
}


def malicious_config(tmp_path, kind: str) -> Path:
    cfg = load("smoke.yaml")
    MALICIOUS[kind](cfg)
    for pair in cfg["pairs"].values():
        if pair["student_tokenizer"] == "byte":
            pair["student_tokenizer"] = next(name for name in cfg["tokenizers"] if "MARKER" in name)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("kind", MALICIOUS)
def test_check_config_refuses_malicious_names_in_one_line(kind, tmp_path, capsys):
    from ctdbench import cli

    path = malicious_config(tmp_path, kind)
    with pytest.raises(SystemExit, match="1 of 1 config files are invalid"):
        cli.main(["check-config", str(path)])
    message = capsys.readouterr().out
    assert message.startswith(f"config file {path}: config key '") and message.count("\n") == 1
    assert "MARKER" in message and "is not a safe name" in message


@pytest.mark.parametrize("kind", MALICIOUS)
def test_the_workflow_refuses_malicious_names_before_any_job(kind, tmp_path, run_snakemake):
    workdir = tmp_path / "work" / "dir"
    workdir.mkdir(parents=True)
    result = run_snakemake(workdir, "--cores", "1", "--configfile", str(malicious_config(tmp_path, kind)))
    assert result.returncode != 0
    assert "invalid config: config key '" in result.stderr and "is not a safe name" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("MARKER*")) and not (workdir / "results").exists()


def test_duplicate_keys_are_refused_by_check_config_and_the_workflow(tmp_path, run_snakemake, capsys):
    from ctdbench import cli

    bad = tmp_path / "dup.yaml"
    bad.write_text((CONFIGS / "smoke.yaml").read_text().replace("{steps: 6,", "{steps: 6, steps: 600,"))
    with pytest.raises(SystemExit):
        cli.main(["check-config", str(bad)])
    assert f"{bad}: config key 'distill.train.steps': written twice (line 32)" in capsys.readouterr().out
    result = run_snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert result.returncode != 0 and "'distill.train.steps': written twice" in result.stderr


def test_yaml_aliases_cannot_blow_up_validation(tmp_path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{k}: &a{k} [*a{k - 1}, *a{k - 1}, *a{k - 1}, *a{k - 1}, *a{k - 1}, *a{k - 1}, *a{k - 1}, *a{k - 1}]"
              for k in range(1, 12)]  # 10 x 8^11 values
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ctd_config.ConfigError, match="more than 100000 values"):
        ctd_config.read_yaml(tmp_path / "laughs.yaml")


def test_every_method_declares_valid_limits_its_defaults_meet():
    import inspect

    import methods
    from methods.base import _INTERVAL, check_hparams

    for name in methods.available():
        cls, defaults = methods.get(name)
        params = set(list(inspect.signature(cls.__init__).parameters)[2:])
        assert set(cls.hparam_limits) <= params, name
        for limit in cls.hparam_limits.values():
            assert callable(limit) or isinstance(limit, tuple) or _INTERVAL.fullmatch(limit), (name, limit)
        check_hparams(cls, defaults, name=name)



@pytest.mark.parametrize("name", ["smoke.yaml", "default.yaml"])
def test_adding_a_method_changes_no_existing_run(name):
    """Snakemake reruns a job whose spec (params) changes: adding a method, to ``run.methods`` and to
    the pairs' own lists, must leave every existing run's spec and the teacher caches' as they were."""
    from ctdbench import specs

    def every_spec(config):
        runs = {(pair, method, seed): specs.distill_spec(config, pair, method, seed)
                for pair in ctd_config.pairs(config) for method in ctd_config.pair_methods(config, pair)
                for seed in config["run"]["seeds"]}
        return runs, {t: specs.teacher_cache_spec(config, t) for t in config["teachers"]}

    grown = ctd_config.validate(load(name))
    grown["methods"].setdefault("uld", {})
    for spec in (grown["run"], *grown["pairs"].values()):
        if "methods" in spec and "uld" not in spec["methods"]:
            spec["methods"].append("uld")
    before = copy.deepcopy(grown)  # the same config before uld was added
    for spec in (before["run"], *before["pairs"].values()):
        if "methods" in spec:
            spec["methods"].remove("uld")
    runs, caches = every_spec(before)
    runs_after, caches_after = every_spec(grown)
    assert len(runs_after) > len(runs) > 0
    assert {job: runs_after[job] for job in runs} == runs
    assert caches_after == caches
