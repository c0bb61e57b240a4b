"""Outputs written whole or not at all: a reader (Snakemake, a resumed run, the analysis) never
sees a half-written file, whatever kills the writer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_dir(target: str | Path, write) -> None:
    """Write a folder whole or not at all: ``write(folder)`` fills one beside it, renamed into place."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
