"""``ctdbench bench``: cost of one training step of every method, relative to the floor step.

The floor step is what any distillation step must at least do: a teacher forward pass plus the
student's SFT forward, backward and optimizer update. Each method's step is timed on the same
fixed batch of the configured default models (fresh weights: timing does not depend on them),
each in its own process so peak memory is the method's own. Results print as ratios to the floor:
the floor step is timed again inside each method's process, alternating with the method's step, and
the ratio is the median of the ratios of adjacent pairs, so that it compares steps taken under the
same machine conditions (on a shared VM, the speed of the same step drifts by 10-15% between
processes and within one).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

from ctdbench import layout, recipe
from ctdbench.files import write_atomic

FLOOR = "floor (teacher fwd + sft)"


def _prepared_inputs(config: dict, pair: str) -> dict:
    """Corpus and tokenizers the pair needs, built with the workflow's own stages if missing."""
    results = layout.results_dir(config)
    data_dir = Path(layout.data_dir(results))
    if not (data_dir / "train.jsonl").exists():
        recipe.prepare_corpus(config["corpus"], data_dir, Path("resources"))
    p = config["pairs"][pair]
    names = {"student": p["student_tokenizer"], "teacher": config["teachers"][p["teacher"]]["tokenizer"]}
    dirs = {}
    for side, name in names.items():
        d = Path(layout.tokenizer_dir(results, name))
        if not d.exists():
            recipe.prepare_tokenizer(config["tokenizers"][name], data_dir / "train.jsonl", d, Path("resources"))
        dirs[side] = str(d)
    return {"data": data_dir, **dirs}


def _time_method(config: dict, pair: str, method_name: str, inputs: dict, repeats: int, threads: int) -> dict:
    """Median step seconds of ``method_name`` and of the floor step, timed alternately in this
    process so that drifts of a shared machine cancel in the ratio; peak RSS of the method."""
    import torch

    import methods
    from ctdbench import allocator, specs
    from ctdbench.data import PairedDataset, collate
    from ctdbench.models import build_model
    from ctdbench.teacher import OnlineTeacher
    from ctdbench.train import TrainConfig, make_optimizer, step_loss
    from methods.base import MethodContext

    allocator.reuse_freed_memory()  # as in the workflow's processes (ctdbench.cli)
    torch.set_num_threads(threads)
    spec = specs.distill_spec(config, pair, method_name if method_name != FLOOR else "sft", 0)
    student_side, teacher_side = recipe.side(inputs["student"]), recipe.side(inputs["teacher"])
    segments = recipe.segments(inputs["data"], "train", spec["data"], "train_bytes")
    cfg = TrainConfig(**spec["train"])
    data = PairedDataset(segments[: cfg.batch_size], student_side, teacher_side)
    teacher_spec = config["models"][config["teachers"][config["pairs"][pair]["teacher"]]["model"]]
    teacher = OnlineTeacher(build_model(teacher_spec, teacher_side.tokenizer, seed=0, max_positions=2048).eval())
    student = build_model(spec["student_model"], student_side.tokenizer, seed=0, max_positions=2048)
    ctx = MethodContext.from_sides(student, teacher.model, student_side, teacher_side)
    examples = [data[i] for i in range(len(data))]

    def step_of(method, force_teacher: bool):
        optimizer = make_optimizer(student, method, cfg)

        def step() -> float:
            t0 = time.perf_counter()
            batch = collate(examples, data, method)  # the collator's work is part of a step
            loss, _ = step_loss(student, method, teacher, batch, force_teacher=force_teacher)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
        return step

    method_step = step_of(methods.build(spec["method"], ctx, spec["hparams"]), method_name == FLOOR)
    floor_step = step_of(methods.build("sft", ctx, {}), True)
    for _ in range(2):  # warm-up: allocator, kernels
        method_step()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before any floor step
    floor_step()
    times, floor_times = [], []
    for _ in range(repeats):
        floor_times.append(floor_step())
        times.append(method_step())
    # The ratio is the median over adjacent (floor, method) pairs: a drift of the machine's speed
    # during the run cancels within each pair, not only on average.
    ratio = statistics.median(m / f for m, f in zip(times, floor_times))
    return {"seconds": statistics.median(times), "floor_seconds": statistics.median(floor_times), "ratio": ratio,
            "peak_rss_mb": peak_mb}


def _worker(queue, *args) -> None:
    try:
        queue.put(_time_method(*args))
    except Exception as e:  # noqa: BLE001 - reported in the table instead of killing the bench
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run(config: dict, pair: str, method_names: list[str], repeats: int = 5, threads: int = 2) -> dict[str, dict]:
    """Per method (and the floor): median step seconds, the ratio to the floor step timed in the
    same process, and peak RSS; each method in a fresh process."""
    inputs = _prepared_inputs(config, pair)
    ctx = mp.get_context("spawn")
    results = {}
    for name in [FLOOR, *method_names]:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(queue, config, pair, name, inputs, repeats, threads))
        proc.start()
        results[name] = queue.get()
        proc.join()
    return results


def main(args) -> None:
    from ctdbench import config as ctd_config

    config = ctd_config.load(args.config)
    pair = args.pair or ctd_config.pairs(config)[0]
    if pair not in config["pairs"]:
        raise ctd_config.ConfigError(f"--pair {pair}: no such pair in {args.config} ({', '.join(config['pairs'])})")
    names = args.methods or ctd_config.pair_methods(config, pair)
    threads = args.threads or config["distill"]["threads"]
    results = run(config, pair, names, repeats=args.repeats, threads=threads)
    print(f"ctdbench bench: config {config['name']}, pair {pair}, {threads} threads, "
          f"median of {args.repeats} steps, each method alternating with the floor step")
    print(f"{'method':<28}{'s/step':>10}{'ratio':>8}{'peak MB':>10}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<28}  failed: {r['error']}")
        else:
            print(f"{name:<28}{r['seconds']:>10.3f}{r.get('ratio', float('nan')):>8.2f}{r['peak_rss_mb']:>10.0f}")
    out = Path(layout.results_dir(config)) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"pair": pair, "threads": threads, "results": results}, indent=2) + "\n")
    print(f"written {out}")
