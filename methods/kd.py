"""KD: forward-KL distillation over a shared vocabulary, the "no tokenizer mismatch" reference.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531), in the
form of DSKD's vanilla-KD baseline: songmzhang/DSKD @ 077337ac98, ``code/criterions/
various_divergence.py`` (``kd_objective=forward_kl``) with ``scripts/*/vanilla_kd_*.sh``
(kd_rate 0.5, kd_temperature 2.0, teacher_temperature 1.0). Shared notes: baselines.md §1, §5, §9.

It only applies when the student uses the teacher's tokenizer (same ids, same bytes): the row
that shows what a cross-tokenizer method could reach without the mismatch. The constructor
refuses any other pair.

With z the student's and t the teacher's logits at position i (both predict token i + 1), over
the N positions whose target is a real token:

    p_i = softmax(t_i / T),  log q_i = log_softmax(z_i / T)
    KL  = (1 / N) sum_i sum_v p_i(v) (log p_i(v) - log q_i(v))          (no T^2 factor)
    CE  = (1 / N) sum_i -log softmax(z_i)[y_i]
    L   = (1 - kd_rate) CE + kd_rate KL,   kd_rate = 0.5, T = 2.0

Cost: the student's CE and KL come from one pass over its logits in cache-sized row blocks with a
hand-written backward (:class:`RowCEKL`, shared with ``dskd`` and ``mined``); per block, one
log-softmax of the teacher (no grad) and of z / T, recomputed in the backward instead of stored.

Deviations from the official code (each with the reason):
    - Every non-padding token is a target (our data has no prompt/response split; DSKD masks the
      prompt with label -100).
    - The sums are divided by the micro-batch's target count, not the global batch's under
      gradient accumulation (identical for grad_accum = 1, the default).
"""

from __future__ import annotations

import torch

from methods import register
from methods.base import DistillationMethod, shifted_targets


BLOCK = 1 << 18  # elements of one row block (1 MB in fp32): a block's temporaries stay in cache
# Finite stand-in for log 0: ids a top-k teacher cache does not store have p = 0 and log p = -inf,
# and must add p * (log p - log q) = 0 to the KL, not 0 * -inf = NaN.
LOG_ZERO = -1e30


class RowCEKL(torch.autograd.Function):
    """Per-row CE(z, y) and KL(softmax(u / T) || softmax(z / T)) of the same logits, block by block.

    The [N, V] logits are read once forward and once backward; everything else (log-softmaxes,
    target probabilities, gradients) lives one cache-sized row block at a time and is recomputed
    in the backward pass instead of being stored. On CPU this is several times faster than
    autograd over full [N, V] temporaries, which are memory-bound and page-fault on allocation.
    """

    @staticmethod
    def forward(ctx, z, targets, target_fn, temperature, kl_mask):
        ce, kl = (torch.zeros(len(z), device=z.device) for _ in range(2))
        for r0, r1, zc in _blocks(z):
            if targets is not None:
                y = targets[r0:r1]
                ce[r0:r1] = -zc.log_softmax(-1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1) * (y >= 0)
            u = target_fn(r0, r1) if target_fn is not None else None
            if u is not None:
                u = u.float() / temperature
                # softmax, not logp.exp(): torch.exp takes a ~15x slower path on inputs below
                # -87 (underflow), which MinED's -1e5 one-hot targets fill almost entirely.
                logp, p = u.log_softmax(-1).clamp_(min=LOG_ZERO), u.softmax(-1)
                kl[r0:r1] = torch.linalg.vecdot(p, logp - (zc / temperature).log_softmax(-1))
        if kl_mask is not None:
            kl = kl * kl_mask
        ctx.save_for_backward(z, targets, kl_mask)
        ctx.target_fn, ctx.temperature = target_fn, temperature
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):
        z, targets, kl_mask = ctx.saved_tensors
        T, dz = ctx.temperature, torch.empty_like(z)
        if g_kl is not None and kl_mask is not None:
            g_kl = g_kl * kl_mask
        for r0, r1, zc in _blocks(z):
            d_ce = d_kl = None
            if targets is not None and g_ce is not None:
                y = targets[r0:r1]
                g = (g_ce[r0:r1] * (y >= 0))[:, None]
                d_ce = zc.softmax(-1).mul_(g).scatter_add_(-1, y.clamp(min=0)[:, None], -g)
            u = ctx.target_fn(r0, r1) if ctx.target_fn is not None and g_kl is not None else None
            if u is not None:  # d KL / dz = (softmax(z / T) - softmax(u / T)) / T
                w = (g_kl[r0:r1] / T)[:, None]
                d_kl = (zc / T).softmax(-1).sub_((u.float() / T).softmax(-1)).mul_(w)
            if d_ce is not None and d_kl is not None:
                torch.add(d_ce, d_kl, out=dz[r0:r1])
            else:
                dz[r0:r1] = d_ce if d_ce is not None else (d_kl if d_kl is not None else 0.0)
        return dz, None, None, None, None


def _blocks(z: torch.Tensor):
    step = max(1, BLOCK // z.shape[-1])
    for r0 in range(0, len(z), step):
        yield r0, min(r0 + step, len(z)), z[r0:r0 + step].float()


def ce_kl(z: torch.Tensor, targets: torch.Tensor | None = None, target_fn=None, temperature: float = 1.0,
          kl_mask: torch.Tensor | None = None):
    """Row-wise cross-entropy and KL to soft targets of logits ``z``, gradients to ``z`` only.

    Args:
        z: [N, V] logits (e.g. a flat view of [B, L, V]: no copy is made).
        targets: [N] next-token ids (-100: no CE), or None for no CE.
        target_fn: ``(r0, r1) -> u``, the target logits of rows r0:r1 ([r1 - r0, V], no gradient;
            None: no KL in this block), or None for no KL at all. It is called again in the
            backward pass: keep it cheap and deterministic.
        temperature: T of both softmaxes in the KL.
        kl_mask: [N] 0/1 weights of the KL rows (rows without a soft target), or None.

    Returns:
        ce [N] and kl [N] (fp32, zero where absent).
    """
    return RowCEKL.apply(z, targets, target_fn, temperature, kl_mask)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(z / T)) per row [N], gradients to the student logits only."""
    return ce_kl(student_logits, None, lambda r0, r1: teacher_logits[r0:r1], temperature)[1]


def kd_loss(student_logits, teacher_logits, input_ids, mask, *, kd_rate: float = 0.5, temperature: float = 2.0):
    """(loss, CE, KL) of the module docstring.

    Args:
        student_logits / teacher_logits: [B, L, V] over the same vocabulary and tokens.
        input_ids: [B, L]; mask: [B, L] attention mask (a target counts if it is a real token).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; both sides must share one tokenization")
    V = student_logits.shape[-1]
    targets = shifted_targets(input_ids, mask)
    has = (targets >= 0).float()
    n = has.sum().clamp(min=1)
    t = teacher_logits.reshape(-1, V)
    # All rows, padding included (weight 0): cheaper than gathering the real ones.
    ce, kl = ce_kl(student_logits.reshape(-1, V), targets, lambda r0, r1: t[r0:r1], temperature, has)
    ce, kl = ce.sum() / n, kl.sum() / n
    return (1 - kd_rate) * ce + kd_rate * kl, ce, kl


@register("kd")
class KD(DistillationMethod):
    needs_teacher = True
    requires_same_tokenizer = True

    def __init__(self, ctx, kd_rate: float = 0.5, temperature: float = 2.0):
        super().__init__(ctx)
        same_bytes = ctx.student_token_bytes == ctx.teacher_token_bytes
        if not (ctx.same_tokenizer and same_bytes):
            raise ValueError(
                "method 'kd' distils over a shared vocabulary, so the student must use the teacher's tokenizer; "
                f"this pair's tokenizers differ (student {len(ctx.student_token_bytes)} ids, teacher "
                f"{len(ctx.teacher_token_bytes)} ids, same bytes: {same_bytes}). Use a cross-tokenizer method "
                "(alm, dskd, mined, ...) or a same-tokenizer pair."
            )
        if ctx.teacher is not None and ctx.student_vocab_size != ctx.teacher_vocab_size:
            raise ValueError(f"method 'kd': the student's output vocabulary ({ctx.student_vocab_size}) differs from "
                             f"the teacher's ({ctx.teacher_vocab_size}) although the tokenizers are the same")
        self.kd_rate, self.temperature = kd_rate, temperature

    def loss(self, batch, student_out, teacher_out):
        loss, ce, kl = kd_loss(student_out.logits, teacher_out.logits, batch["student_input_ids"],
                               batch["student_loss_mask"], kd_rate=self.kd_rate, temperature=self.temperature)
        return loss, {"ce": ce.item(), "kd": kl.item()}
