"""MultiLevelOT: the loss and its gradients against a naive transcription of the official code
(paper-era sort, fixed batch loop, hand-written Sinkhorn on the full padded L x L problem), POT's
Sinkhorn against a plain log-domain one, plan marginals, properties, and real models on both pairs."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import methods
from ctdbench.data import PairedDataset, Side, collate, segment_text
from ctdbench.models import build_model
from ctdbench.teacher import OnlineTeacher
from ctdbench.tokbytes import token_bytes
from ctdbench.train import step_loss
from ctdbench.kernels import target_rows, token_cross_entropy
from methods.base import MethodContext
import methods.multilevel_ot as mot
from methods.multilevel_ot import TopProbs, multilevel_ot_loss, sinkhorn_cost, sinkhorn_plan, top_indices, top_probs

STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def official(s_logits, t_logits, s_mask, t_mask, ts=1.0, tt=1.0, k=50, log_w=0.1, sk_w=0.1, sk_scale=0.001,
             eps=0.1, iters=10, sk_t=2.0):
    """models/distillation_model.py::DistillationLoss (f=1), answers starting after BOS, both sides
    padded to one sequence length (as the official loaders do), paper-era per-row sort, ``+=``;
    the constants as parameters (official values as defaults)."""
    normalize = lambda v: v / (v.std(dim=-1, keepdim=True) + 0.0001)
    improved_sort = lambda v: v[:, :, torch.argsort(v.sum(dim=(0, 1)), descending=True)]
    width = max(s_logits.shape[1], t_logits.shape[1])
    student = F.pad(normalize(s_logits), (0, 0, 0, width - s_logits.shape[1]))
    teacher = F.pad(normalize(t_logits), (0, 0, 0, width - t_logits.shape[1]))
    size_s, size_t = (s_mask.sum(1) - 1).tolist(), (t_mask.sum(1) - 1).tolist()
    student = torch.stack([torch.cat([(student[i, :n] / ts).softmax(-1), torch.zeros_like(student[i, n:])])
                           for i, n in enumerate(size_s)])
    teacher = torch.stack([torch.cat([(teacher[i, :n] / tt).softmax(-1), torch.zeros_like(teacher[i, n:])])
                           for i, n in enumerate(size_t)])
    mex = max(max(size_s), max(size_t))
    student, teacher = student[:, :mex], teacher[:, :mex]
    student = improved_sort(student.sort(dim=-1, descending=True).values)[:, :, :k]
    teacher = improved_sort(teacher.sort(dim=-1, descending=True).values)[:, :, :k]
    diff = student.size(2) - teacher.size(2)                    # a vocabulary smaller than k
    student, teacher = F.pad(student, (0, max(0, -diff))), F.pad(teacher, (0, max(0, diff)))
    dist = torch.stack([(student[i][:n] - teacher[i][:n]).abs().sum(-1).mean(-1)
                        for i, n in enumerate(map(min, size_s, size_t))])
    kl_wo = -torch.sum(F.softmax(student, dim=-1) * F.log_softmax(teacher, dim=-1), dim=-1).mean()
    dist = dist + kl_wo * log_w
    emd = 0
    for i in range(student.shape[0]):
        x, y = F.softmax(teacher[i] / sk_t, dim=-1), F.softmax(student[i] / sk_t, dim=-1)
        w = torch.cdist(x, y, p=1)
        P = torch.exp(-w / eps)
        for _ in range(iters):
            P = P / torch.sum(P, dim=1, keepdim=True)
            P = P / torch.sum(P, dim=0, keepdim=True)
        emd += sk_scale * torch.sum(P * w)
    return dist.mean() + emd * sk_w


def ragged_batch(seed, B=3, Ls=9, Lt=13, Vs=60, Vt=80, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, Ls, Vs, generator=g, dtype=dtype) * 2
    t = torch.randn(B, Lt, Vt, generator=g, dtype=dtype) * 2
    s_mask, t_mask = torch.ones(B, Ls, dtype=torch.long), torch.ones(B, Lt, dtype=torch.long)
    for b in range(1, B):
        s_mask[b, Ls - 2 * b:], t_mask[b, Lt - 4 * b:] = 0, 0
    return s, t, s_mask, t_mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("temps", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("shape", [dict(Ls=9, Lt=13), dict(Ls=15, Lt=6, Vs=30)])
def test_loss_and_gradient_match_official_code(seed, temps, shape):
    s, t, s_mask, t_mask = ragged_batch(seed, **shape)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got, logs = multilevel_ot_loss(s1, t, s_mask, t_mask, student_temperature=temps[0], teacher_temperature=temps[1])
    want = official(s2, t, s_mask, t_mask, *temps)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    got.backward()
    want.backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-7, atol=1e-12)
    assert s1.grad.abs().sum() > 0


@pytest.mark.parametrize("hp", [{}, {"crossentropy_weight": 0.4, "distillation_weight": 0.9, "top_k": 7,
                                     "student_temperature": 1.5, "teacher_temperature": 0.8, "log_weight": 0.3,
                                     "sinkhorn_weight": 0.7, "sinkhorn_scale": 0.01, "sinkhorn_epsilon": 0.5,
                                     "sinkhorn_iters": 3, "sinkhorn_temperature": 1.2}], ids=["defaults", "other"])
def test_method_loss_is_ce_plus_the_official_kd(hp):
    """The registered method's whole loss, every hyperparameter plumbed: its CE weight x CE over the
    student's targets + its distillation weight x the official KD with its constants."""
    s, t, s_mask, t_mask = ragged_batch(8)
    ids = (torch.arange(s_mask.numel()).reshape(s_mask.shape) * 5) % s.shape[-1]
    method = methods.build("multilevel_ot", SimpleNamespace(teacher_top_k=None), hp)
    batch = {"student_input_ids": ids, "student_loss_mask": s_mask, "teacher_loss_mask": t_mask}
    loss, _ = method.loss(batch, SimpleNamespace(logits=s), SimpleNamespace(logits=t))
    names = ["student_temperature", "teacher_temperature", "top_k", "log_weight", "sinkhorn_weight", "sinkhorn_scale",
             "sinkhorn_epsilon", "sinkhorn_iters", "sinkhorn_temperature"]
    official_defaults = [1.0, 1.0, 50, 0.1, 0.1, 0.001, 0.1, 10, 2.0]
    kd = official(s, t, s_mask, t_mask, *[hp.get(n, d) for n, d in zip(names, official_defaults)])
    nll = [-s[b, j - 1].log_softmax(-1)[ids[b, j]] for b in range(len(s)) for j in range(1, s.shape[1]) if s_mask[b, j]]
    want = hp.get("crossentropy_weight", 1.0) * torch.stack(nll).mean() + hp.get("distillation_weight", 1.5) * kd
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)  # the CE runs in fp32


def log_sinkhorn(cost, a, b, epsilon, iters):
    """Plain log-domain Sinkhorn with the official order: rows first, from K, no stopping rule."""
    log_k, log_g = -cost / epsilon, torch.zeros_like(b)
    for _ in range(iters):
        log_f = a.log() - torch.logsumexp(log_k + log_g[:, None, :], dim=2)
        log_g = b.log() - torch.logsumexp(log_k + log_f[:, :, None], dim=1)
    return (log_f[:, :, None] + log_k + log_g[:, None, :]).exp()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iters", [1, 10, 50])
def test_pot_sinkhorn_agrees_with_log_domain_reference(dtype, iters):
    g = torch.Generator().manual_seed(iters)
    cost = torch.rand(4, 7, 9, generator=g, dtype=dtype) * 2
    a = torch.rand(4, 7, generator=g, dtype=dtype) + 0.5
    b = torch.rand(4, 9, generator=g, dtype=dtype) + 0.5
    a[1, 3] = 0.0                                                       # a zero-mass (filler) row
    b = b / b.sum(1, keepdim=True) * a.sum(1, keepdim=True)
    plan = sinkhorn_plan(cost, a, b, epsilon=0.1, iters=iters)
    ref = log_sinkhorn(cost, a, b, 0.1, iters)
    assert torch.allclose(plan, ref, atol=1e-5, rtol=1e-5)
    assert plan[1, 3].abs().max() == 0


def test_transport_plans_meet_their_marginals():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 6, 6, generator=g, dtype=torch.float64) * 2
    ones = torch.ones(3, 6, dtype=torch.float64)
    plan = sinkhorn_plan(cost, ones, ones, epsilon=0.1, iters=10)
    assert torch.allclose(plan.sum(1), ones, atol=1e-12)                  # the last scaling: columns
    converged = sinkhorn_plan(cost, ones, ones, epsilon=0.1, iters=2000)
    assert torch.allclose(converged.sum(2), ones, atol=1e-6) and torch.allclose(converged.sum(1), ones, atol=1e-12)
    assert (plan >= 0).all()


def test_sinkhorn_gradient_reaches_the_student():
    s, t, s_mask, t_mask = ragged_batch(4)
    (rows_s, n_s), (rows_t, n_t) = target_rows(s_mask), target_rows(t_mask)
    L = int(torch.maximum(n_s, n_t).max())
    s_ = s.clone().requires_grad_(True)
    p_s = top_probs(s_, rows_s, L, 50, 1.0)
    with torch.no_grad():
        p_t = top_probs(t, rows_t, L, 50, 1.0)
    cost = sinkhorn_cost(p_t, p_s, n_t, n_s).sum()
    (grad,) = torch.autograd.grad(cost, s_)
    assert grad.abs().sum() > 0
    assert grad[1, 7:].abs().sum() == 0                                  # padded student positions


def test_top_probs_rows():
    s, _, s_mask, _ = ragged_batch(1, Vs=70)
    rows, _ = target_rows(s_mask)
    p = top_probs(s, rows, 12, 50, 1.0)
    z = s / (s.std(-1, keepdim=True) + 1e-4)
    assert torch.allclose(p[0, :8], z[0, :8].softmax(-1).topk(50, -1).values)
    assert p[1, 6:].abs().sum() == 0 and p.shape == (3, 12, 50)
    assert (p[:, :, :-1] >= p[:, :, 1:]).all()
    # Targets with a gap (a user turn between assistant turns) are left-aligned.
    gap = s_mask.clone()
    gap[0, 3:6] = 0
    rows, n = target_rows(gap)
    assert rows[0, : n[0]].tolist() == [0, 1, 5, 6, 7] and n[0] == 5
    assert torch.allclose(top_probs(s, rows, 12, 50, 1.0)[0, :5], p[0, [0, 1, 5, 6, 7]])


@pytest.mark.parametrize("block", [1 << 22, 90])  # one block; blocks of 2 rows
def test_top_probs_match_autograd_of_their_definition(monkeypatch, block):
    monkeypatch.setattr(mot, "ROW_BLOCK", block)
    g = torch.Generator().manual_seed(block)
    logits = torch.randn(9, 40, generator=g, dtype=torch.float64) * 3 + 5
    logits[2] = 1.5                                                     # a constant row: std 0
    rows, k, T = torch.tensor([7, 2, 0, 4, 5]), 6, 2.0
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got = TopProbs.apply(x1, rows, k, T)
    z = x2[rows]
    want = (z / ((z.std(-1, keepdim=True) + 1e-4) * T)).softmax(-1).topk(k, -1).values
    assert torch.allclose(got, want, rtol=1e-12)
    w = torch.randn(5, k, generator=g, dtype=torch.float64)
    (got * w).sum().backward()
    (want * w).sum().backward()
    real = torch.tensor([True, False, True, True, True])               # torch's gradient is NaN at std 0
    assert torch.allclose(x1.grad[rows[real]], x2.grad[rows[real]], rtol=1e-9, atol=1e-15)
    assert torch.isfinite(x1.grad).all() and x1.grad[[1, 3, 6, 8]].abs().sum() == 0  # rows not asked for
    smooth = rows[real]                                                 # std 0 is not differentiable
    assert torch.autograd.gradcheck(lambda v: TopProbs.apply(v, smooth, k, 0.5), (logits[:, :12].clone().requires_grad_(True),))


@pytest.mark.parametrize("V, k", [(80, 50), (4096, 50), (300, 1)])
def test_top_indices_and_values_equal_topk(V, k):
    x = torch.randn(20, V, generator=torch.Generator().manual_seed(V))
    want = x.topk(k, -1)
    assert torch.equal(x.gather(-1, top_indices(x, k)), want.values)
    ties = x.clone()
    ties[3] = ties[3].round()                                           # many ties, also at the k-th value
    assert torch.equal(ties.gather(-1, top_indices(ties, k)), ties.topk(k, -1).values)


# ------------------------------------------------------------------------------ properties


def test_terms_are_non_negative_and_abs_is_zero_for_identical_logits():
    s, _, s_mask, _ = ragged_batch(2, Vs=60)
    kd, logs = multilevel_ot_loss(s, s.clone(), s_mask, s_mask.clone())
    assert logs["abs"] == 0.0 and logs["log"] > 0 and logs["sinkhorn"] > 0
    s, t, s_mask, t_mask = ragged_batch(3)
    kd, logs = multilevel_ot_loss(s, t, s_mask, t_mask)
    assert min(logs.values()) >= 0 and kd.item() > 0


def test_logit_scale_is_normalised_away_but_temperature_is_not():
    s, t, s_mask, t_mask = ragged_batch(6)
    base, _ = multilevel_ot_loss(s, t, s_mask, t_mask)
    scaled, _ = multilevel_ot_loss(s * 5.0, t * 0.2, s_mask, t_mask)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-3)        # std normalisation (+1e-4)
    hot, _ = multilevel_ot_loss(s, t, s_mask, t_mask, student_temperature=4.0)
    assert abs(hot.item() - base.item()) > 1e-3


def test_gradients_reach_the_student_only_through_the_method():
    s, t, s_mask, t_mask = ragged_batch(7, dtype=torch.float32)
    s_, t_ = s.requires_grad_(True), t.requires_grad_(True)
    ctx = SimpleNamespace(teacher_top_k=None)
    method = methods.build("multilevel_ot", ctx)
    ids = torch.zeros_like(s_mask)
    batch = {"student_input_ids": ids, "student_loss_mask": s_mask, "teacher_loss_mask": t_mask}
    loss, logs = method.loss(batch, SimpleNamespace(logits=s_), SimpleNamespace(logits=t_.detach()))
    ce = token_cross_entropy(s_, ids, s_mask)
    assert loss.item() == pytest.approx(ce.item() + 1.5 * logs["kd"], rel=1e-6)
    loss.backward()
    assert s_.grad.abs().sum() > 0 and t_.grad is None


# -------------------------------------------------------------------- real models, both pairs


@pytest.fixture(scope="module")
def pairs(sides, tokenizers):
    student_sp, teacher = sides
    byte = Side(tokenizers["byte"], token_bytes(tokenizers["byte"]))
    return {"bpe_to_sp": (student_sp, teacher), "bpe_to_byte": (byte, teacher), "same": (teacher, teacher)}


def real_step(pair, corpus_texts, same_weights=False):
    student_side, teacher_side = pair
    data = PairedDataset([s for t in corpus_texts for s in segment_text(t, 96)][:3], student_side, teacher_side)
    teacher = build_model(TEACHER, teacher_side.tokenizer, seed=0, max_positions=256)
    student = teacher if same_weights else build_model(STUDENT, student_side.tokenizer, seed=1, max_positions=256)
    ctx = MethodContext.from_sides(student, teacher, student_side, teacher_side)
    method = methods.build("multilevel_ot", ctx)
    batch = collate([data[i] for i in range(3)], data, method)
    loss, logs = step_loss(student, method, OnlineTeacher(copy.deepcopy(teacher)), batch)
    return student, loss, logs


@pytest.mark.parametrize("pair", ["bpe_to_sp", "bpe_to_byte"])
def test_trains_on_both_pairs(pairs, corpus_texts, pair):
    student, loss, logs = real_step(pairs[pair], corpus_texts)
    assert torch.isfinite(loss) and logs["abs"] > 0 and logs["sinkhorn"] > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_same_tokenizer_same_model(pairs, corpus_texts):
    _, loss, logs = real_step(pairs["same"], corpus_texts, same_weights=True)
    assert logs["abs"] == 0.0
    assert logs["kd"] == pytest.approx(0.1 * logs["log"] + 0.1 * logs["sinkhorn"], rel=1e-6)


def test_registered_with_official_defaults():
    cls, defaults = methods.get("multilevel_ot")
    m = cls(SimpleNamespace(teacher_top_k=None), **defaults)
    assert (m.crossentropy_weight, m.distillation_weight) == (1.0, 1.5)
    assert m.kd_args == dict(k=50, student_temperature=1.0, teacher_temperature=1.0, log_weight=0.1,
                             sinkhorn_weight=0.1, sinkhorn_scale=1e-3, epsilon=0.1, iters=10, sinkhorn_temperature=2.0)
