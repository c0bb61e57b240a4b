"""analysis: tidy table, figures and the plots-only command on results written in the real layout."""

import contextlib
import io
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.collect import ResultsWarning, collect, headline, mean_ci, method_order, t_quantile_975, write_summary
from analysis.figures import make_figures, method_colors

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"bpe_to_sp": "bpe_teacher", "bpe_to_byte": "bpe_teacher", "sp_to_byte": "sp_teacher"}
METHODS = {"sft": 2.90, "alm+sft": 2.80, "bld": 2.70}  # true held-out bits per byte of each method
SEEDS = [0, 1, 2]
TEACHERS = {"bpe_teacher": 2.23, "sp_teacher": 2.41, "unused_teacher": 9.9}  # held-out bits per byte
N_EVAL_METRICS = 6  # 3 held-out + 3 cloze
N_RUN_METRICS = 11  # numeric fields of timing (3), memory (2), budget (6)


def bpb(pair: str, method: str, seed: int) -> float:
    return METHODS[method] + (0.1 if pair.endswith("byte") else 0.0) + 0.01 * (seed - 1)


def eval_json(bits_per_byte: float, acc: float) -> dict:
    return {
        "model_dir": "/x/student",
        "tasks": {
            "ctd_heldout": {"word_perplexity": 2 ** (bits_per_byte * 5.4), "word_perplexity_stderr": None,
                            "byte_perplexity": 2**bits_per_byte, "byte_perplexity_stderr": None,
                            "bits_per_byte": bits_per_byte, "bits_per_byte_stderr": None},
            "ctd_cloze": {"acc": acc, "acc_stderr": 0.03, "acc_norm": acc - 0.01, "acc_norm_stderr": 0.03,
                          "acc_bytes": acc + 0.01, "acc_bytes_stderr": 0.03},
        },
        "lm_eval": {"version": "0.4.13", "n-samples": {}, "higher_is_better": {}, "config": {}, "date": "x"},
        "timing": {"seconds": 3.0},
    }


def run_json(config: str, pair: str, method: str, seed: int) -> dict:
    return {
        "config_name": config, "pair": pair, "method": method, "seed": seed,
        "pair_spec": {"teacher": PAIRS[pair], "student_tokenizer": pair.split("_to_")[1], "teacher_tokenizer": "bpe"},
        "budget": {"optimizer_steps": 150, "documents": 2400, "text_bytes": 1_200_000, "student_tokens": 400_000,
                   "teacher_tokens": 0 if method == "sft" else 380_000, "teacher_forward_passes": 0,
                   "stream_sha256": "ab12"},
        "timing": {"wall_seconds": 30.0 + seed, "seconds_per_step": (30.0 + seed) / 150,
                   "tokens_per_second": 13_000.0},
        "memory": {"peak_rss_mb": 900.0 + 50 * (method != "sft"), "peak_cuda_mb": 0.0},
    }


def write_log(folder: Path, final_bpb: float) -> None:
    rows = [{"step": 0, "bytes_seen": 0, "val_bpb": 8.0}]
    for step in (25, 50, 75, 100, 125, 150):
        rows.append({"step": step, "bytes_seen": step * 8000, "lr": 1e-3, "loss": 2.0, "tokens_per_second": 1e4,
                     "terms": {"ce": 2.0}})
        rows.append({"step": step, "bytes_seen": step * 8000, "val_bpb": final_bpb + 1.5 * (1 - step / 150)})
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_results(root: Path, config: str = "demo") -> Path:
    """A finished grid of PAIRS x METHODS x SEEDS plus the teachers' evaluations."""
    config_dir = root / config
    for pair in PAIRS:
        for method in METHODS:
            for seed in SEEDS:
                folder = config_dir / pair / method / f"seed{seed}"
                folder.mkdir(parents=True)
                value = bpb(pair, method, seed)
                (folder / "run.json").write_text(json.dumps(run_json(config, pair, method, seed)))
                (folder / "eval.json").write_text(json.dumps(eval_json(value, 1.2 - value / 4)))
                write_log(folder, value)
    for teacher, value in TEACHERS.items():
        (config_dir / "teachers" / teacher).mkdir(parents=True)
        (config_dir / "teachers" / teacher / "eval.json").write_text(json.dumps(eval_json(value, 0.62)))
    # Things that are not runs: logs and benchmarks mirror the run layout with files.
    (config_dir / "logs" / "evaluate" / "bpe_to_sp" / "sft").mkdir(parents=True)
    (config_dir / "logs" / "evaluate" / "bpe_to_sp" / "sft" / "seed0.log").write_text("log")
    return config_dir


@pytest.fixture
def results(tmp_path) -> Path:
    return write_results(tmp_path)


def test_collect_rows_and_values(results):
    table = collect(results)
    assert list(table.columns) == ["config", "pair", "method", "seed", "task", "metric", "value", "stderr"]
    n_runs = len(PAIRS) * len(METHODS) * len(SEEDS)
    assert len(table) == n_runs * (N_EVAL_METRICS + N_RUN_METRICS) + len(PAIRS) * N_EVAL_METRICS
    assert not table.duplicated(["pair", "method", "seed", "task", "metric"]).any()
    assert set(table["config"]) == {"demo"}
    one = table[(table.pair == "bpe_to_byte") & (table.method == "alm+sft") & (table.seed == 2)]
    assert one.set_index("metric").loc["bits_per_byte", "value"] == pytest.approx(bpb("bpe_to_byte", "alm+sft", 2))
    assert one.set_index("metric").loc["acc", "stderr"] == pytest.approx(0.03)
    assert math.isnan(one.set_index("metric").loc["bits_per_byte", "stderr"])
    cost = one[one.task == "run"].set_index("metric")["value"]
    assert cost["seconds_per_step"] == pytest.approx(32 / 150) and cost["text_bytes"] == 1_200_000
    assert "stream_sha256" not in cost.index
    teacher = table[table.method == "teacher"]
    assert set(teacher.pair) == set(PAIRS) and set(teacher.seed) == {0}
    assert set(teacher.task) == {"ctd_heldout", "ctd_cloze"}
    teacher_bpb = teacher[teacher.metric == "bits_per_byte"].set_index("pair")["value"]
    assert teacher_bpb.to_dict() == {pair: TEACHERS[name] for pair, name in PAIRS.items()}


def test_summary_csv_round_trip(results):
    path = write_summary(results)
    assert path == results / "summary.csv"
    back = pd.read_csv(path)
    assert len(back) == len(collect(results))
    assert back["seed"].dtype.kind == "i"


def test_missing_and_partial_runs_are_skipped_with_warnings(results):
    (results / "bpe_to_sp" / "bld" / "seed2" / "run.json").unlink()  # still training
    (results / "bpe_to_sp" / "sft" / "seed1" / "eval.json").unlink()  # trained, not yet evaluated
    (results / "bpe_to_byte" / "sft" / "seed0" / "eval.json").write_text("{truncated")
    (results / "bpe_to_byte" / "bld" / "seed7").mkdir()  # empty run folder
    with pytest.warns(ResultsWarning) as caught:
        table = collect(results)
    messages = " ".join(str(w.message) for w in caught)
    assert "training not finished" in messages and "not evaluated" in messages and "unreadable" in messages
    rows = lambda pair, method, seed: table[(table.pair == pair) & (table.method == method) & (table.seed == seed)]
    assert rows("bpe_to_sp", "bld", 2).empty and rows("bpe_to_byte", "bld", 7).empty
    assert set(rows("bpe_to_sp", "sft", 1).task) == {"run"}
    assert set(rows("bpe_to_byte", "sft", 0).task) == {"run"}
    paths = make_figures(results, table)
    assert all(p.stat().st_size > 0 for p in paths)


def test_collect_without_teacher_eval_or_any_run(tmp_path):
    config_dir = write_results(tmp_path)
    (config_dir / "teachers" / "bpe_teacher" / "eval.json").unlink()
    with pytest.warns(ResultsWarning, match="teacher not evaluated"):
        table = collect(config_dir)
    assert set(table[table.method == "teacher"].pair) == {"sp_to_byte"}
    empty = tmp_path / "empty"
    empty.mkdir()
    table = collect(empty)
    assert table.empty and list(table.columns)[:3] == ["config", "pair", "method"]
    assert make_figures(empty, table) == []


def test_statistics():
    assert t_quantile_975(2) == pytest.approx(4.303)
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)  # expansion beyond the table
    assert t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)
    mean, ci = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([5.0])[0] == 5.0


def test_method_order_and_colors():
    order = method_order(["bld", "teacher", "alm+sft", "sft", "uld"], preferred=["uld"])
    assert order == ["teacher", "sft", "uld", "alm+sft", "bld"]
    colors = method_colors(order)
    assert len({colors[m] for m in order}) == len(order)
    many = method_colors(["sft"] + [f"m{i}" for i in range(12)])
    assert len(set(many.values())) == 14  # teacher, sft and 12 distinct others


def test_headline_table(results):
    text = headline(collect(results))
    row = text[(text.pair == "bpe_to_sp") & (text.method == "bld")].iloc[0]
    mean, ci = mean_ci([bpb("bpe_to_sp", "bld", s) for s in SEEDS])
    assert row["ctd_heldout/bits_per_byte"] == f"{mean:.3f} ± {ci:.3f}" and row["seeds"] == 3
    teacher = text[(text.pair == "bpe_to_sp") & (text.method == "teacher")].iloc[0]
    assert teacher["ctd_heldout/bits_per_byte"] == f"{TEACHERS['bpe_teacher']:.3f}"  # one value: no interval
    assert text.method.tolist()[:3] == ["teacher", "sft", "alm+sft"]


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """One in-process ``analysis.main`` run (figures are the slow part): (config dir, stdout)."""
    config_dir = write_results(tmp_path_factory.mktemp("plotted"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("error", ResultsWarning)  # a complete grid warns about nothing
        assert analysis.main([str(config_dir), "--methods", "bld"]) == 0
    return config_dir, out.getvalue()


def test_figures_are_written(plotted):
    config_dir, out = plotted
    paths = sorted((config_dir / "figures").glob("*.png"))
    names = {p.name for p in paths}
    assert {"ctd_heldout__bits_per_byte.png", "ctd_cloze__acc.png", "ctd_cloze__acc_bytes.png",
            "learning_curves.png", "cost.png", "headline.png", "paired__ctd_cloze__acc_bytes.png",
            "quality_cost.png"} <= names
    assert len(names) == N_EVAL_METRICS + 5
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert str(p) in out


def test_main_prints_summary_and_ordered_table(plotted):
    config_dir, out = plotted
    assert f"{config_dir / 'summary.csv'}" in out
    lines = [line.split() for line in out.splitlines() if line.strip().startswith("bpe_to_sp")]
    assert [line[1] for line in lines] == ["teacher", "sft", "bld", "alm+sft"]  # --methods bld
    assert "±" in out


def test_plots_only_command_in_a_fresh_interpreter(results):
    """``python -m analysis`` as the workflow runs it, checking it never loads the training stack."""
    script = ("import runpy, sys\n"
              "sys.argv = ['analysis', sys.argv[1]]\n"
              "try:\n    runpy.run_module('analysis', run_name='__main__', alter_sys=True)\n"
              "except SystemExit as e:\n    assert not e.code, e.code\n"
              "assert not {'torch', 'transformers', 'ctdbench', 'methods'} & set(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(results)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (results / "summary.csv").exists() and "learning_curves.png" in proc.stdout


def _plotted_points(ax):
    """Every data point drawn on ``ax`` in data coordinates: lines, markers, error bars, bar tops
    (reference lines such as ``axhline`` span the axes, not the data, and are left out)."""
    points = [line.get_xydata() for line in ax.lines if line.get_transform() == ax.transData]
    for coll in ax.collections:
        if hasattr(coll, "get_segments"):  # error bars
            points += [np.asarray(seg) for seg in coll.get_segments() if len(seg)]
        elif coll.get_offset_transform() == ax.transData:  # scatter markers
            points.append(np.asarray(coll.get_offsets()))
    for patch in ax.patches:
        x0, y0 = patch.get_xy()
        points.append(np.array([[x0, y0 + patch.get_height()]]))
    points = [p.reshape(-1, 2) for p in points if len(p)]
    return np.concatenate(points) if points else np.zeros((0, 2))


def test_axis_limits_contain_every_plotted_point(tmp_path, monkeypatch):
    """Each panel of each figure has its own limits around all of its data (the learning curves of a
    byte and a subword student differ more than methods do; a shared axis hid whole panels), and
    CIs of bounded metrics stay in range."""
    import analysis.figures as figures

    config_dir = write_results(tmp_path)
    # A byte student far from the others, as in the default config.
    for folder in config_dir.glob("bpe_to_byte/*/seed*"):
        rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        for row in rows:
            if "val_bpb" in row and row["step"]:
                row["val_bpb"] += 3.0
        (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Accuracy near 1 with seed spread: its CI would cross 1.
    for seed, acc in zip(SEEDS, (0.99, 0.90, 1.0)):
        path = config_dir / "bpe_to_sp" / "bld" / f"seed{seed}" / "eval.json"
        data = json.loads(path.read_text())
        data["tasks"]["ctd_cloze"]["acc"] = acc
        path.write_text(json.dumps(data))
    figs = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: figs.setdefault(path.name, fig) and path)
    figures.make_figures(config_dir, collect(config_dir))
    assert {"learning_curves.png", "headline.png", "ctd_cloze__acc.png", "quality_cost.png"} <= set(figs)
    for name, fig in figs.items():
        fig.canvas.draw()
        for ax in fig.axes:
            pts = _plotted_points(ax)
            pts = pts[np.isfinite(pts).all(1)]
            if not len(pts):
                continue
            (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
            assert (pts[:, 0] >= x0 - 1e-9).all() and (pts[:, 0] <= x1 + 1e-9).all(), (name, ax.get_title())
            assert (pts[:, 1] >= y0 - 1e-9).all() and (pts[:, 1] <= y1 + 1e-9).all(), (name, ax.get_title())
    acc = figs["ctd_cloze__acc.png"]
    tops = [seg[:, 1].max() for ax in acc.axes for coll in ax.collections if hasattr(coll, "get_segments")
            for seg in map(np.asarray, coll.get_segments())]
    assert max(tops) <= 1.0  # the CI is clipped to the metric's range
    assert figs["ctd_heldout__word_perplexity.png"].axes[0].get_yscale() == "log"


def test_crafted_results_files_cannot_reach_outside_the_results_folder(tmp_path):
    config_dir = write_results(tmp_path / "results")
    seed0 = config_dir / "bpe_to_sp" / "sft" / "seed0"
    crafted = eval_json(2.0, 0.5)
    crafted["tasks"]["../../../../escaped"] = {"/tmp/x": 0.77}
    (seed0 / "eval.json").write_text(json.dumps(crafted))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "eval.json").write_text(json.dumps(eval_json(0.123, 0.456)))
    run = run_json("demo", "bpe_to_sp", "sft", 0)
    run["pair_spec"]["teacher"] = "../../../outside"  # would read tmp_path/outside/eval.json
    (seed0 / "run.json").write_text(json.dumps(run))
    with pytest.warns(ResultsWarning, match="not a folder name"):
        table = collect(config_dir)
    paths = make_figures(config_dir, table)
    assert all(p.parent == config_dir / "figures" for p in paths)
    assert [p.name for p in tmp_path.rglob("*escaped*")] == ["_.._.._.._escaped___tmp_x.png"]
    assert not table["value"].isin([0.123, 0.456]).any()  # nothing read from outside
