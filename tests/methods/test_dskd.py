"""DSKD-CMA: the loss against a literal port of the official criterion, masks, gradient routing,
projectors (shapes, learning rate, never in the student checkpoint), real tokenizer pairs."""

import math

import pytest
import torch
from torch import nn

import methods
from ctdbench import kernels
from ctdbench.data import PairedDataset, Side, collate, segment_text
from ctdbench.models import build_model
from ctdbench.tokbytes import token_bytes
from ctdbench.train import TrainConfig, make_optimizer
from methods.base import MethodContext
from methods.dskd import dskd_loss

STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 48, "heads": 2, "ffn": 64}


def official_kl(logits, teacher_logits, T, tea_T=1.0):
    """various_divergence.compute_forward_kl_divergence(reduction="none")."""
    lprobs = torch.log_softmax(logits / T, -1)
    t = teacher_logits / T / tea_T
    return (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - lprobs)).sum(-1)


def naive_dskd(a, proj, kd_rate=0.5, T=2.0, tea_T=1.0, masked_std=True):
    """Line-by-line port of compute_dual_space_kd_loss_with_cma on pre-shifted tensors."""
    pad_mask, teacher_pad_mask = a["student_mask"][:, 1:].bool(), a["teacher_mask"][:, 1:].bool()
    target = a["student_ids"][:, 1:].masked_fill(~pad_mask, -100)
    teacher_target = a["teacher_ids"][:, 1:].masked_fill(~teacher_pad_mask, -100)
    logits, hiddens = a["student_logits"][:, :-1], a["student_hidden"][:, :-1]
    teacher_logits, teacher_hiddens = a["teacher_logits"][:, :-1], a["teacher_hidden"][:, :-1]
    std = (lambda x, m: x[m].std()) if masked_std else (lambda x, m: x.std())
    formal_target = torch.where(pad_mask, target, 0)
    formal_input = torch.where(pad_mask, a["student_ids"][:, :-1], 0)
    stu_index_embeds = torch.cat([a["student_embed"][formal_input], a["student_embed"][formal_target]], -1)
    formal_teacher_target = torch.where(teacher_pad_mask, teacher_target, 0)
    formal_teacher_input = torch.where(teacher_pad_mask, a["teacher_ids"][:, :-1], 0)
    tea_input_embeds, tea_target_embeds = a["teacher_embed"][formal_teacher_input], a["teacher_embed"][formal_teacher_target]
    tea_index_embeds = torch.cat([tea_input_embeds, tea_target_embeds], -1)
    norm_tea_index_embeds = tea_index_embeds / std(tea_index_embeds, teacher_pad_mask)
    norm_tea_target_embeds = tea_target_embeds / std(tea_target_embeds, teacher_pad_mask)
    norm_teacher_hiddens = teacher_hiddens / std(teacher_hiddens, teacher_pad_mask)
    stu_q_hiddens = proj["query"](stu_index_embeds)
    stu_v_hiddens = proj["s2t"](hiddens)
    tea_v_hiddens = proj["t2s"](norm_teacher_hiddens + norm_tea_target_embeds)
    align = stu_q_hiddens.matmul(norm_tea_index_embeds.transpose(-1, -2)) / math.sqrt(2 * teacher_hiddens.shape[-1])
    align_mask = pad_mask.float().unsqueeze(-1) * teacher_pad_mask.float().unsqueeze(1)
    align = align + (1.0 - align_mask) * (-100000)
    t2s_logits = torch.softmax(align, -1).matmul(tea_v_hiddens).matmul(a["student_head"].detach().T)

    def ce_sum(lg, tg, m):
        return (-torch.log_softmax(lg, -1).gather(-1, tg.clamp(min=0)[..., None]).squeeze(-1) * m).sum()

    t2s_ce = ce_sum(t2s_logits, target, pad_mask)
    t2s_acc_mask = t2s_logits.argmax(-1).eq(target)
    t2s_kd = (official_kl(logits, t2s_logits.detach(), T, tea_T) * pad_mask * t2s_acc_mask).sum()
    s2t_logits = torch.softmax(align.transpose(-1, -2), -1).matmul(stu_v_hiddens).matmul(a["teacher_head"].detach().T)
    s2t_kd = (official_kl(s2t_logits, teacher_logits, T) * teacher_pad_mask).sum()
    n = pad_mask.sum()
    loss = (1 - kd_rate) * ce_sum(logits, target, pad_mask) + kd_rate * (t2s_ce + t2s_kd + s2t_kd)
    return loss / n, {"t2s_ce": t2s_ce / n, "t2s_kd": t2s_kd / n, "s2t_kd": s2t_kd / n}


def random_inputs(seed, B=3, Ls=9, Lt=7, Vs=17, Vt=13, ds=8, dt=6, pad=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    a = {"student_logits": r(B, Ls, Vs) * 2, "student_hidden": r(B, Ls, ds), "student_embed": r(Vs, ds),
         "student_head": r(Vs, ds), "teacher_logits": r(B, Lt, Vt) * 2, "teacher_hidden": r(B, Lt, dt) * 3,
         "teacher_embed": r(Vt, dt), "teacher_head": r(Vt, dt),
         "student_ids": torch.randint(0, Vs, (B, Ls), generator=g), "teacher_ids": torch.randint(0, Vt, (B, Lt), generator=g),
         "student_mask": torch.ones(B, Ls, dtype=torch.long), "teacher_mask": torch.ones(B, Lt, dtype=torch.long)}
    if pad:
        for b in range(1, B):
            a["student_mask"][b, Ls - 2 * b:] = 0
            a["teacher_mask"][b, Lt - b:] = 0
    torch.manual_seed(seed)
    proj = nn.ModuleDict({"query": nn.Linear(2 * ds, 2 * dt), "t2s": nn.Linear(dt, ds), "s2t": nn.Linear(ds, dt)})
    return a, proj


def force_correct(a, proj, c=5):
    """Make the t2s prediction token c everywhere (t2s output ~ a constant) and c the target at
    some positions, so the accuracy-masked t2s KL term is exercised."""
    with torch.no_grad():
        proj["t2s"].weight.mul_(0.01)
        proj["t2s"].bias.zero_()[0] = 10.0
    a["student_head"][:, 0] = -1.0
    a["student_head"][c, 0] = 1.0
    a["student_ids"][:, 2::3] = c


def ours(a, proj, **kw):
    return dskd_loss(**a, query=proj["query"], t2s=proj["t2s"], s2t=proj["s2t"], **kw)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kw", [{}, {"kd_rate": 0.8, "temperature": 1.0, "teacher_temperature": 2.0}])
@pytest.mark.parametrize("block", [1 << 18, 40])  # one row block, and blocks of a few rows
def test_matches_official_port(seed, kw, block, monkeypatch):
    monkeypatch.setattr("ctdbench.kernels.FUSED_BLOCK", block)
    a, proj = random_inputs(seed)
    if seed % 2:
        force_correct(a, proj)
    got, terms = ours(a, proj, **kw)
    want, wterms = naive_dskd(a, proj, kd_rate=kw.get("kd_rate", 0.5), T=kw.get("temperature", 2.0),
                              tea_T=kw.get("teacher_temperature", 1.0))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for k in wterms:
        assert terms[k].item() == pytest.approx(wterms[k].item(), rel=1e-4, abs=1e-6), k
    for k in ("student_logits", "student_hidden"):
        a[k].requires_grad_(True)
    inputs = [*proj.parameters(), a["student_logits"], a["student_hidden"]]
    got, _ = ours(a, proj, **kw)
    want, _ = naive_dskd(a, proj, kd_rate=kw.get("kd_rate", 0.5), T=kw.get("temperature", 2.0),
                         tea_T=kw.get("teacher_temperature", 1.0))
    grads, wgrads = torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(grads, wgrads))


def test_without_padding_equals_the_official_std():
    a, proj = random_inputs(7, pad=False)
    assert ours(a, proj)[0].item() == pytest.approx(naive_dskd(a, proj, masked_std=False)[0].item(), rel=1e-5)


def test_padded_positions_do_not_matter():
    """Whatever sits at positions without a target (e.g. a cached teacher's zeros) changes nothing."""
    a, proj = random_inputs(3)
    base = ours(a, proj)[0]
    b = dict(a)
    for side in ("student", "teacher"):
        free = torch.ones_like(a[f"{side}_mask"], dtype=torch.bool)
        free[:, :-1] = a[f"{side}_mask"][:, 1:] == 0
        for key in ("logits", "hidden"):
            b[f"{side}_{key}"] = a[f"{side}_{key}"].masked_fill(free[..., None], 0.0)
        in_pad = a[f"{side}_mask"] == 0  # ids at padding (inputs and targets)
        b[f"{side}_ids"] = a[f"{side}_ids"].masked_fill(in_pad, 3)
    assert torch.allclose(ours(b, proj)[0], base, rtol=1e-6)


def test_gradient_routing_per_term(monkeypatch):
    """Each fused CE/KL term reaches only what it should: the t2s CE the query and t2s projectors,
    the student's CE and t2s KL (detached target) the student logits, the s2t KL h_S, query and
    s2t; never the teacher."""
    parts = []

    def recording_ce_kl(*args, **kwargs):
        out = kernels.ce_kl(*args, **kwargs)
        parts.append(out[0])
        return out

    monkeypatch.setattr("methods.dskd.ce_kl", recording_ce_kl)
    a, proj = random_inputs(1)
    force_correct(a, proj)
    for k in ("student_logits", "student_hidden", "teacher_logits", "teacher_hidden"):
        a[k] = a[k].clone().requires_grad_(True)
    _, terms = ours(a, proj)
    assert terms["t2s_kd"] > 0 and len(parts) == 3
    inputs = [a["student_logits"], a["student_hidden"], a["teacher_logits"], a["teacher_hidden"],
              proj["query"].weight, proj["t2s"].weight, proj["s2t"].weight]
    reach = []
    for part in parts:
        grads = torch.autograd.grad(part, inputs, retain_graph=True, allow_unused=True)
        reach.append([g is not None and g.abs().sum().item() > 0 for g in grads])
    #                    z_S    h_S    z_T    h_T    query  t2s    s2t
    assert reach == [[False, False, False, False, True, True, False],    # t2s CE: trains the projectors
                     [True, False, False, False, False, False, False],   # student CE + t2s KL
                     [False, True, False, False, True, False, True]]     # s2t KL


@pytest.mark.parametrize("kd_rate", [0.0, 1.0])
def test_gradient_routing(kd_rate):
    """CE alone reaches only the student logits; KD alone reaches z_S (t2s KL), the query and t2s
    projectors (t2s CE) and h_S, query, s2t (s2t KL), never the teacher."""
    a, proj = random_inputs(1)
    force_correct(a, proj)
    for k in ("student_logits", "student_hidden", "teacher_logits", "teacher_hidden"):
        a[k] = a[k].clone().requires_grad_(True)
    loss, terms = ours(a, proj, kd_rate=kd_rate)
    assert terms["t2s_kd"] > 0
    inputs = [a["student_logits"], a["student_hidden"], a["teacher_logits"], a["teacher_hidden"],
              proj["query"].weight, proj["t2s"].weight, proj["s2t"].weight]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    reach = [g is not None and g.abs().sum().item() > 0 for g in grads]
    #                            z_S    h_S    z_T    h_T    query  t2s    s2t
    assert reach == {0.0: [True, False, False, False, False, False, False],
                     1.0: [True, True, False, False, True, True, True]}[kd_rate]


def _pair(tokenizers, corpus_texts, student_kind):
    make = lambda kind: Side(tokenizers[kind], token_bytes(tokenizers[kind]))  # noqa: E731
    s_side, t_side = make(student_kind), make("bytelevel_bpe")
    data = PairedDataset([s for t in corpus_texts for s in segment_text(t, 96)][:5], s_side, t_side)
    student = build_model(STUDENT, s_side.tokenizer, seed=0, max_positions=256)
    teacher = build_model(TEACHER, t_side.tokenizer, seed=0, max_positions=256)  # grads left enabled
    return data, student, teacher, methods.build("dskd", MethodContext.from_sides(student, teacher, s_side, t_side))


@pytest.mark.parametrize("student_kind", ["sentencepiece_bpe", "byte"])
def test_real_pair_shapes_gradients_and_checkpoint(tokenizers, corpus_texts, student_kind):
    data, student, teacher, method = _pair(tokenizers, corpus_texts, student_kind)
    assert method.needs_hidden_states and method.needs_teacher
    assert (method.kd_rate, method.temperature, method.teacher_temperature, method.projector_lr) == (0.5, 2.0, 1.0, 1e-3)
    shapes = {k: tuple(m.weight.shape) for k, m in method.projectors.items()}
    assert shapes == {"query": (96, 64), "t2s": (32, 48), "s2t": (48, 32)}
    batch = collate([data[i] for i in range(len(data))], data, method)
    run = lambda model, p: model(input_ids=batch[f"{p}_input_ids"], attention_mask=batch[f"{p}_attention_mask"],  # noqa: E731
                                 output_hidden_states=True)
    loss, logs = method.loss(batch, run(student, "student"), run(teacher, "teacher"))
    assert set(logs) == {"ce", "t2s_ce", "t2s_kd", "s2t_kd", "t2s_acc"} and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())            # frozen teacher
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.parameters())
    # The projectors train at their own lr and never enter the student checkpoint.
    opt = make_optimizer(student, method, TrainConfig(steps=1, batch_size=1, lr=3e-3))
    assert opt.param_groups[-1]["lr"] == 1e-3
    assert {id(p) for p in opt.param_groups[-1]["params"]} == {id(p) for p in method.parameters()}
    assert not any("projector" in k for k in student.state_dict())
    assert set(method.state_dict()) == {f"projectors.{k}.{w}" for k in shapes for w in ("weight", "bias")}


@pytest.mark.parametrize("hp", [{}, {"kd_rate": 0.7, "temperature": 1.5, "teacher_temperature": 1.3}])
def test_method_loss_is_the_official_port_on_a_real_pair(tokenizers, corpus_texts, hp):
    """The registered method's loss, its hyperparameters plumbed, on real models with a prompt-like
    loss mask on both sides: the std normalisations over the teacher's target positions only."""
    data, student, teacher, method = _pair(tokenizers, corpus_texts, "sentencepiece_bpe")
    method = methods.build("dskd", method.ctx, hp)
    batch = collate([data[i] for i in range(len(data))], data, method)
    for side in ("student", "teacher"):
        batch[f"{side}_loss_mask"][:, 1:5] = 0
    # t2s predicts the most frequent target everywhere (so the accuracy-masked t2s KL has terms), and
    # the attention is peaked (the query of tiny initial embeddings would make it uniform, blind to
    # the key's normalisation).
    targets = batch["student_input_ids"][:, 1:][batch["student_loss_mask"][:, 1:].bool()]
    c = int(targets.mode().values)
    with torch.no_grad():
        method.projectors["query"].weight.mul_(30.0)
        method.projectors["t2s"].bias.zero_()[0] = 30.0
        head = student.get_output_embeddings().weight
        head[:, 0] = -1.0
        head[c, 0] = 1.0
    run = lambda model, p: model(input_ids=batch[f"{p}_input_ids"], attention_mask=batch[f"{p}_attention_mask"],  # noqa: E731
                                 output_hidden_states=True)
    s_out, t_out = run(student, "student"), run(teacher, "teacher")
    loss, logs = method.loss(batch, s_out, t_out)
    assert logs["t2s_kd"] > 0
    a = {"student_logits": s_out.logits, "student_hidden": s_out.hidden_states[-1],
         "student_embed": student.get_input_embeddings().weight.detach(),
         "student_head": student.get_output_embeddings().weight, "teacher_logits": t_out.logits,
         "teacher_hidden": t_out.hidden_states[-1], "teacher_embed": teacher.get_input_embeddings().weight.detach(),
         "teacher_head": teacher.get_output_embeddings().weight, "student_ids": batch["student_input_ids"],
         "teacher_ids": batch["teacher_input_ids"], "student_mask": batch["student_loss_mask"],
         "teacher_mask": batch["teacher_loss_mask"]}
    want, _ = naive_dskd(a, method.projectors, kd_rate=hp.get("kd_rate", 0.5), T=hp.get("temperature", 2.0),
                         tea_T=hp.get("teacher_temperature", 1.0))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
