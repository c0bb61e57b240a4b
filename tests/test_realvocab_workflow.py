"""workflows/config/realvocab.yaml in a reduced form: every method end to end on real vocabularies.

The config is read from the repository and cut down (2 kB of its corpus, a few steps, a few
evaluation documents) so that a real-vocabulary regression turns CI red within minutes: the
cl100k teacher with the 248k Qwen3.6 student runs every cross-tokenizer method but MinED, whose
vocabulary map alone (151k student pieces missing from cl100k, by edit distance) takes minutes;
MinED runs on the byte student, KD on the same-tokenizer pair. The Qwen2 pair is left to the
full config and to tests/test_realvocab.py.
"""

import csv
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def reduced_config() -> dict:
    config = yaml.safe_load((REPO / "workflows/config/realvocab.yaml").read_text())
    cross = [m for m in config["run"]["methods"] if m != "mined"]
    config.update(
        name="realvocab_ci",
        pairs={"cl100k_to_qwen3_6": {**config["pairs"]["cl100k_to_qwen3_6"], "methods": cross},
               "cl100k_to_byte": {**config["pairs"]["cl100k_to_byte"], "methods": ["sft", "mined"]},
               "cl100k_to_cl100k": {**config["pairs"]["cl100k_to_cl100k"], "methods": ["kd"]}},
        evaluate={"batch_size": 4, "max_length": 128, "n_cloze": 4, "limit": 4, "agreement_passages": 2},
    )
    config["teachers"]["cl100k_teacher"].update(train={"steps": 4, "batch_size": 4, "lr": 1.0e-2}, data={"segment_bytes": 128})
    config["distill"].update(train={"steps": 2, "batch_size": 2, "lr": 1.0e-2, "eval_every": 2, "checkpoint_every": 2},
                             data={"segment_bytes": 128, "train_bytes": 2048, "val_bytes": 256})
    config["tokenizers"] = {k: v for k, v in config["tokenizers"].items() if k != "qwen2"}
    return config


@pytest.fixture(scope="module")
def realvocab_run(tmp_path_factory, run_snakemake):
    workdir = tmp_path_factory.mktemp("realvocab")
    (REPO / "resources").mkdir(exist_ok=True)
    (workdir / "resources").symlink_to(REPO / "resources")  # the wheels download once per checkout
    path = workdir / "realvocab_ci.yaml"
    path.write_text(yaml.safe_dump(reduced_config()))
    result = run_snakemake(workdir, "--cores", "2", "--configfile", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "results" / "realvocab_ci"


def test_reduced_form_still_runs_every_method():
    import methods

    config = reduced_config()
    ran = {m for p in config["pairs"].values() for m in p["methods"]}
    assert ran == set(methods.available()) and ran == set(config["methods"])


@pytest.mark.slow
def test_every_method_trains_and_is_evaluated_on_real_vocabularies(realvocab_run):
    rows = list(csv.DictReader(open(realvocab_run / "summary.csv")))
    bpb = {(r["pair"], r["method"]): float(r["value"]) for r in rows if r["metric"] == "bits_per_byte"}
    expected = {(pair, m) for pair, p in reduced_config()["pairs"].items() for m in p["methods"]}
    assert expected <= set(bpb) and all(0 < v < 30 for v in bpb.values())
    figures = {p.name for p in (realvocab_run / "figures").glob("*.png")}
    assert {"ctd_heldout__bits_per_byte.png", "learning_curves.png"} <= figures
    for pair, vocab in (("cl100k_to_qwen3_6", 248077), ("cl100k_to_byte", 258), ("cl100k_to_cl100k", 100277)):
        student = next((realvocab_run / pair).glob("*/seed0/student/config.json"))
        assert json.loads(student.read_text())["vocab_size"] == vocab
    run = json.loads((realvocab_run / "cl100k_to_qwen3_6" / "bld" / "seed0" / "run.json").read_text())
    assert run["teacher_source"] == "online" and run["budget"]["optimizer_steps"] == 2
