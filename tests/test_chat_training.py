"""Chat data through training: markers as byte-less tokens shared by both sides, loss on the
assistant turns only, for every method."""

import copy
import json

import numpy as np
import pytest
import torch

import methods
from ctdbench.align import chunks, span_chunks
from ctdbench.chat import LLAMA3_TEMPLATE, render_chat
from ctdbench.corpus import read_jsonl
from ctdbench.data import PairedDataset, Segment, Side, collate, segment_document, take_segments
from ctdbench.models import build_model
from ctdbench.teacher import OnlineTeacher
from ctdbench.tokbytes import token_bytes
from ctdbench.train import step_loss
from methods.base import MethodContext

MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def conversation(last_question: str, last_answer: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare wrote it, around 1600."},
        {"role": "user", "content": last_question},
        {"role": "assistant", "content": last_answer},
    ]


def with_markers(tokenizer, markers=MARKERS) -> Side:
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(list(markers), special_tokens=True)
    return Side(tok, token_bytes(tok))


@pytest.fixture(scope="module")
def chat_sides(tokenizers):
    """name -> Side with the Llama-3 chat markers added, for each tokenizer kind."""
    return {kind: with_markers(tok) for kind, tok in tokenizers.items()}


def chat_segment(question="And Macbeth?", answer="He did too, in 1606.", first_turn_only=False) -> Segment:
    text, spans = render_chat(conversation(question, answer), LLAMA3_TEMPLATE)
    return Segment(text, tuple(spans[:1] if first_turn_only else spans))


@pytest.mark.parametrize("student", ["sentencepiece_bpe", "byte"])
def test_markers_are_byte_less_tokens_and_both_sides_share_the_content(chat_sides, student):
    seg = chat_segment()
    data = PairedDataset([seg], chat_sides[student], chat_sides["bytelevel_bpe"])
    ex = data[0]
    content = seg.text
    for m in MARKERS:
        content = content.replace(m, "")
    assert ex.text == content.encode()
    for side, spans in ((data.student, ex.student), (data.teacher, ex.teacher)):
        is_marker = [side.token_bytes[i] is None for i in spans.ids]
        assert sum(is_marker) == seg.text.count("<|") + 1  # every marker, and BOS
        assert all(s == e for s, e, m in zip(spans.starts, spans.ends, is_marker) if m)
        # The ordinary tokens tile the content (a dummy-prefix space aside).
        covered = b"".join(ex.text[s:e] for s, e, m in zip(spans.starts, spans.ends, is_marker) if not m)
        assert covered == ex.text
        # Targets: the tokens of the two answers and the <|eot_id|> closing each, nothing else.
        eot = side.special_ids["<|eot_id|>"]
        target_eots = [i for i, t in zip(spans.ids, spans.loss) if t and i == eot]
        assert len(target_eots) == 2 and not spans.loss[0]
        target_text = b"".join(ex.text[s:e] for s, e, t in zip(spans.starts, spans.ends, spans.loss) if t)
        assert target_text.strip() == b"Shakespeare wrote it, around 1600.He did too, in 1606."


def test_span_chunks_equal_byte_chunks_on_chat_data(chat_sides):
    """Chunks from spans (markers and dummy prefixes as empty spans) equal chunks of the spans'
    bytes, in both conventions: specials out (ULD) and empty spans out (ALM, MinED)."""
    segments = [chat_segment(), chat_segment(" leading space", ""), Segment(" x <|eot_id|> y"), Segment("<|eot_id|>"),
                Segment("")]
    for a in chat_sides.values():
        for b in chat_sides.values():
            for ex in PairedDataset(segments, a, b):
                sides = ((ex.teacher, b.token_bytes), (ex.student, a.token_bytes))
                special = [np.array([table[i] is None for i in sp.ids]) for sp, table in sides]
                by_bytes = [[None if table[i] is None else ex.text[s:e] for i, s, e in zip(sp.ids, sp.starts, sp.ends)]
                            for sp, table in sides]
                assert span_chunks(ex.teacher, ex.student, ~special[0], ~special[1]).tolist() == \
                    [list(c) for c in chunks(*by_bytes)]
                nonempty = [[ex.text[s:e] if e > s else None for s, e in zip(sp.starts, sp.ends)] for sp, _ in sides]
                assert span_chunks(ex.teacher, ex.student).tolist() == [list(c) for c in chunks(*nonempty)]


def test_a_marker_known_to_one_side_only_is_refused(chat_sides, tokenizers):
    plain = Side(tokenizers["sentencepiece_bpe"], token_bytes(tokenizers["sentencepiece_bpe"]))
    with pytest.raises(ValueError, match=r"<\|eot_id\|>.*special for only one side.*add_special_tokens"):
        PairedDataset([chat_segment()], plain, chat_sides["bytelevel_bpe"])


def test_segments_carry_the_loss_spans():
    text = "user: hi\nbot: hello there\nuser: bye\nbot: ciao\n"
    spans = ((14, 26), (41, 46))  # "hello there\n", "ciao\n"
    segs = segment_document(text, spans, 20)
    for seg in segs:
        assert seg.loss_spans  # pieces without a target byte are dropped
    pieces = [text.encode()[a:b] for seg in segs for a, b in (
        (x + text.encode().find(seg.text.encode()), y + text.encode().find(seg.text.encode())) for x, y in seg.loss_spans)]
    assert b"".join(pieces) == b"hello there\nciao\n"
    every = take_segments([text], 20, None)
    assert "".join(seg.text for seg in every) == text and all(seg.loss_spans is None for seg in every)
    assert len(segs) < len(every)  # "user: hi\n" trains nothing


def test_local_chat_jsonl_becomes_documents_with_loss_spans(tmp_path):
    rows = [{"messages": conversation("Q?", "A.")}, {"prompt": "2+2?", "response": "4"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = read_jsonl(path, chat_template="llama3")
    assert [d.id for d in docs] == ["chats:1", "chats:2"]
    assert [[d.text.encode()[a:b] for a, b in d.loss_spans] for d in docs] == [
        [b"Shakespeare wrote it, around 1600.<|eot_id|>", b"A.<|eot_id|>"], [b"4<|eot_id|>"]]
    from ctdbench.corpus import write_jsonl

    write_jsonl(docs, tmp_path / "train.jsonl")
    assert read_jsonl(tmp_path / "train.jsonl") == docs  # the split files keep the spans


def _models(student_side, teacher_side):
    teacher = build_model(TEACHER, teacher_side.tokenizer, seed=0, max_positions=512)
    student = build_model(STUDENT, student_side.tokenizer, seed=1, max_positions=512)
    return student, teacher


def _loss(name, student_side, teacher_side, segments, models):
    student, teacher = models
    ctx = MethodContext.from_sides(student, teacher, student_side, teacher_side)
    method = methods.build(name, ctx, {})
    data = PairedDataset(segments, student_side, teacher_side)
    batch = collate([data[i] for i in range(len(data))], data, method)
    with torch.no_grad():
        loss, _ = step_loss(student, method, OnlineTeacher(teacher) if teacher else None, batch)
    return loss.item()


@pytest.mark.parametrize("method_name", [*methods.available(), "template"], indirect=True)
def test_no_method_learns_from_the_text_outside_its_targets(chat_sides, corpus_texts, method_name):
    """With only the first answer as target, rewriting everything after it leaves every method's
    loss unchanged (causal models: nothing after a target can influence it), and rewriting that
    answer changes it (the test can fail). Also for the template, so that its copies start right."""
    name = method_name
    teacher_side = chat_sides["bytelevel_bpe"]
    student_side = teacher_side if name == "kd" else chat_sides["sentencepiece_bpe"]
    models = _models(student_side, teacher_side)
    plain = corpus_texts[0][:200]  # a plain segment in the same batch: every token a target

    def loss(**kw):
        return _loss(name, student_side, teacher_side, [chat_segment(first_turn_only=True, **kw), plain], models)

    base = loss()
    assert loss(question="Name a comedy.", answer="Twelfth Night, or What You Will.") == pytest.approx(base, rel=1e-5)
    changed = render_chat(conversation("And Macbeth?", "x"), LLAMA3_TEMPLATE)[0].replace(
        "Shakespeare wrote it, around 1600.", "Marlowe, in 1590, they say.")
    first = changed.index("Marlowe")
    moved = _loss(name, student_side, teacher_side,
                  [Segment(changed, ((first, changed.index("<|eot_id|>", first) + len("<|eot_id|>")),)), plain], models)
    assert moved != pytest.approx(base, rel=1e-5)


def test_sft_loss_is_the_cross_entropy_of_the_assistant_tokens(chat_sides):
    side = chat_sides["sentencepiece_bpe"]
    student, _ = _models(side, side)
    seg = chat_segment()
    loss = _loss("sft", side, side, [seg], (student, None))
    spans = side.encode(seg.text, seg.loss_spans)
    ids = torch.tensor(spans.ids)
    with torch.no_grad():
        logp = student(input_ids=ids[None]).logits[0].log_softmax(-1)
    nll = [-logp[k - 1, ids[k]].item() for k in range(1, len(ids)) if spans.loss[k]]
    assert loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
