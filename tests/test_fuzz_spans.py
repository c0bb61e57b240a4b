"""Text a tokenizer's own tokens do not spell (a literal "▁", NFC changes, control bytes ...):
the byte fallback of ``ctdbench.tokbytes`` spells it exactly, for every tokenizer kind, and the
data layer counts it. ``benchmarks/fuzz_spans.py`` runs the same check on 10,000 texts."""

import importlib.util
import json
from pathlib import Path

import pytest

from ctdbench.data import PairedDataset, Side
from ctdbench.tokbytes import encode_with_spans, token_bytes

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fuzz_spans", REPO / "benchmarks" / "fuzz_spans.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)


@pytest.fixture(scope="module")
def kinds():
    return {name: Side(tok, token_bytes(tok)) for name, tok in fuzz.tokenizers().items()}


@pytest.mark.parametrize("name", ["bytelevel_bpe", "sentencepiece_bpe", "byte", "bytelevel_bpe+nfc"])
def test_fuzzed_texts_are_spelled_byte_for_byte(kinds, name):
    side, fell_back = kinds[name], 0
    for text in fuzz.fuzz_texts(300, seed=1):
        spans = encode_with_spans(side.tokenizer, text, side.token_bytes, side.byte_ids)
        assert fuzz.spelling_error(side.tokenizer, side.token_bytes, text, spans) is None, text
        fell_back += spans.fallback_bytes > 0
    # Only the tokenizers that misread some of this text need the fallback.
    assert (fell_back > 0) == (name in ("sentencepiece_bpe", "bytelevel_bpe+nfc"))


def test_a_literal_space_marker_is_spelled_by_byte_fallback_pieces(kinds):
    side = kinds["sentencepiece_bpe"]
    spans = encode_with_spans(side.tokenizer, "a▁b", side.token_bytes)
    assert side.tokenizer.convert_ids_to_tokens(spans.ids) == ["▁a", "<0xE2>", "<0x96>", "<0x81>", "<0x62>"]
    assert (spans.starts, spans.ends, spans.fallback_bytes) == ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5], 4)


def test_a_corpus_with_space_markers_pairs_and_counts(kinds):
    student, teacher = kinds["sentencepiece_bpe"], kinds["bytelevel_bpe"]
    segments = ["plain text\n", "web ▁ text\n", "▁▁start\n", "more plain\n"]
    data = PairedDataset(segments, student, teacher)
    assert [e.text for e in data] == [s.encode() for s in segments]  # the text itself is never changed
    counts = data.fallback_counts()
    assert counts["segments"] == 4
    assert counts["byte_fallback"]["student"]["segments"] == 2 and counts["byte_fallback"]["student"]["bytes"] >= 9
    assert counts["byte_fallback"]["teacher"] == {"segments": 0, "bytes": 0}
    # The teacher's tokens of a segment do not depend on the student: a cache stays aligned.
    alone = PairedDataset(segments, teacher, teacher)
    assert [e.teacher.ids for e in alone] == [e.teacher.ids for e in data]
    json.dumps(counts)
