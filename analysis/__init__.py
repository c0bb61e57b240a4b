"""results/<config>/ -> a tidy table (summary.csv) and comparison figures.

Reads result files only (numpy, pandas, matplotlib): runs standalone, without the training stack.
``python -m analysis results/<config>`` regenerates everything from existing results.
"""

from analysis.collect import collect, write_summary
from analysis.figures import make_figures


def main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path, help="results/<config>")
    args = parser.parse_args(argv)
    table = collect(args.config_dir)
    path = write_summary(args.config_dir, table)
    print(f"wrote {path} ({len(table)} rows)")
    for fig in make_figures(args.config_dir, table):
        print(f"wrote {fig}")
    from analysis.collect import headline

    print(headline(table).to_string())


__all__ = ["collect", "write_summary", "make_figures", "main"]
