"""Time of the MinED vocabulary map (``methods.mined.mined_map``) on synthetic vocabulary pairs.

    python benchmarks/bench_mined_map.py --vocab 32000 --shared 0.7
    python benchmarks/bench_mined_map.py --families cl100k:qwen2 cl100k:qwen3_6   # real vocabularies

Each vocabulary holds every byte plus random BPE-like pieces (lowercase words and fragments,
half with a leading space, lengths 2-12); a fraction ``--shared`` of the teacher's pieces is
also in the student's vocabulary, as between real tokenizers of one language. The unshared
student pieces are the ones the edit-distance search has to work for. ``--families T:S`` times
the map between real tokenizer families instead (``ctdbench.families``, teacher T, student S).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from methods.mined import mined_map


def vocabulary(rng: random.Random, n: int, start=(), exclude: set[bytes] = frozenset()) -> list[bytes]:
    """``start``, every single byte, then new random pieces not in ``exclude`` up to ``n``."""
    out = {bytes([b]) for b in range(256)} | set(start)
    letters = b"etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - k for k in range(26)]  # frequent letters first, roughly as in English
    while len(out) < n:
        word = bytes(rng.choices(letters, weights, k=rng.randint(2, 12)))
        piece = b" " + word if rng.random() < 0.5 else word
        if piece not in exclude:
            out.add(piece)
    return sorted(out)


def real_table(family: str) -> list[bytes | None]:
    from ctdbench.families import pretrained_tokenizer
    from ctdbench.tokbytes import token_bytes

    return token_bytes(pretrained_tokenizer(family, Path("resources")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="synthetic sizes (default 32000)")
    parser.add_argument("--shared", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=[], help="TEACHER:STUDENT pairs of real families")
    args = parser.parse_args()
    for pair in args.families:
        teacher, student = (real_table(name) for name in pair.split(":"))
        t0 = time.process_time()
        mapped = mined_map(teacher, student)
        exact = len(set(student) & set(teacher)) - 1  # None is in both
        print(f"{pair} ({len(teacher)} x {len(student)} ids): {time.process_time() - t0:.1f} CPU s "
              f"({exact} exact matches, {int((mapped >= 0).sum()) - exact} by edit distance)")
    for v in args.vocab or ([] if args.families else [32000]):
        rng = random.Random(args.seed)
        teacher = vocabulary(rng, v)
        shared = rng.sample(teacher, int(args.shared * v))
        student = vocabulary(rng, v, start=shared, exclude=set(teacher))
        t0 = time.perf_counter()
        mapped = mined_map(teacher, student)
        dt = time.perf_counter() - t0
        exact = len(set(student) & set(teacher))
        print(f"{v} x {v}: {dt:.1f} s ({exact} exact matches, {len(student) - exact} by edit distance, "
              f"{int((mapped >= 0).sum())} mapped)")


if __name__ == "__main__":
    main()
