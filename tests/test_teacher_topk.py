"""The top-k teacher cache end to end: every method trains on it (or refuses it at construction),
the config and the specs carry k only when set, and the workflow's commands pass it through."""

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import methods
from ctdbench import cli, specs
from ctdbench import config as ctd_config
from ctdbench.corpus import prepare_corpus
from ctdbench.data import PairedDataset, collate, segment_text
from ctdbench.models import build_model
from ctdbench.teacher import CachedTeacher, build_cache
from ctdbench.train import step_loss
from methods.base import MethodContext

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflows" / "config"
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
K = 5  # of a 400-token vocabulary: the observed next token is often outside the top k


@pytest.fixture(scope="module")
def top_k_setups(sides, corpus_texts, tmp_path_factory):
    """{same tokenizer?: (data, teacher model, top-k cache folder)}, hidden states stored (DSKD)."""
    student_side, teacher_side = sides
    segments = [s for t in corpus_texts for s in segment_text(t, 96)][:6]
    out = {}
    for same, student in ((False, student_side), (True, teacher_side)):
        data = PairedDataset(segments, student, teacher_side)
        teacher = build_model(TEACHER, teacher_side.tokenizer, seed=0, max_positions=256)
        cache = tmp_path_factory.mktemp("cache")
        build_cache(teacher, data, cache, top_k=K, hidden_states=True)
        out[same] = data, teacher, cache
    return out


@pytest.mark.parametrize("method_name", [*methods.available(), "template"], indirect=True)
def test_every_method_takes_a_finite_step_on_a_top_k_cache(method_name, top_k_setups):
    name = method_name
    cls = methods.get(name)[0]
    data, teacher, cache = top_k_setups[cls.requires_same_tokenizer]
    student = build_model(STUDENT, data.student.tokenizer, seed=0, max_positions=256)
    ctx = MethodContext.from_sides(student, teacher, data.student, data.teacher, teacher_top_k=K)
    if cls.needs_full_teacher_vocab:
        with pytest.raises(ValueError, match=f"full next-token distribution.*top-{K} cache"):
            methods.build(name, ctx)
        return
    method = methods.build(name, ctx)
    batch = collate([data[i] for i in range(len(data))], data, method)
    source = CachedTeacher(cache, data, top_k=K)
    assert torch.isinf(source(batch).logits).any()  # the truncation is really there
    loss, logs = step_loss(student, method, source, batch)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values()), logs
    loss.backward()
    grads = [p.grad for p in (*student.parameters(), *method.parameters()) if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def load(name: str) -> dict:
    return ctd_config.load(CONFIGS / name)


def with_top_k(config: dict, k: int = 64) -> dict:
    config = copy.deepcopy(config)
    config["distill"].update(teacher_cache=True, teacher_cache_top_k=k)
    return ctd_config.validate(config)


def grid(config: dict):
    return [(p, m, s) for p in ctd_config.pairs(config) for m in ctd_config.pair_methods(config, p)
            for s in config["run"]["seeds"]]


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml"])
def test_configs_without_top_k_keep_their_specs(name):
    """No new spec key unless top-k is set: every existing result stays up to date."""
    config = load(name)
    for teacher in config["teachers"]:
        assert set(specs.teacher_cache_spec(config, teacher)) == {"data", "device"}
    assert all("teacher_cache_top_k" not in specs.distill_spec(config, *job) for job in grid(config))


def test_top_k_enters_the_cache_spec_and_the_runs_that_read_the_teacher():
    config = load("smoke.yaml")
    config["pairs"]["bpe_to_byte"]["methods"] = ["sft", "alm+sft", "dskd"]
    config = with_top_k(config)
    assert specs.teacher_cache_spec(config, "t") == {
        "data": config["distill"]["data"], "device": "auto", "top_k": 64, "hidden_states": True}
    for pair, method, seed in grid(config):
        k = specs.distill_spec(config, pair, method, seed).get("teacher_cache_top_k")
        assert k == (64 if methods.get(method)[0].needs_teacher else None)
    del config["pairs"]["bpe_to_byte"]["methods"]  # sft, alm+sft; BLD reads the student's hidden states only
    assert specs.teacher_cache_spec(config, "t")["hidden_states"] is False


def test_top_k_without_the_cache_is_refused():
    config = load("default.yaml")
    config["distill"].update(teacher_cache=False, teacher_cache_top_k=64)  # it would do nothing
    with pytest.raises(ctd_config.ConfigError, match="'distill.teacher_cache_top_k': has no effect without"):
        ctd_config.validate(config)
    assert ctd_config.teacher_cache_top_k(config) is None


def test_config_rejects_a_method_that_needs_the_full_teacher():
    config = copy.deepcopy(load("default.yaml"))
    assert "multilevel_ot" in config["run"]["methods"]
    config["distill"].update(teacher_cache=True, teacher_cache_top_k=64)
    with pytest.raises(ctd_config.ConfigError, match="'distill.teacher_cache_top_k': method 'multilevel_ot'"):
        ctd_config.validate(config)
    config["distill"]["teacher_cache_top_k"] = 0
    with pytest.raises(ctd_config.ConfigError, match="'distill.teacher_cache_top_k'"):
        ctd_config.validate(config)


@pytest.mark.parametrize("path", sorted((CONFIGS / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_name_a_top_k_that_validates_with_the_cache(path):
    assert "# teacher_cache_top_k: 64" in path.read_text()
    config = ctd_config.load(path)
    config["distill"].update(teacher_cache=True, teacher_cache_top_k=64)
    assert ctd_config.validate(config)["distill"]["teacher_cache_top_k"] == 64


def test_workflow_commands_pass_k_through(tmp_path, run_snakemake):
    config = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    config["distill"].update(teacher_cache=True, teacher_cache_top_k=16)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    spec_of = lambda cmd: json.loads(re.search(r"--spec '([^']*)'", cmd).group(1))  # noqa: E731
    cache_cmds = [c for c in result.stdout.splitlines() if "ctdbench teacher-cache" in c]
    assert cache_cmds and spec_of(cache_cmds[0])["top_k"] == 16
    distill = [c for c in result.stdout.splitlines() if "ctdbench distill" in c]
    for cmd in distill:
        spec = spec_of(cmd)
        assert "--teacher-cache" in cmd
        assert spec.get("teacher_cache_top_k") == (None if spec["method"] == "sft" else 16)
    assert {spec_of(c)["method"] for c in distill} == {"sft", "alm+sft", "bld", "mined"}


def test_cli_builds_and_trains_from_a_top_k_cache(tokenizers, tmp_path):
    """The two stages the rules run: ``teacher-cache`` with k in its spec, ``distill`` reading it."""
    teacher_tok, student_tok = tokenizers["bytelevel_bpe"], tokenizers["sentencepiece_bpe"]
    data = tmp_path / "data"
    prepare_corpus(str(REPO / "tests" / "data" / "tiny_corpus"), data, cache_dir=tmp_path, n_validation=1,
                   n_test=1, seed=0)
    teacher_dir = tmp_path / "teacher"
    build_model(TEACHER, teacher_tok, seed=1, max_positions=512).save_pretrained(teacher_dir / "model")
    for name, tok in (("tt", teacher_tok), ("st", student_tok)):
        tok.save_pretrained(tmp_path / name)
    data_spec = {"segment_bytes": 128, "train_bytes": 2048, "val_bytes": 512}
    cli.main(["teacher-cache", "--spec", json.dumps({"data": data_spec, "device": "cpu", "top_k": 8,
                                                     "hidden_states": False}),
              "--data", str(data), "--teacher", str(teacher_dir), "--tokenizer", str(tmp_path / "tt"),
              "--out", str(tmp_path / "cache")])
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["top_k"] == 8
    spec = {"config_name": "t", "pair": "p", "pair_spec": {}, "method": "alm+sft", "hparams": {}, "seed": 0,
            "student_model": STUDENT, "device": "cpu", "data": data_spec, "teacher_cache_top_k": 8,
            "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 2}}
    args = ["distill", "--spec", json.dumps(spec), "--data", str(data), "--quiet", "--teacher", str(teacher_dir),
            "--teacher-tokenizer", str(tmp_path / "tt"), "--student-tokenizer", str(tmp_path / "st")]
    cli.main([*args, "--out", str(tmp_path / "run"), "--teacher-cache", str(tmp_path / "cache")])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["teacher_source"] == "cache" and run["spec"]["teacher_cache_top_k"] == 8
    with pytest.raises(ValueError, match="top-8 teacher cache.*pass --teacher-cache"):
        cli.main([*args, "--out", str(tmp_path / "online")])
