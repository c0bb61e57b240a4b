"""results/<config>/ -> ``summary.csv``, aggregated and paired tables, and comparison figures.

Imports numpy, pandas and matplotlib, never the training stack, so the plots-only path
(``python -m analysis results/<config>``) runs anywhere the results are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.collect import (collect, headline, learning_curves, pair_teachers, summarize, write_summary,
                              write_whole)
from analysis.figures import make_figures
from analysis.paired import paired_differences, transfer, verdict_text

__all__ = ["collect", "headline", "learning_curves", "main", "make_figures", "paired_differences", "summarize",
           "transfer", "verdict_text", "write_summary", "write_tables"]

# Files written next to summary.csv (the README's "Reading the results" describes each).
STATS_CSV, PAIRED_CSV, TRANSFER_CSV, VERDICT_MD = "summary_stats.csv", "paired.csv", "transfer.csv", "headline.md"


def write_tables(config_dir: Path, table) -> dict[str, Path]:
    """Write the aggregated, paired and transfer tables and the verdict text next to summary.csv.

    Returns:
        ``name -> path`` of ``summary_stats.csv`` (mean, sd over seeds and 95% CI per pair, method,
        metric), ``paired.csv`` (method - SFT of the same seed), ``transfer.csv`` (share of the
        same-tokenizer KD gain kept per cross-tokenizer pair) and ``headline.md``.
    """
    config_dir = Path(config_dir)
    paired = paired_differences(table)
    transfers = transfer(table, pair_teachers(config_dir))
    paths = {name: config_dir / name for name in (STATS_CSV, PAIRED_CSV, TRANSFER_CSV, VERDICT_MD)}
    for name, frame in ((STATS_CSV, summarize(table)), (PAIRED_CSV, paired), (TRANSFER_CSV, transfers)):
        write_whole(paths[name], lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    text = verdict_text(paired, transfers)
    write_whole(paths[VERDICT_MD], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Regenerate every table and figure of one config; print paths, a text table and the verdict.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``): the config folder, and optionally
            ``--methods`` to order the methods after teacher and sft.

    Returns:
        The exit status (0).
    """
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path, help="results/<config>")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="display order of the methods after teacher and sft (default: alphabetical)")
    args = parser.parse_args(argv)
    table = collect(args.config_dir)
    print(f"{write_summary(args.config_dir, table)}  ({len(table)} rows)")
    tables = write_tables(args.config_dir, table)
    for path in tables.values():
        print(path)
    for path in make_figures(args.config_dir, table, preferred=args.methods):
        print(path)
    if len(table):
        print()
        print("mean ± 95% CI over seeds (Student t):")
        print(headline(table, preferred=args.methods).to_string(index=False))
        print()
        print(tables[VERDICT_MD].read_text(encoding="utf-8"))
    return 0
