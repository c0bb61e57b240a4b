"""ULD: Universal Logit Distillation (Boizard, El Haddad, Hudelot, Colombo; arXiv 2402.12030, TMLR 2025).

Official code: Nicolas-BZRD/llm-recipes @ ab6e79800d, ``models/distillation_model.py::DistillationLoss``
with ``configs/distillation.py`` / ``configs/training.py`` (no licence: reimplemented, not copied).
The aligned variant follows TRL GOLD's extended ULD (huggingface/trl @ f2cd57710a,
``trl/experimental/gold/gold_trainer.py::ULDLoss``, ``uld_token_merge_strategy="bayesian"``).

With p_S = softmax(z_S / T_S), p_T = softmax(z_T / T_T) the next-token distributions (fp32):

    sorted_l1(p, q) = sum_k |p_(k) - q_(k)|     p_(k): k-th largest entry; the smaller vocabulary is
                                                zero-padded (the closed form of Wasserstein-1 used by ULD)
    uld:          the row predicting the student's t-th target against the row predicting the teacher's
                  t-th target, t < n_b, n_b = min(student targets, teacher targets) of example b
                  (truncated to the shorter); targets are the loss mask's tokens, so with a prompt
                  the first compared rows are the last prompt tokens', as the official code slices
    uld_aligned:  groups g = exact byte chunks (``ctdbench.align.chunks``) of the two tokenizations; inside
                  a group of tokens y_1..y_m (chain rule, GOLD "bayesian"):
                  P_g(v) = p(v | .., y_{m-1}) * prod_{i<m} max(p(y_i | .., y_{i-1}), 1e-8)
    D_b = (1 / n_b) sum_{rows of b} sorted_l1(P_S, P_T)          (n_b rows or groups of example b)
    L   = 1.0 * CE(student) + 1.5 * mean_b D_b                   (mean over the examples with n_b > 0)

Registered as ``uld`` (positional, the official alignment) and ``uld_aligned`` (byte groups). Both
use the official weights and temperatures; ``uld_aligned`` only changes the alignment.

Deviations from the official code (each with the reason):
    - No position is skipped for EOS (``skip_student_eos`` is on in the official training): our
      segments carry no EOS, so skipping would drop a real target.
    - Training data is the shared corpus, not teacher-generated answers (the benchmark fixes the
      data for every method; ULD's paper setting is SeqKD + ULD).
    - ``uld_aligned``: GOLD's default weights are CE 0 / distillation 1; ULD's (1 / 1.5) are kept so
      the variant differs from ``uld`` in the alignment only. Groups come from exact byte chunks of
      the shared text (GOLD walks byte offsets; the groups are the same).
    - An example without a compared row (no target on one side) is left out of the batch mean;
      llm-recipes' mean over its zero rows is NaN, and TRL's ``ULDLoss`` counts it as a 0 in its
      batch mean. Reason: the other examples' loss must not depend on it.

Conventions of TRL (``ULDLoss`` @ f2cd57710a) that differ: its default merge strategy
``"observed"`` slices the logits at the answer tokens' own positions, so every compared row
(plain and grouped) is one position later than here, predicting the token after the compared one;
``"bayesian"``, followed here, shifts the slice one position earlier, as llm-recipes does (its
slice starts at the last prompt token, which predicts the first answer token).

Implementation notes (same numbers, faster on CPU): the sorted L1 distance comes from the CPU sort
kernels of ``ctdbench.kernels`` (numpy sorts over torch's threads, a hand-written backward).
``uld_aligned`` scales the teacher's sorted split by the group factor instead of its rows (a
positive factor keeps the order), and normalises only the rows that predict a group's earlier
tokens for the factors.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch

from ctdbench.align import chunk_index, span_chunks, target_chunks
from ctdbench.kernels import scaled_rows, sorted_l1_of_logits, target_rows, teacher_split, token_cross_entropy
from methods import register
from methods.base import DistillationMethod

LOG_EPS = math.log(1e-8)  # GOLD's clamp of the merged scalar probabilities, 1e-8


def byte_groups(examples, teacher_special: np.ndarray, student_special: np.ndarray) -> dict[str, torch.Tensor]:
    """Exact byte-chunk alignment of every example (GOLD's byte-offset groups), as index tensors.

    A zero-length token (the SentencePiece dummy prefix at the start) joins the first group, as in
    GOLD's offset walk: its probability is a chain-rule factor of that group. Special tokens (BOS)
    belong to no group.

    Args:
        examples: ``PairedExample`` objects.
        teacher_special / student_special: [V] bool, each side's ids without bytes (specials).

    Returns:
        ``uld_row_teacher`` / ``uld_row_student`` [B, C]: logits row predicting the last token of each
        group (-1 = padding); ``uld_pre_teacher`` [B, Lt] / ``uld_pre_student`` [B, Ls]: the group of
        every token that is not its group's last (its probability is a chain-rule factor), else -1.
    """
    groups = [target_chunks(span_chunks(ex.teacher, ex.student, ~teacher_special[ex.teacher.ids],
                                        ~student_special[ex.student.ids]), ex.teacher.loss, ex.student.loss)
              for ex in examples]
    C = max(1, max(len(g) for g in groups))
    out = {}
    for side, name in enumerate(("teacher", "student")):
        width = max(len(getattr(e, name).ids) for e in examples)
        row = np.full((len(examples), C), -1, dtype=np.int64)
        pre = np.full((len(examples), width), -1, dtype=np.int64)
        for b, g in enumerate(groups):
            end = g[:, 2 * side + 1]
            row[b, : len(g)] = end - 2  # logits row t predicts token t + 1
            pre[b] = chunk_index(g, width, side)
            pre[b, end - 1] = -1
        out[f"uld_row_{name}"], out[f"uld_pre_{name}"] = torch.from_numpy(row), torch.from_numpy(pre)
    return out


def log_chain_factors(z, ids, pre, b, c, n_groups: int, temperature: float) -> torch.Tensor:
    """[N] log of the chain-rule factor of every compared group: the sum over the group's tokens
    before its last of log max(p(token), 1e-8) (differentiable for the student).

    Args:
        z: [B, L, V] logits; ids: [B, L]; pre: [B, L] group of each non-last token (-1 = none).
        b, c: [N] example and group of every compared row; n_groups: C, the number of group columns.
    """
    B, L, V = z.shape
    eb, et = (pre[:, 1:] >= 0).nonzero(as_tuple=True)  # token et + 1 of example eb is a factor; row et predicts it
    logits = scaled_rows(z.reshape(B * L, V), eb * L + et, temperature)
    token = logits.gather(-1, ids[eb, et + 1, None]).squeeze(-1) - logits.logsumexp(-1)
    per_group = token.new_zeros(B, n_groups).index_put_((eb, pre[eb, et + 1]), token.clamp_min(LOG_EPS), accumulate=True)
    return per_group[b, c]


@register("uld", aligned=False)
@register("uld_aligned", aligned=True)
class ULD(DistillationMethod):
    needs_teacher = True
    hparam_limits = {"crossentropy_weight": "[0, inf)", "distillation_weight": "[0, inf)",
                     "student_temperature": "(0, inf)", "teacher_temperature": "(0, inf)"}

    def __init__(self, ctx, aligned: bool = False, crossentropy_weight: float = 1.0, distillation_weight: float = 1.5,
                 student_temperature: float = 1.0, teacher_temperature: float = 1.0):
        super().__init__(ctx)
        self.aligned = aligned
        self.crossentropy_weight, self.distillation_weight = crossentropy_weight, distillation_weight
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature

    @cached_property
    def _special(self) -> list[np.ndarray]:
        """Each side's ids without bytes (specials), for the collator."""
        return [np.array([b is None for b in table], dtype=bool)
                for table in (self.ctx.teacher_token_bytes, self.ctx.student_token_bytes)]

    def prepare(self, examples):
        if not self.aligned:
            return {}
        return byte_groups(examples, *self._special)

    def loss(self, batch, student_out, teacher_out):
        s_ids, s_mask = batch["student_input_ids"], batch["student_loss_mask"]
        s_logits, t_logits = student_out.logits, teacher_out.logits
        (B, Ls, Vs), (_, Lt, Vt) = s_logits.shape, t_logits.shape
        k = min(Vs, Vt)
        ce = token_cross_entropy(s_logits, s_ids, s_mask)
        Ts, Tt = self.student_temperature, self.teacher_temperature
        if self.aligned:
            row_s, row_t = batch["uld_row_student"], batch["uld_row_teacher"]
            b, c = (row_t >= 0).nonzero(as_tuple=True)
            rs, rt = b * Ls + row_s[b, c], b * Lt + row_t[b, c]
            with torch.no_grad():  # scaling a row by its positive factor scales its sorted split
                top_t, rest_t = teacher_split(t_logits.reshape(B * Lt, Vt), rt, Tt, k)
                factor = log_chain_factors(t_logits, batch["teacher_input_ids"], batch["uld_pre_teacher"], b, c,
                                           row_t.shape[1], Tt).exp()
                top_t.mul_(factor[:, None]), rest_t.mul_(factor)
            scale = log_chain_factors(s_logits, s_ids, batch["uld_pre_student"], b, c, row_s.shape[1], Ts).exp()
        else:
            # Official alignment: target j of the student against target j of the teacher.
            (rows_s, n_s), (rows_t, n_t) = target_rows(s_mask), target_rows(batch["teacher_loss_mask"])
            n = torch.minimum(n_s, n_t)
            b, j = (torch.arange(int(n.max()), device=n.device) < n[:, None]).nonzero(as_tuple=True)
            top_t, rest_t = teacher_split(t_logits.reshape(B * Lt, Vt), b * Lt + rows_t[b, j], Tt, k)
            rs, scale = b * Ls + rows_s[b, j], None
        dist = sorted_l1_of_logits(s_logits.reshape(B * Ls, Vs), rs, Ts, top_t, rest_t, scale)
        rows = torch.zeros(B, device=dist.device).index_add_(0, b, torch.ones_like(dist))
        per_example = dist.new_zeros(B).index_add_(0, b, dist) / rows.clamp(min=1)
        uld = per_example.sum() / (rows > 0).sum().clamp(min=1)
        loss = self.crossentropy_weight * ce + self.distillation_weight * uld
        return loss, {"ce": ce.item(), "uld": uld.item()}
