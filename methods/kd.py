"""KD: forward-KL distillation over a shared vocabulary, the "no tokenizer mismatch" reference.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531), in the
form of DSKD's vanilla-KD baseline: songmzhang/DSKD @ 077337ac98, ``code/criterions/
various_divergence.py`` (``kd_objective=forward_kl``) with ``scripts/*/vanilla_kd_*.sh``
(kd_rate 0.5, kd_temperature 2.0, teacher_temperature 1.0).

It only applies when the student uses the teacher's tokenizer (same ids, same bytes): the row
that shows what a cross-tokenizer method could reach without the mismatch. The constructor
refuses any other pair.

With z the student's and t the teacher's logits at position i (both predict token i + 1), over
the N positions whose next token is a training target (the loss mask: every real token of plain
text, the assistant turns of chat data, as DSKD's label -100 masks the prompt):

    p_i = softmax(t_i / T),  log q_i = log_softmax(z_i / T)
    KL  = (1 / N) sum_i sum_v p_i(v) (log p_i(v) - log q_i(v))          (no T^2 factor)
    CE  = (1 / N) sum_i -log softmax(z_i)[y_i]
    L   = (1 - kd_rate) CE + kd_rate KL,   kd_rate = 0.5, T = 2.0

Cost: the student's CE and KL come from one pass over its logits in cache-sized row blocks
(:class:`FusedCEKL`, shared with ``dskd`` and ``mined``): three softmaxes per element (z, z / T and
the teacher's t / T), the log-normalisers read off them, and the gradient written during the
forward, so the backward only scales it.

Deviations from the official code (each with the reason):
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


class FusedCEKL(torch.autograd.Function):
    """``ce_weight * sum_i CE_i + kl_weight * sum_i KL_i`` of one logit matrix, its gradient made in the forward.

    CE_i = CE(z_i, y_i), KL_i = m_i KL(softmax(u_i / T) || softmax(z_i / T)). The loss is linear
    in the two sums, so its gradient, w_ce (softmax(z) - onehot(y)) + (w_kl m / T) (softmax(z / T)
    - softmax(u / T)), is known once the forward has its softmaxes: it is written block by block
    into one [N, V] buffer (the tensor autograd would allocate in the backward anyway) and the
    backward only scales it. Three softmaxes per element in all (the log-normalisers come from
    them: log sum exp x = x_max - log softmax(x)_max) instead of seven passes of exponentials over
    full [N, V] temporaries; everything except the gradient lives one cache-sized row block at a
    time.
    """

    @staticmethod
    def forward(ctx, z, targets, target_fn, temperature, ce_weight, kl_weight, kl_mask):
        grad = torch.empty_like(z) if ctx.needs_input_grad[0] else None
        ce_sum, kl_sum = (z.new_zeros((), dtype=torch.float) for _ in range(2))
        for r0, r1, zc in _blocks(z):
            # The gradient block is composed in place (fp32; copied if the logits are not).
            out = None if grad is None else grad[r0:r1] if grad.dtype == torch.float32 else torch.empty_like(zc)
            filled, z_max = False, zc.amax(-1)
            if targets is not None:
                y = targets[r0:r1]
                valid, y = y >= 0, y.clamp(min=0)[:, None]
                q = zc.softmax(-1)
                ce_sum += ((_logsumexp(z_max, q) - zc.gather(-1, y).squeeze(-1)) * valid).sum()
                if out is not None:  # w_ce (softmax(z) - onehot(y))
                    w = (ce_weight * valid)[:, None].float()
                    torch.mul(q, w, out=out).scatter_add_(-1, y, -w)
                    filled = True
            u = target_fn(r0, r1) if target_fn is not None else None
            if u is not None:
                zs, us = zc / temperature, u.float() / temperature
                # softmax, not exp(log_softmax): torch.exp takes a ~15x slower path on inputs below
                # -87 (underflow), which MinED's -1e5 one-hot targets fill almost entirely.
                qs, p = zs.softmax(-1), us.softmax(-1)
                # sum_v p (log p - log q) with sum_v p = 1; clamp: ids a top-k cache does not store
                # have u = -inf and p = 0, and must add 0, not 0 * -inf = NaN.
                kl = (torch.linalg.vecdot(p, (us - zs).clamp_(min=LOG_ZERO))
                      - _logsumexp(us.amax(-1), p) + _logsumexp(z_max / temperature, qs))
                m = kl_mask[r0:r1] if kl_mask is not None else torch.ones_like(kl)
                kl_sum += kl @ m
                if out is not None:  # (w_kl m / T) (softmax(z / T) - softmax(u / T))
                    w = (kl_weight / temperature * m)[:, None].float()
                    d = qs.sub_(p)
                    out.addcmul_(d, w) if filled else torch.mul(d, w, out=out)
                    filled = True
            if out is not None:
                if not filled:
                    out.zero_()
                if out.dtype != grad.dtype:
                    grad[r0:r1] = out
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return ce_weight * ce_sum + kl_weight * kl_sum, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kl):
        (grad,) = ctx.saved_tensors
        g = g_loss.to(grad.dtype)
        # Usually the loss is backpropagated as is: skip a pass over [N, V] (the check needs no
        # device sync on CPU, where the pass matters most).
        unit = grad.device.type == "cpu" and g.item() == 1.0
        return grad if unit else grad * g, None, None, None, None, None, None


def _logsumexp(x_max: torch.Tensor, softmax_x: torch.Tensor) -> torch.Tensor:
    """log sum exp of the rows of x from their maxima and their softmax, without exponentials.

    softmax is monotone, so its largest entry sits where x is largest: exp(x_max - lse) = p_max.
    (``amax``, not ``max``: the latter also finds the index and is ~7x slower on CPU.)
    """
    return x_max - softmax_x.amax(-1).log()


def _blocks(z: torch.Tensor):
    step = max(1, BLOCK // z.shape[-1])
    for r0 in range(0, len(z), step):
        yield r0, min(r0 + step, len(z)), z[r0:r0 + step].float()


def ce_kl(z: torch.Tensor, targets: torch.Tensor | None = None, target_fn=None, temperature: float = 1.0,
          ce_weight: float | torch.Tensor = 1.0, kl_weight: float | torch.Tensor = 1.0,
          kl_mask: torch.Tensor | None = None):
    """Weighted sums of the row-wise cross-entropy and KL to soft targets of logits ``z``.

    Args:
        z: [N, V] logits (e.g. a flat view of [B, L, V]: no copy is made).
        targets: [N] next-token ids (-100: no CE), or None for no CE.
        target_fn: ``(r0, r1) -> u``, the target logits of rows r0:r1 ([r1 - r0, V], no gradient;
            None: no KL in this block), or None for no KL at all. Called once per block.
        temperature: T of both softmaxes in the KL.
        ce_weight / kl_weight: scalar weights of the two sums in the loss.
        kl_mask: [N] 0/1 weights of the KL rows (rows without a soft target), or None.

    Returns:
        (loss, ce, kl): ``loss = ce_weight * ce + kl_weight * kl``, differentiable to ``z`` only;
        ``ce`` = sum of CE over rows with a target and ``kl`` = masked sum of KL (fp32, detached).
    """
    return FusedCEKL.apply(z, targets, target_fn, temperature, ce_weight, kl_weight, kl_mask)


def kd_loss(student_logits, teacher_logits, input_ids, mask, *, kd_rate: float = 0.5, temperature: float = 2.0):
    """(loss, CE, KL) of the module docstring.

    Args:
        student_logits / teacher_logits: [B, L, V] over the same vocabulary and tokens.
        input_ids: [B, L]; mask: [B, L] loss mask (token t + 1 is a target of position t where it is 1).
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
    loss, ce, kl = ce_kl(student_logits.reshape(-1, V), targets, lambda r0, r1: t[r0:r1], temperature,
                         (1 - kd_rate) / n, kd_rate / n, has)
    return loss, ce / n, kl / n


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
