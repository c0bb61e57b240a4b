"""Per-job specs and the generic per-pair precomputation hook (``DistillationMethod.precompute``)."""

import json
from pathlib import Path

import pytest

import methods
from ctdbench import cli, specs
from ctdbench import config as ctd_config
from methods.base import DistillationMethod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config():
    return ctd_config.load(REPO / "workflows" / "config" / "smoke.yaml")


def test_the_precomputed_file_reaches_its_method_spec_only(config):
    spec = specs.distill_spec(config, "bpe_to_sp", "mined", 0)
    # The path MinED's spec has always named: its runs keep their specs and digests.
    assert spec["hparams"] == {"map_path": "results/smoke/maps/bpe_to_sp/mined.npy"}
    assert specs.precomputed_path(config, "bpe_to_sp", "mined") == spec["hparams"]["map_path"]
    assert specs.precomputed_path(config, "bpe_to_sp", "bld") is None
    assert specs.distill_spec(config, "bpe_to_sp", "bld", 0)["hparams"] == {}
    config["methods"]["mined"]["map_path"] = "results/shared/{key}.npy"  # the config's own file wins
    assert specs.distill_spec(config, "bpe_to_sp", "mined", 0)["hparams"]["map_path"] == "results/shared/{key}.npy"


class Lengths(DistillationMethod):
    """A stand-in method with its own per-pair file: the token lengths of both vocabularies."""

    needs_teacher = False
    precomputed_arg, precomputed_suffix = "lengths_path", ".json"

    def __init__(self, ctx, lengths_path: str | None = None):
        super().__init__(ctx)
        self.lengths = json.loads(Path(lengths_path).read_text())

    @classmethod
    def precompute(cls, student_side, teacher_side, path):
        lengths = {side: [len(b or b"") for b in s.token_bytes] for side, s in
                   (("student", student_side), ("teacher", teacher_side))}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(lengths))
        return {"student_ids": len(lengths["student"])}


def test_a_new_method_with_a_per_pair_file_needs_only_its_class(config, tmp_path, monkeypatch, sides):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.register("lengths")(Lengths)
    config["methods"]["lengths"] = {}
    path = specs.precomputed_path(config, "bpe_to_byte", "lengths")
    assert path == "results/smoke/maps/bpe_to_byte/lengths.json"
    assert specs.distill_spec(config, "bpe_to_byte", "lengths", 1)["hparams"] == {"lengths_path": path}
    # The workflow's stage: the method's file and a receipt, from the two tokenizer folders.
    student_side, teacher_side = sides
    for name, side in (("student", student_side), ("teacher", teacher_side)):
        side.tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "maps" / "p" / "lengths.json"
    cli.main(["precompute", "--spec", json.dumps(specs.precompute_spec("lengths")),
              "--student-tokenizer", str(tmp_path / "student"), "--teacher-tokenizer", str(tmp_path / "teacher"),
              "--out", str(out), "--receipt", str(tmp_path / "receipt.json")])
    lengths = json.loads(out.read_text())
    assert lengths["student"] == [len(b or b"") for b in student_side.token_bytes]
    assert lengths["teacher"] == [len(b or b"") for b in teacher_side.token_bytes]
    receipt = json.loads((tmp_path / "receipt.json").read_text())
    assert receipt["method"] == "lengths" and receipt["student_ids"] == len(student_side.token_bytes)


def test_precompute_refuses_a_method_without_the_hook(tmp_path):
    with pytest.raises(SystemExit, match="bld has nothing to precompute"):
        cli.main(["precompute", "--spec", json.dumps({"method": "bld"}), "--student-tokenizer", "x",
                  "--teacher-tokenizer", "y", "--out", str(tmp_path / "a"), "--receipt", str(tmp_path / "b")])
