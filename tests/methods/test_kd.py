"""KD: refusal on mismatched pairs, the loss against a naive per-position implementation, zero KL
for identical models (tensors and real tiny models), and the fused CE+KL autograd function."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import methods
from ctdbench.data import PairedDataset, Side, collate, segment_text
from ctdbench.models import build_model
from ctdbench.tokbytes import token_bytes
from methods.base import MethodContext, token_cross_entropy
from methods.kd import ce_kl, forward_kl, kd_loss

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


def test_kd_is_zero_for_identical_logits_and_padding_is_ignored():
    z, t, ids, mask = random_batch(0)
    zz = z.clone().requires_grad_(True)
    _, _, kl = kd_loss(zz, z, ids, mask)
    (grad,) = torch.autograd.grad(kl, zz)
    assert abs(kl.item()) < 1e-6 and grad.abs().max() < 1e-7
    # Positions without a target (padding, the last position) do not count, whatever they hold.
    no_target = torch.ones_like(mask, dtype=torch.bool)
    no_target[:, :-1] = mask[:, 1:] == 0
    junk = lambda x: x.masked_fill(no_target[..., None], 1e3)  # noqa: E731
    assert torch.allclose(torch.stack(kd_loss(junk(z), junk(t), ids, mask)), torch.stack(kd_loss(z, t, ids, mask)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 8.0))
def test_kl_properties(seed, T):
    g = torch.Generator().manual_seed(seed)
    z, t = torch.randn(4, 11, generator=g) * 4, torch.randn(4, 11, generator=g) * 4
    kl = forward_kl(t, z, T)
    assert (kl > -1e-5).all()                                  # Gibbs
    assert torch.allclose(forward_kl(t, t, T), torch.zeros(4), atol=1e-5)
    assert torch.allclose(forward_kl(t + 3.0, z - 1.0, T), kl, atol=1e-4)  # shift invariance


@pytest.mark.parametrize("block", [1 << 18, 20])  # one block, and many blocks of two rows
def test_blockwise_ce_kl_matches_autograd(block, monkeypatch):
    monkeypatch.setattr("methods.kd.BLOCK", block)
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    y = torch.tensor([1, 0, -100, 8, 3, -100])
    w1, w2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    has_kl = torch.tensor([1.0, 1, 1, 0, 1, 1])  # a row without a soft target (all-zero p)

    target_fn = lambda r0, r1: t[r0:r1]  # noqa: E731

    for use in ("both", "ce", "kl"):
        a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        ce, kl = ce_kl(a, y, target_fn, 2.0, has_kl)
        ref_ce = torch.nn.functional.cross_entropy(b, y, ignore_index=-100, reduction="none")
        p = torch.softmax(t / 2.0, -1)
        ref_kl = (p * (p.log() - (b / 2.0).log_softmax(-1))).sum(-1) * has_kl
        assert torch.allclose(ce, ref_ce, atol=1e-6) and torch.allclose(kl, ref_kl, atol=1e-6)
        lhs = {"both": (ce * w1).sum() + (kl * w2).sum(), "ce": (ce * w1).sum(), "kl": (kl * w2).sum()}[use]
        rhs = {"both": (ref_ce * w1).sum() + (ref_kl * w2).sum(), "ce": (ref_ce * w1).sum(), "kl": (ref_kl * w2).sum()}[use]
        lhs.backward()
        rhs.backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6), use
    # No CE, and a target_fn that skips blocks.
    a = z.clone().requires_grad_(True)
    ce, kl = ce_kl(a, None, lambda r0, r1: None, 2.0)
    assert (ce == 0).all() and (kl == 0).all()


def _ctx(student_side, teacher_side, student=None, teacher=None):
    return MethodContext(student=student, teacher=teacher, student_token_bytes=student_side.token_bytes,
                         teacher_token_bytes=teacher_side.token_bytes,
                         same_tokenizer=student_side.token_bytes == teacher_side.token_bytes)


def test_kd_refuses_mismatched_tokenizers(sides):
    student_side, teacher_side = sides
    assert methods.get("kd")[0].requires_same_tokenizer  # config validation refuses it too
    with pytest.raises(ValueError, match="student must use the teacher's tokenizer"):
        methods.build("kd", _ctx(student_side, teacher_side))
    lying = MethodContext(student=None, teacher=None, student_token_bytes=student_side.token_bytes,
                          teacher_token_bytes=teacher_side.token_bytes, same_tokenizer=True)
    with pytest.raises(ValueError, match="same bytes: False"):
        methods.build("kd", lying)


def test_kd_on_real_same_tokenizer_pair(tokenizers, corpus_texts):
    side = Side(tokenizers["bytelevel_bpe"], token_bytes(tokenizers["bytelevel_bpe"]))
    data = PairedDataset([s for t in corpus_texts for s in segment_text(t, 96)][:6], side, side)
    student = build_model(MODEL, side.tokenizer, seed=0, max_positions=256)
    teacher = build_model(MODEL, side.tokenizer, seed=0, max_positions=256).requires_grad_(False)
    method = methods.build("kd", _ctx(side, side, student, teacher))
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
