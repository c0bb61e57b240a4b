"""KD: refusal on mismatched pairs, the loss against a naive per-position implementation, zero KL
for identical models (tensors and real tiny models), and the fused CE+KL autograd function."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import methods
from ctdbench.data import PairedDataset, Side, collate, segment_text
from ctdbench.models import build_model
from ctdbench.tokbytes import token_bytes
from ctdbench.kernels import ce_kl, token_cross_entropy
from methods.base import MethodContext
from methods.kd import kd_loss

MODEL = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def naive_kd(z, t, ids, mask, kd_rate=0.5, T=2.0):
    """Per-position loops over the definition (module docstring)."""
    ce, kl, n = 0.0, 0.0, 0
    for b in range(z.shape[0]):
        for i in range(z.shape[1] - 1):
            if not mask[b, i + 1]:
                continue
            n += 1
            ce = ce - torch.log_softmax(z[b, i].double(), -1)[ids[b, i + 1]]
            p = torch.softmax(t[b, i].double() / T, -1)
            kl = kl + (p * (p.log() - torch.log_softmax(z[b, i].double() / T, -1))).sum()
    return (1 - kd_rate) * ce / n + kd_rate * kl / n, ce / n, kl / n


def random_batch(seed, B=3, L=9, V=13):
    g = torch.Generator().manual_seed(seed)
    z, t = torch.randn(B, L, V, generator=g) * 3, torch.randn(B, L, V, generator=g) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(1, B):
        mask[b, L - 2 * b:] = 0  # ragged right padding
    return z, t, ids, mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kd_rate,T", [(0.5, 2.0), (0.3, 1.0), (1.0, 4.0)])
def test_kd_matches_naive_definition(seed, kd_rate, T):
    z, t, ids, mask = random_batch(seed)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    got = kd_loss(z1, t, ids, mask, kd_rate=kd_rate, temperature=T)
    want = naive_kd(z2, t, ids, mask, kd_rate=kd_rate, T=T)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    got[0].backward()
    want[0].backward()
    assert torch.allclose(z1.grad, z2.grad.float(), atol=1e-6)
    assert torch.allclose(got[1], token_cross_entropy(z, ids, mask))


@pytest.mark.parametrize("hp", [{}, {"kd_rate": 0.3, "temperature": 1.5}])
def test_method_loss_is_the_naive_definition(hp):
    """The registered method's loss (its defaults, or others) on a loss mask with a prompt-like gap."""
    z, t, ids, attention = random_batch(7)
    loss_mask = attention.clone()
    loss_mask[0, 2:5] = 0
    table = [bytes([i]) for i in range(13)]
    ctx = MethodContext(student=None, teacher=None, student_token_bytes=table, teacher_token_bytes=table,
                        same_tokenizer=True)
    method = methods.build("kd", ctx, hp)
    batch = {"student_input_ids": ids, "student_attention_mask": attention, "student_loss_mask": loss_mask}
    loss, logs = method.loss(batch, SimpleNamespace(logits=z), SimpleNamespace(logits=t))
    want = naive_kd(z, t, ids, loss_mask, kd_rate=hp.get("kd_rate", 0.5), T=hp.get("temperature", 2.0))
    assert [loss.item(), logs["ce"], logs["kd"]] == pytest.approx([w.item() for w in want], rel=1e-5)


def test_kd_is_zero_for_identical_logits_and_padding_is_ignored():
    z, t, ids, mask = random_batch(0)
    zz = z.clone().requires_grad_(True)
    kl, _, _ = kd_loss(zz, z, ids, mask, kd_rate=1.0)  # the loss is the KL alone
    (grad,) = torch.autograd.grad(kl, zz)
    assert abs(kl.item()) < 1e-6 and grad.abs().max() < 1e-7
    # Positions without a target (padding, the last position) do not count, whatever they hold.
    no_target = torch.ones_like(mask, dtype=torch.bool)
    no_target[:, :-1] = mask[:, 1:] == 0
    junk = lambda x: x.masked_fill(no_target[..., None], 1e3)  # noqa: E731
    assert torch.allclose(torch.stack(kd_loss(junk(z), junk(t), ids, mask)), torch.stack(kd_loss(z, t, ids, mask)))


def row_kl(t, z, T):
    """KL(softmax(t_i / T) || softmax(z_i / T)) of every row, one row per call."""
    return torch.stack([ce_kl(z[i:i + 1], None, lambda r0, r1, i=i: t[i:i + 1], T)[2] for i in range(len(z))])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 8.0))
def test_kl_properties(seed, T):
    g = torch.Generator().manual_seed(seed)
    z, t = torch.randn(4, 11, generator=g) * 4, torch.randn(4, 11, generator=g) * 4
    kl = row_kl(t, z, T)
    assert (kl > -1e-5).all()                                  # Gibbs
    assert torch.allclose(row_kl(t, t, T), torch.zeros(4), atol=1e-5)
    assert torch.allclose(row_kl(t + 3.0, z - 1.0, T), kl, atol=1e-4)  # shift invariance


@pytest.mark.parametrize("block", [1 << 18, 20])  # one block, and many blocks of two rows
def test_fused_ce_kl_matches_autograd(block, monkeypatch):
    monkeypatch.setattr("ctdbench.kernels.FUSED_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(6, 9, generator=g) * 3, torch.randn(6, 9, generator=g) * 3
    t[1, :4] = -float("inf")  # ids a top-k teacher cache does not store
    t[4] = -1e5
    t[4, 2] = 100.0           # MinED's one-hot target logits
    y = torch.tensor([1, 0, -100, 8, 3, -100])
    has_kl = torch.tensor([1.0, 1, 1, 0, 1, 1])  # a row without a soft target
    T = 2.0

    def reference(b, w_ce, w_kl):
        ce = torch.nn.functional.cross_entropy(b, y, ignore_index=-100, reduction="sum")
        p = torch.softmax(t / T, -1)
        kl = (torch.special.xlogy(p, p) - p * (b / T).log_softmax(-1)).sum(-1) @ has_kl
        return w_ce * ce + w_kl * kl, ce, kl

    for targets, fn, w_ce, w_kl in ((y, lambda r0, r1: t[r0:r1], 0.7, 0.3), (y, None, 1.0, 0.0),
                                    (None, lambda r0, r1: t[r0:r1], 0.0, 1.5)):
        a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        got = ce_kl(a, targets, fn, T, w_ce, w_kl, has_kl)
        want = reference(b, w_ce, w_kl)
        want_ce = want[1].item() if targets is not None else 0.0
        want_kl = want[2].item() if fn is not None else 0.0
        assert [x.item() for x in got] == pytest.approx([want[0].item(), want_ce, want_kl], abs=1e-5)
        (3.0 * got[0]).backward()  # the saved gradient is scaled by the upstream one
        (3.0 * want[0]).backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6), (targets is None, fn is None)
        assert not got[1].requires_grad and not got[2].requires_grad
    # bf16 logits: the gradient is composed in fp32 and returned in the logits' dtype.
    a = z.bfloat16().requires_grad_(True)
    ce_kl(a, y, lambda r0, r1: t[r0:r1], T, 0.7, 0.3, has_kl)[0].backward()
    b = z.bfloat16().float().requires_grad_(True)
    reference(b, 0.7, 0.3)[0].backward()
    assert a.grad.dtype == torch.bfloat16 and torch.allclose(a.grad.float(), b.grad, atol=1e-2)
    # A target_fn that skips blocks: no KL, no gradient from it.
    a = z.clone().requires_grad_(True)
    loss, ce, kl = ce_kl(a, None, lambda r0, r1: None, T)
    loss.backward()
    assert loss.item() == ce.item() == kl.item() == 0 and (a.grad == 0).all()


def test_kd_refuses_mismatched_tokenizers(sides):
    student_side, teacher_side = sides
    assert methods.get("kd")[0].requires_same_tokenizer  # config validation refuses it too
    with pytest.raises(ValueError, match="student must use the teacher's tokenizer"):
        methods.build("kd", MethodContext.from_sides(None, None, student_side, teacher_side))
    lying = MethodContext(student=None, teacher=None, student_token_bytes=student_side.token_bytes,
                          teacher_token_bytes=teacher_side.token_bytes, same_tokenizer=True)
    with pytest.raises(ValueError, match="same bytes: False"):
        methods.build("kd", lying)


def test_kd_on_real_same_tokenizer_pair(tokenizers, corpus_texts):
    side = Side(tokenizers["bytelevel_bpe"], token_bytes(tokenizers["bytelevel_bpe"]))
    data = PairedDataset([s for t in corpus_texts for s in segment_text(t, 96)][:6], side, side)
    student = build_model(MODEL, side.tokenizer, seed=0, max_positions=256)
    teacher = build_model(MODEL, side.tokenizer, seed=0, max_positions=256).requires_grad_(False)
    method = methods.build("kd", MethodContext.from_sides(student, teacher, side, side))
    assert (method.kd_rate, method.temperature) == (0.5, 2.0)
    batch = collate([data[i] for i in range(len(data))], data, method)
    kwargs = lambda p: dict(input_ids=batch[f"{p}_input_ids"], attention_mask=batch[f"{p}_attention_mask"])  # noqa: E731
    loss, logs = method.loss(batch, student(**kwargs("student")), teacher(**kwargs("teacher")))
    assert abs(logs["kd"]) < 1e-5                                # identical models: zero KL
    assert loss.item() == pytest.approx(0.5 * logs["ce"], rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    other = build_model(MODEL, side.tokenizer, seed=1, max_positions=256).requires_grad_(False)
    _, logs = method.loss(batch, student(**kwargs("student")), other(**kwargs("teacher")))
    assert logs["kd"] > 1e-3
