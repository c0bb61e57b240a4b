"""results/<config>/ -> ``summary.csv`` and comparison figures, from result files only.

Imports numpy, pandas and matplotlib, never the training stack, so the plots-only path
(``python -m analysis results/<config>``) runs anywhere the results are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.collect import collect, headline, learning_curves, summarize, write_summary
from analysis.figures import make_figures

__all__ = ["collect", "headline", "learning_curves", "main", "make_figures", "summarize", "write_summary"]


def main(argv: list[str] | None = None) -> int:
    """Regenerate ``summary.csv`` and every figure of one config; print paths and a text table.

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
    for path in make_figures(args.config_dir, table, preferred=args.methods):
        print(path)
    if len(table):
        print()
        print(headline(table, preferred=args.methods).to_string(index=False))
    return 0
