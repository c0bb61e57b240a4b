"""The whole workflow on workflows/config/smoke.yaml: every rule, real lm-eval, figures."""

import csv
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, run_snakemake):
    workdir = tmp_path_factory.mktemp("smoke")
    result = run_snakemake(workdir, "--cores", "2", "--configfile", str(REPO / "workflows/config/smoke.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "results" / "smoke"


@pytest.mark.slow
def test_smoke_workflow_produces_table_and_figures(smoke_run):
    rows = list(csv.DictReader(open(smoke_run / "summary.csv")))
    methods = {(r["pair"], r["method"]) for r in rows}
    assert {("bpe_to_sp", "sft"), ("bpe_to_byte", "alm+sft"), ("bpe_to_sp", "bld"), ("bpe_to_sp", "mined"),
            ("bpe_to_sp", "teacher")} <= methods
    bpb = [r for r in rows if r["metric"] == "bits_per_byte"]
    assert len(bpb) == (4 + 2) * 2 + 2  # (4 + 2 methods of the pairs) x 2 seeds + the teacher per pair
    assert all(0 < float(r["value"]) < 9 for r in bpb)
    agreement = [r for r in rows if r["task"] == "byte_agreement"]
    assert {r["metric"] for r in agreement} == {"kl_per_byte", "top1", "kl_boundary", "top1_boundary"}
    assert len(agreement) == 4 * (4 + 2) * 2  # every student, no teacher row
    figures = {p.name for p in (smoke_run / "figures").glob("*.png")}
    assert {"ctd_heldout__bits_per_byte.png", "ctd_cloze__acc.png", "learning_curves.png", "cost.png",
            "byte_agreement__kl_per_byte.png"} <= figures
    assert all((smoke_run / "figures" / f).stat().st_size > 5000 for f in figures)


@pytest.mark.slow
def test_runs_record_identical_budgets(smoke_run):
    runs = [json.loads(p.read_text()) for p in smoke_run.glob("*/*/seed*/run.json")]
    assert len(runs) == (4 + 2) * 2
    for r in runs:
        assert r["budget"]["optimizer_steps"] == 6 and r["git_commit"] is not None
        assert {"torch", "transformers"} <= set(r["versions"])
    by_seed = {}
    for r in runs:  # same seed, different pairs and methods: same text bytes and stream
        by_seed.setdefault(r["seed"], set()).add((r["budget"]["text_bytes"], r["budget"]["stream_sha256"]))
    assert all(len(v) == 1 for v in by_seed.values())
    corpus = json.loads((smoke_run / "data" / "corpus.json").read_text())
    assert corpus["splits"]["train"]["content_sha256"] and corpus["license"]


@pytest.mark.slow
def test_students_load_as_plain_hf_models(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = smoke_run / "bpe_to_sp" / "sft" / "seed0" / "student"
    model = AutoModelForCausalLM.from_pretrained(student)
    tok = AutoTokenizer.from_pretrained(student)
    assert model.config.model_type == "gpt_neox" and len(tok) == model.config.vocab_size


@pytest.mark.slow
def test_plots_target_regenerates_figures_without_training(smoke_run, run_snakemake):
    workdir = smoke_run.parent.parent
    shutil.rmtree(smoke_run / "figures")
    (smoke_run / "summary.csv").unlink()
    result = run_snakemake(workdir, "plots", "--cores", "1", "--configfile", str(REPO / "workflows/config/smoke.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (smoke_run / "summary.csv").exists() and (smoke_run / "figures" / "cost.png").exists()
    assert "distill" not in result.stderr.split("Job stats")[-1].split("Reasons")[0]


def test_default_config_plans(tmp_path, run_snakemake):
    result = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    names = re.findall(r"^rule (\w+):$", result.stdout, re.M)
    assert {"teacher_cache", "distill"} <= set(names)
    assert (names.count("distill"), names.count("precompute")) == (84, 3)  # MinED's map for each of 3 pairs


LOCAL_RULES = """
import json
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(cores=2), config_settings=ConfigSettings(),
                            snakefile=Path({snakefile!r}), workdir=Path({workdir!r}))._workflow
    print(json.dumps([sorted(workflow._localrules), sorted(r.name for r in workflow.rules)]))
"""


def test_light_rules_run_where_snakemake_runs(tmp_path):
    """The jobs of seconds are never cluster jobs (``localrules``); the rest may be."""
    import subprocess
    import sys

    code = LOCAL_RULES.format(snakefile=str(REPO / "Snakefile"), workdir=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    local, every = map(set, json.loads(result.stdout.strip().splitlines()[-1]))
    assert local == {"all", "corpus", "eval_data", "tokenizer", "summary", "plots"}
    assert every - local == {"teacher", "teacher_cache", "precompute", "distill", "evaluate_teacher",
                             "evaluate_student"}


@pytest.mark.parametrize("config", ["smoke.yaml", "default.yaml"])
def test_snakemake_lint_is_clean(tmp_path, run_snakemake, config):
    """The Snakemake catalogue's checks: software per rule, no globals in shell commands, no
    hard-coded path prefixes in params, ... (``snakemake --lint``: 0 findings)."""
    result = run_snakemake(tmp_path, "--lint", "--configfile", str(REPO / "workflows/config" / config))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Lints for" not in output, output[-5000:]
    assert "your workflow is in a good condition" in output


def test_invalid_config_fails_before_any_job(tmp_path, run_snakemake):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "workflows/config/smoke.yaml").read_text().replace("steps: 6", "stpes: 6"))
    result = run_snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert "distill.train.stpes" in result.stdout + result.stderr


def shell_commands(rules: Path) -> list[str]:
    """The (unformatted) shell command lines of a rules file: the lines after each ``shell:``."""
    commands, inside = [], False
    for line in rules.read_text().splitlines():
        text = line.strip()
        inside = text.startswith("shell:") or (inside and text.startswith(('"', "+ ", "ctdbench_command")))
        commands += [text] if inside else []
    return commands


def test_rule_commands_quote_every_path():
    """Config text reaches a shell command only as shell-quoted JSON (``as_arg``) or inside a
    path, and every path placeholder of a rule's command is quoted (``:q``)."""

    placeholder = re.compile(r"\{([^{}]+)\}")
    trusted = {"params.spec", "params.cache", "threads", "resources.gpu"}  # quoted JSON, quoted option, numbers
    found = [p for rules in (REPO / "workflows" / "rules").glob("*.smk") for c in shell_commands(rules)
             for p in placeholder.findall(c)]
    assert len(found) > 40 and "params.spec" in found
    assert [p for p in found if p not in trusted and not p.endswith(":q")] == []


@pytest.mark.slow
def test_a_run_killed_inside_the_workflow_resumes_with_its_whole_learning_curve(tmp_path, run_snakemake):
    """SIGKILL to the whole workflow mid-training, `--unlock`, rerun (as the README says): the run
    resumes from its checkpoint, and its learning curve equals an uninterrupted run's row for row."""
    config = yaml.safe_load((REPO / "workflows/config/smoke.yaml").read_text())
    config["pairs"] = {"bpe_to_sp": {**config["pairs"]["bpe_to_sp"], "methods": ["sft"]}}
    config["run"] = {"methods": ["sft"], "seeds": [0]}
    config["distill"]["train"].update(steps=60, checkpoint_every=10, eval_every=20)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["results/smoke/bpe_to_sp/sft/seed0/run.json", "--cores", "1", "--configfile", str(tmp_path / "config.yaml")]
    logs = {}
    for name in ("whole", "killed"):
        workdir = tmp_path / name
        run = workdir / "results" / "smoke" / "bpe_to_sp" / "sft" / "seed0"
        if name == "whole":
            workdir.mkdir()
        else:  # the same corpus, tokenizers and teacher: only the run itself is trained again
            shutil.copytree(tmp_path / "whole", workdir)
            shutil.rmtree(run)
            workflow, deadline = run_snakemake.start(workdir, *args), time.monotonic() + 300
            while not (run / "checkpoint" / "last.pt").exists() and workflow.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert workflow.poll() is None, "finished before the kill: the test needs more steps"
            os.killpg(workflow.pid, signal.SIGKILL)  # the whole workflow and its job, mid-training
            workflow.wait()
            assert not (run / "run.json").exists()
            assert run_snakemake(workdir, "--unlock", *args).returncode == 0
        result = run_snakemake(workdir, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[name] = [{k: v for k, v in json.loads(row).items() if k != "tokens_per_second"}
                      for row in (run / "train_log.jsonl").read_text().splitlines()]
    resumed = [row for row in logs["killed"] if row.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 10
    assert [row for row in logs["killed"] if "event" not in row] == logs["whole"]
