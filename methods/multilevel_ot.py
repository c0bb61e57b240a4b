"""MultiLevelOT: multi-level optimal transport for cross-tokenizer logit distillation.

Cui, Wang, Wang, Song, Cao, Hu (AAAI 2025; arXiv 2412.14528). Official code: 2018cx/Multi-Level-OT
(no licence: reimplemented, not copied), ``models/distillation_model.py::DistillationLoss`` with
``configs/*.py`` and ``recipes.sh``; read at @ 712cfb49ae (2026-02-04), history @ d8d298f (2025-04-20)
and @ 77e32ae (2025-01-16).

Positions are aligned as in ULD (the row predicting the student's target t against the row
predicting the teacher's target t; targets are the loss mask's tokens, so with a prompt the first
rows are the last prompt tokens', where the official code's answer slice starts), rows of both
sides zero-padded to L = the longest target sequence of either side in the batch. With z the
logits of one position, fp32:

    z~ = z / (std_v(z) + 1e-4)                     (unbiased std over the vocabulary, no centring)
    P  = top_50(softmax(z~ / T))                   sorted descending, [B, L, 50]; padded rows = 0
    L_abs[b] = (1 / n_b) sum_{t < n_b} sum_k |P_S[b,t,k] - P_T[b,t,k]|,  n_b = min(targets of b)
                                                   (0 for an example with n_b = 0, see below)
    L_log    = -(1 / (B L)) sum_{b, t < L} sum_k softmax(P_S[b,t])_k log softmax(P_T[b,t])_k
    X_b = softmax(P_T[b] / 2), Y_b = softmax(P_S[b] / 2)                  [L, 50] each
    C_b[i, j] = ||X_b[i] - Y_b[j]||_1,  K_b = exp(-C_b / 0.1)
    Pi_b = 10 Sinkhorn iterations from K_b: rows scaled to sum 1, then columns to sum 1
    L_sk = sum_b 0.001 * sum_ij Pi_b[i, j] C_b[i, j]
    KD = mean_b L_abs[b] + 0.1 L_log + 0.1 L_sk
    L  = 1.0 * CE(student) + 1.5 * KD

Gradients flow through P_S, C_b and the Sinkhorn iterations (autograd, as the official loop;
P_S's own backward through the top-k, softmax and scaling is hand-written and runs row block by
row block, so that no [N, V] intermediate is kept: ``TopProbs``). The Sinkhorn is POT's batched
Bregman projection (``ot.batch``, torch backend, ``grad="autodiff"``): it scales rows first and
starts from K, exactly the official update order, so 10 iterations give the official plan
(marginals of ones, not 1/L: the cost grows with L, as in the official code).

Official-code history, and what is followed:
    - Sorting. Paper-era code (77e32ae, d8d298f) sorts each position's distribution in descending
      order (ULD's "local" sort), then reorders columns by their batch-summed mass
      (``improved_sort``; a no-op after the per-row sort, whose column sums are already
      non-increasing) and keeps 50 columns: per-position top-50 (here
      ``torch.topk``'s values, found by a numpy partition on CPU). HEAD (712cfb4)
      comments the per-row sort out and keeps only the batch-global column order: every position
      is then compared on the batch's 50 most probable ids of each side (by summed mass), in that
      order, instead of on its own 50 largest probabilities. That order does not depend on the
      vocabulary's order either (permuting both vocabularies leaves HEAD's loss bit-identical).
      We follow the paper-era code because it is the code of the published results (HEAD came more
      than a year after the paper) and its token-level terms compare each position's own sorted
      distributions, as ULD does.
    - Batch bug. Before d8d298f the Sinkhorn loop assigned (``=``) instead of accumulating, so only
      the last example contributed; the fix (``+=``, kept at HEAD) is followed.
    - ``DistillationModel2`` (HEAD: student labels replaced by teacher argmax text) is unused by the
      recipes and not implemented; ``f=2`` (greedy column matching) is not implemented either.

Deviations (each with the reason):
    - No EOS is skipped: our segments carry none.
    - An example with no target on one side contributes 0 to L_abs's batch mean; the official
      per-example mean over zero rows is NaN and turns the whole batch's loss NaN. Reason: one
      empty example must not stop training.
    - Training data is the shared corpus, not teacher-generated answers (fixed for every method).
    - Padded rows are kept exactly as the official code has them (uniform rows after the softmax
      at T = 2, included in L_log's mean and in the Sinkhorn), but the Sinkhorn problem stores each
      side's identical padding rows once, with their count as marginal mass, and sizes the batch to
      the longest real sequence + 1 per side. Identical rows get identical scalings, so the plan,
      the cost and the gradients equal the official L x L problem's; it is ~3x smaller for the
      byte-level student, whose sequences are ~3.5x the teacher's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ctdbench.kernels import row_blocks, target_rows, token_cross_entropy
from methods import register
from methods.base import DistillationMethod


def top_probs(logits: torch.Tensor, target: torch.Tensor, width: int, k: int, temperature: float) -> torch.Tensor:
    """Top-k next-token probabilities of the std-normalised logits at the target rows, left-aligned,
    zero rows after each sequence.

    Args:
        logits: [B, L0, V].
        target: [B, K] the target rows of each example (``ctdbench.kernels.target_rows``; -1 = none).
        width: L, the padded number of rows (>= K).
        k: entries kept per row.

    Returns:
        [B, L, k], rows sorted in descending order.
    """
    B = logits.shape[0]
    b, j = (target >= 0).nonzero(as_tuple=True)
    top = TopProbs.apply(logits.flatten(0, 1), b * logits.shape[1] + target[b, j], min(k, logits.shape[-1]),
                         temperature)
    top = F.pad(top, (0, k - top.shape[-1]))  # a vocabulary smaller than k: zero-padded, as officially
    return top.new_zeros(B, width, k).index_put((b, j), top)


ROW_BLOCK = 1 << 22  # elements of one block of rows (16 MB of fp32)


class TopProbs(torch.autograd.Function):
    """The k largest entries, descending, of softmax(x / ((std(x) + 1e-4) T)) for each row x of
    ``logits[rows]`` (fp32 at least; unbiased std over the vocabulary, no centring of x).

    Forward and backward run block by block of rows, the backward recomputing each block's
    probabilities, so no [N, V] intermediate is kept or even built whole: at V = 248k, autograd
    through ``index_select``, the scaling, the softmax and ``gather`` held ~6 of them (0.5 GB
    each at 512 rows). The only vocabulary-sized tensor is the logits' gradient. The backward is
    the chain rule through ``gather`` (only the k kept columns receive a gradient), the softmax
    and the scaling; a constant row (std 0) gets no gradient through its std (torch's would be NaN).
    """

    @staticmethod
    def forward(ctx, logits, rows, k, temperature):
        blocks = row_blocks(len(rows), logits.shape[-1], ROW_BLOCK) or [slice(0, 0)]  # no rows: empty results
        top, idx, mean, std, c = (torch.cat(t) for t in zip(*(_top_block(logits, rows[sl], k, temperature)
                                                               for sl in blocks)))
        ctx.save_for_backward(logits, rows, idx, top, mean, std, c)
        return top

    @staticmethod
    def backward(ctx, g):
        logits, rows, idx, top, mean, std, c = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        V = logits.shape[-1]
        for sl in row_blocks(len(rows), V, ROW_BLOCK):
            x, gt = _rows(logits, rows[sl]), g[sl] * top[sl]
            # softmax: dz = p * (dp - sum(dp * p)), dp non-zero only at the kept columns
            dz = (x * c[sl]).softmax(-1).mul_(-gt.sum(-1, keepdim=True)).scatter_add_(-1, idx[sl], gt)
            # scaling z = x c(x), c = 1 / ((std(x) + 1e-4) T): dc/dstd = -c / (std + 1e-4)
            s = std[sl]
            coef = torch.where(s > 0, -torch.linalg.vecdot(dz, x)[:, None] * c[sl] / ((s + 1e-4) * (V - 1) * s), 0.0)
            grad.index_add_(0, rows[sl], dz.mul_(c[sl]).addcmul_(x - mean[sl], coef).to(grad.dtype))
        return grad, None, None, None


def _rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    x = logits.index_select(0, rows)  # not logits[rows]: advanced indexing is ~3x slower on CPU
    return x if x.dtype == torch.float64 else x.float()


def _top_block(logits, rows, k, temperature):
    """:class:`TopProbs`'s forward of one block: top [n, k], their columns, and mean, std, c [n, 1]."""
    x = _rows(logits, rows)
    mean = x.mean(-1, keepdim=True)
    d = x - mean
    std = (torch.linalg.vecdot(d, d)[:, None] / (x.shape[-1] - 1)).sqrt()
    c = ((std + 1e-4) * temperature).reciprocal()
    idx = top_indices(x, k)  # a positive per-row scale keeps the order: top-k of the raw logits
    return (x * c).softmax(-1).gather(-1, idx), idx, mean, std, c


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k largest entries of every row of ``x`` [N, V], in descending order of
    value: ``x.topk(k).indices`` (which may order ties differently).

    On CPU the k-th largest value of every row comes from numpy's partition (torch.topk costs ~20 us
    per row there); the entries at or above it are the top k unless a row has ties at that value,
    in which case torch.topk decides.
    """
    N, V = x.shape
    if x.device.type != "cpu" or k >= V or N == 0:
        return x.topk(k, -1).indices
    xn = x.numpy()
    kth = np.partition(xn, V - k, axis=-1)[:, V - k: V - k + 1]
    above = np.broadcast_to(np.arange(V), (N, V))[xn >= kth]  # columns, row by row (faster than torch's nonzero)
    if len(above) != N * k:  # ties at the k-th value
        return x.topk(k, -1).indices
    idx = torch.from_numpy(above.reshape(N, k))
    return idx.gather(-1, x.gather(-1, idx).argsort(-1, descending=True))


def _compact(probs: torch.Tensor, n: torch.Tensor, size: int, temperature: float):
    """Real rows of softmax(probs / T), then the shared padding row, then zero-mass filler rows.

    Returns:
        rows [B, size, k] and their marginal masses [B, size] (1 per real row, L - n_b for the
        padding row, 0 for filler).
    """
    B, L, k = probs.shape
    rows = (probs[:, :size] / temperature).softmax(-1)
    pos = torch.arange(size, device=probs.device)
    pad_row = torch.full((k,), 1.0 / k, dtype=rows.dtype, device=rows.device)   # softmax of a zero row
    rows = torch.where((pos[None, :, None] >= n[:, None, None]), pad_row, rows)
    mass = (pos[None] < n[:, None]).to(rows.dtype) + (pos[None] == n[:, None]) * (L - n[:, None]).to(rows.dtype)
    return rows, mass


def sinkhorn_cost(p_teacher: torch.Tensor, p_student: torch.Tensor, n_t: torch.Tensor, n_s: torch.Tensor, *,
                  epsilon: float = 0.1, iters: int = 10, temperature: float = 2.0) -> torch.Tensor:
    """sum_ij Pi[i, j] C[i, j] per example, as the official L x L problem (module docstring).

    Args:
        p_teacher / p_student: [B, L, k] top-k probabilities, zero rows after n_t[b] / n_s[b].
        n_t / n_s: [B] real rows per example.

    Returns:
        [B] transport costs.
    """
    L = p_teacher.shape[1]
    x, a = _compact(p_teacher, n_t, min(L, int(n_t.max()) + 1), temperature)
    y, b = _compact(p_student, n_s, min(L, int(n_s.max()) + 1), temperature)
    cost = torch.cdist(x, y, p=1)                                               # [B, Lt', Ls']
    return (sinkhorn_plan(cost, a, b, epsilon=epsilon, iters=iters) * cost).sum((1, 2))


def sinkhorn_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, epsilon: float, iters: int) -> torch.Tensor:
    """Entropic transport plans of a batch of problems, differentiable: POT (torch backend).

    Starts from K = exp(-cost / epsilon) and alternates row scaling (to ``a``) and column scaling
    (to ``b``) ``iters`` times, the official update order; no early stop.

    Args:
        cost: [B, n, m]; a: [B, n] and b: [B, m] marginals of equal totals per problem.

    Returns:
        [B, n, m] plans (columns meet ``b`` exactly, rows approach ``a``).
    """
    import ot  # here, not at module level: importing POT takes seconds and most runs never need it

    with torch.device(cost.device):  # POT creates its initial scalings on the default device
        return ot.batch.bregman_projection_batch(torch.exp(-cost / epsilon), a, b, max_iter=iters, tol=0.0,
                                                 grad="autodiff")["T"]


def multilevel_ot_loss(s_logits, t_logits, s_mask, t_mask, *, k: int = 50, student_temperature: float = 1.0,
                       teacher_temperature: float = 1.0, log_weight: float = 0.1, sinkhorn_weight: float = 0.1,
                       sinkhorn_scale: float = 1e-3, epsilon: float = 0.1, iters: int = 10,
                       sinkhorn_temperature: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    """KD of the module docstring (without CE and the distillation weight) and its terms.

    Args:
        s_logits: [B, Ls, Vs] student logits; t_logits: [B, Lt, Vt] teacher logits (constants).
        s_mask / t_mask: [B, Ls] / [B, Lt] loss masks: the k-th student target meets the k-th
            teacher target.
    """
    (rows_s, n_s), (rows_t, n_t) = target_rows(s_mask), target_rows(t_mask)
    L = int(torch.maximum(n_s, n_t).max())
    k = min(k, max(s_logits.shape[-1], t_logits.shape[-1]))
    with torch.no_grad():
        p_t = top_probs(t_logits, rows_t, L, k, teacher_temperature)
    p_s = top_probs(s_logits, rows_s, L, k, student_temperature)
    n_min = torch.minimum(n_s, n_t)
    both = (torch.arange(L, device=p_s.device) < n_min[:, None]).to(p_s.dtype)
    l_abs = (((p_s - p_t).abs().sum(-1) * both).sum(1) / n_min.clamp(min=1)).mean()
    # Official KL_wo(teacher, student): student softmax weights, teacher log-softmax, padded rows in.
    l_log = -(p_s.softmax(-1) * p_t.log_softmax(-1)).sum(-1).mean()
    l_sk = sinkhorn_scale * sinkhorn_cost(p_t, p_s, n_t, n_s, epsilon=epsilon, iters=iters,
                                          temperature=sinkhorn_temperature).sum()
    kd = l_abs + log_weight * l_log + sinkhorn_weight * l_sk
    return kd, {"abs": l_abs.item(), "log": l_log.item(), "sinkhorn": l_sk.item()}


@register("multilevel_ot")
class MultiLevelOT(DistillationMethod):
    needs_teacher = True
    # z / std_v(z) needs the teacher's logits over the whole vocabulary: the std and the softmax
    # normaliser at that scale are not determined by a top-k cache's log-probabilities.
    needs_full_teacher_vocab = True
    hparam_limits = {"crossentropy_weight": "[0, inf)", "distillation_weight": "[0, inf)", "top_k": "[1, inf)",
                     "student_temperature": "(0, inf)", "teacher_temperature": "(0, inf)",
                     "log_weight": "[0, inf)", "sinkhorn_weight": "[0, inf)", "sinkhorn_scale": "[0, inf)",
                     "sinkhorn_epsilon": "(0, inf)", "sinkhorn_iters": "[1, inf)",
                     "sinkhorn_temperature": "(0, inf)"}

    def __init__(self, ctx, crossentropy_weight: float = 1.0, distillation_weight: float = 1.5, top_k: int = 50,
                 student_temperature: float = 1.0, teacher_temperature: float = 1.0, log_weight: float = 0.1,
                 sinkhorn_weight: float = 0.1, sinkhorn_scale: float = 1e-3, sinkhorn_epsilon: float = 0.1,
                 sinkhorn_iters: int = 10, sinkhorn_temperature: float = 2.0):
        super().__init__(ctx)
        self.crossentropy_weight, self.distillation_weight = crossentropy_weight, distillation_weight
        self.kd_args = dict(k=top_k, student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                            log_weight=log_weight, sinkhorn_weight=sinkhorn_weight, sinkhorn_scale=sinkhorn_scale,
                            epsilon=sinkhorn_epsilon, iters=sinkhorn_iters, sinkhorn_temperature=sinkhorn_temperature)

    def loss(self, batch, student_out, teacher_out):
        s_ids, s_mask = batch["student_input_ids"], batch["student_loss_mask"]
        ce = token_cross_entropy(student_out.logits, s_ids, s_mask)
        kd, logs = multilevel_ot_loss(student_out.logits, teacher_out.logits, s_mask, batch["teacher_loss_mask"],
                                      **self.kd_args)
        loss = self.crossentropy_weight * ce + self.distillation_weight * kd
        return loss, {"ce": ce.item(), "kd": kd.item(), **logs}
