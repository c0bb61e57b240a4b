"""ALM: the loss against a naive per-chunk implementation of tokenkit's formulas, and properties."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import methods
from ctdbench.align import chunk_index, chunks
from ctdbench.data import PairedDataset, Segment, Side, collate, segment_text
from ctdbench.models import build_model
from ctdbench.tokbytes import TokenSpans, token_bytes
from methods.alm import SpaceMass, alm_loss, chunk_ids, log1mexp, merge_by_space_prob
from methods.base import MethodContext

STUDENT = {"arch": "gpt_neox", "layers": 2, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def naive_alm(tl, tids, tchunks, sl, sids, schunks, space_t, space_s, tau=100.0, thr=0.1, eps=1e-6):
    """Per example, per chunk Python loops over the definitions (module docstring of ``methods.alm``)."""
    losses = []
    for b in range(tl.shape[0]):
        lt, ls = tl[b].log_softmax(-1), sl[b].log_softmax(-1)
        pt, ps = tl[b].softmax(-1), sl[b].softmax(-1)
        rows = []
        for (i0, i1, j0, j1) in [c for c in tchunks[b]]:
            LT = min(0.0, sum(lt[t - 1, tids[b, t]].item() for t in range(i0, i1) if t >= 1))
            LS = min(0.0, sum(ls[t - 1, sids[b, t]].item() for t in range(j0, j1) if t >= 1))
            n = sum(1 for t in range(i0, i1) if t >= 1)
            ST = math.log(pt[i1 - 1, space_t].sum().item())
            SS = math.log(ps[j1 - 1, space_s].sum().item())
            rows.append([LT, LS, n, ST, SS])
        groups, cur = [], []
        for r in rows:
            cur.append(r)
            if math.exp(r[3]) > thr:
                groups.append(cur)
                cur = []
        if cur:
            groups.append(cur)
        for g in groups:
            g = [r for r in g if r[2] > 0]
            if not g:
                continue
            zT = sum(r[0] for r in g) + g[-1][3]
            zS = sum(r[1] for r in g) + g[-1][4]
            a, bb = zT / tau - eps, zS / tau - eps
            losses.append(-(math.exp(a) * bb + (1 - math.exp(a)) * math.log(1 - math.exp(bb))))
    return sum(losses) / len(losses)


def mask(ids, V):
    m = torch.zeros(V)
    m[ids] = 1.0
    return m


def make_batch(seed, B=3, Lt=9, Ls=11, Vt=13, Vs=17):
    g = torch.Generator().manual_seed(seed)
    tl, sl = torch.randn(B, Lt, Vt, generator=g) * 3, torch.randn(B, Ls, Vs, generator=g) * 3
    tids, sids = torch.randint(0, Vt, (B, Lt), generator=g), torch.randint(0, Vs, (B, Ls), generator=g)
    # Random monotone chunkings: token 0 is BOS (no chunk); the rest tiled in order.
    tch, sch, tchunks, schunks = -torch.ones(B, Lt, dtype=torch.long), -torch.ones(B, Ls, dtype=torch.long), [], []
    for b in range(B):
        nt, ns = Lt - 1 - b, Ls - 1 - b  # ragged: padding at the end
        C = int(torch.randint(1, min(nt, ns) + 1, (1,), generator=g))
        cuts_t = sorted(torch.randperm(nt - 1, generator=g)[: C - 1].add(1).tolist())
        cuts_s = sorted(torch.randperm(ns - 1, generator=g)[: C - 1].add(1).tolist())
        bt, bs = [0, *cuts_t, nt], [0, *cuts_s, ns]
        tchunks.append([(bt[c] + 1, bt[c + 1] + 1, bs[c] + 1, bs[c + 1] + 1) for c in range(C)])
        for c, (i0, i1, j0, j1) in enumerate(tchunks[-1]):
            tch[b, i0:i1], sch[b, j0:j1] = c, c
    return tl, tids, tch, tchunks, sl, sids, sch


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5, 1.01])
def test_alm_matches_naive_definition(seed, threshold):
    tl, tids, tch, tchunks, sl, sids, sch = make_batch(seed)
    space_t, space_s = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 7, 11])
    got = alm_loss(tl.log_softmax(-1), tids, tch, sl.log_softmax(-1), sids, sch, mask(space_t, 13), mask(space_s, 17),
                   threshold=threshold)
    want = naive_alm(tl, tids, tchunks, sl, sids, None, space_t, space_s, thr=threshold)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_alm_gradient_matches_finite_differences(seed):
    tl, tids, tch, _, sl, sids, sch = make_batch(seed, B=2, Lt=6, Ls=7, Vt=5, Vs=6)
    space_t, space_s = mask([0, 3], 5).double(), mask([1, 2], 6).double()
    teacher_logp = tl.double().log_softmax(-1)
    loss = lambda s: alm_loss(teacher_logp, tids, tch, s.log_softmax(-1), sids, sch, space_t, space_s, tau=3.0)
    assert torch.autograd.gradcheck(loss, (sl.double().requires_grad_(True),))


def test_space_mass_and_its_gradient_match_autograd_of_the_definition(monkeypatch):
    monkeypatch.setattr("ctdbench.kernels.FUSED_BLOCK", 40)  # several row blocks (2 rows each)
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 3).log_softmax(-1)
    space, w = mask([1, 2, 7, 11], 17).double(), torch.randn(3, 5, generator=g, dtype=torch.float64)
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    got, want = SpaceMass.apply(a, space), b.exp() @ space
    assert torch.allclose(got, want, rtol=1e-12)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-12)


def test_merge_threshold_edges():
    # threshold > 1: nothing survives -> everything merges into one group per example;
    # threshold 0: every chunk is its own group.
    tl, tids, tch, tchunks, sl, sids, sch = make_batch(0)
    C = int(tch.max()) + 1
    from methods.alm import chunk_logprobs
    LT, n, sT = chunk_logprobs(tl.log_softmax(-1), tids, tch, mask([0, 1], 13), C)
    LS, _, sS = chunk_logprobs(sl.log_softmax(-1), sids, sch, mask([0, 1], 17), C)
    merged = merge_by_space_prob(LT, LS, n, sT, sS, threshold=2.0)
    assert ((merged[2] > 0).sum(1) == 1).all() and torch.allclose(merged[0][:, 0], (LT * (n > 0)).sum(1))
    merged = merge_by_space_prob(LT, LS, n, sT, sS, threshold=0.0)
    assert torch.allclose(merged[0], LT * (n > 0)) and torch.equal(merged[2], n)


def test_alm_near_minimum_for_identical_models():
    tl, tids, tch, *_ = make_batch(3, Lt=10, Ls=10)
    space = mask([0, 3], 13)
    lp = tl.log_softmax(-1)
    same = alm_loss(lp, tids, tch, lp, tids, tch, space, space)
    other = alm_loss(lp, tids, tch, tl.roll(1, -1).log_softmax(-1), tids, tch, space, space)
    # BCE of a distribution with itself is its entropy: the minimum over student likelihoods.
    tl2 = tl.clone().requires_grad_(True)
    loss = alm_loss(lp, tids, tch, tl2.log_softmax(-1), tids, tch, space, space)
    (grad,) = torch.autograd.grad(loss, tl2)
    assert grad.abs().max() < 1e-6
    assert same < other


def test_gradients_reach_student_logits_only():
    tl, tids, tch, tchunks, sl, sids, sch = make_batch(1)
    tl, sl = tl.requires_grad_(True), sl.requires_grad_(True)
    loss = alm_loss(tl.log_softmax(-1), tids, tch, sl.log_softmax(-1), sids, sch, mask([0], 13), mask([0], 17))
    loss.backward()
    assert tl.grad is None or tl.grad.abs().sum() == 0
    assert sl.grad.abs().sum() > 0


def test_log1mexp_is_stable():
    x = torch.tensor([-1e-12, -1e-6, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-30]))).all()


def test_chunk_ids_from_spans():
    text = "Hello world!".encode()
    sp = lambda starts, ends, ids: TokenSpans(ids, starts, ends)  # noqa: E731
    ex = SimpleNamespace(
        text=text,
        teacher=sp([0, 0, 5, 11], [0, 5, 11, 12], [9, 1, 2, 3]),            # BOS Hello| world|!
        student=sp([0, 0, 3, 5, 9], [0, 3, 5, 9, 12], [9, 1, 2, 3, 4]),     # BOS Hel|lo| wor|ld!
    )
    special = np.array([False] * 9 + [True])                                   # id 9 = BOS
    ct, cs = chunk_ids([ex], special, special)
    assert ct.tolist() == [[-1, 0, 1, 1]]
    assert cs.tolist() == [[-1, 0, 0, 1, 1]]


@pytest.mark.parametrize("sp_side", ["student", "teacher"])
def test_chunks_are_tokenkits_on_real_sentencepiece_output(tokenizers, corpus_texts, sp_side):
    """Our SentencePiece tokenizer emits a bare dummy-prefix token "▁" (an empty span of the text)
    before a word it has no "▁word" piece for. As in tokenkit (and ``align.chunks`` on the tokens'
    bytes, and ULD's byte groups) that token joins the first chunk."""
    make = lambda kind: Side(tokenizers[kind], token_bytes(tokenizers[kind]))  # noqa: E731
    sp, bpe = make("sentencepiece_bpe"), make("bytelevel_bpe")
    student, teacher = (sp, bpe) if sp_side == "student" else (bpe, sp)
    data = PairedDataset([s for t in corpus_texts for s in segment_text(t, 80)][:6], student, teacher)
    examples = [data[i] for i in range(len(data))]
    ctx = MethodContext.from_sides(None, None, student, teacher)
    batch = methods.build("alm", ctx).prepare(examples)
    bare = 0
    for b, ex in enumerate(examples):
        want = chunks([teacher.token_bytes[i] for i in ex.teacher.ids], [student.token_bytes[i] for i in ex.student.ids])
        for side, name in ((0, "teacher"), (1, "student")):
            spans = getattr(ex, name)
            got = batch[f"alm_chunk_{name}"][b, : len(spans.ids)]
            assert got.tolist() == chunk_index(np.array(want).reshape(-1, 4), len(spans.ids), side).tolist()
            if getattr(data, name) is sp and spans.ends[1] == spans.starts[1]:  # BOS, then a bare "▁"
                assert sp.token_bytes[spans.ids[1]] == b" " and got[1] == 0
                bare += 1
    assert bare == len(examples)  # every segment starts with a capital letter, which has no "▁X" piece


def test_logprob_cross_entropy_matches_token_cross_entropy():
    from ctdbench.kernels import logprob_cross_entropy, token_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 7, 11, generator=g), torch.randint(0, 11, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    assert torch.allclose(logprob_cross_entropy(logits.log_softmax(-1), ids, mask), token_cross_entropy(logits, ids, mask))


@pytest.mark.parametrize("name,hp", [("alm", {}), ("alm+sft", {}), ("alm", {"tau": 7.0, "threshold": 0.4}),
                                     ("alm+sft", {"tau": 30.0, "threshold": 0.02}), ("alm+sft", {"gradmag": True})])
def test_whole_loss_matches_a_naive_implementation(tokenizers, corpus_texts, name, hp):
    """The method's loss on real models and a loss mask (the middle third of each segment): naive ALM
    over tokenkit-style chunks of the tokens' bytes whose tokens are all targets, alone (``alm``) or
    averaged with the student's CE over its targets (``alm+sft``), or GradMag's weighted mean."""
    make = lambda kind: Side(tokenizers[kind], token_bytes(tokenizers[kind]))  # noqa: E731
    student_side, teacher_side = make("sentencepiece_bpe"), make("bytelevel_bpe")
    texts = [s for t in corpus_texts for s in segment_text(t, 80)][:3]
    data = PairedDataset([Segment(t, ((len(t) // 3, 2 * len(t) // 3),)) for t in texts], student_side, teacher_side)
    student = build_model(STUDENT, student_side.tokenizer, seed=0, max_positions=256)
    teacher = build_model(TEACHER, teacher_side.tokenizer, seed=1, max_positions=256)
    ctx = MethodContext.from_sides(student, teacher, student_side, teacher_side)
    method = methods.build(name, ctx, hp)
    examples = [data[i] for i in range(len(data))]
    batch = collate(examples, data, method)
    s_out, t_out = (model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"])
                    for model, side in ((student, "student"), (teacher, "teacher")))
    loss, logs = method.loss(batch, s_out, t_out)

    def targets_only(c, ex):
        return all(ex.teacher.loss[i] for i in range(c[0], c[1])) and all(ex.student.loss[j] for j in range(c[2], c[3]))

    found = [[c for c in chunks([teacher_side.token_bytes[i] for i in ex.teacher.ids],
                                [student_side.token_bytes[i] for i in ex.student.ids]) if targets_only(c, ex)]
             for ex in examples]
    assert sum(map(len, found)) < sum(len(chunks([teacher_side.token_bytes[i] for i in ex.teacher.ids],
                                                 [student_side.token_bytes[i] for i in ex.student.ids])) for ex in examples)
    space = [[i for i, b in enumerate(side.token_bytes) if b is None or b[:1] in (b" ", b"\n", b"\t")]
             for side in (teacher_side, student_side)]
    with torch.no_grad():
        alm = naive_alm(t_out.logits.double(), batch["teacher_input_ids"], found, s_out.logits.double(),
                        batch["student_input_ids"], None, *space, tau=hp.get("tau", 100.0), thr=hp.get("threshold", 0.1))
    if name == "alm":
        assert loss.item() == pytest.approx(alm, rel=1e-5)
        return
    nll = [-s_out.logits[b, k - 1].double().log_softmax(-1)[ex.student.ids[k]]
           for b, ex in enumerate(examples) for k in range(1, len(ex.student.ids)) if ex.student.loss[k]]
    ce = torch.stack(nll).mean().item()
    if not hp.get("gradmag"):
        assert loss.item() == pytest.approx((ce + alm) / 2, rel=1e-5)
        return
    # GradMag: each term weighted by 1 / the norm of its gradient on the last transformer block.
    last = list(student.gpt_neox.layers[-1].parameters())
    assert [logs["ce"], logs["alm"]] == pytest.approx([ce, alm], rel=1e-5)
    logp = s_out.logits.float().log_softmax(-1)
    norms = []
    for term in (ce_term(logp, examples), alm_term(method, batch, logp, t_out)):
        grads = torch.autograd.grad(term, last, retain_graph=True, allow_unused=True)
        norms.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None)))
    w = [1 / n for n in norms]
    assert loss.item() == pytest.approx((w[0] * ce + w[1] * alm) / sum(w), rel=1e-4)


def ce_term(logp, examples):
    return torch.stack([-logp[b, k - 1, ex.student.ids[k]] for b, ex in enumerate(examples)
                        for k in range(1, len(ex.student.ids)) if ex.student.loss[k]]).mean()


def alm_term(method, batch, logp, t_out):
    return alm_loss(t_out.logits.float().log_softmax(-1), batch["teacher_input_ids"], batch["alm_chunk_teacher"], logp,
                    batch["student_input_ids"], batch["alm_chunk_student"], method.space_t, method.space_s)
