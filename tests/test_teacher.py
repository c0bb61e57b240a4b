"""Teacher sources: the fp16 caches (full and top-k) reproduce the online teacher and refuse other
segments or another k."""

import pytest
import torch

from ctdbench.data import PairedDataset, collate, segment_text
from ctdbench.models import build_model
from ctdbench.teacher import CachedTeacher, OnlineTeacher, build_cache

TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


@pytest.fixture
def data_and_teacher(sides, corpus_texts):
    student, teacher_side = sides
    segments = [s for t in corpus_texts for s in segment_text(t, 96)][:10]
    data = PairedDataset(segments, student, teacher_side)
    model = build_model(TEACHER, teacher_side.tokenizer, seed=0, max_positions=256)
    return data, model


def test_cache_matches_online_teacher(data_and_teacher, tmp_path):
    data, model = data_and_teacher
    meta = build_cache(model, data, tmp_path, batch_size=3)
    assert meta["segments"] == len(data)
    cached, online = CachedTeacher(tmp_path, data), OnlineTeacher(model)
    batch = collate([data[i] for i in (7, 2, 5)], data)  # any order, ragged lengths
    a, b = cached(batch, hidden_states=True), online(batch, hidden_states=True)
    mask = batch["teacher_attention_mask"].bool()
    assert torch.allclose(a.logits[mask], b.logits[mask], atol=2e-2, rtol=1e-3)  # fp16 storage
    assert torch.allclose(a.hidden_states[-1][mask], b.hidden_states[-1][mask], atol=2e-2, rtol=1e-3)
    assert (a.logits[~mask] == 0).all()
    assert cached.cached and not online.cached


def test_cache_refuses_other_segments(data_and_teacher, tmp_path):
    data, model = data_and_teacher
    build_cache(model, data, tmp_path)
    other = PairedDataset([data[i].text.decode() for i in range(1, len(data))] + ["new text"],
                          data.student, data.teacher)
    with pytest.raises(ValueError, match="other segments"):
        CachedTeacher(tmp_path, other)


def _online_logprobs(model, batch):
    return OnlineTeacher(model)(batch).logits.float().log_softmax(-1)


def test_top_k_cache_keeps_the_teachers_k_largest_log_probs(data_and_teacher, tmp_path):
    data, model = data_and_teacher
    k = 7
    meta = build_cache(model, data, tmp_path, batch_size=3, top_k=k, hidden_states=False)
    assert (meta["top_k"], meta["hidden_states"]) == (k, False) and not (tmp_path / "hidden.npy").exists()
    cached = CachedTeacher(tmp_path, data, top_k=k)
    batch = collate([data[i] for i in (7, 2, 5)], data)  # any order, ragged lengths
    real = batch["teacher_attention_mask"].bool()
    online = _online_logprobs(model, batch)

    # The stored arrays: the k largest log-softmax values (ties may swap ids) at their ids, fp16.
    values, ids = cached._rows(cached.topk_logprobs, batch), cached._rows(cached.topk_ids, batch, torch.int64)
    assert torch.allclose(values[real], online.gather(-1, ids)[real], atol=1e-2)
    assert torch.allclose(values[real].sort(-1, descending=True).values, online.topk(k).values[real], atol=1e-2)

    # The dense logits: those log-probabilities and the observed next token's, -inf elsewhere.
    logits = cached(batch).logits
    support = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
    has_next = real & torch.nn.functional.pad(real[:, 1:], (0, 1))
    b, t = has_next.nonzero(as_tuple=True)
    support[b, t, batch["teacher_input_ids"][b, t + 1]] = True
    assert torch.isfinite(logits[support & real[..., None]]).all()
    assert (logits[~support & real[..., None]] == float("-inf")).all()
    assert torch.allclose(logits[support & real[..., None]], online[support & real[..., None]], atol=1e-2)
    assert (logits[~real] == 0).all()  # padding as in the full cache

    # Any softmax renormalises over the stored ids: the teacher's distribution restricted to them.
    restricted = online.exp() * support
    restricted = restricted / restricted.sum(-1, keepdim=True)
    assert torch.allclose(logits.softmax(-1)[real], restricted[real], rtol=5e-3, atol=1e-6)  # fp16 log p


def test_top_k_cache_with_k_beyond_the_vocabulary_is_the_full_cache(data_and_teacher, tmp_path):
    data, model = data_and_teacher
    vocab = model.get_output_embeddings().weight.shape[0]
    build_cache(model, data, tmp_path / "full")
    build_cache(model, data, tmp_path / "top", top_k=vocab + 5)
    batch = collate([data[i] for i in (4, 0, 9)], data)
    real = batch["teacher_attention_mask"].bool()
    full = CachedTeacher(tmp_path / "full", data)(batch, hidden_states=True)
    top = CachedTeacher(tmp_path / "top", data, top_k=vocab + 5)(batch, hidden_states=True)
    assert torch.isfinite(top.logits).all()
    assert torch.allclose(top.logits.softmax(-1)[real], full.logits.softmax(-1)[real], atol=1e-4)
    assert torch.equal(top.hidden_states[-1], full.hidden_states[-1])


def test_top_k_cache_hidden_states_only_when_stored(data_and_teacher, tmp_path):
    data, model = data_and_teacher
    build_cache(model, data, tmp_path / "with", top_k=4, hidden_states=True)
    build_cache(model, data, tmp_path / "without", top_k=4, hidden_states=False)
    batch = collate([data[i] for i in (3, 1)], data)
    real = batch["teacher_attention_mask"].bool()
    hidden = CachedTeacher(tmp_path / "with", data, top_k=4)(batch, hidden_states=True).hidden_states[-1]
    online = OnlineTeacher(model)(batch, hidden_states=True).hidden_states[-1]
    assert torch.allclose(hidden[real], online[real], atol=2e-2, rtol=1e-3)
    with pytest.raises(ValueError, match="without hidden states"):
        CachedTeacher(tmp_path / "without", data, top_k=4)(batch, hidden_states=True)


def test_cache_refuses_another_k(data_and_teacher, tmp_path):
    data, model = data_and_teacher
    build_cache(model, data, tmp_path / "top", top_k=4, hidden_states=False)
    build_cache(model, data, tmp_path / "full")
    with pytest.raises(ValueError, match="holds the top-4 teacher tokens, but this run expects the full vocabulary"):
        CachedTeacher(tmp_path / "top", data)
    with pytest.raises(ValueError, match="holds the top-4 teacher tokens, but this run expects the top-8"):
        CachedTeacher(tmp_path / "top", data, top_k=8)
    with pytest.raises(ValueError, match="holds the full vocabulary, but this run expects the top-4"):
        CachedTeacher(tmp_path / "full", data, top_k=4)
