"""Paper-scale pieces through the real entry points, on tiny local stand-ins of hub checkpoints:
a student moved to a new tokenizer by FVT (`fvt: true`) and trained with LoRA (`distill.lora`)."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ctdbench import cli
from ctdbench.corpus import prepare_corpus
from ctdbench.models import build_model
from ctdbench.tokbytes import token_bytes

TINY = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def checkpoint(tokenizer, path, seed=0):
    """A tiny randomly initialised 'hub checkpoint': model and tokenizer in one folder."""
    build_model(TINY, tokenizer, seed=seed, max_positions=512).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_fvt_student_spec_moves_a_checkpoint_to_the_student_tokenizer(tokenizers, tmp_path):
    old, new = tokenizers["bytelevel_bpe"], tokenizers["sentencepiece_bpe"]
    source = checkpoint(old, tmp_path / "llama")
    student = build_model({"hf": source, "fvt": True}, new, seed=0, max_positions=512)
    assert student.get_input_embeddings().weight.shape[0] == len(new)
    old_rows = AutoModelForCausalLM.from_pretrained(source).get_input_embeddings().weight
    old_ids = {b: i for i, b in enumerate(token_bytes(old)) if b}
    shared = [(i, old_ids[b]) for i, b in enumerate(token_bytes(new)) if b and b in old_ids and len(b) > 1]
    assert shared  # multi-byte tokens both vocabularies have copy their row
    i, j = shared[0]
    assert torch.equal(student.get_input_embeddings().weight[i], old_rows[j])


def test_distill_with_lora_and_fvt_saves_a_plain_student(tokenizers, tmp_path):
    teacher_tok, student_tok = tokenizers["bytelevel_bpe"], tokenizers["sentencepiece_bpe"]
    data = tmp_path / "data"
    prepare_corpus(str(Path(__file__).parent / "data" / "tiny_corpus"), data,
                   cache_dir=tmp_path, n_validation=1, n_test=1, seed=0)
    teacher_dir = tmp_path / "teacher"
    checkpoint(teacher_tok, teacher_dir / "model", seed=1)
    (tmp_path / "tt").mkdir(), (tmp_path / "st").mkdir()
    teacher_tok.save_pretrained(tmp_path / "tt"), student_tok.save_pretrained(tmp_path / "st")
    source = checkpoint(teacher_tok, tmp_path / "base")
    spec = {"config_name": "t", "pair": "p", "pair_spec": {}, "method": "sft", "hparams": {}, "seed": 0,
            "student_model": {"hf": source, "fvt": True}, "device": "cpu",
            "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 2},
            "data": {"segment_bytes": 128, "val_bytes": 512},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "train_embeddings": True}}
    out = tmp_path / "run"
    cli.main(["distill", "--spec", json.dumps(spec), "--data", str(data), "--out", str(out), "--quiet",
              "--teacher", str(teacher_dir), "--teacher-tokenizer", str(tmp_path / "tt"),
              "--student-tokenizer", str(tmp_path / "st")])
    saved = AutoModelForCausalLM.from_pretrained(out / "student")
    assert not any("lora" in k for k in saved.state_dict())
    assert saved.get_input_embeddings().weight.shape[0] == len(student_tok)
    fresh = build_model({"hf": source, "fvt": True}, student_tok, seed=0, max_positions=512)
    # LoRA merged into the attention weights, and the (new) embeddings trained too.
    assert not torch.equal(saved.model.layers[0].self_attn.q_proj.weight, fresh.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(saved.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
    assert json.loads((out / "run.json").read_text())["budget"]["optimizer_steps"] == 3
