"""Byte-level teacher agreement: zero against itself, the definition on a small case, dummy prefixes."""

import math

import pytest
import torch

from ctdbench.agreement import byte_agreement, byte_distributions
from ctdbench.byteprob import VocabByteIndex
from ctdbench.data import Side
from ctdbench.models import build_model
from ctdbench.tokbytes import token_bytes

MODEL = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


@pytest.fixture(scope="module")
def models(tokenizers):
    made = {}
    for seed, kind in enumerate(["bytelevel_bpe", "sentencepiece_bpe", "byte"]):
        tok = tokenizers[kind]
        made[kind] = (build_model(MODEL, tok, seed=seed, max_positions=512).eval(), Side(tok, token_bytes(tok)))
    return made


TEXTS = ["Now is the winter of our discontent", "  Naïve café — 東京\nSo fair and foul a day."]


@pytest.mark.parametrize("kind", ["bytelevel_bpe", "sentencepiece_bpe", "byte"])
def test_one_row_per_text_byte(models, kind):
    model, side = models[kind]
    for text in TEXTS:
        q, starts = byte_distributions(model, side, VocabByteIndex.build(side.token_bytes), text)
        assert q.shape[0] == len(starts) == len(text.encode("utf-8"))
        assert torch.allclose(q.sum(-1), torch.ones(len(q)), atol=1e-5)
        spans = side.encode(text)
        assert starts.nonzero().squeeze(1).tolist() == sorted({s for s, e in zip(spans.starts, spans.ends) if e > s})


def test_a_model_agrees_with_itself(models):
    model, side = models["sentencepiece_bpe"]
    result = byte_agreement(model, side, model, side, TEXTS)
    assert result["kl_per_byte"] == pytest.approx(0, abs=1e-6)
    assert result["kl_boundary"] == pytest.approx(0, abs=1e-6)
    assert result["top1"] == result["top1_boundary"] == 1.0
    assert result["n_bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS)


@pytest.mark.parametrize("student", ["byte", "sentencepiece_bpe"])
def test_kl_and_top1_follow_their_definition(models, student):
    (t_model, t_side), (s_model, s_side) = models["bytelevel_bpe"], models[student]
    result = byte_agreement(t_model, t_side, s_model, s_side, TEXTS)
    kl, agree, n = [0.0, 0.0], [0, 0], [0, 0]  # all bytes, shared token starts
    for text in TEXTS:
        qt, t_starts = byte_distributions(t_model, t_side, VocabByteIndex.build(t_side.token_bytes), text)
        qs, s_starts = byte_distributions(s_model, s_side, VocabByteIndex.build(s_side.token_bytes), text)
        qt, qs = qt.double(), qs.double()
        for a in range(len(qt)):
            # Student probabilities floored at 1e-12, as documented.
            term = sum(float(qt[a, b] * math.log2(qt[a, b] / max(qs[a, b], 1e-12)))
                       for b in range(qt.shape[1]) if qt[a, b] > 0)
            for k in ([0, 1] if t_starts[a] and s_starts[a] else [0]):
                kl[k] += term
                agree[k] += int(qt[a].argmax() == qs[a].argmax())
                n[k] += 1
    assert result["kl_per_byte"] == pytest.approx(kl[0] / n[0], rel=1e-4)
    assert result["top1"] == agree[0] / n[0]
    assert result["kl_boundary"] == pytest.approx(kl[1] / n[1], rel=1e-4)
    assert result["top1_boundary"] == agree[1] / n[1]
    assert result["n_boundary_bytes"] == n[1] < n[0] and result["kl_per_byte"] > 0.01
