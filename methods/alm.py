"""ALM: Approximate Likelihood Matching (Minixhofer, Vulić, Ponti; arXiv 2503.20083).

Reimplemented in PyTorch from tokenkit (bminixhofer/tokenkit @ bcacdef43f,
``tokenkit/training/losses.py::compute_alm_loss``), in its recommended configuration
(``losses=[sft, alm_unconstrained]``, ``alm_mode=merge_by_space_prob+append_space``, threshold 0.1,
``binary_ce``, tau 100, numerator = denominator = chunk count).

Chunks c are the finest spans where both tokenizations cover the same bytes (``ctdbench.align``).
With l_T, l_S the log-softmax of each model (fp32, clipped at 0):

    L_T(c)   = min(0, sum_{teacher tokens t in c} l_T(t | prefix))           (likewise L_S)
    sigma(t) = log sum_{v in Space} p(v | prefix up to t)   Space = tokens whose first byte is a
               space, newline or tab, or special tokens (space+tab+newline+special)
    merge:   a chunk boundary survives only where exp(sigma_T(last teacher token of c)) > 0.1;
             chunks between surviving boundaries are merged (sums of L and of token counts)
    append:  z_T = L_T + sigma_T(last token), z_S = L_S + sigma_S(last token)
    loss_c = BCE(Bern(exp(z_T / tau)) || Bern(exp(z_S / tau))) with a = z_T/tau - eps, b = z_S/tau - eps:
             -(e^a * b + (1 - e^a) * log(1 - e^b)),  tau = 100, eps = 1e-6
    L_ALM  = mean of loss_c over valid merged chunks

Registered as ``alm`` (L_ALM alone) and ``alm+sft`` (L_ALM and the student's CE, combined by a
plain mean as tokenkit's default aggregation, or by GradMag ``approx_gradmag_preserve_mag`` with
``gradmag: true``: w_i = 1 / ||grad of L_i w.r.t. the last transformer layer||, loss =
sum w_i L_i / sum w_i). GradMag needs the layer's whole weights, so on several GPUs it trains
with DDP (``profiles/accelerate/ddp.yaml``), not FSDP.

Deviations from tokenkit:
    - The mean is over valid chunks of the micro-batch, not of the global batch under gradient
      accumulation (identical when grad_accum = 1, the default).
    - Alignment comes from byte spans of the same text (our data pipeline) instead of
      byteified token strings; the chunks are the same: special tokens belong to no chunk, a bare
      SentencePiece dummy-prefix token joins the first chunk.
    - tokenkit drops chunks whose strings mismatch with a warning; here both sides always spell
      the same bytes by construction, and a mismatch is an error.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from ctdbench.align import chunk_index, span_chunks, target_chunks
from ctdbench.kernels import logprob_cross_entropy, row_blocks
from methods import register
from methods.base import DistillationMethod

SPACE_BYTES = (0x20, 0x0A, 0x09)


def space_mask(token_bytes: list[bytes | None]) -> torch.Tensor:
    """[V] 0/1 float mask of ids whose bytes start a new pretoken (space, newline, tab) or special."""
    return torch.tensor([float(b is None or (len(b) > 0 and b[0] in SPACE_BYTES)) for b in token_bytes])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def chunk_ids(examples, teacher_special: np.ndarray, student_special: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token chunk index of each side (-1 = in no chunk): ([B, Lt], [B, Ls]).

    Every token with bytes takes part, so a bare SentencePiece dummy prefix (an empty span in
    the text) joins the first chunk, as in tokenkit; special tokens (``*_special``: [V] bool, the
    ids without bytes) belong to no chunk.
    """
    widths = max(len(e.teacher.ids) for e in examples), max(len(e.student.ids) for e in examples)
    ids = [np.full((len(examples), w), -1, dtype=np.int64) for w in widths]
    for b, ex in enumerate(examples):
        found = target_chunks(span_chunks(ex.teacher, ex.student, ~teacher_special[ex.teacher.ids],
                                          ~student_special[ex.student.ids]), ex.teacher.loss, ex.student.loss)
        for side, (out, width) in enumerate(zip(ids, widths)):
            out[b] = chunk_index(found, width, side)
    return torch.from_numpy(ids[0]), torch.from_numpy(ids[1])


def chunk_logprobs(logp: torch.Tensor, ids: torch.Tensor, chunk: torch.Tensor, space: torch.Tensor, n_chunks: int):
    """Chunk log-likelihoods, token counts and the space log-probability after each chunk.

    Args:
        logp: [B, L, V] log-probabilities (fp32); position t predicts token t + 1.
        ids: [B, L] token ids; chunk: [B, L] chunk index per token (-1 = none).
        space: [V] float 0/1 mask of the space set.
        n_chunks: C, the number of chunk columns.

    Returns:
        L [B, C] (clipped at 0), n [B, C] token counts, sigma [B, C] at each chunk's last token.
    """
    token_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).clamp(max=0)  # [B, L-1]
    target_chunk = chunk[:, 1:]
    valid = target_chunk >= 0
    col = torch.where(valid, target_chunk, n_chunks)                              # dump column C
    B = ids.shape[0]
    L = logp.new_zeros(B, n_chunks + 1).scatter_add_(1, col, token_lp * valid)[:, :n_chunks].clamp(max=0)
    n = logp.new_zeros(B, n_chunks + 1).scatter_add_(1, col, valid.to(logp.dtype))[:, :n_chunks]
    pos = torch.arange(chunk.shape[1], device=chunk.device).expand_as(chunk)
    col_all = torch.where(chunk >= 0, chunk, n_chunks)
    last = torch.zeros(B, n_chunks + 1, dtype=torch.long, device=chunk.device).scatter_reduce_(
        1, col_all, pos, reduce="amax", include_self=True)[:, :n_chunks]
    space_mass = SpaceMass.apply(logp, space)
    sigma = space_mass.clamp_min(1e-30).log().clamp(max=0).gather(1, last)
    return L, n, sigma


class SpaceMass(torch.autograd.Function):
    """exp(logp) @ space: the probability mass on the space set at each position of logp [..., V]
    (a matrix-vector product with the 0/1 mask ``space`` [V]).

    Row block by row block, and the backward recomputes the exponentials from ``logp`` (kept for
    the softmax's backward anyway): autograd through ``exp`` and the product kept exp(logp) and
    built two more [..., V] tensors in the backward, 0.5 GB each at V = 248k and 512 positions.
    """

    @staticmethod
    def forward(ctx, logp, space):
        ctx.save_for_backward(logp, space)
        flat = logp.flatten(0, -2)
        blocks = [flat[sl].exp() @ space for sl in row_blocks(len(flat), flat.shape[-1])]
        return torch.cat(blocks or [flat.new_zeros(0)]).view(logp.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        logp, space = ctx.saved_tensors
        flat, g = logp.flatten(0, -2), g.reshape(-1, 1)
        grad = torch.empty_like(flat)
        for sl in row_blocks(len(flat), flat.shape[-1]):
            torch.mul(flat[sl].exp(), space, out=grad[sl]).mul_(g[sl])
        return grad.view_as(logp), None


def merge_by_space_prob(LT, LS, n, sT, sS, threshold: float):
    """Merge chunks until the teacher's space probability after them exceeds ``threshold``."""
    keep = (sT.exp() > threshold).long()
    group = keep.cumsum(-1) - keep                       # exclusive cumsum: kept chunk closes its group
    C = LT.shape[1]
    valid = n > 0
    gcol = torch.where(valid, group, C)
    merged = [x.new_zeros(x.shape[0], C + 1).scatter_add_(1, gcol, x * valid)[:, :C] for x in (LT, LS, n)]
    idx = torch.arange(C, device=LT.device).expand_as(group)
    # Last valid chunk of each group: its space probabilities are the merged chunk's.
    last = torch.full((LT.shape[0], C + 1), -1, dtype=torch.long, device=LT.device)
    last = last.scatter_reduce_(1, gcol, torch.where(valid, idx, -1), reduce="amax")[:, :C]
    has = last >= 0
    take = last.clamp(min=0)
    return (*merged, sT.gather(1, take) * has, sS.gather(1, take) * has)


def alm_loss(teacher_logp, teacher_ids, teacher_chunk, student_logp, student_ids, student_chunk,
             space_t, space_s, *, tau: float = 100.0, threshold: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """The ALM binary-CE loss, averaged over valid merged chunks (module docstring).

    Args:
        teacher_logp / student_logp: [B, L, V] fp32 log-probabilities.
        space_t / space_s: [V] 0/1 masks of each side's space set (:func:`space_mask`).
    """
    C = int(max(teacher_chunk.max(), student_chunk.max()).item()) + 1
    if C <= 0:
        return student_logp.sum() * 0.0
    with torch.no_grad():
        LT, n, sT = chunk_logprobs(teacher_logp, teacher_ids, teacher_chunk, space_t, C)
    LS, _, sS = chunk_logprobs(student_logp, student_ids, student_chunk, space_s, C)
    LT, LS, n, sT, sS = merge_by_space_prob(LT, LS, n, sT, sS, threshold)
    valid = n > 0
    a = (LT + sT) / tau - eps
    b = (LS + sS) / tau - eps
    bce = -(a.exp() * b + (-a.expm1()) * log1mexp(b))
    return (bce * valid).sum() / valid.sum().clamp(min=1)


def last_layer_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the last transformer block (for GradMag), found as the last ModuleList."""
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    params = [p for p in blocks[-1][-1].parameters() if p.requires_grad]
    if any(isinstance(p, DTensor) for p in params):
        # Outside the block's own forward FSDP holds only shards, which the loss never used.
        raise RuntimeError("ALM's GradMag differentiates the last block's weights, which FSDP shards; "
                           "train it on several GPUs with accelerate_config: profiles/accelerate/ddp.yaml")
    return params


@register("alm", sft=False)
@register("alm+sft", sft=True)
class ALM(DistillationMethod):
    needs_teacher = True
    hparam_limits = {"tau": "(0, inf)", "threshold": "[0, 1]"}

    def __init__(self, ctx, sft: bool = True, tau: float = 100.0, threshold: float = 0.1, gradmag: bool = False):
        super().__init__(ctx)
        self.sft, self.tau, self.threshold, self.gradmag = sft, tau, threshold, gradmag
        self.register_buffer("space_t", space_mask(ctx.teacher_token_bytes), persistent=False)
        self.register_buffer("space_s", space_mask(ctx.student_token_bytes), persistent=False)
        self._special = [np.array([b is None for b in t]) for t in (ctx.teacher_token_bytes, ctx.student_token_bytes)]

    def prepare(self, examples):
        ct, cs = chunk_ids(examples, *self._special)
        return {"alm_chunk_teacher": ct, "alm_chunk_student": cs}

    def loss(self, batch, student_out, teacher_out):
        with torch.no_grad():
            teacher_logp = teacher_out.logits.float().log_softmax(-1)
        # One student log-softmax serves both the ALM term and the CE term.
        student_logp = student_out.logits.float().log_softmax(-1)
        ids, mask = batch["student_input_ids"], batch["student_loss_mask"]
        alm = alm_loss(teacher_logp, batch["teacher_input_ids"], batch["alm_chunk_teacher"],
                       student_logp, ids, batch["alm_chunk_student"],
                       self.space_t, self.space_s, tau=self.tau, threshold=self.threshold)
        logs = {"alm": alm.item()}
        if not self.sft:
            return alm, logs
        ce = logprob_cross_entropy(student_logp, ids, mask)
        logs["ce"] = ce.item()
        if not self.gradmag:
            return (ce + alm) / 2, logs
        params = last_layer_parameters(self.ctx.student)
        weights = []
        for term in (ce, alm):
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            weights.append(1.0 / (norm + 1e-8))
        total = sum(weights)
        logs.update(w_ce=(weights[0] / total).item(), w_alm=(weights[1] / total).item())
        return (weights[0] * ce + weights[1] * alm) / total, logs
