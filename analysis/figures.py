"""Comparison figures from the tidy table: metric bars, learning curves, cost.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot): no global state, no
interactive backend, nothing kept alive between figures. Every method keeps one color in every
figure; the teacher and SFT are drawn as reference lines.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.collect import RUN_TASK, SFT, TEACHER, learning_curves, method_order, summarize, write_whole

TASK_TITLES = {"ctd_heldout": "Held-out text", "ctd_cloze": "Line-completion cloze, 4 choices",
               "byte_agreement": "Byte-level agreement with the teacher"}
METRIC_LABELS = {
    "bits_per_byte": ("bits per byte", False),
    "byte_perplexity": ("perplexity per byte", False),
    "word_perplexity": ("perplexity per word", False),
    "acc": ("accuracy (fraction correct)", True),
    "acc_norm": ("accuracy, choice log-lik. per character", True),
    "acc_bytes": ("accuracy, choice log-lik. per byte", True),
    "kl_per_byte": ("KL(teacher || student), bits per byte", False),
    "top1": ("top-1 next-byte agreement (fraction)", True),
    "kl_boundary": ("KL(teacher || student) at shared token starts, bits per byte", False),
    "top1_boundary": ("top-1 next-byte agreement at shared token starts", True),
    "seconds_per_step": ("seconds per optimizer step (s)", False),
    "peak_rss_mb": ("peak CPU memory, RSS (MB)", False),
    "peak_cuda_mb": ("peak GPU memory (MB)", False),
}
CHANCE = {"ctd_cloze": 0.25}
COST_METRICS = ("seconds_per_step", "peak_rss_mb", "peak_cuda_mb")
SFT_COLOR = "#7f7f7f"
DPI = 130


def method_colors(methods: list[str]) -> dict[str, tuple]:
    """One color per method, the same in every figure: SFT gray, the others tab10 (tab20 if many)."""
    others = [m for m in methods if m not in (TEACHER, SFT)]
    cmap = matplotlib.colormaps["tab10" if len(others) <= 9 else "tab20"]
    palette = [c for i, c in enumerate(cmap.colors) if cmap.name != "tab10" or i != 7]  # tab10's gray is SFT's
    colors = {m: palette[i % len(palette)] for i, m in enumerate(others)}
    return {TEACHER: "black", SFT: SFT_COLOR, **colors}


def make_figures(config_dir: Path, table: pd.DataFrame, preferred: list[str] | None = None) -> list[Path]:
    """Write every figure of one config into ``config_dir/figures``.

    Args:
        config_dir: ``results/<config>`` (its run folders give the learning curves).
        table: The :func:`analysis.collect.collect` table.
        preferred: Method order after teacher and sft (e.g. the config's); others alphabetical.

    Returns:
        The written PNG paths: ``<task>__<metric>.png`` per evaluation metric,
        ``learning_curves.png`` and ``cost.png`` when their data exist.
    """
    out = Path(config_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    curves = learning_curves(config_dir)
    order = method_order(set(table["method"]) | set(curves["method"]), preferred)
    colors = method_colors(order)
    stats = summarize(table)
    paths = []
    evals = table[table["task"] != RUN_TASK][["task", "metric"]].drop_duplicates()
    for task, metric in sorted(evals.itertuples(index=False, name=None)):
        paths.append(metric_figure(table, stats, task, metric, out / file_name(f"{task}__{metric}.png"), colors, order))
    if len(curves):
        paths.append(learning_curve_figure(curves, out / "learning_curves.png", colors, order))
    if _cost_metrics(table):
        paths.append(cost_figure(table, stats, out / "cost.png", colors, order))
    return paths


def metric_figure(table, stats, task, metric, path, colors, order) -> Path:
    """One panel per pair: bars per method (mean over seeds, 95% CI), seeds as dots, reference lines."""
    rows = table[(table["task"] == task) & (table["metric"] == metric)]
    st = stats[(stats["task"] == task) & (stats["metric"] == metric)]
    pairs = sorted(rows["pair"].unique())
    label, higher = METRIC_LABELS.get(metric, (metric, None))
    fig, axes = _panels(len(pairs), max(1, len(set(rows["method"]) - {TEACHER})))
    chance = CHANCE.get(task) if metric.startswith("acc") else None
    for ax, pair in zip(axes, pairs):
        _bar_panel(ax, rows[rows["pair"] == pair], st[st["pair"] == pair], colors, order, chance)
        ax.set_title(f"pair: {pair}", fontsize=10)
    zoomed = _set_ylim(axes, rows["value"], st, chance)
    _reference_legend(fig, axes)
    axes[0].set_ylabel(label + _better(higher))
    fig.suptitle(f"{TASK_TITLES.get(task, task)} ({task}): {label}", fontsize=12)
    note = "bars: mean over seeds · error bars: 95% CI (Student t) · dots: seeds"
    fig.supxlabel(note + (" · y axis does not start at 0" if zoomed else ""), fontsize=8, color="dimgray")
    return _save(fig, path)


def learning_curve_figure(curves: pd.DataFrame, path: Path, colors: dict, order: list[str]) -> Path:
    """Validation bits per byte against training text seen; mean over seeds, band = seed range."""
    pairs = sorted(curves["pair"].unique())
    fig, axes = _panels(len(pairs), 6)
    for ax, pair in zip(axes, pairs):
        sub = curves[curves["pair"] == pair]
        for method in [m for m in order if m in set(sub["method"])]:
            per_step = sub[sub["method"] == method].groupby("step").agg(
                mb=("bytes_seen", "mean"), mean=("val_bpb", "mean"), lo=("val_bpb", "min"), hi=("val_bpb", "max"))
            x = per_step["mb"] / 1e6
            ax.plot(x, per_step["mean"], marker="o", ms=3, lw=1.6, color=colors[method], label=method)
            ax.fill_between(x, per_step["lo"], per_step["hi"], color=colors[method], alpha=0.15, lw=0)
        trained = sub[sub["bytes_seen"] > 0]["val_bpb"]
        # The untrained model (step 0) sits far above everything else; clip it to keep the
        # differences between methods visible.
        if len(trained) and sub["val_bpb"].max() > trained.max():
            lo, hi = trained.min(), trained.max()
            ax.set_ylim(lo - 0.1 * (hi - lo or 1), hi + 0.25 * (hi - lo or 1))
            ax.text(0.02, 0.02, f"untrained model off-scale ({sub['val_bpb'].max():.2f})", transform=ax.transAxes,
                    va="bottom", fontsize=8, color="dimgray")
        ax.set_title(f"pair: {pair}", fontsize=10)
        ax.set_xlabel("training text seen (MB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("validation bits per byte" + _better(False))
    fig.suptitle("Learning curves: mean over seeds (band: range over seeds)", fontsize=12)
    return _save(fig, path)


def cost_figure(table, stats, path, colors, order) -> Path:
    """Rows: seconds per step, peak memory (GPU too if any was used); columns: pairs."""
    run = table[table["task"] == RUN_TASK]
    metrics = _cost_metrics(table)
    pairs = sorted(run["pair"].unique())
    n_methods = max(1, run["method"].nunique())
    fig = Figure(figsize=(max(3.6, 1.0 + 0.6 * n_methods) * len(pairs), 3.4 * len(metrics) + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(metrics), len(pairs), squeeze=False, sharey="row")
    for r, metric in enumerate(metrics):
        rows, st = run[run["metric"] == metric], stats[(stats["task"] == RUN_TASK) & (stats["metric"] == metric)]
        for c, pair in enumerate(pairs):
            ax = axes[r][c]
            _bar_panel(ax, rows[rows["pair"] == pair], st[st["pair"] == pair], colors, order, None)
            ax.set_title(f"pair: {pair}", fontsize=10)
        axes[r][0].set_ylabel(METRIC_LABELS[metric][0] + _better(False))
    _reference_legend(fig, axes.ravel())
    fig.suptitle("Cost per method: mean over seeds, 95% CI", fontsize=12)
    return _save(fig, path)


def _cost_metrics(table: pd.DataFrame) -> list[str]:
    """The cost metrics with data (peak GPU memory is all zeros on a CPU run)."""
    run = table[table["task"] == RUN_TASK]
    return [m for m in COST_METRICS if (run[run["metric"] == m]["value"] > 0).any()]


def _panels(n_panels: int, n_bars: int):
    fig = Figure(figsize=(max(3.6, 1.2 + 0.62 * n_bars) * n_panels, 4.4), layout="constrained")
    return fig, fig.subplots(1, n_panels, squeeze=False, sharey=True)[0]


def _bar_panel(ax, rows: pd.DataFrame, st: pd.DataFrame, colors: dict, order: list[str], chance) -> None:
    """Bars per method (not the teacher), error bars where n >= 2, seed dots, reference lines."""
    methods = [m for m in order if m in set(st["method"]) and m != TEACHER]
    st = st.set_index("method")
    x = np.arange(len(methods))
    means = np.array([st.loc[m, "mean"] for m in methods])
    cis = np.array([st.loc[m, "ci95"] for m in methods])
    ax.bar(x, means, width=0.7, color=[colors[m] for m in methods], alpha=0.85, zorder=2)
    has_ci = np.isfinite(cis)
    if has_ci.any():
        ax.errorbar(x[has_ci], means[has_ci], yerr=cis[has_ci], fmt="none", ecolor="black", capsize=4, lw=1.2,
                    zorder=4)
    jitter = np.random.default_rng(0)  # fixed: the same figure every time
    for i, m in enumerate(methods):
        values = rows[rows["method"] == m]["value"].to_numpy()
        if len(values) > 1:
            ax.scatter(i + jitter.uniform(-0.15, 0.15, len(values)), values, s=12, color="black", alpha=0.6,
                       zorder=5)
        top = np.nanmax([means[i], means[i] + np.nan_to_num(cis[i]), *values])
        # Flag bars resting on fewer seeds than their neighbours (unfinished or failed runs).
        fewer = f" (n={st.loc[m, 'n']})" if st.loc[m, "n"] < st.loc[methods, "n"].max() else ""
        ax.annotate(_fmt(means[i]) + fewer, (i, top), textcoords="offset points", xytext=(0, 3), ha="center",
                    fontsize=8, zorder=6)
    if TEACHER in st.index:
        teacher = st.loc[TEACHER, "mean"]
        ax.axhline(teacher, color="black", ls="--", lw=1.3, label="teacher", zorder=3)
        ax.annotate(f"teacher {_fmt(teacher)}", (0, teacher), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(3, 2), fontsize=7, zorder=6)
    if SFT in methods:
        ax.axhline(st.loc[SFT, "mean"], color=SFT_COLOR, ls=":", lw=1.6, label="sft mean", zorder=3)
    if chance is not None:
        ax.axhline(chance, color="firebrick", ls="-.", lw=1, label=f"chance ({chance:g})", zorder=3)
    ax.set_xticks(x, methods, rotation=30 if len(methods) > 3 else 0, ha="right" if len(methods) > 3 else "center")
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _reference_legend(fig: Figure, axes) -> None:
    """One legend for the reference lines of all panels, outside them so it hides no data."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize=8)


def _set_ylim(axes, values: pd.Series, st: pd.DataFrame, chance) -> bool:
    """Zoom on the range of the data (bars then do not start at 0); True if zoomed."""
    lows = [values.min(), (st["mean"] - st["ci95"].fillna(0)).min()]
    highs = [values.max(), (st["mean"] + st["ci95"].fillna(0)).max()]
    if chance is not None:
        lows.append(chance)
        highs.append(chance)
    lo, hi = np.nanmin(lows), np.nanmax(highs)
    pad = 0.12 * (hi - lo) if hi > lo else 0.1 * abs(hi) or 1.0
    bottom = lo - pad
    zoomed = lo > 0 and bottom > 0.1 * hi
    axes[0].set_ylim(bottom if zoomed else min(0.0, bottom), hi + 1.5 * pad)
    return zoomed


def _better(higher: bool | None) -> str:
    return "" if higher is None else ("\n(higher is better)" if higher else "\n(lower is better)")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 100 else f"{x:.3f}"


def file_name(name: str) -> str:
    """``name`` as one harmless file name: task and metric names come from eval.json files."""
    return re.sub(r"[^A-Za-z0-9_.+\-\[\]]", "_", name).lstrip(".")


def _save(fig: Figure, path: Path) -> Path:
    return write_whole(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=path.suffix[1:]))
