"""The one training loop: schedule, identical budgets, resume, NaN handling, logs."""

import json
import math
import re

import pytest
import torch

from ctdbench.data import PairedDataset, Schedule, segment_text
from ctdbench.models import build_model
from ctdbench.teacher import OnlineTeacher
from ctdbench.train import (
    NonFiniteGradientError,
    NonFiniteLossError,
    TrainConfig,
    checkpoint_path,
    lr_factor,
    make_optimizer,
    remove_checkpoint,
    running_log_path,
    TrainingModule,
    train,
    validation_bpb,
)
from methods import build
from ctdbench.kernels import token_cross_entropy
from methods.base import DistillationMethod, MethodContext

MODEL = {"arch": "gpt_neox", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}
TEACHER = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, batch_size=1, lr=1.0, warmup_frac=0.1, final_lr_frac=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)
    values = [lr_factor(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


class _TeacherCE(DistillationMethod):
    """A teacher-using test method: CE plus a trivial use of the teacher logits."""

    def __init__(self, ctx, nan_at: int = -1, interrupt_at: int = -1, nan_grad: tuple[int, int] = (-1, -1),
                 inf_at: int = -1):
        super().__init__(ctx)
        self.head = torch.nn.Linear(2, 2)  # owns parameters, like BLD/DSKD
        self.calls, self.nan_at, self.interrupt_at, self.inf_at = 0, nan_at, interrupt_at, inf_at
        self.nan_grad_from, self.nan_grad_segment = nan_grad  # from this call on, a batch holding that segment

    def loss(self, batch, student_out, teacher_out):
        self.calls += 1
        if self.calls - 1 == self.interrupt_at:
            raise KeyboardInterrupt
        ce = token_cross_entropy(student_out.logits, batch["student_input_ids"], batch["student_attention_mask"])
        loss = ce + 0.0 * teacher_out.logits.mean() + 0.0 * self.head.weight.sum()
        if self.calls - 1 == self.nan_at:
            loss = loss * float("nan")
        if self.calls - 1 == self.inf_at:
            loss = loss + float("inf")  # an infinite loss with a finite gradient
        if self.calls > self.nan_grad_from >= 0 and self.nan_grad_segment in batch["index"].tolist():
            # a finite loss term (0) whose gradient is 0 x inf = NaN
            loss = loss + 0.0 * (self.head.weight - self.head.weight.detach()).abs().sqrt().sum()
        return loss, {"ce": ce.item()}


@pytest.fixture
def setup(sides, corpus_texts):
    student_side, teacher_side = sides
    segments = [s for t in corpus_texts for s in segment_text(t, 96)][:24]
    data = PairedDataset(segments, student_side, teacher_side)
    val = PairedDataset(segments[-4:], student_side)
    teacher_model = build_model(TEACHER, teacher_side.tokenizer, seed=0, max_positions=256)
    teacher = OnlineTeacher(teacher_model)

    def make(method="sft", seed=0, **hp):
        student = build_model(MODEL, student_side.tokenizer, seed=seed, max_positions=256)
        ctx = MethodContext.from_sides(student, teacher_model, student_side, teacher_side)
        if isinstance(method, str):
            method = build(method, ctx, seed=seed)
        else:
            torch.manual_seed(seed)
            method = method(ctx, **hp)
        method.name = getattr(method, "name", "test")
        return student, method

    return data, val, teacher, make


CFG = dict(steps=6, batch_size=4, lr=3e-3, checkpoint_every=2, eval_every=3)


def test_two_methods_consume_the_same_byte_stream(setup, tmp_path):
    data, val, teacher, make = setup
    runs = {}
    for name, method_cls in [("sft", "sft"), ("teacher_ce", _TeacherCE)]:
        student, method = make(method_cls)
        runs[name] = train(student, method, data, TrainConfig(**CFG), tmp_path / name, seed=1,
                           teacher=teacher, val_data=val, progress=False)
    a, b = runs["sft"]["budget"], runs["teacher_ce"]["budget"]
    for key in ("optimizer_steps", "documents", "text_bytes", "student_tokens", "stream_sha256"):
        assert a[key] == b[key], key
    assert a["teacher_forward_passes"] == 0 and b["teacher_forward_passes"] == 6
    assert b["teacher_tokens"] > 0
    # Same seed, same initialisation: both students started from identical weights.
    s0, _ = make("sft")
    s1, _ = make(_TeacherCE)
    assert all(torch.equal(p, q) for p, q in zip(s0.parameters(), s1.parameters()))


def test_interrupted_run_resumes_to_identical_weights(setup, tmp_path):
    data, val, teacher, make = setup
    ref_student, ref_method = make(_TeacherCE)
    train(ref_student, ref_method, data, TrainConfig(**CFG), tmp_path / "ref", seed=2, teacher=teacher,
          val_data=val, progress=False)

    student, method = make(_TeacherCE, interrupt_at=4)  # dies during step 5, after checkpoint 4
    with pytest.raises(KeyboardInterrupt):
        train(student, method, data, TrainConfig(**CFG), tmp_path / "run", seed=2, teacher=teacher,
              val_data=val, progress=False)
    assert (tmp_path / "run" / "checkpoint" / "last.pt").exists()
    # Snakemake deletes an interrupted job's declared outputs before rerunning it.
    (tmp_path / "run" / "train_log.jsonl").unlink(missing_ok=True)
    student, method = make(_TeacherCE)  # a fresh process would rebuild everything from scratch
    summary = train(student, method, data, TrainConfig(**CFG), tmp_path / "run", seed=2, teacher=teacher,
                    val_data=val, progress=False)
    for p, q in zip(ref_student.parameters(), student.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(ref_method.head.weight, method.head.weight)
    assert summary["budget"]["optimizer_steps"] == 6
    # The caller removes the checkpoint once the student and run.json are saved.
    assert checkpoint_path(tmp_path / "run").exists()
    remove_checkpoint(tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()
    # The whole learning curve survives: the same rows, values and all, as the uninterrupted run's.
    rows = lambda path: [{k: v for k, v in json.loads(r).items() if k != "tokens_per_second"}
                         for r in path.read_text().splitlines()]
    resumed = rows(tmp_path / "run" / "train_log.jsonl")
    assert [r for r in resumed if "event" in r] == [{"step": 4, "event": "resumed"}]
    assert [r for r in resumed if "event" not in r] == rows(tmp_path / "ref" / "train_log.jsonl")


def _interrupted(make, data, teacher, val, out, cfg, seed=2):
    """A run killed during step 5, after its step-4 checkpoint."""
    student, method = make(_TeacherCE, interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        train(student, method, data, cfg, out, seed=seed, teacher=teacher, val_data=val, progress=False)
    assert checkpoint_path(out).exists()


def test_a_changed_spec_starts_fresh_and_says_so(setup, tmp_path, capsys):
    data, val, teacher, make = setup
    _interrupted(make, data, teacher, val, tmp_path / "run", TrainConfig(**CFG))
    fixed = TrainConfig(**{**CFG, "lr": 1e-3})  # e.g. the lr fixed after a failure
    student, method = make(_TeacherCE)
    summary = train(student, method, data, fixed, tmp_path / "run", seed=2, teacher=teacher, val_data=val,
                    progress=False)
    ref_student, ref_method = make(_TeacherCE)
    train(ref_student, ref_method, data, fixed, tmp_path / "ref", seed=2, teacher=teacher, val_data=val, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(ref_student.parameters(), student.parameters()))
    assert summary["train_config"]["lr"] == 1e-3 and summary["budget"]["optimizer_steps"] == 6
    rows = [json.loads(r) for r in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "fresh_start" and "belongs to another run" in rows[0]["reason"]
    assert "starting fresh" in capsys.readouterr().err
    # The spec also covers the caller's part (method hyperparameters, models, teacher ...).
    _interrupted(make, data, teacher, val, tmp_path / "run2", TrainConfig(**CFG))
    student, method = make(_TeacherCE)
    train(student, method, data, TrainConfig(**CFG), tmp_path / "run2", seed=2, teacher=teacher, progress=False,
          spec={"hparams": {"kd_rate": 0.2}})
    assert json.loads((tmp_path / "run2" / "train_log.jsonl").read_text().splitlines()[0])["event"] == "fresh_start"
    # ... and the data: the same segments with one text changed (another corpus, segmentation or tokenizer).
    _interrupted(make, data, teacher, val, tmp_path / "run3", TrainConfig(**CFG))
    changed = PairedDataset([e.text.decode() for e in data][:-1] + ["another text\n"], data.student, data.teacher)
    student, method = make(_TeacherCE)
    train(student, method, changed, TrainConfig(**CFG), tmp_path / "run3", seed=2, teacher=teacher, progress=False)
    assert json.loads((tmp_path / "run3" / "train_log.jsonl").read_text().splitlines()[0])["event"] == "fresh_start"


def test_a_crafted_checkpoint_runs_nothing(setup, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "MARKER"), "w"))

    data, val, teacher, make = setup
    checkpoint_path(tmp_path / "run").parent.mkdir(parents=True)
    checkpoint_path(tmp_path / "run").write_bytes(pickle.dumps({"model": Payload()}))
    student, method = make(_TeacherCE)
    summary = train(student, method, data, TrainConfig(**CFG), tmp_path / "run", seed=2, teacher=teacher,
                    progress=False)
    assert not (tmp_path / "MARKER").exists() and summary["budget"]["optimizer_steps"] == 6
    row = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[0])
    assert row["event"] == "fresh_start" and "unreadable" in row["reason"]


def test_a_torn_last_log_line_does_not_block_resuming(setup, tmp_path):
    data, val, teacher, make = setup
    _interrupted(make, data, teacher, val, tmp_path / "run", TrainConfig(**CFG))
    running = running_log_path(tmp_path / "run")
    running.write_text(running.read_text() + '{"step": 5, "bytes_se')  # killed mid-write
    student, method = make(_TeacherCE)
    train(student, method, data, TrainConfig(**CFG), tmp_path / "run", seed=2, teacher=teacher, val_data=val,
          progress=False)
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


@pytest.fixture
def updates(monkeypatch) -> list:
    """One entry per optimizer update (AdamW.step call)."""
    calls = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or adamw_step(self, *a, **k))
    return calls


def _applied_and_saved(student, run_dir) -> tuple[bool, int]:
    """Whether the weights are finite, and the optimizer steps of the run's checkpoint."""
    finite = all(torch.isfinite(p).all() for p in student.parameters())
    return finite, torch.load(checkpoint_path(run_dir), weights_only=True)["counters"]["optimizer_steps"]


def test_nan_gradient_at_the_last_step_stops_before_the_update(setup, tmp_path, updates):
    data, val, teacher, make = setup
    cfg = TrainConfig(**{**CFG, "grad_accum": 2})
    last = Schedule(len(data), cfg.batch_size, seed=0).indices(cfg.steps - 1)
    student, method = make(_TeacherCE, nan_grad=(2 * 5, last[3]))  # step 5 (the last), micro-batch 1
    with pytest.raises(NonFiniteGradientError, match=re.escape(f"at step 5: micro-batch 1 (segments {last[2:]}")):
        train(student, method, data, cfg, tmp_path, seed=0, teacher=teacher, progress=False)
    # Steps 0-4 were applied, step 5 was not; the weights stay finite and the checkpoint is step 4's.
    assert len(updates) == 5
    assert _applied_and_saved(student, tmp_path) == (True, 4)


def test_nan_loss_stops_with_step_and_batch(setup, tmp_path):
    data, val, teacher, make = setup
    student, method = make(_TeacherCE, nan_at=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*segments \[\d+, \d+, \d+, \d+\]"):
        train(student, method, data, TrainConfig(**CFG), tmp_path, seed=0, teacher=teacher, progress=False)


@pytest.mark.parametrize("bad", ["nan_at", "inf_at"])
def test_non_finite_loss_of_a_later_micro_batch_stops_before_the_update(setup, tmp_path, updates, bad):
    """The losses are checked once per step, after the micro-batches' backward passes: still the
    run stops naming the micro-batch, and nothing of the step reaches the weights or a checkpoint."""
    data, val, teacher, make = setup
    cfg = TrainConfig(**{**CFG, "grad_accum": 2})
    student, method = make(_TeacherCE, **{bad: 2 * 3 + 1})  # step 3, micro-batch 1
    segments = Schedule(len(data), cfg.batch_size, seed=0).indices(3)[2:]
    with pytest.raises(NonFiniteLossError, match=re.escape(f"at step 3 (micro-batch 1); segments {segments}")):
        train(student, method, data, cfg, tmp_path, seed=0, teacher=teacher, progress=False)
    assert len(updates) == 3
    assert _applied_and_saved(student, tmp_path) == (True, 2)


def test_validation_bpb_is_the_naive_bits_per_byte(setup):
    """Sum over the segments of -log2 p(next token), each segment alone and unpadded, over their bytes."""
    data, val, teacher, make = setup
    student, method = make("sft")
    nats = 0.0
    for i in range(len(val)):
        ids = torch.tensor([val[i].student.ids])
        logp = student(input_ids=ids).logits.log_softmax(-1)[0, :-1]
        nats -= logp.gather(-1, ids[0, 1:, None]).sum().item()
    n_bytes = sum(len(val[i].text) for i in range(len(val)))
    got = validation_bpb(TrainingModule(student, method), val, torch.device("cpu"), batch_size=3)
    assert got == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_log_rows_and_learning(setup, tmp_path):
    data, val, teacher, make = setup
    student, method = make("sft")
    summary = train(student, method, data, TrainConfig(**{**CFG, "steps": 12, "lr": 1e-2}), tmp_path, seed=0,
                    val_data=val, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_bpb" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert [r["step"] for r in val_rows] == [0, 3, 6, 9, 12]
    assert val_rows[-1]["val_bpb"] < val_rows[0]["val_bpb"]
    assert summary["final_val_bpb"] == val_rows[-1]["val_bpb"]
    assert all(r["bytes_seen"] > 0 for r in train_rows)
    assert summary["timing"]["seconds_per_step"] > 0


def test_grad_accumulation_sees_the_same_batch(setup, tmp_path):
    data, val, teacher, make = setup
    logs = []
    for accum in (1, 2):
        student, method = make("sft")
        summary = train(student, method, data, TrainConfig(**{**CFG, "steps": 2, "grad_accum": accum}),
                        tmp_path / str(accum), seed=0, progress=False)
        logs.append((summary["budget"], json.loads((tmp_path / str(accum) / "train_log.jsonl").read_text().splitlines()[0])))
    (b1, first1), (b2, first2) = logs
    assert b1["stream_sha256"] == b2["stream_sha256"] and b1["student_tokens"] == b2["student_tokens"]
    # Same initial weights and segments: the step-1 loss is the same up to per-micro-batch averaging.
    assert first1["loss"] == pytest.approx(first2["loss"], abs=0.02)


class _ExampleMeanCE(DistillationMethod):
    """CE per example, averaged over the examples: the mean of k equal micro-batches' losses is the
    whole batch's loss, so accumulating their gradients must give the whole batch's gradient."""

    needs_teacher = False

    def loss(self, batch, student_out, teacher_out):
        ids, mask = batch["student_input_ids"], batch["student_loss_mask"]
        loss = torch.stack([token_cross_entropy(student_out.logits[b:b + 1], ids[b:b + 1], mask[b:b + 1])
                            for b in range(len(ids))]).mean()
        return loss, {}


def test_accumulated_micro_batches_step_like_the_whole_batch(setup, tmp_path, monkeypatch):
    """One step over 4 segments as 1, 2 or 4 micro-batches gives the same parameters. Plain SGD
    without clipping, so the step is linear in the gradient (AdamW's first step is ~lr * sign(g),
    blind to a scale): keeping only the last micro-batch's gradient, skipping one, or not dividing
    by grad_accum all move the parameters elsewhere."""
    data, val, teacher, make = setup

    def sgd(student, method, cfg):
        groups = [{"params": g["params"], "lr": g["lr"], "base_lr": g["base_lr"]}
                  for g in make_optimizer(student, method, cfg).param_groups]
        return torch.optim.SGD(groups, lr=cfg.lr)

    monkeypatch.setattr("ctdbench.train.make_optimizer", sgd)
    after, norms = {}, {}
    for accum in (1, 2, 4):
        student, method = make(_ExampleMeanCE)
        start = [p.detach().clone() for p in student.parameters()]
        train(student, method, data, TrainConfig(steps=1, batch_size=4, grad_accum=accum, lr=1.0, grad_clip=1e9),
              tmp_path / str(accum), seed=0, progress=False)
        after[accum] = [p.detach() for p in student.parameters()]
        norms[accum] = json.loads((tmp_path / str(accum) / "train_log.jsonl").read_text().splitlines()[0])["grad_norm"]
    moved = sum(float((p - q).abs().sum()) for p, q in zip(after[1], start))
    assert moved > 1.0  # the step is large, so any lost or rescaled gradient shows
    for accum in (2, 4):
        assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(after[accum], after[1])), accum
        assert norms[accum] == pytest.approx(norms[1], rel=1e-5)


def test_method_needing_teacher_without_one_fails(setup, tmp_path):
    data, val, teacher, make = setup
    student, method = make(_TeacherCE)
    with pytest.raises(ValueError, match="needs a teacher"):
        train(student, method, data, TrainConfig(**CFG), tmp_path, seed=0, progress=False)
