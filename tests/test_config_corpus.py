"""A corpus of invalid configs, each a mutation of workflows/config/smoke.yaml covering one key of
the schema (every key has at least one): each must be refused by ``ctdbench check-config``'s
loader with one line naming that key, never a traceback and never a pass."""

import copy
from pathlib import Path

import pytest
import yaml

from ctdbench import config as ctd_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = (REPO / "workflows" / "config" / "smoke.yaml").read_text()
DELETE = object()
NAN, INF = float("nan"), float("inf")


# (key the message must name, mutation): a {dotted.path: value} dict, a function editing the
# parsed config, or ("text", function editing the YAML text).
CASES = [
    ("name", {"name": "../x"}), ("name", {"name": "."}), ("name", {"name": "a b"}), ("name", {"name": 5}),
    ("device", {"device": "tpu"}),
    ("gpus_per_run", {"gpus_per_run": 0}), ("gpus_per_run", {"gpus_per_run": 2}),
    ("gpus_per_run", {"gpus_per_run": 2.0}),
    ("accelerate_config", {"device": "cuda", "gpus_per_run": 2, "accelerate_config": "profiles/nope.yaml"}),
    ("accelerate_config", {"accelerate_config": 3}),
    ("corpus.source", {"corpus.source": "tests/data/nope"}), ("corpus.source", {"corpus.source": 7}),
    ("corpus.n_validation", {"corpus.n_validation": 0}), ("corpus.n_test", {"corpus.n_test": 1.5}),
    ("corpus.split_seed", {"corpus.split_seed": "x"}), ("corpus.chat_template", {"corpus.chat_template": 3}),
    ("corpus.colour", {"corpus.colour": 1}), ("corpus", {"corpus.source": DELETE}),
    ("tokenizers.byte;touch MARKER;", lambda c: c["tokenizers"].update({"byte;touch MARKER;": {"kind": "byte"}})),
    ("tokenizers...", lambda c: c["tokenizers"].update({"..": {"kind": "byte"}})),
    ("tokenizers.sp.kind", {"tokenizers.sp.kind": "wordpiece"}),
    ("tokenizers.sp.vocab_size", {"tokenizers.sp.vocab_size": 100}),
    ("tokenizers.sp.vocab_size", {"tokenizers.sp.vocab_size": DELETE}),
    ("tokenizers.sp.add_special_tokens", {"tokenizers.sp.add_special_tokens": "<x>"}),
    ("tokenizers.sp", {"tokenizers.sp.hf": "gpt2"}), ("tokenizers", {"tokenizers": {}}),
    ("models.student.arch", {"models.student.arch": "mamba"}),
    ("models.student.layers", {"models.student.layers": 0}),
    ("models.student.hidden", {"models.student.hidden": 32.0}),
    ("models.student.heads", {"models.student.heads": 3}), ("models.student.ffn", {"models.student.ffn": -1}),
    ("models.student.tie_embeddings", {"models.student.tie_embeddings": "yes"}),
    ("models.student.dtype", {"models.student.dtype": "float8"}),
    ("models.student.fvt", {"models.student.fvt": 1}),
    ("models.student", {"models.student.hf": "gpt2"}),
    ("models.../m", lambda c: c["models"].update({"../m": c["models"]["student"]})),
    ("teachers.t.tokenizer", {"teachers.t.tokenizer": "nope"}),
    ("teachers.t.model", {"teachers.t.model": "x;rm -rf ~"}),
    ("teachers.t.seed", {"teachers.t.seed": -1}),
    ("teachers.t.train", {"teachers.t.train": DELETE}),
    ("teachers.t.train.steps", {"teachers.t.train.steps": 8.0}),
    ("teachers.t.train.batch_size", {"teachers.t.train.grad_accum": 3}),
    ("teachers.t.data.segment_bytes", {"teachers.t.data.segment_bytes": 10**9}),
    ("teachers.a b", lambda c: c["teachers"].update({"a b": c["teachers"]["t"]})),
    ("distill.train.steps", {"distill.train.steps": 0}), ("distill.train.steps", {"distill.train.steps": 6.0}),
    ("distill.train.batch_size", {"distill.train.batch_size": "4"}),
    ("distill.train.batch_size", {"distill.train.grad_accum": 3}),
    ("distill.train.grad_accum", {"distill.train.grad_accum": 0}),
    ("distill.train.lr", {"distill.train.lr": NAN}), ("distill.train.lr", {"distill.train.lr": INF}),
    ("distill.train.lr", {"distill.train.lr": 0}),
    ("distill.train.warmup_frac", {"distill.train.warmup_frac": 1.5}),
    ("distill.train.final_lr_frac", {"distill.train.final_lr_frac": -0.1}),
    ("distill.train.weight_decay", {"distill.train.weight_decay": NAN}),
    ("distill.train.betas", {"distill.train.betas": [0.9]}),
    ("distill.train.betas.1", {"distill.train.betas": [0.9, 1.0]}),
    ("distill.train.grad_clip", {"distill.train.grad_clip": INF}),
    ("distill.train.grad_clip", {"distill.train.grad_clip": 0}),
    ("distill.train.checkpoint_every", {"distill.train.checkpoint_every": 0}),
    ("distill.train.eval_every", {"distill.train.eval_every": -1}),
    ("distill.train.log_every", {"distill.train.log_every": 0}),
    ("distill.train.num_workers", {"distill.train.num_workers": 1.0}),
    ("distill.train.stpes", {"distill.train.stpes": 3}),
    ("distill.train.steps", ("text", lambda text: text.replace("{steps: 6,", "{steps: 6, steps: 7,", 1))),
    ("distill.data.segment_bytes", {"distill.data.segment_bytes": 10**9}),
    ("distill.data.segment_bytes", {"distill.data.segment_bytes": 8}),
    ("distill.data.train_bytes", {"distill.data.train_bytes": 0}),
    ("distill.data.val_bytes", {"distill.data.val_bytes": 1.5}),
    ("distill.threads", {"distill.threads": 0}),
    ("distill.lora.r", {"distill.lora": {"r": 0}}),
    ("distill.lora.alpha", {"distill.lora": {"alpha": INF}}),
    ("distill.lora.dropout", {"distill.lora": {"dropout": 1.0}}),
    ("distill.lora.target_modules", {"distill.lora": {"target_modules": "q_proj"}}),
    ("distill.lora.train_embeddings", {"distill.lora": {"train_embeddings": "no"}}),
    ("distill.teacher_cache", {"distill.teacher_cache": "yes"}),
    ("distill.teacher_cache_top_k", {"distill.teacher_cache_top_k": 4}),
    ("distill.teacher_cache_top_k", {"distill.teacher_cache": True, "distill.teacher_cache_top_k": 0}),
    ("distill.teacher_cache_top_k", {"distill.teacher_cache": True, "distill.teacher_cache_top_k": 4,
                                     "run.methods": ["sft", "multilevel_ot"]}),
    ("pairs.bpe_to_sp.teacher", {"pairs.bpe_to_sp.teacher": "nobody"}),
    ("pairs.bpe_to_sp.student_tokenizer", {"pairs.bpe_to_sp.student_tokenizer": "../x"}),
    ("pairs.bpe_to_sp.student_model", {"pairs.bpe_to_sp.student_model": "nobody"}),
    ("pairs.bpe_to_sp.methods.1", {"pairs.bpe_to_sp.methods": ["sft", "nope"]}),
    ("pairs.bpe_to_sp.methods", {"pairs.bpe_to_sp.methods": []}),
    ("pairs.bpe_to_sp.methods", {"pairs.bpe_to_sp.methods": ["sft", "sft"]}),
    ("pairs.bpe_to_byte.methods", {"pairs.bpe_to_byte.methods": ["kd"]}),
    ("pairs.data", lambda c: c["pairs"].update({"data": c["pairs"].pop("bpe_to_sp")})),
    ("pairs.p q", lambda c: c["pairs"].update({"p q": c["pairs"].pop("bpe_to_sp")})),
    ("methods.sft.temprature", {"methods.sft": {"temprature": 2.0}}),
    ("methods.bld.temperature", {"methods.bld": {"temperature": "hot"}}),
    ("methods.bld.temperature", {"methods.bld": {"temperature": -1}}),
    ("methods.bld.n_bytes", {"methods.bld": {"n_bytes": 2.5}}),
    ("methods.bld.head", {"methods.bld": {"head": "mlp"}}),
    ("methods.bld.lambda_kl", {"methods.bld": {"lambda_kl": NAN}}),
    ("methods.bld.conversion", {"methods.bld": {"conversion": "a2"}}),
    ("methods.mined.map_path", {"methods.mined": {"map_path": "/tmp/x.npy"}}),
    ("methods.mined.map_path", {"methods.mined": {"map_path": "results/../../x.npy"}}),
    ("methods.mined.alignment", {"methods.mined": {"alignment": "viterbi"}}),
    ("methods.alm+sft.threshold", {"methods.alm+sft": {"threshold": 2}}),
    ("methods.alm+sft.sft", {"methods.alm+sft": {"sft": "yes"}}),
    ("methods.magic", {"methods.magic": {}}), ("methods.bld", {"methods.bld": None}),
    ("methods.sft", ("text", lambda text: text.replace("  sft: {}", "  sft: {}\n  sft: {}", 1))),
    ("name", ("text", lambda text: text + "name: other\n")),
    ("run.methods.1", {"run.methods": ["sft", "magic"]}), ("run.methods", {"run.methods": []}),
    ("run.seeds.1", {"run.seeds": [0, -1]}), ("run.seeds.0", {"run.seeds": [0.5]}),
    ("run.seeds", {"run.seeds": [0, 0]}), ("run.pairs.0", {"run.pairs": ["nope"]}),
    ("run", {"run": DELETE}),
    ("evaluate.tasks.0", {"evaluate.tasks": ["ctd_heldot"]}), ("evaluate.tasks", {"evaluate.tasks": []}),
    ("evaluate.batch_size", {"evaluate.batch_size": 0}), ("evaluate.max_length", {"evaluate.max_length": 8}),
    ("evaluate.n_cloze", {"evaluate.n_cloze": 2.0}), ("evaluate.limit", {"evaluate.limit": 0}),
    ("evaluate.apply_chat_template", {"evaluate.apply_chat_template": "yes"}),
    ("evaluate.fewshot_as_multiturn", {"evaluate.fewshot_as_multiturn": True}),
    ("evaluate.agreement_passages", {"evaluate.agreement_passages": -1}),
    ("colour", {"colour": "blue"}),
    ("__use_yte__", {"__use_yte__": True}),  # Snakemake would evaluate the file as a YTE template
]


def mutated(mutation) -> str:
    if isinstance(mutation, tuple):
        return mutation[1](SMOKE)
    config = yaml.safe_load(SMOKE)
    if callable(mutation):
        mutation(config)
    else:
        for path, value in mutation.items():
            *parents, last = path.split(".")
            node = config
            for key in parents:
                node = node[key]
            node.pop(last) if value is DELETE else node.__setitem__(last, copy.deepcopy(value))
    return yaml.safe_dump(config, sort_keys=False)


def test_the_corpus_covers_every_key_of_the_schema():
    schema = yaml.safe_load((REPO / "workflows" / "schema" / "config.schema.yaml").read_text())

    def keys(node, prefix=""):
        node = schema["$defs"][node["$ref"].split("/")[-1]] if "$ref" in node else node
        for name, sub in node.get("properties", {}).items():
            yield prefix + name
            yield from keys(sub, prefix + name + ".")

    covered = " ".join(key for key, _ in CASES)
    # Per-entry sections (tokenizers.<name>, ...) are covered through the smoke config's entries.
    missing = [k for k in keys(schema) if k.split(".")[-1] not in covered]
    assert not missing and len(CASES) >= 60


@pytest.mark.parametrize("key, mutation", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_invalid_config_is_refused_naming_the_key(key, mutation, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(mutated(mutation))
    with pytest.raises(ctd_config.ConfigError) as refused:
        ctd_config.load(path)
    message = str(refused.value)
    assert f"'{key}'" in message and "\n" not in message, message
