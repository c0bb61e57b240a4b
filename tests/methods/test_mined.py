"""MinED: the vocabulary map against a brute-force edit-distance search, its cache and precompute stage, the
1:1-chunk and DTW alignments (DTW against the upstream algorithm), the loss against a naive
implementation of DSKD's formulation, and real tokenizer pairs."""

import json
import re
from types import SimpleNamespace

import editdistance
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import methods
from ctdbench.data import PairedDataset, Side, collate, segment_text
from ctdbench.models import build_model
from ctdbench.tokbytes import TokenSpans, token_bytes
from methods.base import MethodContext
from methods.mined import (_DTWAligner, byte_fallback_ids, chunk_positions, dtw_paths, load_or_build_map, mined_loss,
                           mined_map, pair_key)

STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def brute_force_map(teacher, student, fallback=()):
    """map(s) = argmin over teacher strings t of (edit distance, id(t)), id(t) = the smallest id
    spelling t that is not in ``fallback``, else the smallest."""
    ids = {}
    for i, t in enumerate(teacher):
        if t is not None:
            ids[t] = min(ids.get(t, (True, i)), (i in fallback, i))
    out, dist = [], []
    for s in student:
        if s is None:
            out.append(-1), dist.append(-1)
            continue
        d, i = min((editdistance.eval(s, t), i) for t, (_, i) in ids.items())
        out.append(i), dist.append(d)
    return np.array(out), np.array(dist)


def fallback_pieces(tokenizer) -> set[int]:
    """Ids of the tokenizer's ``<0xNN>`` byte-fallback pieces, by their strings."""
    return {i for piece, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-F]{2}>", piece)}


token = st.one_of(st.none(), st.binary(max_size=7).map(lambda b: bytes(x % 5 + 97 for x in b)))


@settings(max_examples=60, deadline=None)
@given(st.lists(token, min_size=1, max_size=40), st.lists(token, max_size=40))
def test_map_equals_brute_force_on_random_vocabularies(teacher, student):
    if all(t is None for t in teacher):
        teacher = teacher + [b"a"]
    got, dist = mined_map(teacher, student, return_distance=True)
    want, wdist = brute_force_map(teacher, student)
    assert got.tolist() == want.tolist() and dist.tolist() == wdist.tolist()


def test_map_exact_matches_ties_and_specials():
    teacher = [None, b"the", b" the", b"th", b"the", b"\xc3\xa9"]
    student = [None, b"the", b"thee", b" th", b"\xc3", b""]
    got, dist = mined_map(teacher, student, return_distance=True)
    assert got.tolist() == [-1, 1, 1, 2, 5, 3]   # duplicates resolve to the smallest teacher id
    assert dist.tolist() == [-1, 0, 1, 1, 1, 2]
    assert mined_map([None, None], [b"a", None]).tolist() == [-1, -1]


@pytest.mark.parametrize("teacher_kind,student_kind", [("bytelevel_bpe", "sentencepiece_bpe"), ("sentencepiece_bpe", "byte")])
def test_map_on_real_tokenizers_equals_brute_force(tokenizers, teacher_kind, student_kind):
    t, s = token_bytes(tokenizers[teacher_kind]), token_bytes(tokenizers[student_kind])
    fallback = fallback_pieces(tokenizers[teacher_kind])
    assert set(byte_fallback_ids(t)) == fallback and len(fallback) == (256 if teacher_kind == "sentencepiece_bpe" else 0)
    got, dist = mined_map(t, s, return_distance=True)
    want, wdist = brute_force_map(t, s, fallback)
    assert np.array_equal(got, want) and np.array_equal(dist, wdist)
    assert (dist == 0).mean() > 0.5  # mostly exact matches
    # An exact match goes to a byte-fallback piece only if the teacher has no normal piece for it.
    pieces = {b for i, b in enumerate(t) if b is not None and i not in fallback}
    assert all((i in fallback) == (s[j] not in pieces) for j, i in enumerate(got.tolist()) if i >= 0 and dist[j] == 0)


def test_map_takes_normal_pieces_before_byte_fallback_ones():
    """A Llama-2-like teacher: <unk> <s> </s>, the 256 <0xNN> pieces at ids 3..258, then pieces, some
    of them single bytes the fallback block holds too; a GPT-2-like student."""
    pieces = [b"!", b" ", b"1", b"0", b"00", b" the", b"\xe4\xbd\xa0"]
    teacher = [None] * 3 + [bytes([b]) for b in range(256)] + pieces
    assert byte_fallback_ids(teacher) == range(3, 259)
    piece = {p: 259 + k for k, p in enumerate(pieces)}
    student = [b"!", b" 1", b"00", b"0", b"\xff", b"\xe4", None, b"1!"]
    got, dist = mined_map(teacher, student, return_distance=True)
    assert got.tolist() == [piece[b"!"], piece[b" "], piece[b"00"], piece[b"0"], 3 + 0xFF, 3 + 0xE4, -1, piece[b"!"]]
    assert dist.tolist() == [0, 1, 0, 0, 0, 0, -1, 1]
    want, wdist = brute_force_map(teacher, student, set(range(3, 259)))
    assert got.tolist() == want.tolist() and dist.tolist() == wdist.tolist()
    # Without a fallback block the smallest id of a duplicate string wins, as before.
    assert mined_map([None, b"a", b"!", b"a"], [b"a"]).tolist() == [1]


def test_map_cache_and_precompute_stage(tmp_path, tokenizers, monkeypatch):
    from ctdbench import cli

    t, s = token_bytes(tokenizers["bytelevel_bpe"]), token_bytes(tokenizers["sentencepiece_bpe"])
    template = str(tmp_path / "maps" / "{key}.npz")
    built, path = load_or_build_map(template, t, s)
    assert path.name == f"{pair_key(t, s)}.npz" and path.exists()
    # The workflow's stage (the generic precompute hook) writes the same bytes at its path.
    dirs = {}
    for kind in ("bytelevel_bpe", "sentencepiece_bpe"):
        tokenizers[kind].save_pretrained(tmp_path / kind)
        dirs[kind] = str(tmp_path / kind)
    out, receipt_path = tmp_path / "maps" / "p" / "mined.npy", tmp_path / "maps" / "p" / "mined.npy.json"
    cli.main(["precompute", "--spec", json.dumps({"method": "mined"}), "--teacher-tokenizer", dirs["bytelevel_bpe"],
              "--student-tokenizer", dirs["sentencepiece_bpe"], "--out", str(out), "--receipt", str(receipt_path)])
    assert out.read_bytes() == path.read_bytes()
    receipt = json.loads(receipt_path.read_text())
    assert receipt["map"] == str(out) and receipt["key"] == pair_key(t, s)
    assert receipt["exact"] == sum(b in set(t) for b in s if b is not None) and receipt["special"] == s.count(None)
    assert receipt["exact"] + receipt["fuzzy"] + receipt["special"] == len(s)
    monkeypatch.setattr("methods.mined.mined_map", lambda *a, **k: pytest.fail("recomputed"))
    loaded, _ = load_or_build_map(template, t, s)
    assert np.array_equal(loaded, built)
    with pytest.raises(ValueError, match="another tokenizer pair"):
        load_or_build_map(str(path), s, t)
    assert pair_key(t, s) != pair_key(s, t)


def test_chunk_positions_one_to_one_only():
    text = "Hello world!".encode()
    sp = lambda starts, ends: TokenSpans(list(range(len(starts))), starts, ends)  # noqa: E731
    ex = SimpleNamespace(
        text=text,
        teacher=sp([0, 0, 5, 6, 11], [0, 5, 6, 11, 12]),         # BOS Hello| |world|!
        student=sp([0, 0, 3, 5, 6, 9], [0, 3, 5, 6, 9, 12]),     # BOS Hel|lo| |wor|ld!
    )
    assert chunk_positions([ex]).tolist() == [[0, -1, -1, 2, -1, -1]]  # BOS, and " " <-> " "


def upstream_dtw(series_1, series_2, norm_func):
    """DSKD's dtw (min_edit_dis_kld.py), verbatim apart from names."""
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            matrix[i + 1, j + 1] = norm_func(vec1, vec2) + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    mappings_series_2 = [list() for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        mappings_series_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    mappings_series_2[0].append(0)
    return [m[0] if len(m) == 1 else -1 for m in mappings_series_2]


@pytest.mark.parametrize("seed", range(10))
def test_dtw_paths_equal_upstream(seed):
    rng = np.random.default_rng(seed)
    n_t, n_s = rng.integers(1, 12, 4), rng.integers(1, 12, 4)
    cost = rng.integers(0, 4 if seed % 2 else 2, (4, n_t.max(), n_s.max())).astype(float)  # many ties
    got = dtw_paths(cost, n_t, n_s)
    for b in range(4):
        want = upstream_dtw(range(n_t[b]), range(n_s[b]), lambda i, j: cost[b, i, j])
        assert got[b, : n_s[b]].tolist() == want


def _pair(tokenizers, corpus_texts, student_kind, teacher_kind="bytelevel_bpe", n=6):
    make = lambda kind: Side(tokenizers[kind], token_bytes(tokenizers[kind]))  # noqa: E731
    s_side, t_side = make(student_kind), make(teacher_kind)
    data = PairedDataset([s for t in corpus_texts for s in segment_text(t, 96)][:n], s_side, t_side)
    student = build_model(STUDENT, s_side.tokenizer, seed=0, max_positions=256)
    teacher = build_model(TEACHER if teacher_kind != student_kind else STUDENT, t_side.tokenizer, seed=0,
                          max_positions=256).requires_grad_(False)
    return data, student, teacher, MethodContext.from_sides(student, teacher, s_side, t_side)


def test_dtw_aligner_equals_upstream_on_real_examples(tokenizers, corpus_texts):
    data, _, _, ctx = _pair(tokenizers, corpus_texts, "sentencepiece_bpe")
    vocab_map = mined_map(ctx.teacher_token_bytes, ctx.student_token_bytes)
    aligner = _DTWAligner(ctx.teacher_token_bytes, ctx.student_token_bytes, vocab_map)
    examples = [data[i] for i in range(len(data))]
    got = aligner(examples)
    strip = lambda b: b"" if b is None else b.replace(b" ", b"")  # noqa: E731
    for b, ex in enumerate(examples):
        t_ids, s_ids = ex.teacher.ids[:-1], ex.student.ids[:-1]
        want = upstream_dtw(t_ids, s_ids, lambda i, j: editdistance.eval(strip(ctx.teacher_token_bytes[i]),
                                                                         strip(ctx.student_token_bytes[j])))
        want = [i if i >= 0 and vocab_map[s_ids[j]] == t_ids[i] else -1 for j, i in enumerate(want)]
        want[0] = 0  # BOS <-> BOS
        assert got[b, : len(s_ids)].tolist() == want and (got[b, len(s_ids):] == -1).all()
    assert torch.equal(aligner(examples), got)  # the memo gives the same costs again


def naive_mined(z, ids, mask, t, tpos, vocab_map, kd_rate=0.5, T=2.0):
    """DSKD's formulation: per position, a target logit row (mapped teacher or one-hot 100 / -1e5)."""
    ce, kd, n = 0.0, 0.0, 0
    for b in range(z.shape[0]):
        for i in range(z.shape[1] - 1):
            if not mask[b, i + 1]:
                continue
            n += 1
            y = ids[b, i + 1]
            if tpos[b, i] >= 0:
                target = torch.where(vocab_map >= 0, t[b, tpos[b, i]][vocab_map.clamp(min=0)], torch.tensor(-1e5))
            else:
                target = torch.full((z.shape[-1],), -1e5)
                target[y] = 100.0
            lp = torch.log_softmax(z[b, i].double() / T, -1)
            tp, tlp = torch.softmax(target.double() / T, -1), torch.log_softmax(target.double() / T, -1)
            kd = kd + (tp * (tlp - lp)).sum()
            ce = ce - torch.log_softmax(z[b, i].double(), -1)[y]
    return (1 - kd_rate) * ce / n + kd_rate * kd / n, ce / n, kd / n


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block", [1 << 18, 30])  # one row block, and blocks of two rows
@pytest.mark.parametrize("kw", [{}, {"kd_rate": 0.3, "temperature": 1.3}])
def test_loss_matches_naive_definition(seed, block, kw, monkeypatch):
    monkeypatch.setattr("ctdbench.kernels.FUSED_BLOCK", block)
    g = torch.Generator().manual_seed(seed)
    B, Ls, Lt, Vs, Vt = 3, 9, 7, 11, 13
    z, t = torch.randn(B, Ls, Vs, generator=g) * 3, torch.randn(B, Lt, Vt, generator=g) * 3
    ids = torch.randint(0, Vs, (B, Ls), generator=g)
    mask = torch.ones(B, Ls, dtype=torch.long)
    mask[1, 6:], mask[2, 4:] = 0, 0
    tpos = torch.randint(-1, Lt, (B, Ls), generator=g)
    vocab_map = torch.randint(-1, Vt, (Vs,), generator=g)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    got = mined_loss(z1, ids, mask, t, tpos, vocab_map, **kw)
    want = naive_mined(z2, ids, mask, t, tpos, vocab_map, kw.get("kd_rate", 0.5), kw.get("temperature", 2.0))
    for a, b in zip(got[:3], want):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    got[0].backward()
    want[0].backward()
    assert torch.allclose(z1.grad, z2.grad.float(), atol=1e-6)


@pytest.mark.parametrize("student_kind", ["sentencepiece_bpe", "byte"])
@pytest.mark.parametrize("alignment", ["chunks", "dtw"])
def test_real_pairs(tokenizers, corpus_texts, student_kind, alignment, tmp_path):
    data, student, teacher, ctx = _pair(tokenizers, corpus_texts, student_kind)
    method = methods.build("mined", ctx, {"alignment": alignment, "map_path": str(tmp_path / "{key}.npz")})
    assert (method.kd_rate, method.temperature) == (0.5, 2.0) and len(list(method.parameters())) == 0
    batch = collate([data[i] for i in range(len(data))], data, method)
    pos = batch["mined_teacher_pos"]
    assert pos.shape == batch["student_input_ids"].shape and (pos[:, 0] == 0).all()
    if alignment == "chunks":  # aligned tokens spell the same bytes and end at the same offset
        for b, j in zip(*torch.nonzero(pos[:, 1:] >= 0, as_tuple=True)):
            i, j = pos[b, j + 1].item(), j.item() + 1
            ex = data[batch["index"][b].item()]
            assert ex.student.ends[j] == ex.teacher.ends[i]
            assert ex.text[ex.student.starts[j]:ex.student.ends[j]] == ex.text[ex.teacher.starts[i]:ex.teacher.ends[i]]
    run = lambda m, p: m(input_ids=batch[f"{p}_input_ids"], attention_mask=batch[f"{p}_attention_mask"])  # noqa: E731
    loss, logs = method.loss(batch, run(student, "student"), run(teacher, "teacher"))
    assert torch.isfinite(loss) and 0 < logs["aligned"] <= 1
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("hp", [{}, {"kd_rate": 0.3, "temperature": 1.3}])
def test_method_loss_is_the_naive_definition_on_a_real_pair(tokenizers, corpus_texts, hp):
    """The registered method (defaults, or others) on real models, with a prompt-like loss mask."""
    data, student, teacher, ctx = _pair(tokenizers, corpus_texts, "sentencepiece_bpe", n=3)
    method = methods.build("mined", ctx, hp)
    batch = collate([data[i] for i in range(len(data))], data, method)
    batch["student_loss_mask"][:, 1:6] = 0
    run = lambda m, p: m(input_ids=batch[f"{p}_input_ids"], attention_mask=batch[f"{p}_attention_mask"])  # noqa: E731
    s_out, t_out = run(student, "student"), run(teacher, "teacher")
    loss, logs = method.loss(batch, s_out, t_out)
    with torch.no_grad():
        want = naive_mined(s_out.logits, batch["student_input_ids"], batch["student_loss_mask"], t_out.logits,
                           batch["mined_teacher_pos"], method.vocab_map, hp.get("kd_rate", 0.5), hp.get("temperature", 2.0))
    assert [loss.item(), logs["ce"], logs["kd"]] == pytest.approx([w.item() for w in want], rel=1e-5)


def test_same_tokenizer_identical_models_give_zero_kd(tokenizers, corpus_texts):
    data, student, _, ctx = _pair(tokenizers, corpus_texts, "bytelevel_bpe", "bytelevel_bpe")
    method = methods.build("mined", ctx)
    assert np.array_equal(method.vocab_map[2:].numpy(), np.arange(2, len(ctx.student_token_bytes)))
    batch = collate([data[i] for i in range(len(data))], data, method)
    out = student(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"])
    _, logs = method.loss(batch, out, out)
    assert logs["aligned"] == 1.0
    # Every position is aligned with itself; the only mismatch left is the special ids, which get
    # no target mass: KL = -log(1 - q_T(specials)) per position.
    valid = batch["student_attention_mask"][:, 1:].bool()
    q = (out.logits[:, :-1][valid] / 2.0).softmax(-1)
    assert logs["kd"] == pytest.approx(-torch.log1p(-q[:, method.vocab_map < 0].sum(-1)).mean().item(), rel=1e-3)
