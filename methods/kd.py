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
(``ctdbench.kernels.ce_kl``, shared with ``dskd`` and ``mined``): three softmaxes per element (z, z / T and
the teacher's t / T), the log-normalisers read off them, and the gradient written during the
forward, so the backward only scales it.

Deviations from the official code (each with the reason):
    - The sums are divided by the micro-batch's target count, not the global batch's under
      gradient accumulation (identical for grad_accum = 1, the default).
"""

from __future__ import annotations

import torch

from ctdbench.kernels import ce_kl, shifted_targets
from methods import register
from methods.base import DistillationMethod


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
    hparam_limits = {"kd_rate": "[0, 1]", "temperature": "(0, inf)"}

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
