"""BLD: byte targets, the teacher's byte distributions, the loss terms, gradients, the saved student."""

import math

import pytest
import torch
import torch.nn.functional as F

from ctdbench.byteprob import next_byte_distributions
from ctdbench.data import PairedDataset, Segment, Side, collate, segment_text
from ctdbench.models import build_model
from ctdbench.teacher import OnlineTeacher
from ctdbench.tokbytes import token_bytes
from methods import build
from methods.base import MethodContext
from methods.bld import ByteHead, LinearByteHead, byte_kl

STUDENT = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def setup_pair(student_side, teacher_side, texts, n=4, **hp):
    """(data, student, teacher, method, batch) of the first n 80-byte segments of ``texts``, or of
    ``texts`` themselves when they are ``Segment`` objects."""
    segments = texts if isinstance(texts[0], Segment) else [s for t in texts for s in segment_text(t, 80)][:n]
    data = PairedDataset(segments, student_side, teacher_side)
    student = build_model(STUDENT, student_side.tokenizer, seed=0, max_positions=256)
    teacher = build_model(TEACHER, teacher_side.tokenizer, seed=1, max_positions=256)
    ctx = MethodContext.from_sides(student, teacher, student_side, teacher_side)
    method = build("bld", ctx, hp)
    batch = collate([data[i] for i in range(len(data))], data, method)
    return data, student, teacher, method, batch


def side(tokenizers, kind):
    return Side(tokenizers[kind], token_bytes(tokenizers[kind]))


# BPE -> SentencePiece, BPE -> byte, and a SentencePiece teacher (dummy-prefix space) -> BPE.
PAIRS = [("sentencepiece_bpe", "bytelevel_bpe"), ("byte", "bytelevel_bpe"), ("bytelevel_bpe", "sentencepiece_bpe")]


@pytest.fixture(params=PAIRS, ids=lambda p: f"{p[1]}->{p[0]}")
def pair_kinds(request):
    return request.param


@pytest.fixture
def pair(pair_kinds, tokenizers, corpus_texts):
    student_kind, teacher_kind = pair_kinds
    return setup_pair(side(tokenizers, student_kind), side(tokenizers, teacher_kind), corpus_texts)


def test_byte_slots_are_the_student_token_bytes(pair):
    data, student, teacher, method, batch = pair
    pos, target = batch["bld_pos"], batch["bld_target"]
    offset = 0
    for b, ex in enumerate(data):
        for l, (s, e) in enumerate(zip(ex.student.starts, ex.student.ends)):
            n = min(e - s, method.n_bytes)
            assert (pos[b, l, :n] == torch.arange(s, s + n) + offset).all()
            assert (pos[b, l, n:] == -1).all()
            assert bytes(target[b, l, :n].tolist()) == ex.text[s: s + n]
        offset += len(ex.text)


def test_teacher_bytes_are_the_converter_per_example(pair):
    """The batched targets equal the per-example conversion of the text's own bytes."""
    data, student, teacher, method, batch = pair
    t_out = OnlineTeacher(teacher)(batch)
    q = method.teacher_bytes(batch, t_out)
    assert q.shape == (sum(len(ex.text) for ex in data), method.n_symbols)
    offset = 0
    for b, ex in enumerate(data):
        n_tok = len(ex.teacher.ids)
        logp = t_out.logits[b, : n_tok - 1].float().log_softmax(-1)
        ref = next_byte_distributions(logp, ex.teacher.ids[1:], method.ctx.teacher_token_bytes,
                                      method.conversion, special_ids=method.special_ids)
        ref = ref[len(ref) - len(ex.text):]  # minus a dummy-prefix row
        torch.testing.assert_close(q[offset: offset + len(ex.text), : ref.shape[1]], ref, atol=1e-6, rtol=0)
        # Every row is a distribution that gives the real next byte positive mass.
        assert torch.allclose(ref.sum(-1), torch.ones(len(ref)), atol=1e-5)
        assert (ref[torch.arange(len(ex.text)), torch.tensor(list(ex.text))] > 0).all()
        offset += len(ex.text)


def test_loss_terms_and_gradients_reach_backbone_and_head(pair):
    data, student, teacher, method, batch = pair
    s_out = student(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"],
                    output_hidden_states=True)
    loss, logs = method.loss(batch, s_out, OnlineTeacher(teacher)(batch))
    assert torch.isfinite(loss) and logs["byte_kl"] > 0 and logs["byte_ce"] > 0
    # An untrained head is near uniform over 260 symbols.
    assert logs["byte_ce"] == pytest.approx(math.log(260), abs=0.5)
    assert logs["kl_coverage"] == 1.0
    loss.backward()
    assert student.base_model.layers[0].attention.query_key_value.weight.grad.abs().sum() > 0
    assert method.head.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


class FixedHead(ByteHead):
    """A head that outputs given logits for the loss's rows, in the loss's order."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, h, prev_bytes):
        assert len(h) == len(self.logits)
        return self.logits + 0 * h.sum()


def test_kl_vanishes_when_the_head_is_the_teacher(pair):
    data, student, teacher, method, batch = pair
    t_out = OnlineTeacher(teacher)(batch)
    q = method.teacher_bytes(batch, t_out)
    pos = batch["bld_pos"][:, 1:]
    rows = (pos[..., 0] >= 0).nonzero(as_tuple=True)
    method.head = FixedHead(q[pos[rows].clamp(min=0)].clamp(min=1e-30).log())
    s_out = student(input_ids=batch["student_input_ids"], output_hidden_states=True)
    _, logs = method.loss(batch, s_out, t_out)
    assert abs(logs["byte_kl"]) < 1e-5
    method.head = FixedHead(torch.zeros(len(rows[0]), method.n_bytes, method.n_symbols))
    _, logs = method.loss(batch, s_out, t_out)
    assert logs["byte_kl"] > 0.1


def naive_bld(method, data, s_out, t_out, lambda_b, lambda_kl, temperature):
    """The header's loss as loops over examples, target tokens and byte slots: token CE mean +
    lambda_b * byte CE mean + lambda_kl * KL mean (over the slots whose teacher row is defined),
    teacher byte distributions from the teacher's logits / T, the head run densely per token."""
    ce, byte_ce, kl = [], [], []
    for b, ex in enumerate(data):
        lp = (t_out.logits[b, : len(ex.teacher.ids) - 1].double() / temperature).log_softmax(-1)
        P = next_byte_distributions(lp, ex.teacher.ids[1:], method.ctx.teacher_token_bytes, method.conversion,
                                    special_ids=method.special_ids).double()
        P = F.pad(P[len(P) - len(ex.text):], (0, method.n_symbols - P.shape[1]))  # minus a dummy-prefix row
        for l in range(1, len(ex.student.ids)):
            if ex.student.loss is not None and not ex.student.loss[l]:
                continue
            ce.append(-s_out.logits[b, l - 1].double().log_softmax(-1)[ex.student.ids[l]])
            s, e = ex.student.starts[l], ex.student.ends[l]
            token = torch.tensor(list(ex.text[s:e]) + [0] * method.n_bytes)[None, : method.n_bytes]
            logits = method.head(s_out.hidden_states[-1][b, l - 1][None].float(), token)[0].double()
            for j in range(min(e - s, method.n_bytes)):
                logq = logits[j].log_softmax(-1)
                byte_ce.append(-logq[ex.text[s + j]])
                p = P[s + j]
                if p.sum() > 0:  # a masked teacher row has no KL term
                    kl.append((p[p > 0] * (p[p > 0].log() - logq[p > 0])).sum())
    mean = lambda x: torch.stack(x).mean()  # noqa: E731
    return mean(ce) + lambda_b * mean(byte_ce) + lambda_kl * mean(kl)


@pytest.mark.parametrize("hp", [{}, {"lambda_b": 0.6, "lambda_kl": 0.35, "temperature": 1.7, "conversion": "a0",
                                     "head": "transformer", "head_width": 16}], ids=["defaults", "other"])
def test_whole_loss_matches_a_naive_implementation(tokenizers, corpus_texts, pair_kinds, hp):
    """Every term, weight, temperature, reduction and the loss mask: half of each segment is a target."""
    student_kind, teacher_kind = pair_kinds
    texts = [s for t in corpus_texts for s in segment_text(t, 80)][:3]
    segments = [Segment(t, ((len(t.encode()) // 3, 2 * len(t.encode()) // 3),)) for t in texts]
    data, student, teacher, method, batch = setup_pair(side(tokenizers, student_kind), side(tokenizers, teacher_kind),
                                                       segments, **hp)
    assert sum(ex.student.loss.count(False) for ex in data) > 3 * 3  # the mask leaves real tokens out
    s_out = student(input_ids=batch["student_input_ids"], output_hidden_states=True)
    t_out = OnlineTeacher(teacher)(batch)
    loss, logs = method.loss(batch, s_out, t_out)
    defaults = {"lambda_b": 1.0, "lambda_kl": 0.1, "temperature": 1.0}
    args = {k: hp.get(k, v) for k, v in defaults.items()}
    want = naive_bld(method, data, s_out, t_out, **args)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_linear_slot_logits_equal_the_dense_heads_at_valid_slots():
    torch.manual_seed(0)
    head = LinearByteHead(8, 4, 260)
    h = torch.randn(6, 8)
    lengths = torch.tensor([1, 4, 2, 7, 3, 1])
    valid = torch.arange(4) < lengths[:, None]
    dense = head(h, None)[valid]
    assert torch.allclose(head.slot_logits(h, None, valid), dense, atol=1e-6)


def test_heads_are_capped_at_the_longest_student_token(tokenizers, corpus_texts):
    sides = side(tokenizers, "byte"), side(tokenizers, "bytelevel_bpe")
    assert setup_pair(*sides, corpus_texts)[3].n_bytes == 1
    student = side(tokenizers, "sentencepiece_bpe")
    longest = max(len(b) for b in student.token_bytes if b)
    assert setup_pair(student, sides[1], corpus_texts)[3].n_bytes == min(10, longest)


def test_byte_kl_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 260, generator=g), -1)
    p[0, :100] = 0  # zeros in the target contribute nothing
    p[0] /= p[0].sum()
    logq = torch.log_softmax(torch.randn(5, 260, generator=g), -1)
    naive = sum(sum(p[i, s] * (math.log(p[i, s]) - logq[i, s]) for s in range(260) if p[i, s] > 0) for i in range(5)) / 5
    assert byte_kl(p, logq).item() == pytest.approx(float(naive), rel=1e-5)
    assert byte_kl(p, p.log()).abs().item() < 1e-6
    assert byte_kl(p[:0], logq[:0]).item() == 0
    masked = torch.cat([p, torch.zeros(2, 260)])                        # rows without a target
    assert byte_kl(masked, torch.cat([logq, logq[:2]])).item() == pytest.approx(float(naive), rel=1e-5)


def test_transformer_head_conditions_on_previous_bytes_only(sides, corpus_texts):
    data, student, teacher, method, batch = setup_pair(*sides, corpus_texts, head="transformer", head_width=32)
    h = torch.randn(3, student.config.hidden_size)
    prev = torch.randint(0, 256, (3, method.n_bytes))
    out1 = method.head(h, prev)
    prev2 = prev.clone()
    k = method.n_bytes - 2  # changing byte k may only move the predictions of bytes > k
    prev2[:, k] = (prev2[:, k] + 1) % 256
    out2 = method.head(h, prev2)
    assert torch.allclose(out1[:, : k + 1], out2[:, : k + 1], atol=1e-5)
    assert not torch.allclose(out1[:, k + 1:], out2[:, k + 1:])
    s_out = student(input_ids=batch["student_input_ids"], output_hidden_states=True)
    loss, _ = method.loss(batch, s_out, OnlineTeacher(teacher)(batch))
    loss.backward()
    assert method.head.byte_emb.weight.grad.abs().sum() > 0


def test_head_is_absent_from_the_saved_student(sides, corpus_texts, tmp_path):
    from transformers import AutoModelForCausalLM

    data, student, teacher, method, batch = setup_pair(*sides, corpus_texts)
    student.save_pretrained(tmp_path)
    state = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert set(state) == set(student.state_dict())
    assert "head.proj.weight" in method.state_dict()
    assert not any(k.startswith(("student", "teacher", "ctx")) for k in method.state_dict())


def test_bad_hyperparameters_are_named(sides, corpus_texts):
    with pytest.raises(ValueError, match="methods.bld.conversion"):
        setup_pair(*sides, corpus_texts, conversion="exact")
    with pytest.raises(ValueError, match="methods.bld.head"):
        setup_pair(*sides, corpus_texts, head="mlp")
    with pytest.raises(ValueError, match="methods.bld.lambda_byte: unknown hyperparameter"):
        setup_pair(*sides, corpus_texts, lambda_byte=1.0)
