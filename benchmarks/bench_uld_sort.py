"""Speed of ULD's sorting (``ctdbench.kernels``) against its physical floor, one ``torch.sort``.

ULD's distance needs, per row, the student's probabilities in descending order (their order, for
the gradient) and the teacher's top-k values in descending order (k = the smaller vocabulary) plus
the sum of the rest. Any exact implementation sorts both rows at least once, so the floor is ONE
``torch.sort(descending=True)`` of the same [T, V] float32 rows per side. Timed interleaved with
the floor (load from other processes hits both alike), median of the per-repeat ratios, for:

- ``student order``: ``descending_order(p_s, k)`` against ``torch.sort(p_s)``;
- ``teacher split``: ``split_sorted(p_t, k)`` against ``torch.sort(p_t)``;
- ``distance + grad``: ``sorted_l1(p_s, p_t)`` forward and backward against the two sorts.

Rows are softmaxes of N(0, 3) logits: peaked, as a language model's are.

Run: ``python benchmarks/bench_uld_sort.py [--vocab 151851 248077] [--teacher-vocab 100277]
[--T 512] [--threads 1 2] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ctdbench.kernels import descending_order, sorted_l1, split_sorted


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ratio(fn, floor, repeats: int) -> tuple[float, float, float]:
    """(median seconds of fn, median seconds of the floor, median of the adjacent ratios)."""
    fn(), floor()  # warm-up: allocator, thread pools
    pairs = [(_timed(fn), _timed(floor)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(a / b for a, b in pairs))


def rows(T: int, V: int, seed: int) -> torch.Tensor:
    return (torch.randn(T, V, generator=torch.Generator().manual_seed(seed)) * 3).softmax(-1)


def bench(T: int, student_vocab: int, teacher_vocab: int, repeats: int) -> dict:
    p_s, p_t = rows(T, student_vocab, 0), rows(T, teacher_vocab, 1)
    k = min(student_vocab, teacher_vocab)
    sort = lambda p: torch.sort(p, dim=-1, descending=True)  # noqa: E731

    def distance():
        p = p_s.clone().requires_grad_()
        sorted_l1(p, p_t).sum().backward()

    out = {}
    for name, fn, floor in (
        ("student order", lambda: descending_order(p_s, k), lambda: sort(p_s)),
        ("teacher split", lambda: split_sorted(p_t, k), lambda: sort(p_t)),
        ("distance + grad", distance, lambda: (sort(p_s), sort(p_t))),
    ):
        seconds, floor_seconds, ratio = _ratio(fn, floor, repeats)
        out[name] = {"seconds": seconds, "floor_seconds": floor_seconds, "ratio": ratio}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[151_851, 248_077], help="student vocabularies")
    parser.add_argument("--teacher-vocab", type=int, default=100_277, help="teacher vocabulary (cl100k)")
    parser.add_argument("--T", type=int, default=512, help="rows (positions)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    args = parser.parse_args()
    results = []
    print(f"{'threads':>7} {'V student':>10} {'V teacher':>10}  {'part':<16} {'s':>7} {'floor s':>8} {'ratio':>6}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for V in args.vocab:
            for part, r in bench(args.T, V, args.teacher_vocab, args.repeats).items():
                print(f"{threads:>7} {V:>10,} {args.teacher_vocab:>10,}  {part:<16} {r['seconds']:>7.3f} "
                      f"{r['floor_seconds']:>8.3f} {r['ratio']:>6.2f}", flush=True)
                results.append({"threads": threads, "student_vocab": V, "teacher_vocab": args.teacher_vocab,
                                "T": args.T, "part": part, **r})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
