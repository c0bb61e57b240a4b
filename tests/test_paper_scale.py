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


MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_chat_distillation_end_to_end(corpus_texts, tmp_path):
    """Conversations rendered with the Llama-3 template, markers added to both tokenizers by the
    tokenizer stage, a checkpoint student given rows for them (FVT), BLD on the assistant turns."""
    lines = [ln for t in corpus_texts for ln in t.splitlines() if ln.strip()][:120]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in zip(lines[::2], lines[1::2])))
    data = tmp_path / "data"
    prepare_corpus(str(chats), data, cache_dir=tmp_path, n_validation=2, n_test=2, seed=0, chat_template="llama3")
    assert all("loss_spans" in json.loads(r) for r in (data / "train.jsonl").read_text().splitlines())
    dirs = {}
    for name, spec in (("tt", {"kind": "bytelevel_bpe", "vocab_size": 400}), ("st", {"kind": "sentencepiece_bpe", "vocab_size": 380})):
        dirs[name] = tmp_path / name
        cli.main(["tokenizer", "--spec", json.dumps({**spec, "add_special_tokens": MARKERS}),
                  "--train", str(data / "train.jsonl"), "--out", str(dirs[name])])
    from ctdbench.tokenizers import load_tokenizer

    teacher_tok, student_tok = load_tokenizer(dirs["tt"]), load_tokenizer(dirs["st"])
    for tok in (teacher_tok, student_tok):
        table = token_bytes(tok)
        assert all(table[tok.convert_tokens_to_ids(t)] is None for t in MARKERS)  # special: no bytes
    checkpoint(teacher_tok, tmp_path / "teacher" / "model", seed=1)
    # The student checkpoint's own tokenizer lacks the markers: build_model adds their rows.
    plain = load_tokenizer(dirs["st"])
    plain_dir = tmp_path / "plain_st"
    cli.main(["tokenizer", "--spec", json.dumps({"kind": "sentencepiece_bpe", "vocab_size": 380}),
              "--train", str(data / "train.jsonl"), "--out", str(plain_dir)])
    source = checkpoint(load_tokenizer(plain_dir), tmp_path / "base")
    assert len(plain) > len(load_tokenizer(plain_dir))  # markers the trained vocabulary lacked were appended
    spec = {"config_name": "t", "pair": "p", "pair_spec": {}, "method": "bld", "hparams": {}, "seed": 0,
            "student_model": {"hf": source}, "device": "cpu",
            "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 5},
            "data": {"segment_bytes": 256, "val_bytes": 1024}}
    out = tmp_path / "run"
    cli.main(["distill", "--spec", json.dumps(spec), "--data", str(data), "--out", str(out), "--quiet",
              "--teacher", str(tmp_path / "teacher"), "--teacher-tokenizer", str(dirs["tt"]),
              "--student-tokenizer", str(dirs["st"])])
    log = [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    saved = AutoModelForCausalLM.from_pretrained(out / "student")
    assert saved.get_input_embeddings().weight.shape[0] == len(student_tok)
