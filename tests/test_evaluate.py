"""ctdbench.evaluate: task data, a real lm-eval run, and bits-per-byte against a direct computation."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ctdbench.evaluate import build_eval_data, cloze_items, evaluate_model, read_eval

WORDS = ("the king my lord thou art and shall with love night moon fair sweet death crown sword "
         "good heart noble grace speak hear come away hence naïve café Æsop whither").split()
MAX_LENGTH = 48  # far below the passage lengths in tokens: every passage spans several windows
LIMIT = 4


def synthetic_docs(n_docs: int = 2, n_lines: int = 90, seed: int = 0) -> list[dict]:
    """Verse-like documents with some non-ASCII words (bytes != characters)."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 10))).capitalize() for _ in range(n_lines)]
        docs.append({"id": f"play-{d}", "text": "\n".join(lines) + "\n"})
    return docs


def test_build_eval_data_is_deterministic(tmp_path):
    docs = synthetic_docs()
    a = build_eval_data(docs, tmp_path / "a", n_cloze=30, seed=3, passage_bytes=300)
    b = build_eval_data(docs, tmp_path / "b", n_cloze=30, seed=3, passage_bytes=300)
    c = build_eval_data(docs, tmp_path / "c", n_cloze=30, seed=4, passage_bytes=300)
    assert a == b == c
    for name in ("heldout.jsonl", "cloze.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "cloze.jsonl").read_bytes() != (tmp_path / "c" / "cloze.jsonl").read_bytes()


def test_heldout_passages_cover_the_split(tmp_path):
    docs = synthetic_docs()
    counts = build_eval_data(docs, tmp_path, n_cloze=5, passage_bytes=300)
    passages = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert counts["heldout_passages"] == len(passages) > len(docs)
    assert all(len(p["text"].encode()) <= 300 for p in passages)
    for doc in docs:
        assert "".join(p["text"] for p in passages if p["id"].startswith(doc["id"] + "#")) == doc["text"]
    assert counts["heldout_bytes"] == sum(len(d["text"].encode()) for d in docs)


def test_cloze_items_format(tmp_path):
    docs = synthetic_docs()
    counts = build_eval_data(docs, tmp_path, n_cloze=40)
    items = [json.loads(line) for line in (tmp_path / "cloze.jsonl").read_text().splitlines()]
    assert counts["cloze_items"] == len(items) == 40
    lines = {(d["id"], n + 1): line for d in docs for n, line in enumerate(d["text"].splitlines())}
    lengths = []
    for item in items:
        doc_id, line_no = item["id"].rsplit(":", 1)
        context_lines = item["context"].split("\n")
        assert len(context_lines) == 3 and context_lines[:2] == [lines[doc_id, int(line_no) - 2],
                                                                 lines[doc_id, int(line_no) - 1]]
        choices, gold = item["choices"], item["gold"]
        assert len(choices) == len(set(choices)) == 4 and 0 <= gold < 4
        assert context_lines[2] + choices[gold] == lines[doc_id, int(line_no)]
        assert all(c.startswith(" ") and len(c.split()) >= 2 for c in choices)
        lengths.append([len(c.encode()) for c in choices])
    lengths = np.array(lengths)
    # Distractors of nearly the true length: the longest choice is no better than chance at gold.
    assert np.abs(lengths - lengths[np.arange(len(items)), [i["gold"] for i in items]][:, None]).mean() < 4
    assert len({i["gold"] for i in items}) == 4


def test_cloze_items_skip_when_too_little_text():
    assert cloze_items([("x", "one two three four\nfive six seven eight")], n_cloze=5) == []


def byte_level_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with "<|endoftext|>" as BOS = EOS; vocab 258 gives a pure byte tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def tiny_model(kind: str, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(**common)).eval()


@pytest.fixture(scope="module", params=[("llama", 300), ("gpt_neox", 258)], ids=["llama_bpe", "neox_bytes"])
def evaluated(request, tmp_path_factory):
    """One real evaluate_model run per (architecture, tokenizer): the BPE teacher-like and the byte student-like."""
    arch, vocab = request.param
    root = tmp_path_factory.mktemp(arch)
    docs = synthetic_docs()
    tokenizer = byte_level_tokenizer([d["text"] for d in docs], vocab)
    model = tiny_model(arch, tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    build_eval_data(docs, root / "data", n_cloze=12, passage_bytes=600)
    result = evaluate_model(root / "model", root / "data", root / "run" / "eval.json", batch_size=8,
                            max_length=MAX_LENGTH, limit=LIMIT)
    return root, model, tokenizer, result


def test_eval_json_schema(evaluated):
    root, _, _, result = evaluated
    on_disk = read_eval(root / "run" / "eval.json")
    assert on_disk == result
    assert set(on_disk) == {"model_dir", "tasks", "lm_eval", "timing"}
    heldout, cloze = on_disk["tasks"]["ctd_heldout"], on_disk["tasks"]["ctd_cloze"]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(heldout)
    assert {"acc", "acc_norm", "acc_bytes", "acc_stderr"} <= set(cloze)
    assert all(isinstance(v, float) or v is None for m in on_disk["tasks"].values() for v in m.values())
    assert 0.0 <= cloze["acc"] <= 1.0 and heldout["bits_per_byte"] > 0
    assert math.isclose(heldout["byte_perplexity"], 2 ** heldout["bits_per_byte"], rel_tol=1e-9)
    lm = on_disk["lm_eval"]
    assert lm["n-samples"]["ctd_heldout"]["effective"] == LIMIT
    assert lm["higher_is_better"]["ctd_heldout"]["bits_per_byte"] is False
    assert lm["config"]["max_length"] == MAX_LENGTH and lm["version"] and lm["date"]
    assert on_disk["timing"]["seconds"] > 0


def direct_bits_per_byte(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Sum of NLL / ln 2 / UTF-8 bytes, with lm-eval's rolling windows written out independently.

    The document is BOS + tokens; targets are cut into chunks of ``max_length`` tokens, and each
    chunk is predicted from the ``max_length`` positions that end just before its last target (so
    the first chunk starts at BOS and the last, short chunk sees a full window of context).
    """
    nll, n_bytes = 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
        n = len(ids) - 1
        for first in range(1, n + 1, max_length):
            last = min(first + max_length - 1, n)
            start = max(0, last - max_length)
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:last]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[-(last - first + 1):]
            targets = torch.tensor(ids[first:last + 1])
            nll -= logp[torch.arange(len(targets)), targets].sum().item()
        n_bytes += len(text.encode("utf-8"))
    return nll / math.log(2) / n_bytes


def test_bits_per_byte_matches_direct_computation(evaluated):
    root, model, tokenizer, result = evaluated
    passages = [json.loads(line)["text"] for line in (root / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(tokenizer.encode(passages[0])) > 3 * MAX_LENGTH  # several windows per passage
    expected = direct_bits_per_byte(model, tokenizer, passages[:LIMIT], MAX_LENGTH)
    assert abs(result["tasks"]["ctd_heldout"]["bits_per_byte"] - expected) < 1e-4


def test_cloze_contexts_start_with_bos(evaluated):
    from ctdbench.evaluate import _bos_context_hflm

    _, model, tokenizer, _ = evaluated
    lm = _bos_context_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=MAX_LENGTH)
    context, continuation = lm._encode_pair("Good night, sweet", " prince")
    assert context[0] == tokenizer.bos_token_id and context.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(context[1:] + continuation) == "Good night, sweet prince"


def test_non_finite_weights_or_metrics_are_never_reported(evaluated, tmp_path):
    from ctdbench.agreement import byte_agreement
    from ctdbench.data import Side
    from ctdbench.evaluate import write_eval
    from ctdbench.tokbytes import token_bytes

    root, model, tokenizer, result = evaluated
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters())[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        evaluate_model(tmp_path / "model", root / "data", tmp_path / "eval.json", batch_size=8, max_length=MAX_LENGTH,
                       limit=LIMIT)
    side = Side(tokenizer, token_bytes(tokenizer))
    with pytest.raises(FloatingPointError, match="non-finite next-byte distributions"):  # not a KL of 0.0
        byte_agreement(model, side, broken, side, ["some held-out text"])
    nan_metric = copy.deepcopy(result)
    nan_metric["tasks"]["ctd_heldout"]["bits_per_byte"] = float("nan")
    with pytest.raises(FloatingPointError, match="ctd_heldout/bits_per_byte"):
        write_eval(nan_metric, tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()
