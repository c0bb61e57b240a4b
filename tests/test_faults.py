"""The distill stage under faults, as the workflow runs it (``ctdbench distill``): a crash between
saving the student and removing the checkpoint, a NaN gradient at the last step, a literal "▁"
in the corpus; and a teacher cache whose build was interrupted."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctdbench import cli
from ctdbench.corpus import prepare_corpus
from ctdbench.data import PairedDataset, Side, take_segments
from ctdbench.models import build_model
from ctdbench.tokbytes import token_bytes
from ctdbench.train import checkpoint_path

REPO = Path(__file__).resolve().parents[1]
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
DATA = {"segment_bytes": 128, "train_bytes": 2048, "val_bytes": 256}


@pytest.fixture(scope="module")
def workspace(tokenizers, tmp_path_factory):
    """Corpus (the tiny plays plus web-like text with literal "▁"), tokenizers, a teacher."""
    root = tmp_path_factory.mktemp("faults")
    source = root / "source"
    shutil.copytree(REPO / "tests" / "data" / "tiny_corpus", source)
    for play in source.glob("*.txt"):  # every split starts with web-like text
        play.write_text("the ▁ marker in web text\n▁▁ leading markers ▁x\n" + play.read_text())
    prepare_corpus(str(source), root / "data", cache_dir=root, n_validation=1, n_test=1, seed=0)
    for name, kind in (("tt", "bytelevel_bpe"), ("st", "sentencepiece_bpe")):
        tokenizers[kind].save_pretrained(root / name)
    build_model(TEACHER, tokenizers["bytelevel_bpe"], seed=1, max_positions=512).save_pretrained(
        root / "teacher" / "model")
    return root


def distill(root: Path, out: str, method: str = "sft", **train):
    spec = {"config_name": "t", "pair": "p", "pair_spec": {}, "method": method, "hparams": {}, "seed": 0,
            "student_model": STUDENT, "device": "cpu", "data": DATA,
            "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 2, **train}}
    cli.main(["distill", "--spec", json.dumps(spec), "--data", str(root / "data"), "--quiet",
              "--teacher", str(root / "teacher"), "--teacher-tokenizer", str(root / "tt"),
              "--student-tokenizer", str(root / "st"), "--out", str(root / out)])
    return root / out


def weights(run: Path) -> dict:
    return AutoModelForCausalLM.from_pretrained(run / "student").state_dict()


def test_a_crash_between_saving_and_cleanup_loses_nothing(workspace, monkeypatch):
    reference = distill(workspace, "reference")
    write_json = cli._write_json

    def crash(path, obj):  # the process dies after the student is saved, before run.json is
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        distill(workspace, "crashed")
    run = workspace / "crashed"
    assert (run / "student").is_dir() and not (run / "run.json").exists()
    assert checkpoint_path(run).exists()  # kept: the student alone is not a finished run
    monkeypatch.setattr(cli, "_write_json", write_json)
    distill(workspace, "crashed")
    assert not checkpoint_path(run).exists() and json.loads((run / "run.json").read_text())["budget"][
        "optimizer_steps"] == 4
    a, b = weights(reference), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2: bit-identical
    log = [json.loads(r) for r in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_nan_at_the_last_step_leaves_no_finished_student(workspace, monkeypatch):
    from methods.sft import SFT

    run = distill(workspace, "nan")  # a finished run whose outputs a failing rerun must not leave behind
    assert (run / "run.json").exists()
    calls, loss = [], SFT.loss

    def nan_at_last_step(self, batch, student_out, teacher_out):
        value, logs = loss(self, batch, student_out, teacher_out)
        calls.append(1)
        if len(calls) >= 4:  # the last step, and its recomputation: a finite loss, a NaN gradient
            logits = student_out.logits
            value = value + 0.0 * (logits - logits.detach()).abs().sqrt().sum()
        return value, logs

    monkeypatch.setattr(SFT, "loss", nan_at_last_step)
    with pytest.raises(SystemExit, match="at step 3: micro-batch 0"):  # one line, no traceback
        distill(workspace, "nan", lr=2e-2)
    assert not (run / "run.json").exists() and not (run / "student").exists()


def test_space_markers_in_the_corpus_train_every_method_on_the_same_tokens(workspace):
    runs = [json.loads((distill(workspace, f"marker_{m}", method=m, steps=2) / "run.json").read_text())
            for m in ("sft", "bld")]
    assert runs[0]["data"] == runs[1]["data"]  # one rule for every method of the pair
    fallback = runs[0]["data"]["byte_fallback"]
    assert fallback["student"]["segments"] > 0 and fallback["teacher"] == {"segments": 0, "bytes": 0}
    assert runs[0]["budget"]["stream_sha256"] == runs[1]["budget"]["stream_sha256"]


def test_an_interrupted_cache_build_is_never_trusted(workspace, tokenizers):
    from ctdbench.corpus import read_jsonl
    from ctdbench.models import load_model
    from ctdbench.teacher import CachedTeacher, build_cache

    side = Side(tokenizers["bytelevel_bpe"], token_bytes(tokenizers["bytelevel_bpe"]))
    data = PairedDataset(take_segments(read_jsonl(workspace / "data" / "train.jsonl"), 128, 1024), side, side)
    teacher = load_model(workspace / "teacher" / "model")
    cache = workspace / "cache"
    build_cache(teacher, data, cache, top_k=4, hidden_states=False)
    CachedTeacher(cache, data, top_k=4)
    with open(cache / "topk_logprobs.npy", "r+b") as f:  # a rebuild killed while writing its arrays ...
        f.truncate(100)
    with pytest.raises(ValueError, match="topk_logprobs.npy is missing or not the size"):
        CachedTeacher(cache, data, top_k=4)
    (cache / "meta.json").unlink()  # ... or before its arrays were complete (meta.json goes first)
    with pytest.raises(ValueError, match="incomplete"):
        CachedTeacher(cache, data, top_k=4)
    build_cache(teacher, data, cache, top_k=4, hidden_states=False)
    CachedTeacher(cache, data, top_k=4)


def test_a_model_with_non_finite_weights_is_never_saved(tokenizers, tmp_path):
    model = build_model(STUDENT, tokenizers["byte"], seed=0, max_positions=64)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="not saving .*non-finite weights"):
        cli._save_model(model, tokenizers["byte"], tmp_path / "student")
    assert not list(tmp_path.iterdir())
