"""Time of the MinED vocabulary map (``methods.mined.mined_map``) on synthetic vocabulary pairs.

    python benchmarks/bench_mined_map.py --vocab 32000 --shared 0.7

Each vocabulary holds every byte plus random BPE-like pieces (lowercase words and fragments,
half with a leading space, lengths 2-12); a fraction ``--shared`` of the teacher's pieces is
also in the student's vocabulary, as between real tokenizers of one language. The unshared
student pieces are the ones the edit-distance search has to work for.
"""

from __future__ import annotations

import argparse
import random
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--shared", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for v in args.vocab:
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
