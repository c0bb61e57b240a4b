"""Teacher sources: the fp16 cache reproduces the online teacher and refuses other segments."""

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
