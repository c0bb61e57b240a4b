"""ULD and uld_aligned: sorted L1 against its definition, the losses against naive per-example
implementations of the official code (llm-recipes) and of GOLD's "bayesian" merge, and both
methods end to end on real paired examples of both tokenizer pairs."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods
from ctdbench import kernels
from ctdbench.data import PairedDataset, Side, collate, segment_text
from ctdbench.kernels import sorted_l1, sorted_l1_of_logits, split_sorted, teacher_split
from ctdbench.models import build_model
from ctdbench.teacher import OnlineTeacher
from ctdbench.tokbytes import TokenSpans, token_bytes
from ctdbench.train import step_loss
from methods.base import MethodContext
from methods.uld import byte_groups

STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def definition(p, q):
    """Sort both rows in descending order, zero-pad the shorter, L1 (baselines.md §3)."""
    V = max(p.shape[-1], q.shape[-1])
    p = F.pad(p.sort(-1, descending=True).values, (0, V - p.shape[-1]))
    q = F.pad(q.sort(-1, descending=True).values, (0, V - q.shape[-1]))
    return (p - q).abs().sum(-1)


def rand_probs(g, n, v, scale=3.0, dtype=torch.float32):
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).softmax(-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vs,vt", [(7, 13), (13, 7), (50, 50), (300, 1100)])
def test_sorted_l1_matches_definition_and_its_gradient(dtype, vs, vt):
    g = torch.Generator().manual_seed(vs * vt)
    ps, pt = rand_probs(g, 600, vs, dtype=dtype), rand_probs(g, 600, vt, dtype=dtype)
    pt[:5] *= torch.rand(5, 1, generator=g, dtype=dtype)          # unnormalised rows (merged groups)
    a, b = ps.clone().requires_grad_(True), ps.clone().requires_grad_(True)
    c, d = pt.clone().requires_grad_(True), pt.clone().requires_grad_(True)
    got, want = sorted_l1(a, c), definition(b, d)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got, want, atol=tol, rtol=0)
    w = torch.rand(600, generator=g, dtype=dtype)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=tol) and torch.allclose(c.grad, d.grad, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("block", [1 << 20, 100])  # one block; a few rows per block
def test_sorted_l1_of_logits_matches_definition_and_its_gradients(monkeypatch, dtype, scaled, block):
    monkeypatch.setattr(kernels, "SORT_BLOCK", block)
    g = torch.Generator().manual_seed(block + scaled)
    z = torch.randn(70, 30, generator=g, dtype=dtype) * 3
    rows, T = torch.randperm(70, generator=g)[:50], 0.7
    pt = rand_probs(g, 50, 45, dtype=dtype)
    top, rest = split_sorted(pt, 30)
    scale = torch.rand(50, generator=g, dtype=dtype) + 0.2 if scaled else None
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    s1, s2 = (scale.clone().requires_grad_(True), scale.clone().requires_grad_(True)) if scaled else (None, None)
    got = sorted_l1_of_logits(z1, rows, T, top, rest, s1)
    p = (z2[rows] / T).softmax(-1)
    want = definition(p * s2[:, None] if scaled else p, pt)
    tol = 1e-5  # the probabilities are fp32 (scaled_rows) whatever the logits' dtype
    assert torch.allclose(got, want, atol=tol, rtol=0)
    w = torch.rand(50, generator=g, dtype=dtype)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert torch.allclose(z1.grad, z2.grad, atol=tol) and z1.grad[torch.isin(torch.arange(70), rows, invert=True)].abs().sum() == 0
    assert not scaled or torch.allclose(s1.grad, s2.grad, atol=tol)


def test_sorted_l1_zero_on_identical_and_invariant_to_permutations():
    g = torch.Generator().manual_seed(0)
    p, q = rand_probs(g, 40, 64), rand_probs(g, 40, 96)
    assert torch.equal(sorted_l1(p, p), torch.zeros(40))
    perm_s, perm_t = torch.randperm(64, generator=g), torch.randperm(96, generator=g)
    assert torch.allclose(sorted_l1(p[:, perm_s], q), sorted_l1(p, q), atol=1e-7)
    assert torch.allclose(sorted_l1(p, q[:, perm_t]), sorted_l1(p, q), atol=1e-7)
    # Zero padding: a distribution against itself with extra zero entries is still at distance 0.
    assert sorted_l1(p, F.pad(p, (0, 32))).abs().max() < 1e-7
    d = sorted_l1(p, q)
    assert (d >= 0).all() and (d <= 2 + 1e-6).all()
    assert torch.allclose(d, sorted_l1(q, p), atol=1e-7)   # symmetric


def test_split_sorted_is_descending_topk_and_the_rest():
    g = torch.Generator().manual_seed(1)
    p = rand_probs(g, 300, 700)
    for k in (1, 50, 700):
        for req in (False, True):
            top, rest = split_sorted(p.clone().requires_grad_(req), k)
            assert torch.equal(top.detach(), p.topk(k, -1).values)
            assert torch.allclose(rest.detach(), p.sort(-1).values[:, : 700 - k].sum(-1), atol=1e-7)


@pytest.mark.parametrize("vs,vt", [(30, 70), (70, 30)])
def test_row_blocks_on_threads(monkeypatch, vs, vt):
    """Rows sorted block by block on a thread pool (large batches) give the definition's numbers."""
    g = torch.Generator().manual_seed(vs)
    ps, pt = rand_probs(g, 90, vs), rand_probs(g, 90, vt)
    z, rows, k = torch.randn(90, vt, generator=g), torch.arange(5, 90), min(vs, vt)
    threads = torch.get_num_threads()
    monkeypatch.setattr(kernels, "SORT_BLOCK", 100)  # a few rows per block
    torch.set_num_threads(2)
    try:
        a, b = ps.clone().requires_grad_(True), ps.clone().requires_grad_(True)
        got, want = sorted_l1(a, pt), definition(b, pt)
        top, rest = teacher_split(z, rows, 0.7, k)
    finally:
        torch.set_num_threads(threads)
    (got * torch.arange(90.0)).sum().backward()
    (want * torch.arange(90.0)).sum().backward()
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(a.grad, b.grad, atol=1e-6)
    p = (z[rows] / 0.7).softmax(-1)
    assert torch.equal(top, p.topk(k, -1).values)
    assert torch.allclose(rest, p.sort(-1).values[:, : vt - k].sum(-1), atol=1e-7)


# ----------------------------------------------------------------- naive reference implementations


def naive_uld(s_logits, t_logits, s_ids, s_mask, t_mask, ts=1.0, tt=1.0, cw=1.0, dw=1.5):
    """llm-recipes' DistillationLoss: answer slices from the last prompt token (here BOS), softmax,
    zero rows to the longest answer, full sort, vocabulary padding, per-example mean over the
    shorter answer, mean over the batch; cw x student CE (mean over its targets) + dw x ULD."""
    sizes_s, sizes_t = (s_mask.sum(1) - 1).tolist(), (t_mask.sum(1) - 1).tolist()
    L = max(max(sizes_s), max(sizes_t))
    rows_s = torch.zeros(len(sizes_s), L, s_logits.shape[-1], dtype=torch.float64)
    rows_t = torch.zeros(len(sizes_t), L, t_logits.shape[-1], dtype=torch.float64)
    for i, (ns, nt) in enumerate(zip(sizes_s, sizes_t)):
        rows_s[i, :ns] = (s_logits[i, 0:ns].double() / ts).softmax(-1)
        rows_t[i, :nt] = (t_logits[i, 0:nt].double() / tt).softmax(-1)
    V = max(rows_s.shape[-1], rows_t.shape[-1])
    rows_s = F.pad(rows_s.sort(-1, descending=True).values, (0, V - rows_s.shape[-1]))
    rows_t = F.pad(rows_t.sort(-1, descending=True).values, (0, V - rows_t.shape[-1]))
    per = [(rows_s[i, :n] - rows_t[i, :n]).abs().sum(-1).mean() for i, n in enumerate(map(min, sizes_s, sizes_t))]
    nll = [-s_logits[b, t - 1].double().log_softmax(-1)[s_ids[b, t]] for b in range(len(s_ids))
           for t in range(1, s_ids.shape[1]) if s_mask[b, t]]
    return cw * torch.stack(nll).mean().item() + dw * torch.stack(per).mean().item()


def s_ids_of(mask):
    return (torch.arange(mask.numel()).reshape(mask.shape) * 7) % 11


def ragged_batch(seed, B=3, Ls=9, Lt=12, Vs=11, Vt=17):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, Ls, Vs, generator=g) * 2, torch.randn(B, Lt, Vt, generator=g) * 2
    s_mask, t_mask = torch.ones(B, Ls, dtype=torch.long), torch.ones(B, Lt, dtype=torch.long)
    for b in range(1, B):
        s_mask[b, Ls - 2 * b:], t_mask[b, Lt - 3 * b:] = 0, 0
    return s, t, s_mask, t_mask


def run_method(name, s, t, s_mask, t_mask, extra=None, **hp):
    ctx = SimpleNamespace(teacher_token_bytes=None, student_token_bytes=None)
    method = methods.build(name, ctx, hp)
    batch = {"student_input_ids": s_ids_of(s_mask), "student_loss_mask": s_mask,
             "teacher_input_ids": s_ids_of(t_mask) % t.shape[-1], "teacher_loss_mask": t_mask, **(extra or {})}
    return method.loss(batch, SimpleNamespace(logits=s), SimpleNamespace(logits=t))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temps", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("weights", [{}, {"crossentropy_weight": 0.3, "distillation_weight": 0.8}])
def test_uld_matches_official_code(seed, temps, weights):
    s, t, s_mask, t_mask = ragged_batch(seed)
    loss, logs = run_method("uld", s, t, s_mask, t_mask, student_temperature=temps[0], teacher_temperature=temps[1],
                            **weights)
    want = naive_uld(s, t, s_ids_of(s_mask), s_mask, t_mask, *temps, *weights.values())
    assert loss.item() == pytest.approx(want, rel=1e-5)


def naive_gold(s_logits, t_logits, s_ids, t_ids, groups, ts=1.0, tt=1.0):
    """GOLD ``bayesian`` merge, per example and per group in Python: last position's distribution
    times the clamped probabilities of the earlier tokens; L1 of sorted rows summed / n_groups."""
    per = []
    for b, g in enumerate(groups):
        merged_s, merged_t = [], []
        for (ti0, ti1, si0, si1) in g:
            for logits, ids, lo, hi, T, out in ((s_logits, s_ids, si0, si1, ts, merged_s),
                                                (t_logits, t_ids, ti0, ti1, tt, merged_t)):
                p = (logits[b].double() / T).softmax(-1)           # p[j] predicts token j + 1
                scale = 1.0
                for j in range(lo, hi - 1):
                    scale *= max(p[j - 1, ids[b, j]].item(), 1e-8)
                out.append(p[hi - 2] * scale)
        d = definition(torch.stack(merged_s), torch.stack(merged_t))
        per.append(d.sum() / len(g))
    return torch.stack(per).mean().item()


def gold_walk(t_ends, s_ends):
    """GOLD's ``_align_by_byte_offsets`` over the tokens after BOS: advance the side whose token ends
    first; a group closes where both end on the same byte. Returns (i0, i1, j0, j1) token ranges."""
    groups, t, s, t0, s0 = [], 1, 1, 1, 1
    while t < len(t_ends) and s < len(s_ends):
        if s_ends[s] < t_ends[t]:
            s += 1
        elif s_ends[s] > t_ends[t]:
            t += 1
        else:
            t, s = t + 1, s + 1
            groups.append((t0, t, s0, s))
            t0, s0 = t, s
    assert t == len(t_ends) and s == len(s_ends)
    return groups


def test_uld_aligned_matches_gold_bayesian(sides, corpus_texts):
    student, teacher = sides
    segments = [s for t in corpus_texts for s in segment_text(t, 80)][:3]
    data = PairedDataset(segments, student, teacher)
    ex = [data[i] for i in range(3)]
    batch = collate(ex, data)
    g = torch.Generator().manual_seed(0)
    Vs, Vt = len(student.tokenizer), len(teacher.tokenizer)
    s = torch.randn(3, batch["student_input_ids"].shape[1], Vs, generator=g) * 2
    t = torch.randn(3, batch["teacher_input_ids"].shape[1], Vt, generator=g) * 2
    groups = [gold_walk(e.teacher.ends, e.student.ends) for e in ex]
    assert any(i1 - i0 > 1 for g_ in groups for (i0, i1, _, _) in g_)       # real multi-token groups
    assert any(j1 - j0 > 1 for g_ in groups for (_, _, j0, j1) in g_)
    want = naive_gold(s, t, batch["student_input_ids"], batch["teacher_input_ids"], groups, 1.5, 0.7)
    ctx = SimpleNamespace(teacher_token_bytes=teacher.token_bytes, student_token_bytes=student.token_bytes)
    method = methods.build("uld_aligned", ctx, {"student_temperature": 1.5, "teacher_temperature": 0.7})
    batch.update(method.prepare(ex))
    loss, logs = method.loss(batch, SimpleNamespace(logits=s), SimpleNamespace(logits=t))
    assert logs["uld"] == pytest.approx(want, rel=1e-5)
    ids = batch["student_input_ids"]
    ce = torch.stack([-s[b, k - 1].double().log_softmax(-1)[ids[b, k]] for b, e in enumerate(ex)
                      for k in range(1, len(e.student.ids))]).mean()
    assert loss.item() == pytest.approx(1.0 * ce.item() + 1.5 * want, rel=1e-5)


def test_byte_groups_from_spans():
    text = "Hello world!".encode()
    sp = lambda ids, starts, ends: TokenSpans(ids, starts, ends)  # noqa: E731
    ex = SimpleNamespace(
        text=text,
        teacher=sp([9, 1, 2, 3], [0, 0, 5, 11], [0, 5, 11, 12]),              # BOS Hello| world|!
        student=sp([9, 8, 1, 2, 3, 4], [0, 0, 0, 3, 5, 9], [0, 0, 3, 5, 9, 12]),  # BOS ▁ Hel|lo| wor|ld!
    )
    table = [b"x"] * 9 + [None]                                                 # id 9 = BOS
    special = np.array([b is None for b in table])
    out = byte_groups([ex], special, special)
    assert out["uld_row_teacher"].tolist() == [[0, 2]]          # groups end at teacher tokens 1, 3
    assert out["uld_pre_teacher"].tolist() == [[-1, -1, 1, -1]]
    assert out["uld_row_student"].tolist() == [[2, 4]]          # the dummy prefix joins group 0
    assert out["uld_pre_student"].tolist() == [[-1, 0, 0, -1, 1, -1]]


# ------------------------------------------------------------------------------ properties


def test_temperature_is_a_logit_scale():
    s, t, s_mask, t_mask = ragged_batch(5)
    _, hot = run_method("uld", s, t, s_mask, t_mask, student_temperature=3.0, teacher_temperature=0.5)
    _, scaled = run_method("uld", s / 3.0, t / 0.5, s_mask, t_mask)
    assert hot["uld"] == pytest.approx(scaled["uld"], rel=1e-5)
    # Very high temperatures: both sides tend to uniform, the distance to the uniform-vs-uniform one.
    _, flat = run_method("uld", s, t, s_mask, t_mask, student_temperature=1e6, teacher_temperature=1e6)
    uniform = definition(torch.full((1, 11), 1 / 11), torch.full((1, 17), 1 / 17)).item()
    assert flat["uld"] == pytest.approx(uniform, rel=1e-4)


def test_gradients_reach_the_student_only():
    s, t, s_mask, t_mask = ragged_batch(2)
    for name in ("uld",):
        s_ = s.clone().requires_grad_(True)
        t_ = t.clone().requires_grad_(True)
        loss, _ = run_method(name, s_, t_, s_mask, t_mask, crossentropy_weight=0.0)
        loss.backward()
        assert s_.grad.abs().sum() > 0 and (t_.grad is None or t_.grad.abs().sum() == 0)
        # Padded positions get no gradient.
        assert s_.grad[1, -2:].abs().sum() == 0


# -------------------------------------------------------------------- real models, both pairs


@pytest.fixture(scope="module")
def pairs(sides, tokenizers):
    student_sp, teacher = sides
    byte = Side(tokenizers["byte"], token_bytes(tokenizers["byte"]))
    return {"bpe_to_sp": (student_sp, teacher), "bpe_to_byte": (byte, teacher), "same": (teacher, teacher)}


def real_step(pair, name, corpus_texts, same_weights=False, **hp):
    student_side, teacher_side = pair
    data = PairedDataset([s for t in corpus_texts for s in segment_text(t, 96)][:3], student_side, teacher_side)
    teacher = build_model(TEACHER, teacher_side.tokenizer, seed=0, max_positions=256)
    student = teacher if same_weights else build_model(STUDENT, student_side.tokenizer, seed=1, max_positions=256)
    ctx = MethodContext.from_sides(student, teacher, student_side, teacher_side)
    method = methods.build(name, ctx, hp)
    batch = collate([data[i] for i in range(3)], data, method)
    loss, logs = step_loss(student, method, OnlineTeacher(copy.deepcopy(teacher)), batch)
    return student, loss, logs


@pytest.mark.parametrize("pair", ["bpe_to_sp", "bpe_to_byte"])
@pytest.mark.parametrize("name", ["uld", "uld_aligned"])
def test_both_methods_train_on_both_pairs(pairs, corpus_texts, pair, name):
    student, loss, logs = real_step(pairs[pair], name, corpus_texts)
    assert torch.isfinite(loss) and 0 < logs["uld"] <= 2
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", ["uld", "uld_aligned"])
def test_same_tokenizer_same_model_gives_zero(pairs, corpus_texts, name):
    _, loss, logs = real_step(pairs["same"], name, corpus_texts, same_weights=True)
    assert logs["uld"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(logs["ce"], rel=1e-6)


def test_registered_with_official_defaults():
    for name, aligned in (("uld", False), ("uld_aligned", True)):
        cls, defaults = methods.get(name)
        m = cls(SimpleNamespace(), **defaults)
        assert (m.aligned, m.crossentropy_weight, m.distillation_weight) == (aligned, 1.0, 1.5)
        assert (m.student_temperature, m.teacher_temperature) == (1.0, 1.0)
