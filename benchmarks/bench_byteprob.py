"""Speed of the token -> byte conversion (``ctdbench.byteprob``) against the memory-bound floor.

The floor is ONE ``torch.cumsum`` over the same [T, V] float32 logprobs: any exact conversion has
to read every probability at least once. Conversion and floor are timed interleaved (so load from
other processes hits both alike), medians over the repeats; ratios are reported for wall-clock
time and for process CPU time (the latter is robust to a busy machine). Peak extra memory is the
high-water mark of the torch CPU allocator during one conversion (torch.profiler memory events).

Run: ``python benchmarks/bench_byteprob.py [--vocab 32000 128000] [--T 512] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time

import torch

from ctdbench.byteprob import VocabByteIndex, next_byte_distributions


def synthetic_vocab(vocab_size: int, seed: int = 0, max_len: int = 16) -> list[bytes | None]:
    """A BPE-like byte table: id 0 is a special token (None), then the 256 single bytes, then merges.

    Each merge appends one byte (Zipf-distributed: lowercase letters first, then space, other
    ASCII, and UTF-8 lead / continuation bytes last) to an existing entry one byte shorter, with
    the target length drawn around 6.5 bytes (1..max_len). Every entry's prefixes are thus entries
    too and entries share prefixes heavily, as in a BPE vocabulary; roughly a third start with a
    space, as word-initial BPE tokens do.
    """
    rng = random.Random(seed)
    frequent = b"etaoinshrdlucmfwypvbgkjqxz"
    alphabet = list(frequent) + [b for b in range(256) if b not in frequent]
    cum = list(itertools.accumulate(1 / (r + 1) ** 1.1 for r in range(256)))
    by_len: dict[int, list[bytes]] = {1: [bytes([b]) for b in alphabet]}
    table: list[bytes | None] = [None, *by_len[1]]
    seen = set(by_len[1])
    while len(table) < vocab_size:
        length = min(max(round(rng.gauss(6.5, 2.5)), 2), max_len)
        length = min(length, max(by_len) + 1)
        if length > 2:
            head = rng.choice(by_len[length - 1])
        else:  # a word-initial space, or a frequent byte
            head = b" " if rng.random() < 0.35 else bytes(rng.choices(alphabet, cum_weights=cum))
        tok = head + bytes(rng.choices(alphabet, cum_weights=cum))
        if tok not in seen:
            seen.add(tok)
            table.append(tok)
            by_len.setdefault(length, []).append(tok)
    return table


def split_words(table: list[bytes | None], T: int, rng: random.Random) -> list[int]:
    """T token ids spelling random vocabulary entries ("words"): half of them whole, half split
    into a prefix entry and a longest-match tokenization of the rest, so that a1's walks follow
    real trie paths."""
    by_bytes = {b: i for i, b in enumerate(table) if b}
    ids: list[int] = []
    while len(ids) < T:
        word = table[rng.randrange(257, len(table))]
        # Every prefix of a synthetic entry is an entry.
        i = len(word) if rng.random() < 0.5 else rng.randrange(1, len(word) + 1)
        ids.append(by_bytes[word[:i]])
        while i < len(word):
            j = max(j for j in range(i + 1, len(word) + 1) if word[i:j] in by_bytes)
            ids.append(by_bytes[word[i:j]])
            i = j
    return ids[:T]


def _peak_extra_bytes(fn) -> int:
    """High-water mark of the torch CPU allocator while ``fn`` runs, from profiler memory events.

    Each operator event carries what it allocated minus what it freed itself; tensors freed later
    appear as "[memory]" events; the running sum in time order is the live extra memory.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def bench_conversion(vocab_size: int, T: int = 512, *, modes=("a0", "a1"), repeats: int = 7,
                     threads: int | None = None, row_chunk: int | None = None, seed: int = 0) -> dict:
    """Time ``next_byte_distributions`` on a synthetic vocabulary against one float32 cumsum.

    Args:
        vocab_size: V of the synthetic vocabulary.
        T: teacher rows (tokens) per call.
        modes: conversion modes to time.
        repeats: timed repeats (after one warm-up); medians are reported.
        threads: torch threads (None: the machine default).
        row_chunk: passed through (None: the conversion's default).
        seed: vocabulary, token and logprob seed.

    Returns:
        A JSON-able dict: sizes, index build time, the floor's median times, and per mode the
        median times, the wall and CPU ratios to the floor, bytes per call and peak extra memory.
    """
    if threads:
        torch.set_num_threads(threads)
    table = synthetic_vocab(vocab_size, seed)
    t0 = time.perf_counter()
    index = VocabByteIndex.build(table)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(split_words(table, T, random.Random(seed)))
    logprobs = torch.randn(T, vocab_size, generator=g) * 2
    for rows in logprobs.split(64):  # in place, chunked: no [T, V] temporaries
        rows -= rows.logsumexp(-1, keepdim=True)

    def floor():
        torch.cumsum(logprobs, dim=-1)

    calls = {m: (lambda m=m: next_byte_distributions(logprobs, ids, None, m, index=index, row_chunk=row_chunk))
             for m in modes}
    times = {name: ([], []) for name in ["floor", *modes]}
    for rep in range(repeats + 1):
        for name, fn in [("floor", floor), *calls.items()]:
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if rep:  # the first round is a warm-up
                times[name][0].append(time.perf_counter() - w0)
                times[name][1].append(time.process_time() - c0)
    med = {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}
    result = {
        "vocab_size": vocab_size, "T": T, "threads": torch.get_num_threads(), "repeats": repeats,
        "mean_token_bytes": sum(map(len, table[1:])) / (vocab_size - 1),
        "index_build_s": round(build_s, 3), "trie_nodes": len(index.node_lo),
        "floor_cumsum_ms": {"wall": round(med["floor"][0] * 1e3, 1), "cpu": round(med["floor"][1] * 1e3, 1)},
    }
    for m, fn in calls.items():
        result[m] = {
            "wall_ms": round(med[m][0] * 1e3, 1), "cpu_ms": round(med[m][1] * 1e3, 1),
            "ratio_wall": round(med[m][0] / med["floor"][0], 2), "ratio_cpu": round(med[m][1] / med["floor"][1], 2),
            "n_bytes": len(fn()), "peak_extra_mb": round(_peak_extra_bytes(fn) / 2**20, 1),
        }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--row-chunk", type=int, default=None)
    args = parser.parse_args()
    for V in args.vocab:
        print(json.dumps(bench_conversion(V, args.T, repeats=args.repeats, threads=args.threads,
                                          row_chunk=args.row_chunk)), flush=True)
