"""Paired data: segmentation, byte spans on both sides, the deterministic schedule."""

import pytest
import torch

from ctdbench.data import PairedDataset, Schedule, collate, segment_text, stream_digest, take_segments

TEXT = (
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "Café naïve — 東京 🙂 e\u0301\n" * 6
)


@pytest.mark.parametrize("size", [16, 40, 64, 1000])
def test_segments_reassemble_the_text(size):
    pieces = segment_text(TEXT, size)
    assert "".join(pieces) == TEXT
    assert all(len(p.encode()) <= size for p in pieces)


def test_take_segments_stops_at_the_byte_budget():
    segs = take_segments([TEXT, TEXT], 64, max_bytes=200)
    assert 200 <= sum(len(s.text.encode()) for s in segs) < 200 + 64


def test_both_sides_cover_the_same_bytes(sides):
    student, teacher = sides
    data = PairedDataset(segment_text(TEXT, 64), student, teacher)
    for ex in data:
        for side, spans in ((student, ex.student), (teacher, ex.teacher)):
            assert spans.ids[0] == side.bos_id and spans.starts[0] == spans.ends[0] == 0
            pieces = [side.token_bytes[i] for i in spans.ids[1:]]
            got = b"".join(ex.text[s:e] for s, e in zip(spans.starts[1:], spans.ends[1:]))
            assert got == ex.text
            assert spans.ends[-1] == len(ex.text)
            assert all(p is not None for p in pieces)


def test_collate_pads_right_and_masks(sides):
    student, teacher = sides
    data = PairedDataset(segment_text(TEXT, 64), student, teacher)
    batch = collate([data[0], data[1], data[2]], data)
    for side in ("student", "teacher"):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        assert ids.shape == mask.shape and mask[:, 0].all()
        lengths = mask.sum(1)
        for row, n in zip(ids, lengths):
            assert (row[n:] == data.student.pad_id if side == "student" else row[n:] == data.teacher.pad_id).all()
    assert batch["n_bytes"].tolist() == [len(data[i].text) for i in range(3)]


def test_schedule_is_a_function_of_seed_and_step():
    a, b = Schedule(50, 8, seed=3), Schedule(50, 8, seed=3)
    steps = [a.indices(s) for s in range(20)]
    assert [b.indices(s) for s in reversed(range(20))][::-1] == steps  # order of queries irrelevant
    epoch = sum(steps[:6], [])
    assert len(set(epoch)) == 48  # an epoch never repeats a segment (ragged tail dropped)
    assert Schedule(50, 8, seed=4).indices(0) != steps[0]


def test_schedule_needs_one_batch():
    with pytest.raises(ValueError, match="cannot fill a batch"):
        Schedule(3, 8, seed=0)


def test_stream_digest_depends_on_order(sides):
    student, teacher = sides
    data = PairedDataset(segment_text(TEXT, 32), student, teacher)
    d0 = stream_digest(data, Schedule(len(data), 2, 0), 3)
    assert d0 == stream_digest(data, Schedule(len(data), 2, 0), 3)
    assert d0 != stream_digest(data, Schedule(len(data), 2, 1), 3)
