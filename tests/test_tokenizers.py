"""Locally trained tokenizers: specials, ids, lossless decoding, save / reload beside a model."""

import pytest
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config

from ctdbench.tokenizers import KINDS, load_tokenizer, train_tokenizer

TEXTS = [
    "Now is the winter of our discontent",
    "  two leading spaces, runs   of spaces\tand\ttabs\n\nand newlines\n",
    " Café naïve — Zoë, e\u0301 (combining)",
    "東京の夜 🙂 👩‍👩‍👧 🇫🇷 👋🏽",
    "",
]


@pytest.mark.parametrize("kind", KINDS)
def test_specials_are_identical_on_all_kinds(tokenizers, kind):
    tok = tokenizers[kind]
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert set(tok.all_special_tokens) == {"<|endoftext|>", "<pad>"}
    assert tok("Hello")["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]  # no BOS added


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", TEXTS)
def test_decoding_is_lossless(tokenizers, kind, text):
    tok = tokenizers[kind]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_byte_tokenizer_ids_are_the_bytes(tokenizers):
    tok = tokenizers["byte"]
    text = "Zoë 🙂\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())
    assert (tok.bos_token_id, tok.pad_token_id, len(tok)) == (256, 257, 258)


def test_sentencepiece_byte_pieces_are_ordinary_vocabulary(tokenizers):
    tok = tokenizers["sentencepiece_bpe"]
    ids = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    assert ids == list(range(2, 258))
    assert not set(ids) & set(tok.added_tokens_decoder)
    # A character outside the learned alphabet falls back to its bytes and decodes back.
    enc = tok("𝄞", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(enc) == ["▁", "<0xF0>", "<0x9D>", "<0x84>", "<0x9E>"]
    assert tok.decode(enc) == "𝄞"


def test_vocab_size_and_determinism(corpus_texts, tokenizers):
    assert len(tokenizers["bytelevel_bpe"]) == 400 and len(tokenizers["sentencepiece_bpe"]) == 380
    again = train_tokenizer("sentencepiece_bpe", corpus_texts, 380)
    assert again.backend_tokenizer.to_str() == tokenizers["sentencepiece_bpe"].backend_tokenizer.to_str()


def test_bad_arguments():
    with pytest.raises(ValueError, match="bytelevel_bpe, sentencepiece_bpe, byte"):
        train_tokenizer("wordpiece", ["text"], 500)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("bytelevel_bpe", ["text"])
    with pytest.raises(ValueError, match="above 258"):
        train_tokenizer("sentencepiece_bpe", ["text"], 200)


def _tiny_model(arch: str, vocab_size: int):
    size = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**size))
    return GPTNeoXForCausalLM(GPTNeoXConfig(**size))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("kind", KINDS)
def test_reload_beside_a_model_gives_the_same_ids(tokenizers, kind, arch, tmp_path):
    """transformers 5 may pick a tokenizer class by model type; the saved pipeline must survive."""
    tok = tokenizers[kind]
    _tiny_model(arch, len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
        for text in TEXTS:
            ids = loaded(text, add_special_tokens=False)["input_ids"]
            assert ids == tok(text, add_special_tokens=False)["input_ids"]
            assert loaded.decode(ids) == text


def test_load_tokenizer_ignores_the_model_type(tokenizers, tmp_path):
    """AutoTokenizer gives a qwen2 directory Qwen2's own pre-tokenizer; load_tokenizer keeps the saved one."""
    tok = tokenizers["sentencepiece_bpe"]
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    text = TEXTS[2]
    assert load_tokenizer(tmp_path)(text)["input_ids"] == tok(text)["input_ids"]
