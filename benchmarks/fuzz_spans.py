"""Fuzzed text through tokenization with byte spans (``ctdbench.tokbytes.encode_with_spans``).

    python benchmarks/fuzz_spans.py --texts 10000
    python benchmarks/fuzz_spans.py --texts 10000 --real ../shared/tokenizers   # + GPT-2, Llama-2

Texts mix ASCII words with what breaks naive tokenization: emoji with ZWJ and skin tones, CJK,
combining marks (NFC would compose them), right-to-left scripts and bidi controls, control
bytes, NUL, ``\\r\\n``, long runs of (Unicode) whitespace, a literal SentencePiece marker "▁",
byte-fallback look-alikes and the special tokens' strings. Every text goes through every
tokenizer kind trained on the tiny corpus (plus a byte-level BPE behind an NFC normalizer, as
Qwen2's, and the real tokenizers when given) and must come out spelled byte for byte: the
spans tile the text and every token's bytes equal its span (a special token's string, a
dummy-prefix space excepted). Prints per tokenizer the failures (must be 0), the texts and
bytes the byte fallback spelled, and the time. ``tests/test_fuzz_spans.py`` runs a few hundred.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PIECES = {
    "word": ["the", "Hello", "world", "token", "byte", "of", "and", "ALL", "x", "42", "3.14", "--", "'s"],
    "emoji": ["🙂", "👩‍👩‍👧", "👋🏽", "🇫🇷", "🏳️‍🌈", "🧑🏿‍💻", "❤️", "👁️‍🗨️"],
    "cjk": ["東京", "の", "夜", "、", "雨が降る。", "漢字", "한국어", "ひらがな", "ｶﾀｶﾅ", "　"],
    "combining": ["e\u0301", "a\u0300", "n\u0303", "o\u0308\u0304", "\u0301", "\u0323\u0302", "\u1100\u1161",
                  "A\u030a", "\u212b", "Å"],
    "rtl": ["שלום", "مرحبا", "\u200f", "\u200e", "\u202e", "\u202c", "\u2066", "\u2069", "فارسی"],
    "control": ["\x00", "\x01", "\x07", "\x08", "\x1b", "\x7f", "\x85", "\x9f", "\ufeff", "\u200b", "\ufffd"],
    "newline": ["\n", "\r\n", "\r", "\u2028", "\u2029", "\x0b", "\x0c"],
    "space": [" ", "  ", "\t", " " * 17, "\t\t\t", "\u00a0", "\u3000", " \u2009 ", " " * 64],
    "marker": ["▁", "▁▁", "▁x", "x▁", " ▁ ", "<0x41>", "<|endoftext|>", "<pad>", "<unk>", "<s>", "</s>"],
}


def fuzz_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` random texts of 1-40 pieces drawn from every class of :data:`PIECES` (seeded)."""
    rng = random.Random(seed)
    classes = sorted(PIECES)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            kind = rng.choice(classes)
            if kind == "word" or rng.random() < 0.1:  # now and then any code point but a surrogate
                parts.append(rng.choice(PIECES["word"]) if kind == "word" else chr(rng.choice(
                    [rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
            else:
                parts.append(rng.choice(PIECES[kind]))
            if rng.random() < 0.3:
                parts.append(" ")
        texts.append("".join(parts))
    return texts


def spelling_error(tokenizer, table, text: str, spans) -> str | None:
    """Why ``spans`` do not spell ``text`` byte for byte (None if they do)."""
    data, pos = text.encode("utf-8"), 0
    for k, (i, s, e) in enumerate(zip(spans.ids, spans.starts, spans.ends)):
        expected = tokenizer.convert_ids_to_tokens(i).encode() if table[i] is None else table[i]
        if s != pos or not (data[s:e] == expected or (expected[:1] == b" " and data[s:e] == expected[1:])):
            return f"token {k} (id {i}, {expected!r}) spans [{s}, {e}) = {data[s:e]!r}, expected from byte {pos}"
        pos = e
    return None if pos == len(data) else f"the spans end at byte {pos} of {len(data)}"


def tokenizers(real: Path | None = None) -> dict:
    """Every tokenizer kind trained on the tiny corpus, a byte-level BPE behind NFC, and the real ones."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    from ctdbench.corpus import read_local
    from ctdbench.tokenizers import BOS, PAD, train_tokenizer

    texts = [d.text for d in read_local(REPO / "tests" / "data" / "tiny_corpus")]
    out = {"bytelevel_bpe": train_tokenizer("bytelevel_bpe", texts, 400),
           "sentencepiece_bpe": train_tokenizer("sentencepiece_bpe", texts, 380),
           "byte": train_tokenizer("byte", texts)}
    nfc = Tokenizer.from_str(out["bytelevel_bpe"].backend_tokenizer.to_str())
    nfc.normalizer = normalizers.NFC()
    out["bytelevel_bpe+nfc"] = PreTrainedTokenizerFast(tokenizer_object=nfc, bos_token=BOS, eos_token=BOS,
                                                       pad_token=PAD)
    for name in ("gpt2", "llama2"):
        if real is not None and (real / f"{name}.tokenizer.json").is_file():
            out[name] = PreTrainedTokenizerFast(tokenizer_file=str(real / f"{name}.tokenizer.json"))
    return out


def main() -> None:
    from ctdbench.data import Side
    from ctdbench.tokbytes import encode_with_spans, token_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, default=None, help="folder of gpt2/llama2 .tokenizer.json files")
    args = parser.parse_args()
    texts = fuzz_texts(args.texts, args.seed)
    print(f"{len(texts)} texts, {sum(len(t.encode()) for t in texts)} bytes")
    for name, tok in tokenizers(args.real).items():
        side = Side(tok, token_bytes(tok))
        failures, fallback_texts, fallback_bytes = 0, 0, 0
        start = time.perf_counter()
        for text in texts:
            try:
                spans = encode_with_spans(tok, text, side.token_bytes, side.byte_ids)
                error = spelling_error(tok, side.token_bytes, text, spans)
            except Exception as e:  # noqa: BLE001 - counted and shown
                spans, error = None, f"{type(e).__name__}: {e}"
            if error:
                failures += 1
                if failures <= 3:
                    print(f"  {name} FAILED on {text!r}: {error}")
            elif spans.fallback_bytes:
                fallback_texts += 1
                fallback_bytes += spans.fallback_bytes
        seconds = time.perf_counter() - start
        print(f"{name:20s} failures {failures}  byte fallback: {fallback_texts} texts, {fallback_bytes} bytes  "
              f"{seconds:.2f} s")


if __name__ == "__main__":
    main()
