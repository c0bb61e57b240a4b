"""DSKD: Dual-Space Knowledge Distillation with cross-model attention (DSKD-CMA).

Zhang, Zhang, Meng, Xu, Chen, Liu, Zhou, "Dual-Space Knowledge Distillation for Large Language
Models" (EMNLP 2024, arXiv 2406.17328). Reimplemented from songmzhang/DSKD @ 077337ac98,
``code/criterions/dual_space_kd_with_cross_model_attention.py``, ``various_divergence.py``,
``code/distiller.py``, ``configs/projector_config.json`` and ``scripts/*/dskd_cma_*.sh``
(kd_rate 0.5, kd_temperature 2.0, teacher_temperature 1.0, forward KL, projector lr 1e-3).

Positions are the HF-shifted ones: student position i reads x_i and predicts y_i = x_{i+1}
(likewise j on the teacher side); m_S, m_T mark the positions whose y is a training target (the
loss mask: every real token of plain text, the assistant turns of chat data, as the official
label -100 masks the prompt). E_S, E_T are the input embedding tables, W_S, W_T the LM heads
(frozen here: detached), h_S, h_T the final hidden states.

    Q     = W_q [E_S(x_S); E_S(y_S)]                                  query   Linear(2 d_S -> 2 d_T)
    K     = [E_T(x_T); E_T(y_T)] / std(.)                             (scalar std over m_T's rows)
    V_t2s = W_t2s (h_T / std(h_T) + E_T(y_T) / std(E_T(y_T)))         t2s     Linear(d_T -> d_S)
    V_s2t = W_s2t h_S                                                 s2t     Linear(d_S -> d_T)
    A     = Q K^T / sqrt(2 d_T) - 1e5 (1 - m_S m_T^T)                 [B, L_S, L_T]
    t2s   = (softmax(A) V_t2s) W_S^T           s2t = (softmax(A^T) V_s2t) W_T^T
    acc_i = [argmax t2s_i = y_i]
    KD    = sum_{m_S} CE(t2s, y_S)                                    trains the projectors
          + sum_{m_S, acc} KL(t2s.detach() / (T T_t) || z_S / T)      teacher -> student space
          + sum_{m_T} KL(z_T / T || s2t / T)                          student -> teacher space
    L     = (1 - kd_rate) CE(z_S, y_S) + kd_rate KD / N_S,  N_S = number of student targets

with T = 2.0 and the teacher temperature T_t = 1.0. Every sum is divided by the student's target
count, as the official loss_denom (the s2t sum over teacher positions included). No T^2 factor.
The projectors are this module's submodules: they train with the student at their own learning
rate (``param_groups``) and are never saved into the student checkpoint. ``needs_teacher_hidden_states``: a cached teacher provides its last
hidden state; the embeddings and LM head come from the frozen teacher model in the context.

Deviations from the official code (each with the reason):
    - The three standard deviations are taken over the teacher's target positions only (m_T: with
      a prompt mask, not the prompt's rows); the official code takes them over the whole padded
      tensor, whose non-target ids (padding and prompt) it has replaced by 0. Reason: the loss of
      an example then does not depend on how much padding its batch has, and a cached teacher
      (zeros at padded positions) gives the same loss as the online one. On plain text without
      padding the two agree.
    - The sums are divided by the micro-batch's student target count, not the global batch's
      (identical for grad_accum = 1, the default).
    - CE, argmax and KL are evaluated only at rows with a real target (the official code
      computes them everywhere and masks afterwards): same values, less work.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ctdbench.kernels import ce_kl, shifted_targets
from methods import register
from methods.base import DistillationMethod


def masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std of all entries of ``x`` [B, L, d] at positions where ``mask`` [B, L] is true."""
    return x[mask].std()


def dskd_loss(*, student_logits, student_hidden, student_ids, student_mask, student_embed, student_head,
              teacher_logits, teacher_hidden, teacher_ids, teacher_mask, teacher_embed, teacher_head,
              query: nn.Module, t2s: nn.Module, s2t: nn.Module, kd_rate: float = 0.5, temperature: float = 2.0,
              teacher_temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DSKD-CMA loss of the module docstring.

    Args:
        student_logits: [B, Ls, Vs]; student_hidden: [B, Ls, ds] final hidden states;
            student_ids / student_mask: [B, Ls] ids and loss mask (HF convention: position i
            predicts id i + 1; the mask marks the training targets).
        teacher_logits / teacher_hidden / teacher_ids / teacher_mask: the teacher's, [B, Lt, ...].
        student_embed / teacher_embed: [V, d] input embedding tables (used detached).
        student_head / teacher_head: [V, d] LM head weights (used detached: frozen).
        query, t2s, s2t: the projectors.

    Returns:
        The loss and its terms (``ce``, ``t2s_ce``, ``t2s_kd``, ``s2t_kd`` (each already divided
        by the student target count), ``t2s_acc``).
    """
    m_s, m_t = student_mask[:, 1:].bool(), teacher_mask[:, 1:].bool()       # training targets
    n_s = max(int(m_s.sum()), 1)
    x_s, y_s = student_ids[:, :-1] * m_s, student_ids[:, 1:] * m_s            # pads -> id 0, as upstream
    x_t, y_t = teacher_ids[:, :-1] * m_t, teacher_ids[:, 1:] * m_t
    with torch.no_grad():
        e_s = torch.cat([student_embed[x_s], student_embed[y_s]], -1).float()         # [B, Ls', 2 ds]
        e_in_t, e_tg_t = teacher_embed[x_t].float(), teacher_embed[y_t].float()
        key = torch.cat([e_in_t, e_tg_t], -1)
        key = key / masked_std(key, m_t)                                              # [B, Lt', 2 dt]
        h_t = teacher_hidden[:, :-1].float()
        v_in = h_t / masked_std(h_t, m_t) + e_tg_t / masked_std(e_tg_t, m_t)          # [B, Lt', dt]
    q = query(e_s)                                                                    # [B, Ls', 2 dt]
    v_t2s = t2s(v_in)                                                                 # [B, Lt', ds]
    v_s2t = s2t(student_hidden[:, :-1].float())                                       # [B, Ls', dt]
    align = q @ key.transpose(1, 2) / math.sqrt(key.shape[-1])
    align = align + (~(m_s[:, :, None] & m_t[:, None, :])) * -1e5                     # [B, Ls', Lt']

    # Flat [B * L, V] views and the rows with a real target: no copies of the logits, and the
    # row order equals that of x[m] (row-major).
    targets_s = shifted_targets(student_ids, student_mask)
    rows_s, rows_t = (torch.nonzero(shifted_targets(i, m) >= 0).squeeze(1)
                      for i, m in ((student_ids, student_mask), (teacher_ids, teacher_mask)))

    # Teacher -> student space, at the student's real targets only.
    t2s_hidden = (align.softmax(-1) @ v_t2s)[m_s]                                     # [N_s, ds]
    t2s_logits = t2s_hidden @ student_head.detach().float().T                         # [N_s, Vs]
    targets = targets_s[rows_s]
    w = kd_rate / n_s  # of every KD sum; the student's CE has (1 - kd_rate) / n_s
    loss_t2s_ce, t2s_ce, _ = ce_kl(t2s_logits, targets, ce_weight=w)
    # KL(t2s / (T * teacher_T) || z / T) at rows where t2s predicts the target: a soft target for
    # those rows of the student's flat logits, which also give the student's CE in the same pass.
    t2s_target = t2s_logits.detach()
    acc = t2s_target.argmax(-1) == targets
    source = torch.full_like(targets_s, -1).index_put_((rows_s[acc],), torch.nonzero(acc).squeeze(1))

    def t2s_fn(r0, r1):
        k = source[r0:r1]
        return t2s_target[k.clamp(min=0)] / teacher_temperature if (k >= 0).any() else None

    loss_student, ce, t2s_kd = ce_kl(student_logits.reshape(-1, student_logits.shape[-1]), targets_s, t2s_fn,
                                     temperature, (1 - kd_rate) / n_s, w, (source >= 0).float())

    # Student -> teacher space, at the teacher's real targets.
    s2t_hidden = (align.transpose(1, 2).softmax(-1) @ v_s2t)[m_t]                     # [N_t, dt]
    s2t_logits = s2t_hidden @ teacher_head.detach().float().T                         # [N_t, Vt]
    # The teacher's target rows gathered once: the KL reads every block of them.
    teacher_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).index_select(0, rows_t)
    loss_s2t, _, s2t_kd = ce_kl(s2t_logits, None, lambda r0, r1: teacher_rows[r0:r1], temperature, kl_weight=w)

    terms = {"ce": ce / n_s, "t2s_ce": t2s_ce / n_s, "t2s_kd": t2s_kd / n_s, "s2t_kd": s2t_kd / n_s,
             "t2s_acc": acc.float().mean() if len(acc) else acc.new_zeros((), dtype=torch.float)}
    return loss_t2s_ce + loss_student + loss_s2t, terms


@register("dskd")
class DSKD(DistillationMethod):
    needs_teacher = True
    needs_hidden_states = True
    needs_teacher_hidden_states = True
    hparam_limits = {"kd_rate": "[0, 1]", "temperature": "(0, inf)", "teacher_temperature": "(0, inf)",
                     "projector_lr": "(0, inf)"}

    def __init__(self, ctx, kd_rate: float = 0.5, temperature: float = 2.0, teacher_temperature: float = 1.0,
                 projector_lr: float = 1e-3):
        super().__init__(ctx)
        if ctx.teacher is None:
            raise ValueError("method 'dskd' needs the teacher model (its embeddings and LM head)")
        ds, dt = ctx.student_hidden_size, ctx.teacher_hidden_size
        # configs/projector_config.json: query "2s-2t", t2s "t-s", s2t "s-t", single nn.Linear each
        # (PyTorch's default initialisation, as upstream).
        self.projectors = nn.ModuleDict({
            "query": nn.Linear(2 * ds, 2 * dt), "t2s": nn.Linear(dt, ds), "s2t": nn.Linear(ds, dt),
        })
        self.kd_rate, self.temperature = kd_rate, temperature
        self.teacher_temperature, self.projector_lr = teacher_temperature, projector_lr

    def param_groups(self):
        return [{"params": list(self.projectors.parameters()), "lr": self.projector_lr}]

    def loss(self, batch, student_out, teacher_out):
        student, teacher = self.ctx.student, self.ctx.teacher
        loss, terms = dskd_loss(
            student_logits=student_out.logits, student_hidden=student_out.hidden_states[-1],
            student_ids=batch["student_input_ids"], student_mask=batch["student_loss_mask"],
            student_embed=student.get_input_embeddings().weight.detach(),
            student_head=student.get_output_embeddings().weight,
            teacher_logits=teacher_out.logits, teacher_hidden=teacher_out.hidden_states[-1],
            teacher_ids=batch["teacher_input_ids"], teacher_mask=batch["teacher_loss_mask"],
            teacher_embed=teacher.get_input_embeddings().weight.detach(),
            teacher_head=teacher.get_output_embeddings().weight,
            query=self.projectors["query"], t2s=self.projectors["t2s"], s2t=self.projectors["s2t"],
            kd_rate=self.kd_rate, temperature=self.temperature, teacher_temperature=self.teacher_temperature,
        )
        return loss, {k: v.item() for k, v in terms.items()}
