"""Byte-level teacher agreement: how much of the teacher a student absorbed, tokenizer-free.

On held-out text, the teacher's and the student's next-token distributions are both converted to
next-byte distributions with the same converter (``ctdbench.byteprob``, mode a0), and compared
byte by byte: mean KL(teacher || student) in bits per byte, and top-1 byte agreement. Both sides
cover every byte of the text once, whatever their tokenizers, so students of different tokenizers
are comparable with each other and with the teacher.

Student byte probabilities are floored at 1e-12 inside the KL: a student whose vocabulary cannot
continue a within-token prefix with some byte would otherwise get an infinite KL from one byte.

Two readings are reported. Over **all bytes** (``kl_per_byte``, ``top1``), the conversion's
approximation differs between tokenizers: inside a token, a0 conditions on the token continuing
(tokens equal to the prefix are dropped), so a subword student whose token spans a teacher token
boundary (``"▁man,"`` against ``" man"`` + ``","``) is scored on its conditional among longer
tokens, which a small model calibrates badly; measured on the default config, such bytes carry
most of a SentencePiece student's KL. At **shared boundaries** (``kl_boundary``,
``top1_boundary``: bytes where both tokenizations start a token) both sides give the same
quantity, the distribution of the next token's first byte, so that reading compares students of
different tokenizers on equal terms (and is exact for every byte of a byte-level student).
"""

from __future__ import annotations

import math

import torch

from ctdbench.byteprob import VocabByteIndex, next_byte_distributions, text_rows
from ctdbench.data import Side

FLOOR = 1e-12


@torch.no_grad()
def byte_distributions(model, side: Side, index: VocabByteIndex, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_bytes, 256] next-byte distributions of ``model`` over the bytes of ``text``, and a
    [n_bytes] bool mask of the bytes that start one of its tokens.

    Bytes only: special tokens (EOS inside running text) are dropped and renormalised away, so
    both sides live on the same 256 symbols whatever their special tokens."""
    spans = side.encode(text)
    ids = torch.tensor(spans.ids, device=next(model.parameters()).device)
    logp = model(input_ids=ids[None]).logits[0, :-1].float().log_softmax(-1)  # row k predicts token k + 1
    q = next_byte_distributions(logp, ids[1:], side.token_bytes, index=index)
    span = torch.tensor(spans.ends[1:]) - torch.tensor(spans.starts[1:])
    q = q[text_rows(index.token_len[ids[1:].cpu()].to(q.device), span.to(q.device))]  # drop dummy-prefix spaces
    starts = torch.zeros(len(q), dtype=torch.bool)
    starts[[s for s, e in zip(spans.starts, spans.ends) if e > s]] = True
    return q, starts


def byte_agreement(teacher, teacher_side: Side, student, student_side: Side, texts: list[str]) -> dict:
    """KL(teacher || student) per byte (bits) and top-1 byte agreement over ``texts``, over all
    bytes and at the bytes where both tokenizations start a token (module docstring)."""
    t_index, s_index = VocabByteIndex.build(teacher_side.token_bytes), VocabByteIndex.build(student_side.token_bytes)
    sums = {"kl": 0.0, "agree": 0, "n": 0, "kl_b": 0.0, "agree_b": 0, "n_b": 0}
    for text in texts:
        qt, t_starts = byte_distributions(teacher, teacher_side, t_index, text)
        qs, s_starts = byte_distributions(student, student_side, s_index, text)
        if not (torch.isfinite(qt).all() and torch.isfinite(qs).all()):  # NaN rows would drop out as invalid
            raise FloatingPointError(f"non-finite next-byte distributions on held-out text {text[:40]!r}")
        valid = (qt.sum(-1) > 0) & (qs.sum(-1) > 0)
        qt, qs, shared = qt[valid].double(), qs[valid].double(), (t_starts & s_starts)[valid]
        kl = (torch.xlogy(qt, qt) - qt * qs.clamp_min(FLOOR).log()).sum(-1)
        agree = qt.argmax(-1) == qs.argmax(-1)
        sums["kl"] += kl.sum().item(); sums["agree"] += int(agree.sum()); sums["n"] += len(kl)
        sums["kl_b"] += kl[shared].sum().item(); sums["agree_b"] += int(agree[shared].sum())
        sums["n_b"] += int(shared.sum())
    if not sums["n"]:
        raise ValueError("byte agreement compared no byte (no text, or no byte both models predict)")
    n, n_b = sums["n"], max(sums["n_b"], 1)
    return {"kl_per_byte": sums["kl"] / n / math.log(2), "top1": sums["agree"] / n, "n_bytes": sums["n"],
            "kl_boundary": sums["kl_b"] / n_b / math.log(2), "top1_boundary": sums["agree_b"] / n_b,
            "n_boundary_bytes": sums["n_b"]}
