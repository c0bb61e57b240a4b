"""ctdbench.byteprob against naive loops over its definitions (a0, a1), on toy vocabularies of both
families and on the real GPT-2 / Llama-2 vocabularies when they are available."""

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctdbench.byteprob import (
    PRETOKEN_BOUNDARY_BYTES,
    VocabByteIndex,
    next_byte_distributions,
    next_byte_distributions_batch,
)

SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"
TEXTS = [
    "Hello wörld, naïve café! 你好，世界 😀🎉 done.\n\tTabs\r\nand  spaces",
    "Grüße aus München: Привет, мир! 東京タワー 🤖 x=1+2",
]
ATOL = 1e-6


# ---------------------------------------------------------------- naive reference

def extensions(table):
    """R(q) of every prefix q: q -> (ids, next byte) of the entries that start with q and are longer."""
    ext = {}
    for v, tb in enumerate(table):
        for o in range(len(tb or b"")):
            ext.setdefault(tb[:o], []).append((v, tb[o]))
    return {q: tuple(np.array(c) for c in zip(*pairs)) for q, pairs in ext.items()}


def naive(logprobs, ids, table, mode="a0", special_ids=(), rows=None, ext=None):
    """The definitions of a0 / a1 as plain loops over bytes and earlier starts, in float64 log space:
    log N_a(b) = logsumexp over covers of (log w(k') + log sum_{v in R(q + b)} p_k'(v)), P_a = N_a / sum_b N_a.
    A start k' whose q = x[st_k' : a] no entry extends adds nothing, so the loop over k' stops at the
    longest entry."""
    lp = logprobs.double().numpy()
    ids = [int(u) for u in ids]
    ext = extensions(table) if ext is None else ext
    longest = max(len(b or b"") for b in table)
    pieces = [table[u] or b"" for u in ids]
    x = b"".join(pieces)
    starts = np.cumsum([0] + [len(b) for b in pieces])[:-1].tolist()
    token_of = [k for k, b in enumerate(pieces) for _ in b]
    true = lp[np.arange(len(ids)), ids] if ids else np.zeros(0)

    def starts_pretoken(k):
        return k == 0 or not pieces[k] or not pieces[k - 1] or pieces[k][0] in PRETOKEN_BOUNDARY_BYTES

    S = 256 + len(special_ids)
    out = np.zeros((len(x), S))
    for a in range(len(x)) if rows is None else rows:
        k = token_of[a]
        k0 = k
        while mode == "a1" and not starts_pretoken(k0):
            k0 -= 1
        log_terms = []
        for kp in range(k, k0 - 1, -1):
            if a - starts[kp] >= longest:
                break
            mass = np.zeros(S)
            if x[starts[kp]:a] in ext:
                v, b = ext[x[starts[kp]:a]]
                mass[:256] = np.bincount(b, weights=np.exp(lp[kp, v]), minlength=256)
            if kp == k and a == starts[k]:
                mass[256:] = np.exp(lp[k, list(special_ids)])
            with np.errstate(divide="ignore"):
                log_terms.append(true[k0:kp].sum() + np.log(mass))
        with np.errstate(divide="ignore", invalid="ignore"):
            log_num = np.logaddexp.reduce(np.array(log_terms), axis=0)
            total = np.logaddexp.reduce(log_num)
        if total > -np.inf:
            out[a] = np.exp(log_num - total)
    return out


# ---------------------------------------------------------------- toy vocabularies

def bytelevel_vocab(seed=0):
    """GPT-2-like: a special, all 256 bytes, merges (random substrings of the texts' UTF-8, so many
    split a multi-byte character), padding ids at the end."""
    rng = random.Random(seed)
    data = "".join(TEXTS).encode()
    merges = {b"\xe4\xbd", b"\xa0\xe5", b"\x98\x80", b"\xc3", b" w\xc3"}
    while len(merges) < 300:
        i = rng.randrange(len(data))
        merges.add(data[i:i + rng.randint(2, 6)])
    table = [None] + [bytes([b]) for b in range(256)] + sorted(m for m in merges if len(m) > 1) + [None, None]
    return table, [0]


def sentencepiece_vocab():
    """Llama-2-like: <unk> <s> </s>, 256 byte-fallback entries, pieces with a leading space, single
    characters duplicating byte-fallback entries, CJK and emoji pieces."""
    words = set()
    for text in TEXTS:
        for w in text.split():
            words |= {" " + w, w, " " + w[:3], w[:2]}
    pieces = sorted(w.encode() for w in words) + [c.encode() for c in "abcdeé你好世界😀, .!\n"] + [b"  ", b"\t"]
    return [None, None, None] + [bytes([b]) for b in range(256)] + pieces, [1, 2]


def greedy_tokenize(text: bytes, table):
    """Longest-match segmentation: any cover of the text will do for the conversion."""
    by_bytes = {}
    for i, b in enumerate(table):
        if b:
            by_bytes.setdefault(b, i)
    ids, i = [], 0
    while i < len(text):
        n = max(n for n in range(1, len(text) - i + 1) if text[i:i + n] in by_bytes)
        ids.append(by_bytes[text[i:i + n]])
        i += n
    return ids


def random_logprobs(T, V, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, V, generator=g, dtype=torch.float64) * scale).log_softmax(-1).to(dtype)


def toy_case(family, seed=0, text=TEXTS[0]):
    table, special = bytelevel_vocab(seed) if family == "bytelevel" else sentencepiece_vocab()
    prefix = b"" if family == "bytelevel" else b" "  # the SentencePiece dummy prefix
    ids = greedy_tokenize(prefix + text.encode(), table)
    ids = [special[0]] + ids[:9] + [special[-1]] + ids[9:]  # a special token mid-text too
    return table, special, ids, random_logprobs(len(ids), len(table), seed)


FAMILIES = ["bytelevel", "sentencepiece"]


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["a0", "a1"])
def test_matches_naive_definition(family, mode):
    table, special, ids, lp = toy_case(family)
    got = next_byte_distributions(lp, ids, table, mode, special_ids=special)
    want = naive(lp, ids, table, mode, special)
    assert got.shape == want.shape == (sum(len(table[u] or b"") for u in ids), 256 + len(special))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_are_distributions_and_true_byte_has_mass(family):
    table, special, ids, lp = toy_case(family, seed=1, text=TEXTS[1])
    x = b"".join(table[u] or b"" for u in ids)
    for mode in ("a0", "a1"):
        out = next_byte_distributions(lp, ids, table, mode, special_ids=special)
        assert torch.isfinite(out).all() and (out >= 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(len(x)), atol=1e-6, rtol=0)
        assert (out[torch.arange(len(x)), torch.tensor(list(x))] > 0).all()


def test_zero_denominator_rows_are_masked_not_nan():
    table = [None, b"a", b"b", b"ab", b"abc", b"b\xc3\xa9"]
    ids = [3, 2]  # "ab" "b"
    lp = random_logprobs(2, len(table), 0)
    lp[0, [3, 4]] = -math.inf  # nothing extends "a" at row 0: byte 1 has no distribution
    lp[1, 1:] = -math.inf  # row 1 carries only the special's mass
    for mode in ("a0", "a1"):
        out = next_byte_distributions(lp, ids, table, mode, special_ids=[0])
        assert not out.isnan().any()
        assert (out[1] == 0).all()
        if mode == "a0":
            assert (out.sum(-1) > 0).tolist() == [True, False, True]
            assert out[2, 256] == 1  # the special symbol is all that is left at o = 0
        else:  # p_0("ab") = 0: every cover of "ab" that a1 counts has probability 0
            assert (out.sum(-1) > 0).tolist() == [True, False, False]
        np.testing.assert_allclose(out.double().numpy(), naive(lp, ids, table, mode, [0]), atol=ATOL)
    # Without the special symbol that row has no mass at all.
    assert (next_byte_distributions(lp, ids, table)[2] == 0).all()


def test_a1_equals_a0_when_every_token_starts_a_pretoken():
    table, special = sentencepiece_vocab()
    words = [w for w in TEXTS[0].split() if (" " + w).encode() in table]
    ids = [table.index((" " + w).encode()) for w in words]
    lp = random_logprobs(len(ids), len(table), 3)
    a0 = next_byte_distributions(lp, ids, table, "a0", special_ids=special)
    assert torch.equal(a0, next_byte_distributions(lp, ids, table, "a1", special_ids=special))


def test_a1_adds_covers_across_teacher_boundaries():
    # "a" "b" "c" with "abc" in the vocabulary: at byte "c", a1 also counts "abc" from row 0.
    table = [b"a", b"b", b"c", b"ab", b"abc", b"bx", b"cd"]
    ids = [0, 1, 2]
    lp = torch.full((3, len(table)), math.log(1 / len(table)))
    a0, a1 = (next_byte_distributions(lp, ids, table, m) for m in ("a0", "a1"))
    assert a0[2, ord("c")] == pytest.approx(2 / 7)  # at o = 0 all 7 entries count: c, cd vs the rest
    # Joint probabilities of the covers of "ab" + next byte, over P(nothing before "a") = 1:
    #   a|b|<c or cd>  p_0(a) p_1(b) p_2(c, cd) = 2/343      (a0's term: every row-2 entry counts)
    #   a|<bx>         p_0(a) p_1(bx)           = 1/49  -> x
    #   <abc>          p_0(abc)                 = 1/7   -> c
    total = 1 / 49 + 1 / 49 + 1 / 7
    assert a1[2, ord("c")] == pytest.approx((2 / 343 + 1 / 7) / total)
    assert a1[2, ord("x")] == pytest.approx(1 / 49 / total)
    np.testing.assert_allclose(a1.double().numpy(), naive(lp, ids, table, "a1"), atol=ATOL)


def assert_rows_sum_to_one_or_zero(out, defined):
    """Every row is a distribution where the exact conditional is defined, all zero elsewhere."""
    sums = out.double().sum(-1)
    assert not out.isnan().any() and (out >= 0).all()
    bad = defined & ((sums - 1).abs() > 1e-6) | ~defined & (sums != 0)
    assert not bad.any(), f"{int(bad.sum())} of {len(out)} rows masked or partial, e.g. {bad.nonzero()[:5].flatten().tolist()}"


@pytest.mark.parametrize("n", [1, 2, 17, 400, 4096])
def test_a_byte_level_teacher_gets_its_own_distribution(n):
    """Vocabulary = the 256 single bytes: every byte is a token, so both modes must return the teacher's
    own next-token distribution, however long the whitespace-free run (a1's cover weights of a
    400-byte run at p(actual) = 0.07 reach 0.07^400 = 1e-462, far below float64)."""
    table = [bytes([b]) for b in range(256)]
    x = ord("x")
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, 256, generator=g)
    others = logits.clone().index_fill_(1, torch.tensor([x]), -torch.inf).logsumexp(-1)
    logits[:, x] = others + math.log(0.07 / 0.93)  # p(actual) = 0.07
    lp = logits.log_softmax(-1)
    assert torch.allclose(lp[:, x].exp(), torch.full((n,), 0.07))
    for mode in ("a0", "a1"):
        out = next_byte_distributions(lp, [x] * n, table, mode)
        assert_rows_sum_to_one_or_zero(out, torch.ones(n, dtype=torch.bool))
        torch.testing.assert_close(out, lp.exp(), atol=1e-6, rtol=0)


def cjk_vocab(V=16_000, seed=0):
    """A large BPE-like byte table of CJK text, as byte-level BPE learns it: a special, the 256 bytes,
    500 characters (3 bytes each) and their first 2 bytes (merges inside a character), then words of
    2-4 characters and words with a trailing partial character."""
    rng = random.Random(seed)
    chars = [chr(0x4E00 + i * 7).encode() for i in range(500)]
    entries = {c[:2] for c in chars} | set(chars)
    while len(entries) < V - 257:
        word = b"".join(rng.choices(chars, k=rng.randint(2, 4)))
        entries.add(word[:-rng.choice([0, 0, 0, 1, 2])] if len(word) > 6 else word)
    return [None] + [bytes([b]) for b in range(256)] + sorted(entries - {bytes([b]) for b in range(256)}), chars


def random_cover(text: bytes, table, rng):
    """A random segmentation of ``text`` into vocabulary entries (any cover will do)."""
    by_bytes = {b: i for i, b in enumerate(table) if b}
    longest = max(map(len, by_bytes))
    ids, i = [], 0
    while i < len(text):
        n = rng.choice([n for n in range(1, min(longest, len(text) - i) + 1) if text[i:i + n] in by_bytes])
        ids.append(by_bytes[text[i:i + n]])
        i += n
    return ids


def test_a_long_cjk_segment_on_a_large_vocabulary_matches_the_definition():
    """4 kB of whitespace-free CJK is one pretoken of ~2,000 teacher tokens: a1's covers reach back
    to its start, and their absolute weights underflow after a few dozen tokens."""
    table, chars = cjk_vocab()
    rng = random.Random(1)
    text = b"".join(rng.choices(chars, k=1366))[:4096]
    ids = random_cover(text, table, rng)
    lp = random_logprobs(len(ids), len(table), 7)
    assert lp[torch.arange(len(ids)), ids].double().sum() < -5000  # w of the last start: e^-5000
    ext = extensions(table)
    for mode in ("a0", "a1"):
        got = next_byte_distributions(lp, ids, table, mode, special_ids=[0])
        assert_rows_sum_to_one_or_zero(got, torch.ones(len(text), dtype=torch.bool))
        np.testing.assert_allclose(got.double().numpy(), naive(lp, ids, table, mode, [0], ext=ext), atol=ATOL, rtol=0)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 1200), st.floats(0.5, 3.0), st.integers(2, 40), st.booleans())
def test_fuzzed_rows_are_exact_where_defined_and_zero_elsewhere(seed, n_bytes, scale, top_k, drop_one):
    """Random small vocabularies without whitespace (long pretokens), random covers, teachers
    truncated to their top k (log p = -inf elsewhere; the actual token's own log p kept, as the
    top-k cache keeps it, except at one token with ``drop_one``): both modes equal the definition,
    and a row is all zero exactly where the definition is undefined. (Teachers up to scale 3: a
    prefix mass below ~1e-10 is exact to ~1e-16 / mass only, see ``ctdbench.byteprob``.)"""
    rng = random.Random(seed)
    alphabet = b"ab\xc3\xa9\xe4"
    table = [None] + [bytes([b]) for b in alphabet] + sorted({bytes(rng.choices(alphabet, k=rng.randint(2, 6)))
                                                            for _ in range(60)})
    text = bytes(rng.choices(alphabet, k=n_bytes))
    ids = random_cover(text, table, rng)
    full = random_logprobs(len(ids), len(table), seed % 10_000, scale=scale)
    kth = full.topk(min(top_k, len(table) - 1), -1).values[:, -1:]
    lp = full.masked_fill(full < kth, -math.inf)
    at = torch.arange(len(ids)), torch.tensor(ids)
    lp[at] = full[at]
    if drop_one:
        lp[rng.randrange(len(ids)), :] = -math.inf
    ext = extensions(table)
    for mode in ("a0", "a1"):
        got = next_byte_distributions(lp, ids, table, mode, special_ids=[0])
        want = naive(lp, ids, table, mode, [0], ext=ext)
        assert_rows_sum_to_one_or_zero(got, torch.from_numpy(want.sum(-1) > 0))
        np.testing.assert_allclose(got.double().numpy(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["a0", "a1"])
def test_row_chunk_invariance(mode):
    table, special, ids, lp = toy_case("bytelevel", seed=2)
    ref = next_byte_distributions(lp, ids, table, mode, special_ids=special, row_chunk=len(ids))
    for chunk in (1, 2, 5, None):
        assert torch.equal(next_byte_distributions(lp, ids, table, mode, special_ids=special, row_chunk=chunk), ref)


def test_batch_matches_per_example_and_does_not_cross_examples():
    table, special = sentencepiece_vocab()
    index = VocabByteIndex.build(table)
    # Example 0 ends with "G" and example 1 starts with "rü..": joined, a1 would walk "Grü.." from "G".
    seqs = [greedy_tokenize(b" " + TEXTS[0].encode(), table)[:12] + [table.index(b"G")],
            greedy_tokenize("rüße aus München".encode(), table)]
    T = max(map(len, seqs))
    lp = random_logprobs(2 * T, len(table), 4).reshape(2, T, -1)
    ids = torch.zeros(2, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    for mode in ("a0", "a1"):
        singles = [next_byte_distributions(lp[b, :len(s)], s, None, mode, special_ids=special, index=index)
                   for b, s in enumerate(seqs)]
        out, n_bytes = next_byte_distributions_batch(lp, ids, table, mode, lengths=[len(s) for s in seqs],
                                                     special_ids=special)
        assert n_bytes.tolist() == [len(x) for x in singles]
        assert torch.equal(out, torch.cat(singles))
        mask = ids != 0
        mask[0, len(seqs[0]):] = False
        out2, _ = next_byte_distributions_batch(lp, ids, None, mode, mask=mask, special_ids=special, index=index)
        assert torch.equal(out2, out)
        # Probabilities instead of log-probabilities; padding marked by a byte-less id, all rows converted.
        padded = ids.masked_fill(~mask, special[0])
        out3, n3 = next_byte_distributions_batch(lp.exp(), padded, None, mode, special_ids=special, index=index,
                                                 probs=True)
        assert torch.allclose(out3, out, atol=1e-6) and n3.tolist() == n_bytes.tolist()
        joined = torch.cat([lp[0, :len(seqs[0])], lp[1, :len(seqs[1])]])
        crossed = next_byte_distributions(joined, seqs[0] + seqs[1], None, mode, special_ids=special, index=index)
        assert torch.equal(crossed, out) == (mode == "a0")


def test_float64_input_index_reuse_and_errors():
    table, special, ids, lp = toy_case("bytelevel")
    index = VocabByteIndex.build(table)
    out64 = next_byte_distributions(lp.double(), ids, None, index=index, special_ids=special)
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), naive(lp.double(), ids, table, "a0", special), atol=1e-12)
    assert next_byte_distributions(lp[:1], ids[:1], table).shape == (0, 256)  # a special only
    with pytest.raises(ValueError, match="without bytes"):
        next_byte_distributions(lp, ids, table, special_ids=[5])
    with pytest.raises(ValueError, match="columns"):
        next_byte_distributions(lp[:, :-1], ids, table)
    with pytest.raises(ValueError, match="mode"):
        next_byte_distributions(lp, ids, table, "a2")


def test_index_tables():
    table = [None, b"b", b"a", b"ab", b"a", b"abc", b"", b"\xff"]
    ix = VocabByteIndex.build(table)
    srt = [table[i] for i in ix.order.tolist()]
    assert srt == sorted(b for b in table if b) and ix.order.tolist()[:2] in ([2, 4], [4, 2])
    for v, b in enumerate(table):
        b = b or b""
        for o in range(len(b) + 1):
            m = int(ix.path_node[ix.tok_off[v] + o])
            inside = srt[ix.node_lo[m]:ix.node_hi[m]]
            assert inside == [s for s in srt if s.startswith(b[:o])]
            kids = range(ix.child_ptr[m], ix.child_ptr[m + 1])
            assert sorted({s[o] for s in inside if len(s) > o}) == [int(ix.node_byte[c]) for c in kids]


# ---------------------------------------------------------------- real vocabularies

def _bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in bs]
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def real_table(name):
    path = SHARED_TOKENIZERS / f"{name}.tokenizer.json"
    if not path.exists():
        pytest.skip(f"{path} not available (it lives beside the project, not in it)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    specials = {t["id"] for t in spec["added_tokens"] if t["special"]} | {i for s, i in vocab.items() if s == "<|endoftext|>"}
    table = [None] * (max(vocab.values()) + 1)
    if name == "gpt2":
        u2b = {u: b for b, u in _bytes_to_unicode().items()}
        for s, i in vocab.items():
            table[i] = bytes(u2b[c] for c in s)
    else:
        for s, i in vocab.items():
            m = re.fullmatch(r"<0x([0-9A-F]{2})>", s)
            table[i] = bytes([int(m.group(1), 16)]) if m else s.replace("▁", " ").encode()
    for i in specials:
        table[i] = None
    return path, table, sorted(specials)


@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_real_vocabulary_matches_naive_on_sampled_rows(name):
    from tokenizers import Tokenizer

    path, table, special = real_table(name)
    text = "Hello world! Grüße aus München. 你好，世界。 Привет, мир! 😀 naïve café\n\tdone."
    ids = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    x = b"".join(table[u] for u in ids)
    assert x.decode().strip() == text.strip()
    ids = [special[-1]] + ids
    lp = random_logprobs(len(ids), len(table), 5)
    rows = sorted(random.Random(0).sample(range(len(x)), 10))
    for mode in ("a0", "a1"):
        got = next_byte_distributions(lp, ids, table, mode, special_ids=special)
        torch.testing.assert_close(got.sum(-1), torch.ones(len(x)), atol=1e-6, rtol=0)
        want = naive(lp, ids, table, mode, special, rows=rows)
        np.testing.assert_allclose(got[rows].double().numpy(), want[rows], atol=ATOL, rtol=0)
