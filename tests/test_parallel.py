"""Several processes per run: N ranks with grad_accum g train like one process with g x N.

The CPU runs go through the workflow's own command (``accelerate launch`` with
``profiles/accelerate/ddp.yaml``) with the gloo backend; FSDP needs GPUs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import methods.sft
from ctdbench import cli
from ctdbench.corpus import prepare_corpus
from ctdbench.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
BUDGET_KEYS = ("optimizer_steps", "documents", "text_bytes", "student_tokens", "teacher_tokens",
               "teacher_forward_passes", "stream_sha256")


@pytest.fixture(scope="module")
def run_inputs(tokenizers, tmp_path_factory):
    """Corpus, both tokenizers, a teacher folder and a 'hub checkpoint' on disk, as the distill stage reads them."""
    root = tmp_path_factory.mktemp("inputs")
    teacher_tok, student_tok = tokenizers["bytelevel_bpe"], tokenizers["sentencepiece_bpe"]
    prepare_corpus(str(REPO / "tests" / "data" / "tiny_corpus"), root / "data", cache_dir=root, n_validation=1,
                   n_test=1, seed=0)
    build_model(TINY, teacher_tok, seed=1, max_positions=512).save_pretrained(root / "teacher" / "model")
    build_model(TINY, teacher_tok, seed=2, max_positions=512).save_pretrained(root / "base")
    for folder, tok in [("tt", teacher_tok), ("st", student_tok), ("base", teacher_tok)]:
        tok.save_pretrained(root / folder)
    return root


def distill_args(root: Path, out: Path, method: str, student: dict | None = None, lora: dict | None = None,
                 device: str = "cpu", **train) -> list[str]:
    spec = {"config_name": "t", "pair": "p", "pair_spec": {}, "method": method, "hparams": {}, "seed": 0,
            "student_model": student or {**TINY, "arch": "gpt_neox"}, "device": device,
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2, "eval_every": 2, **train},
            "data": {"segment_bytes": 128, "val_bytes": 512}, **({"lora": lora} if lora else {})}
    return ["distill", "--spec", json.dumps(spec), "--data", str(root / "data"), "--out", str(out), "--quiet",
            "--teacher", str(root / "teacher"), "--teacher-tokenizer", str(root / "tt"),
            "--student-tokenizer", str(root / "st")]


def launch_two_processes(args: list[str], accelerate_config: str = "ddp.yaml") -> None:
    """The workflow's multi-GPU command with two processes (on CPU: gloo, one process per core)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "profiles" / "accelerate" / accelerate_config),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "ctdbench.cli", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def assert_same_run(one: Path, two: Path) -> None:
    """Same final student (float tolerance), same budget, one log written once."""
    a = AutoModelForCausalLM.from_pretrained(one / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(two / "student").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    run_a, run_b = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert {k: run_a["budget"][k] for k in BUDGET_KEYS} == {k: run_b["budget"][k] for k in BUDGET_KEYS}
    assert (run_a["processes"], run_b["processes"]) == (1, 2)
    rows = lambda d: [json.loads(r) for r in (d / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    log_a, log_b = ([row for row in rows(d) if "event" not in row] for d in (one, two))  # a resume's row aside
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "val_bpb"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5)
    assert not (two / "checkpoint").exists()


def test_two_processes_equal_one_with_double_accumulation(run_inputs, tmp_path):
    # BLD owns a trainable byte head: its gradients are averaged across ranks like the student's.
    cli.main(distill_args(run_inputs, tmp_path / "one", "bld", grad_accum=2))
    launch_two_processes(distill_args(run_inputs, tmp_path / "two", "bld", grad_accum=1))
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_two_processes_resume_a_checkpoint(run_inputs, tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint resumes on two processes (checkpoints are full state dicts).

    The student is the paper setups' kind: a checkpoint moved by FVT, trained with LoRA (peft
    under DDP; adapters merged after the weights are gathered).
    """
    student = {"hf": str(run_inputs / "base"), "fvt": True}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "train_embeddings": True}
    run = lambda out, accum: distill_args(run_inputs, out, "sft", student, lora, grad_accum=accum)
    cli.main(run(tmp_path / "one", 2))
    loss = methods.sft.SFT.loss
    calls = []

    def dies_in_step_3(self, *args):
        calls.append(1)
        if len(calls) > 4:  # two micro-batches per step
            raise KeyboardInterrupt
        return loss(self, *args)

    monkeypatch.setattr(methods.sft.SFT, "loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        cli.main(run(tmp_path / "two", 2))
    assert (tmp_path / "two" / "checkpoint" / "last.pt").exists()
    launch_two_processes(run(tmp_path / "two", 1))
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs at least two CUDA GPUs")
def test_fsdp_on_two_gpus_equals_one_process(run_inputs, tmp_path):
    # DSKD reads the student's embeddings and head inside its loss: FSDP must have them unsharded.
    cli.main(distill_args(run_inputs, tmp_path / "one", "dskd", device="cuda", grad_accum=2))
    launch_two_processes(distill_args(run_inputs, tmp_path / "two", "dskd", device="cuda", grad_accum=1), "fsdp.yaml")
    assert_same_run(tmp_path / "one", tmp_path / "two")
