"""BLD: Byte-Level Distillation (Singh, Wu, Cioba, Bernacchia, Buffelli; arXiv 2604.07466).

No official code exists. This follows the paper's abstract and, for what it leaves open, a
public third-party reimplementation that quotes the paper's equations and tables
(nktkt/hf-paper-lens, ``implementations/bld/bld.py``: the loss of Eq. 5 with lambda_b = 1.0 and
lambda_kl = 0.1 from Table 4, forward KL, 10 parallel byte heads over 260 symbols).

The teacher's next-token distributions are converted into next-byte distributions
(``ctdbench.byteprob``). A byte head on the student's final hidden state predicts, from the
position that predicts student token t_l, each of the first J bytes of t_l; distillation goes
through that shared byte interface. For every student token l that is a training target (the
loss mask: every real token of plain text, the assistant turns of chat data), with n_l bytes:

    L = CE(t_l | token head)
      + lambda_b  * mean_{l, j < min(n_l, J)} CE(b_lj | byte head j)
      + lambda_kl * mean_{l, j < min(n_l, J)} KL(P_T(b_lj | all bytes before) || q_S(. | l, j))

with J = 10, byte vocabulary S = 256 + n_special (260), lambda_b = 1.0, lambda_kl = 0.1,
temperature 1 (applied to the teacher's token logits before the conversion: a temperature on
the byte distributions would be a different thing).

Heads (``head``):
    linear       J parallel heads as one Linear(d, J * S), the paper's head. Head j cannot see
                 bytes b_<j of the token, so it fits the average of the teacher's conditionals
                 over the prefixes that occur.
    transformer  a small causal transformer over [proj(h), emb(b_0), ..., emb(b_{J-2})],
                 teacher-forced, so byte j is predicted given the token's previous bytes, which is
                 what the teacher's target conditions on.

The head trains with the student (in the method's own parameter group) and is dropped with the
method: the saved student is a plain Hugging Face model.

Deviations and choices where the sources are silent (temperature, conversion, reductions):
    - Conversion ``a1`` by default (covers that start at earlier teacher boundaries of the same
      pretoken as well, see ``ctdbench.byteprob``); ``conversion: a0`` gives the one-token
      "Marginalize-It" reading.
    - Byte CE and KL are means over the valid byte slots of the micro-batch, the token CE is the
      mean over tokens. Slots whose teacher distribution is masked (zero denominator) leave the KL
      only; ``kl_coverage`` logs the fraction that remain.
    - The extra symbols are the teacher's special tokens (at most ``n_special``), with their
      probability at teacher-token starts; student targets never use them.
    - Bytes past J of long student tokens get no byte loss (the paper's J = 10 cut-off). J is
      capped at the student's longest token (1 for a byte-level student): further heads would
      never be trained.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctdbench.byteprob import MODES, VocabByteIndex, next_byte_distributions_batch, text_rows
from ctdbench.kernels import LOG_ZERO, token_cross_entropy
from methods import register
from methods.base import DistillationMethod


class ByteHead(nn.Module):
    """Maps student hidden states [N, d] (and each token's bytes, for teacher forcing) to byte
    logits [N, J, S]; :meth:`slot_logits` returns only the slots that carry a loss."""

    def slot_logits(self, h: torch.Tensor, prev_bytes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Logits of the slots where ``valid`` [N, J] is true, in row-major order: [M, S]."""
        return self(h, prev_bytes)[valid]


class LinearByteHead(ByteHead):
    """J parallel byte classifiers on the hidden state: [N, d] -> [N, J, S] logits."""

    def __init__(self, hidden: int, n_bytes: int, n_symbols: int):
        super().__init__()
        self.shape = (n_bytes, n_symbols)
        self.proj = nn.Linear(hidden, n_bytes * n_symbols)

    def forward(self, h: torch.Tensor, prev_bytes: torch.Tensor) -> torch.Tensor:
        return self.proj(h).unflatten(-1, self.shape)

    def slot_logits(self, h: torch.Tensor, prev_bytes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # Head j only for the tokens that have a byte j: most tokens are much shorter than J, so
        # this skips most of the head's matmul and softmax work (one matmul per head, not per token).
        n_bytes, n_symbols = self.shape
        weight, bias = self.proj.weight.view(n_bytes, n_symbols, -1), self.proj.bias.view(n_bytes, n_symbols)
        rows = [valid[:, j].nonzero(as_tuple=True)[0] for j in range(n_bytes)]
        logits = torch.cat([F.linear(h[r], weight[j], bias[j]) for j, r in enumerate(rows)])
        head_major = torch.cat([r * n_bytes + j for j, r in enumerate(rows)])  # flat [N, J] index per slot
        return logits[torch.argsort(head_major)]


class TransformerByteHead(ByteHead):
    """A small causal transformer: byte j from h and the token's bytes b_<j. [N, d] -> [N, J, S]."""

    def __init__(self, hidden: int, n_bytes: int, n_symbols: int, width: int, layers: int, heads: int = 4):
        super().__init__()
        self.n_bytes = n_bytes
        self.inp = nn.Linear(hidden, width)
        self.byte_emb = nn.Embedding(n_symbols, width)
        self.pos = nn.Parameter(torch.zeros(n_bytes, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, n_symbols)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(n_bytes), persistent=False)

    def forward(self, h: torch.Tensor, prev_bytes: torch.Tensor) -> torch.Tensor:
        # Position 0 reads the hidden state; position j reads byte j - 1 (teacher forcing).
        x = torch.cat([self.inp(h)[:, None], self.byte_emb(prev_bytes[:, : self.n_bytes - 1])], dim=1) + self.pos
        return self.out(self.body(x, mask=self.causal, is_causal=True))


@register("bld")
class BLD(DistillationMethod):
    needs_teacher = True
    needs_hidden_states = True
    hparam_limits = {"lambda_b": "[0, inf)", "lambda_kl": "[0, inf)", "temperature": "(0, inf)",
                     "n_bytes": "[1, inf)", "n_special": "[1, inf)", "conversion": MODES,
                     "head": ("linear", "transformer"), "head_width": "[1, inf)", "head_layers": "[1, inf)",
                     "row_chunk": "[1, inf)"}

    def __init__(self, ctx, lambda_b: float = 1.0, lambda_kl: float = 0.1, temperature: float = 1.0,
                 n_bytes: int = 10, n_special: int = 4, conversion: str = "a1", head: str = "linear",
                 head_width: int = 128, head_layers: int = 1, row_chunk: int = 256):
        super().__init__(ctx)
        if head not in ("linear", "transformer"):
            raise ValueError(f"methods.bld.head: {head!r} is not one of linear, transformer")
        if conversion not in MODES:
            raise ValueError(f"methods.bld.conversion: {conversion!r} is not one of {', '.join(MODES)}")
        if temperature <= 0:
            raise ValueError(f"methods.bld.temperature: must be positive, got {temperature}")
        self.lambda_b, self.lambda_kl, self.temperature = lambda_b, lambda_kl, temperature
        # Heads past the student's longest token would never see a byte (a byte student needs one).
        longest = max((len(b) for b in ctx.student_token_bytes if b), default=1)
        self.n_bytes, self.n_symbols = min(n_bytes, longest), 256 + n_special
        self.conversion, self.row_chunk = conversion, row_chunk
        d = ctx.student_hidden_size
        self.head = (LinearByteHead(d, self.n_bytes, self.n_symbols) if head == "linear"
                     else TransformerByteHead(d, self.n_bytes, self.n_symbols, head_width, head_layers))
        self.index = VocabByteIndex.build(ctx.teacher_token_bytes)
        self.special_ids = sorted(i for i in ctx.teacher_special_ids if not ctx.teacher_token_bytes[i])[:n_special]
        byteless = [i for i, b in enumerate(ctx.teacher_token_bytes) if not b]
        if not byteless:
            raise ValueError("methods.bld: the teacher's vocabulary has no byte-less (special) token to mark rows "
                             "that predict nothing")
        self.byteless_id = byteless[0]

    def prepare(self, examples) -> dict[str, torch.Tensor]:
        """Byte slots of every student token that is a training target: the byte's position in the
        batch's concatenated text (-1 = no slot) and its value. [B, Ls, J] each."""
        width = max(len(e.student.ids) for e in examples)
        pos = np.full((len(examples), width, self.n_bytes), -1, dtype=np.int64)
        target = np.zeros((len(examples), width, self.n_bytes), dtype=np.int64)
        j = np.arange(self.n_bytes)
        offset = 0
        for b, ex in enumerate(examples):
            starts, ends = np.asarray(ex.student.starts), np.asarray(ex.student.ends)
            at = starts[:, None] + j
            valid = at < ends[:, None]
            if ex.student.loss is not None:
                valid &= np.asarray(ex.student.loss, dtype=bool)[:, None]
            text = np.frombuffer(ex.text, dtype=np.uint8)
            pos[b, : len(starts)] = np.where(valid, at + offset, -1)
            target[b, : len(starts)] = np.where(valid, text[np.minimum(at, len(text) - 1)], 0)
            offset += len(ex.text)
        return {"bld_pos": torch.from_numpy(pos), "bld_target": torch.from_numpy(target)}

    @torch.no_grad()
    def teacher_bytes(self, batch: dict, teacher_out) -> torch.Tensor:
        """The teacher's next-byte distribution at every text byte of the batch: [sum n_bytes, S]."""
        # Row k predicts token k + 1. Every row of the full, contiguous logits is converted, the
        # last row of each example and padding with a byte-less id, which yields no bytes: a
        # softmax over a non-contiguous slice, or rows gathered per chunk, cost several times more
        # on CPU. Probabilities, not log-probabilities: the converter then needs no exponentials.
        logits = teacher_out.logits.float()
        probs = (logits if self.temperature == 1 else logits / self.temperature).softmax(-1)
        has_next = F.pad(batch["teacher_attention_mask"][:, 1:].bool(), (0, 1))
        next_ids = F.pad(batch["teacher_input_ids"][:, 1:], (0, 1)).masked_fill(~has_next, self.byteless_id)
        q, _ = next_byte_distributions_batch(
            probs, next_ids, None, self.conversion, special_ids=self.special_ids, row_chunk=self.row_chunk,
            index=self.index, probs=True)
        # A SentencePiece teacher's dummy-prefix spaces are bytes of its tokens, not of the text.
        span = F.pad(batch["teacher_byte_ends"] - batch["teacher_byte_starts"], (0, 1))[:, 1:]
        q = q[text_rows(self.index.to(q.device).token_len[next_ids].flatten(), span.flatten())]
        if len(q) != int(batch["n_bytes"].sum()):
            raise ValueError(f"teacher tokens cover {len(q)} bytes of the text, the texts have {batch['n_bytes'].tolist()}")
        return F.pad(q, (0, self.n_symbols - q.shape[-1]))

    def loss(self, batch, student_out, teacher_out):
        ids, mask = batch["student_input_ids"], batch["student_loss_mask"]
        ce = token_cross_entropy(student_out.logits, ids, mask)
        # The hidden state at l - 1 predicts student token l: token l's slots pair with state l - 1.
        pos, target = batch["bld_pos"][:, 1:], batch["bld_target"][:, 1:]
        rows = (pos[..., 0] >= 0).nonzero(as_tuple=True)
        h = student_out.hidden_states[-1][:, :-1][rows].float()  # the head is fp32, the student may be bf16
        valid = pos[rows] >= 0
        logq = self.head.slot_logits(h, target[rows], valid).float().log_softmax(-1)  # [valid slots, S]
        pos, target = pos[rows][valid], target[rows][valid]
        byte_ce = F.nll_loss(logq, target.to(logq.device))
        p = self.teacher_bytes(batch, teacher_out)[pos.to(logq.device)]
        kl = byte_kl(p, logq)
        loss = ce + self.lambda_b * byte_ce + self.lambda_kl * kl
        return loss, {"ce": ce.item(), "byte_ce": byte_ce.item(), "byte_kl": kl.item(),
                      "kl_coverage": (p.sum(-1) > 0).float().mean().item()}


def byte_kl(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Mean of KL(p || q) in nats over the rows that have a target; p [N, S] probabilities (a row of
    zeros: no target, as the converter masks), logq [N, S]; 0 without any target.

    Symbols with p = 0 contribute 0, even where q = 0 too (logq = -inf). Computed as
    sum p log p - sum p log q over all rows, without gathering the rows that have a target
    (p log p needs no gradient; xlogy is slow on CPU).
    """
    n = (p.sum(-1) > 0).sum().clamp(min=1)
    with torch.no_grad():
        neg_entropy = torch.linalg.vecdot(p, p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum()
    cross = torch.linalg.vecdot(p, logq.clamp(min=LOG_ZERO)).sum()
    return (neg_entropy - cross) / n
