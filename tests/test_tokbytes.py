"""Token -> bytes tables and byte spans: local tokenizers of all three kinds and the real GPT-2 / Llama-2."""

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ctdbench.tokbytes import UnsupportedTokenizerError, encode_with_spans, token_bytes, tokenizer_family

TEXTS = [
    "Hello world, this is a test.",
    " one leading space",
    "   three leading spaces",
    "runs   of    spaces and trailing  ",
    "tabs\tand\t\tmore tabs",
    "new\nlines\n\n\nand a trailing one\n",
    "\n leading newline",
    "emoji 🙂 family 👩‍👩‍👧 (ZWJ) flag 🇫🇷 skin 👋🏽",
    "CJK 東京の夜、雨が降る。漢字",
    "combining e\u0301 a\u0300 n\u0303 next to precomposed é à ñ",
    "mixed\t 日本 \n 🎉  Zoë —",
    "",
    " ",
]
KINDS = ["bytelevel_bpe", "sentencepiece_bpe", "byte"]
REAL = ["gpt2", "llama2"]


@pytest.fixture(scope="module")
def load(tokenizers, shared_tokenizer):
    """name -> (tokenizer, byte table, family), computed once per module (the real tables take ~0.5 s)."""
    cache = {}

    def get(name):
        if name not in cache:
            tok = tokenizers[name] if name in tokenizers else shared_tokenizer(name)
            cache[name] = tok, token_bytes(tok), tokenizer_family(tok)
        return cache[name]

    return get


def _with_specials(tok: Tokenizer, **specials) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.mark.parametrize("name", KINDS + REAL)
@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_and_spans_spell_the_text(load, name, text):
    tok, table, family = load(name)
    data = text.encode()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    joined = b"".join(table[i] for i in ids)
    # Only a SentencePiece-style tokenizer may add its dummy-prefix space.
    assert joined == data or (family == "sentencepiece" and joined == b" " + data)

    spans = encode_with_spans(tok, text, table)
    assert spans.ids == ids and len(spans.starts) == len(spans.ends) == len(ids)
    pos = 0
    for k, (i, s, e) in enumerate(zip(spans.ids, spans.starts, spans.ends)):
        assert s == pos and e >= s
        # Every span holds its token's bytes, except the dummy-prefix space of the first token.
        assert data[s:e] == table[i] or (k == 0 and b" " + data[s:e] == table[i])
        pos = e
    assert pos == len(data)


@pytest.mark.parametrize("name, family", [("bytelevel_bpe", "bytelevel"), ("byte", "bytelevel"),
                                          ("sentencepiece_bpe", "sentencepiece"), ("gpt2", "bytelevel"),
                                          ("llama2", "sentencepiece")])
def test_families(load, name, family):
    assert load(name)[2] == family


def test_multibyte_characters_split_across_byte_tokens(load):
    tok, table, _ = load("byte")
    text = "a👩‍👩‍👧b"
    spans = encode_with_spans(tok, text, table)
    assert spans.ids == list(text.encode())
    assert list(zip(spans.starts, spans.ends)) == [(k, k + 1) for k in range(len(text.encode()))]


def test_gpt2_splits_characters_inside_tokens(load):
    """GPT-2 has tokens holding part of a character: the spans still cut the bytes exactly."""
    tok, table, _ = load("gpt2")
    text = "漢字 👩‍👩‍👧"
    spans = encode_with_spans(tok, text, table)
    pieces = [table[i] for i in spans.ids]
    assert any(not _is_utf8(p) for p in pieces)  # the case under test really happens
    assert [text.encode()[s:e] for s, e in zip(spans.starts, spans.ends)] == pieces


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("name", ["sentencepiece_bpe", "llama2"])
def test_byte_fallback_tokens_are_single_bytes(load, name):
    tok, table, _ = load(name)
    ids = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    assert [table[i] for i in ids] == [bytes([b]) for b in range(256)]


@pytest.mark.parametrize("name", ["sentencepiece_bpe", "llama2"])
def test_dummy_prefix_is_not_in_the_spans(load, name):
    tok, table, _ = load(name)
    spans = encode_with_spans(tok, "Hello", table)
    assert table[spans.ids[0]].startswith(b" ") and spans.starts[0] == 0 and spans.ends[-1] == 5
    spans = encode_with_spans(tok, " Hello", table)
    first = table[spans.ids[0]]
    assert first.startswith(b"  ") or first == b" "  # Llama-2 has a "▁▁" token, ours splits words at "▁"
    assert (spans.starts[0], spans.ends[0]) == (0, len(first) - 1) and spans.ends[-1] == 6


@pytest.mark.parametrize("name", KINDS)
def test_specials_and_padding_are_none(load, name):
    tok, table, _ = load(name)
    assert table[tok.bos_token_id] is None and table[tok.eos_token_id] is None and table[tok.pad_token_id] is None
    assert sum(b is None for b in table) == 2  # only the two specials
    padded = token_bytes(tok, vocab_size=len(tok) + 7)
    assert padded[: len(tok)] == table and padded[len(tok):] == [None] * 7
    with pytest.raises(ValueError, match="smaller"):
        token_bytes(tok, vocab_size=len(tok) - 1)


def test_real_specials_are_none(load):
    _, llama2, _ = load("llama2")
    assert llama2[:3] == [None, None, None]  # <unk>, <s>, </s>: added tokens marked special
    assert sum(b is None for b in llama2) == 3
    gpt2, _, _ = load("gpt2")  # its tokenizer.json marks nothing special: declare EOS as a model card does
    table = token_bytes(_with_specials(Tokenizer.from_str(gpt2.backend_tokenizer.to_str()), eos_token="<|endoftext|>"))
    assert table[50256] is None and sum(b is None for b in table) == 1


@pytest.mark.parametrize("name", ["bytelevel_bpe", "sentencepiece_bpe", "byte", "llama2"])
def test_special_token_strings_in_the_text_span_their_marker(load, name):
    """Chat markers written in the text become their special ids; the other tokens still spell
    the text around them, a dummy prefix after a marker (Llama-2) included."""
    tok, table, _ = load(name)
    marker = tok.eos_token or "</s>"  # the bare Llama-2 tokenizer.json names no EOS
    text = f"Hello{marker} world{marker}\n next{marker}{marker}end 🙂"
    spans = encode_with_spans(tok, text, table)
    data = text.encode()
    special = [table[i] is None for i in spans.ids]
    assert sum(special) == 4
    assert all(data[s:e] == marker.encode() for s, e, x in zip(spans.starts, spans.ends, special) if x)
    # The spans tile the text in order.
    assert spans.starts[0] == 0 and spans.ends[-1] == len(data)
    assert all(e0 == s1 for e0, s1 in zip(spans.ends, spans.starts[1:]))
    for i, s, e, x in zip(spans.ids, spans.starts, spans.ends, special):
        assert x or table[i] in (data[s:e], b" " + data[s:e])


def test_whitespace_a_marker_eats_is_spelled_by_byte_tokens(tokenizers):
    from tokenizers import AddedToken

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizers["bytelevel_bpe"].backend_tokenizer.to_str()))
    tok.add_tokens([AddedToken("<|eot|>", special=True, lstrip=True)], special_tokens=True)
    table = token_bytes(tok)
    spans = encode_with_spans(tok, "a  <|eot|>b", table)
    pieces = [table[i] or tok.convert_ids_to_tokens(i).encode() for i in spans.ids]
    assert pieces == [b"a", b" ", b" ", b"<|eot|>", b"b"] and spans.fallback_bytes == 2
    assert (spans.starts, spans.ends) == ([0, 1, 2, 3, 10], [1, 2, 3, 10, 11])


def _renormalized(tok, normalizer) -> PreTrainedTokenizerFast:
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizer
    return _with_specials(backend, bos_token="<|endoftext|>", pad_token="<pad>")


@pytest.mark.parametrize("normalizer, name", [
    (normalizers.Lowercase(), "Lowercase"),
    (normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")]), "NFKC"),
    (normalizers.NFD(), "NFD"),
])
def test_normalizers_that_change_the_text_are_refused(tokenizers, normalizer, name):
    tok = _renormalized(tokenizers["bytelevel_bpe"], normalizer)
    with pytest.raises(UnsupportedTokenizerError, match=name):
        token_bytes(tok)


def test_text_nfc_changes_is_spelled_by_byte_tokens(tokenizers):
    tok = _renormalized(tokenizers["bytelevel_bpe"], normalizers.NFC())
    table = token_bytes(tok)
    assert encode_with_spans(tok, "Zoë é", table).fallback_bytes == 0
    spans = encode_with_spans(tok, "Cafe\u0301!", table)  # NFC would compose the e and its accent
    assert [table[i] for i in spans.ids] == [b"C", b"a", b"f", b"e", b"\xcc", b"\x81", b"!"]
    assert spans.ends == list(range(1, 8)) and spans.fallback_bytes == 4


def test_wordpiece_is_refused():
    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedTokenizerError, match="WordPiece"):
        token_bytes(_with_specials(backend, unk_token="[UNK]"))
