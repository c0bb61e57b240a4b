"""Fast Vocabulary Transfer: shapes, copied and averaged rows, specials, tying, save / reload."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctdbench.fvt import fvt_sources, fvt_transfer
from ctdbench.models import build_model
from ctdbench.tokbytes import token_bytes, tokenizer_family

SPEC = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
PAIRS = [("bytelevel_bpe", "sentencepiece_bpe"), ("bytelevel_bpe", "byte"), ("sentencepiece_bpe", "bytelevel_bpe")]
KINDS = ("bytelevel_bpe", "sentencepiece_bpe", "byte")
ALL_PAIRS = [(a, b) for a in KINDS for b in KINDS]


def _model(tok, **spec):
    return build_model({**SPEC, **spec}, tok, seed=0, max_positions=256)


def _transferred(tokenizers, old, new, **spec):
    """(old embeddings, old lm head, transferred model)."""
    model = _model(tokenizers[old], **spec)
    w_in = model.get_input_embeddings().weight.detach().clone()
    w_out = model.get_output_embeddings().weight.detach().clone()
    return w_in, w_out, fvt_transfer(model, tokenizers[old], tokenizers[new])


@pytest.mark.parametrize("old, new", PAIRS)
def test_shapes_config_and_forward(tokenizers, old, new):
    new_tok = tokenizers[new]
    _, _, model = _transferred(tokenizers, old, new)
    n = len(new_tok)
    assert model.get_input_embeddings().weight.shape == (n, SPEC["hidden"])
    assert model.get_output_embeddings().weight.shape == (n, SPEC["hidden"])
    assert model.config.vocab_size == n
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
            new_tok.bos_token_id, new_tok.eos_token_id, new_tok.pad_token_id)
    assert model.get_input_embeddings().padding_idx == new_tok.pad_token_id
    ids = torch.tensor([new_tok("the cat sat on the mat.")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], n)


@pytest.mark.parametrize("old, new", ALL_PAIRS)
def test_sources_spell_every_token_exactly(tokenizers, old, new):
    old_table, new_table = token_bytes(tokenizers[old]), token_bytes(tokenizers[new])
    for i, src in enumerate(fvt_sources(tokenizers[old], tokenizers[new])):
        if new_table[i] is not None:  # partial UTF-8 characters included (the byte tokenizer has all 256)
            assert b"".join(old_table[j] for j in src) == new_table[i], (i, new_table[i])


@pytest.mark.parametrize("old, new", ALL_PAIRS)
def test_sources_match_the_old_tokenizer_on_single_words(tokenizers, old, new):
    """Independent reference: the old tokenizer's full pipeline on a token that is one pre-token."""
    old_tok = tokenizers[old]
    family, checked = tokenizer_family(old_tok), 0
    for data, src in zip(token_bytes(tokenizers[new]), fvt_sources(old_tok, tokenizers[new])):
        try:
            text = data.decode() if data is not None else None
        except UnicodeDecodeError:
            continue
        if not text:
            continue
        if family == "bytelevel" and len(old_tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)) == 1:
            expected = old_tok(text, add_special_tokens=False)["input_ids"]
        elif family == "sentencepiece" and len(text) > 1 and text[0] == " " and text.count(" ") == 1:
            expected = old_tok(text[1:], add_special_tokens=False)["input_ids"]  # the dummy prefix gives the space
        else:
            continue
        assert src == expected, (text, src, expected)
        checked += 1
    assert checked > 10 or (family == "sentencepiece" and new == "byte")  # no byte token starts with a space


def test_partial_utf8_bytes_map_to_byte_fallback_pieces(tokenizers):
    sp = tokenizers["sentencepiece_bpe"]
    src = fvt_sources(sp, tokenizers["byte"])
    for b in (0x80, 0xC3, 0xE6, 0xFF):  # byte-tokenizer id = byte value
        assert sp.convert_ids_to_tokens(src[b]) == [f"<0x{b:02X}>"]


@pytest.mark.parametrize("old, new", PAIRS)
@pytest.mark.parametrize("tie", [True, False])
def test_rows_are_copies_or_means_of_old_rows(tokenizers, old, new, tie):
    w_in, w_out, model = _transferred(tokenizers, old, new, tie_embeddings=tie)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    old_table, new_table = token_bytes(tokenizers[old]), token_bytes(tokenizers[new])
    old_ids: dict[bytes, list[int]] = {}  # bytes -> every old id spelling them ("A" and "<0x41>")
    for j, b in enumerate(old_table):
        old_ids.setdefault(b, []).append(j)
    sources = fvt_sources(tokenizers[old], tokenizers[new])
    copied = averaged = 0
    for i, src in enumerate(sources):  # the naive per-token loop
        for old_w, new_w in ((w_in, new_in), (w_out, new_out)):
            if new_table[i] is not None and new_table[i] in old_ids:
                assert any(torch.equal(new_w[i], old_w[j]) for j in old_ids[new_table[i]])  # verbatim: a copy
            else:
                expected = torch.stack([old_w[j] for j in src]).mean(0) if src else old_w[:len(old_table)].mean(0)
                torch.testing.assert_close(new_w[i], expected, rtol=1e-6, atol=1e-6)
        copied += new_table[i] in old_ids
        averaged += len(src) > 1
    assert copied > 50 and (averaged > 10 or new == "byte")
    if tie:
        assert new_out is new_in
    else:
        assert new_out.data_ptr() != new_in.data_ptr() and not torch.equal(new_out, new_in)


def test_special_tokens_follow_their_role_else_the_global_mean(tokenizers):
    old, new = tokenizers["bytelevel_bpe"], copy.deepcopy(tokenizers["byte"])
    new.add_tokens(["<|extra|>"], special_tokens=True)
    w_in, _, model = _transferred({"old": old, "new": new}, "old", "new")
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[new.eos_token_id], w_in[old.eos_token_id])
    assert torch.equal(emb[new.pad_token_id], w_in[old.pad_token_id])
    torch.testing.assert_close(emb[new.convert_tokens_to_ids("<|extra|>")], w_in.mean(0))


def test_model_smaller_than_old_tokenizer_is_refused(tokenizers):
    model = _model(tokenizers["byte"])
    with pytest.raises(ValueError, match="embedding rows"):
        fvt_transfer(model, tokenizers["bytelevel_bpe"], tokenizers["sentencepiece_bpe"])


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_reload_round_trip(tokenizers, tmp_path, tie):
    new_tok = tokenizers["sentencepiece_bpe"]
    _, _, model = _transferred(tokenizers, "bytelevel_bpe", "sentencepiece_bpe", tie_embeddings=tie)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == len(new_tok)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tie
    ids = torch.tensor([new_tok("a quick test of the model")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bfloat16_model_keeps_its_dtype(tokenizers):
    old, new = tokenizers["bytelevel_bpe"], tokenizers["sentencepiece_bpe"]
    model = _model(old).to(torch.bfloat16)
    w_in = model.get_input_embeddings().weight.detach().float()
    fvt_transfer(model, old, new)
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16
    i, src = next((i, s) for i, s in enumerate(fvt_sources(old, new)) if len(s) > 1)
    assert torch.equal(emb[i], w_in[src].mean(0).to(torch.bfloat16))  # averaged in float32, rounded once
