"""Byte-level teacher agreement: how much of the teacher a student absorbed, tokenizer-free.

On held-out text, the teacher's and the student's next-token distributions are both converted to
next-byte distributions with the same converter (``ctdbench.byteprob``, mode a0), and compared
byte by byte: mean KL(teacher || student) in bits per byte, and top-1 byte agreement. Both sides
cover every byte of the text once, whatever their tokenizers, so students of different tokenizers
are comparable with each other and with the teacher.

Student byte probabilities are floored at 1e-12 inside the KL: a student whose vocabulary cannot
continue a within-token prefix with some byte would otherwise get an infinite KL from one byte.
"""

from __future__ import annotations

import math

import torch

from ctdbench.byteprob import VocabByteIndex, next_byte_distributions
from ctdbench.data import Side

FLOOR = 1e-12


@torch.no_grad()
def byte_distributions(model, side: Side, index: VocabByteIndex, text: str) -> torch.Tensor:
    """[n_bytes, 256] next-byte distributions of ``model`` over the bytes of ``text``.

    Bytes only: special tokens (EOS inside running text) are dropped and renormalised away, so
    both sides live on the same 256 symbols whatever their special tokens."""
    spans = side.encode(text)
    ids = torch.tensor(spans.ids, device=next(model.parameters()).device)
    logp = model(input_ids=ids[None]).logits[0, :-1].float().log_softmax(-1)  # row k predicts token k+1
    q = next_byte_distributions(logp, ids[1:], side.token_bytes, index=index)
    extra = q.shape[0] - len(text.encode("utf-8"))
    return q[extra:]  # a SentencePiece dummy-prefix space is not part of the text


def byte_agreement(teacher, teacher_side: Side, student, student_side: Side, texts: list[str]) -> dict:
    """Mean KL(teacher || student) per byte (bits) and top-1 byte agreement over ``texts``."""
    t_index, s_index = VocabByteIndex.build(teacher_side.token_bytes), VocabByteIndex.build(student_side.token_bytes)
    kl_sum, agree, n = 0.0, 0, 0
    for text in texts:
        qt = byte_distributions(teacher, teacher_side, t_index, text)
        qs = byte_distributions(student, student_side, s_index, text)
        valid = (qt.sum(-1) > 0) & (qs.sum(-1) > 0)
        qt, qs = qt[valid].double(), qs[valid].double()
        kl_sum += (torch.xlogy(qt, qt) - qt * qs.clamp_min(FLOOR).log()).sum().item()
        agree += (qt.argmax(-1) == qs.argmax(-1)).sum().item()
        n += int(valid.sum())
    return {"kl_per_byte": kl_sum / max(n, 1) / math.log(2), "top1": agree / max(n, 1), "n_bytes": n}
