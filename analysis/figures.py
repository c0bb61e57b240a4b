"""Comparison figures from the tidy table: metric bars, learning curves, cost.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot): no global state, no
interactive backend, nothing kept alive between figures. Every method keeps one color in every
figure; the teacher and SFT are drawn as reference lines.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.collect import RUN_TASK, SFT, TEACHER, learning_curves, method_order, summarize, write_whole
from analysis.paired import (BETTER, HEADLINE, HIGHER_IS_BETTER, PAIRED_FIGURES, UNCLEAR, paired_differences,
                             per_seed_differences)

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
# The range each metric can take: confidence intervals are clipped to it (a mean +- CI of a
# fraction or a time must not leave [0, 1] or cross 0).
BOUNDS = {"acc": (0, 1), "acc_norm": (0, 1), "acc_bytes": (0, 1), "top1": (0, 1), "top1_boundary": (0, 1),
          "bits_per_byte": (0, None), "kl_per_byte": (0, None), "kl_boundary": (0, None),
          "byte_perplexity": (1, None), "word_perplexity": (1, None),
          "seconds_per_step": (0, None), "peak_rss_mb": (0, None), "peak_cuda_mb": (0, None)}
LOG_SCALE = {"byte_perplexity", "word_perplexity"}  # spans orders of magnitude across tokenizers
WRAP = 48  # characters per line of titles and axis labels (long ones were clipped)
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


def make_figures(config_dir: Path, table: pd.DataFrame, preferred: list[str] | None = None,
                 paired: pd.DataFrame | None = None) -> list[Path]:
    """Write every figure of one config into ``config_dir/figures``.

    Args:
        config_dir: ``results/<config>`` (its run folders give the learning curves).
        table: The :func:`analysis.collect.collect` table.
        preferred: Method order after teacher and sft (e.g. the config's); others alphabetical.
        paired: The :func:`analysis.paired.paired_differences` table (computed if None).

    Returns:
        The written PNG paths: ``headline.png`` (the paired held-out bits per byte) and
        ``paired__<task>__<metric>.png`` for the other paired metrics, ``<task>__<metric>.png``
        per evaluation metric, ``learning_curves.png``, ``cost.png`` and ``quality_cost.png`` when
        their data exist.
    """
    out = Path(config_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    curves = learning_curves(config_dir)
    order = method_order(set(table["method"]) | set(curves["method"]), preferred)
    colors = method_colors(order)
    stats = summarize(table)
    paired = paired_differences(table) if paired is None else paired
    paths = []
    for task, metric in PAIRED_FIGURES:
        if len(paired[(paired["task"] == task) & (paired["metric"] == metric)]):
            name = "headline.png" if (task, metric) == HEADLINE else file_name(f"paired__{task}__{metric}.png")
            paths.append(paired_figure(table, paired, task, metric, out / name, colors, order))
    evals = table[table["task"] != RUN_TASK][["task", "metric"]].drop_duplicates()
    for task, metric in sorted(evals.itertuples(index=False, name=None)):
        paths.append(metric_figure(table, stats, task, metric, out / file_name(f"{task}__{metric}.png"), colors, order))
    if len(curves):
        paths.append(learning_curve_figure(curves, out / "learning_curves.png", colors, order))
    if _cost_metrics(table):
        paths.append(cost_figure(table, stats, out / "cost.png", colors, order))
        if len(paired[(paired["task"] == HEADLINE[0]) & (paired["metric"] == HEADLINE[1])]):
            paths.append(quality_cost_figure(table, paired, out / "quality_cost.png", colors, order))
    return paths


def metric_figure(table, stats, task, metric, path, colors, order) -> Path:
    """One panel per pair: bars per method (mean over seeds, 95% CI), seeds as dots, reference lines."""
    rows = table[(table["task"] == task) & (table["metric"] == metric)]
    st = stats[(stats["task"] == task) & (stats["metric"] == metric)]
    pairs = sorted(rows["pair"].unique())
    label, higher = METRIC_LABELS.get(metric, (metric, None))
    fig, axes = _panels(len(pairs), max(1, len(set(rows["method"]) - {TEACHER})))
    chance = CHANCE.get(task) if metric.startswith("acc") else None
    log = metric in LOG_SCALE
    for ax, pair in zip(axes, pairs):
        _bar_panel(ax, rows[rows["pair"] == pair], st[st["pair"] == pair], colors, order, chance,
                   BOUNDS.get(metric, (None, None)), log=log)
        ax.set_title(f"pair: {pair}", fontsize=10)
    zoomed = _set_ylim(axes, rows["value"], st, chance, BOUNDS.get(metric, (None, None)), log=log)
    _reference_legend(fig, axes)
    axes[0].set_ylabel(_wrap(label) + _better(higher))
    fig.suptitle(_wrap(f"{TASK_TITLES.get(task, task)} ({task}): {label}", 2 * WRAP), fontsize=12)
    note = ("marks" if log else "bars") + ": mean over seeds · error bars: 95% CI (Student t) · dots: seeds"
    if log:
        note += " · log scale"
    elif zoomed:
        note += " · y axis does not start at 0"
    fig.supxlabel(note, fontsize=8, color="dimgray")
    return _save(fig, path)


def learning_curve_figure(curves: pd.DataFrame, path: Path, colors: dict, order: list[str]) -> Path:
    """Validation bits per byte against training text seen; mean over seeds, band = seed range.

    Each pair has its own y range (a byte student and a subword student differ by far more than
    methods do). The untrained model (step 0) is not drawn, only named: it sits far above the rest.
    """
    pairs = sorted(curves["pair"].unique())
    fig, axes = _panels(len(pairs), 6, sharey=False)
    for ax, pair in zip(axes, pairs):
        sub = curves[curves["pair"] == pair]
        trained = sub[sub["bytes_seen"] > 0]
        for method in [m for m in order if m in set(trained["method"])]:
            per_step = trained[trained["method"] == method].groupby("step").agg(
                mb=("bytes_seen", "mean"), mean=("val_bpb", "mean"), lo=("val_bpb", "min"), hi=("val_bpb", "max"))
            x = per_step["mb"] / 1e6
            ax.plot(x, per_step["mean"], marker="o", ms=3, lw=1.6, color=colors[method], label=method)
            ax.fill_between(x, per_step["lo"], per_step["hi"], color=colors[method], alpha=0.15, lw=0)
        if len(trained):
            lo, hi = trained["val_bpb"].min(), trained["val_bpb"].max()
            ax.set_ylim(lo - 0.1 * (hi - lo or 1), hi + 0.25 * (hi - lo or 1))
        if len(trained) < len(sub):
            ax.text(0.02, 0.02, f"untrained model: {sub[sub['bytes_seen'] == 0]['val_bpb'].max():.2f} (not drawn)",
                    transform=ax.transAxes, va="bottom", fontsize=8, color="dimgray")
        ax.set_title(f"pair: {pair}", fontsize=10)
        ax.set_xlabel("training text seen (MB)")
        ax.set_ylabel("validation bits per byte" + _better(False))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
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
            _bar_panel(ax, rows[rows["pair"] == pair], st[st["pair"] == pair], colors, order, None, BOUNDS[metric])
            ax.set_title(f"pair: {pair}", fontsize=10)
        axes[r][0].set_ylabel(_wrap(METRIC_LABELS[metric][0]) + _better(False))
    _reference_legend(fig, axes.ravel())
    fig.suptitle("Cost per method: mean over seeds, 95% CI", fontsize=12)
    return _save(fig, path)


def _cost_metrics(table: pd.DataFrame) -> list[str]:
    """The cost metrics with data (peak GPU memory is all zeros on a CPU run)."""
    run = table[table["task"] == RUN_TASK]
    return [m for m in COST_METRICS if (run[run["metric"] == m]["value"] > 0).any()]


def _panels(n_panels: int, n_bars: int, sharey: bool = True):
    fig = Figure(figsize=(max(3.6, 1.2 + 0.62 * n_bars) * n_panels, 4.4), layout="constrained")
    return fig, fig.subplots(1, n_panels, squeeze=False, sharey=sharey)[0]


def _bar_panel(ax, rows: pd.DataFrame, st: pd.DataFrame, colors: dict, order: list[str], chance,
               bounds: tuple = (None, None), log: bool = False) -> None:
    """Bars per method (not the teacher), error bars where n >= 2 (clipped to ``bounds``), seed dots,
    reference lines; ``log``: a log y axis with markers instead of bars (bars need a zero)."""
    methods = [m for m in order if m in set(st["method"]) and m != TEACHER]
    st = st.set_index("method")
    x = np.arange(len(methods))
    means = np.array([st.loc[m, "mean"] for m in methods])
    cis = np.array([st.loc[m, "ci95"] for m in methods])
    if log:
        ax.set_yscale("log")
        ax.scatter(x, means, s=60, marker="_", linewidths=3, color=[colors[m] for m in methods], zorder=4)
    else:
        ax.bar(x, means, width=0.7, color=[colors[m] for m in methods], alpha=0.85, zorder=2)
    has_ci = np.isfinite(cis)
    if has_ci.any():
        lo, hi = _clip(means - cis, bounds), _clip(means + cis, bounds)
        ax.errorbar(x[has_ci], means[has_ci], yerr=np.stack([means - lo, hi - means])[:, has_ci], fmt="none",
                    ecolor="black", capsize=4, lw=1.2, zorder=4)
    jitter = np.random.default_rng(0)  # fixed: the same figure every time
    for i, m in enumerate(methods):
        values = rows[rows["method"] == m]["value"].to_numpy()
        if len(values) > 1:
            ax.scatter(i + jitter.uniform(-0.15, 0.15, len(values)), values, s=12, color="black", alpha=0.6,
                       zorder=5)
        top = np.nanmax([means[i], _clip(means[i] + np.nan_to_num(cis[i]), bounds), *values])
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


def _set_ylim(axes, values: pd.Series, st: pd.DataFrame, chance, bounds: tuple = (None, None),
              log: bool = False) -> bool:
    """Zoom on the range of the data, CIs clipped to ``bounds`` (bars then do not start at 0);
    True if zoomed."""
    ci = st["ci95"].fillna(0)
    lows = [values.min(), _clip(st["mean"] - ci, bounds).min()]
    highs = [values.max(), _clip(st["mean"] + ci, bounds).max()]
    if chance is not None:
        lows.append(chance)
        highs.append(chance)
    lo, hi = np.nanmin(lows), np.nanmax(highs)
    if log:
        axes[0].set_ylim(lo / 1.25, hi * 1.6)  # room above for the value labels
        return False
    pad = 0.12 * (hi - lo) if hi > lo else 0.1 * abs(hi) or 1.0
    bottom = lo - pad
    zoomed = lo > 0 and bottom > 0.1 * hi
    axes[0].set_ylim(bottom if zoomed else min(0.0, bottom), hi + 1.5 * pad)
    return zoomed


def _clip(values, bounds: tuple):
    low, high = bounds
    return np.clip(values, -np.inf if low is None else low, np.inf if high is None else high)


def _wrap(text: str, width: int = WRAP) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _better(higher: bool | None) -> str:
    return "" if higher is None else ("\n(higher is better)" if higher else "\n(lower is better)")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 100 else f"{x:.3f}"


def file_name(name: str) -> str:
    """``name`` as one harmless file name: task and metric names come from eval.json files."""
    return re.sub(r"[^A-Za-z0-9_.+\-\[\]]", "_", name).lstrip(".")


def _save(fig: Figure, path: Path) -> Path:
    return write_whole(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=path.suffix[1:]))


def paired_figure(table: pd.DataFrame, paired: pd.DataFrame, task: str, metric: str, path: Path, colors: dict,
                  order: list[str]) -> Path:
    """The headline: per pair, each method's difference to SFT of the same seed, mean and 95% CI.

    Filled markers are differences whose interval excludes 0 (distinguishable from SFT), hollow
    ones are not; dots are the seeds' own differences.
    """
    diffs = per_seed_differences(table)
    diffs = diffs[(diffs["task"] == task) & (diffs["metric"] == metric)]
    st = paired[(paired["task"] == task) & (paired["metric"] == metric)]
    pairs = sorted(st["pair"].unique())
    methods = [m for m in order if m in set(st["method"])]
    label, higher = METRIC_LABELS.get(metric, (metric, HIGHER_IS_BETTER.get(metric)))
    fig = Figure(figsize=(3.9 * len(pairs) + 1.2, 0.42 * len(methods) + 1.9), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False, sharey=True)[0]
    y = {m: i for i, m in enumerate(reversed(methods))}
    for ax, pair in zip(axes, pairs):
        here, seeds = st[st["pair"] == pair].set_index("method"), diffs[diffs["pair"] == pair]
        xs = [0.0]
        for m in methods:
            if m not in here.index:
                continue
            r = here.loc[m]
            ci = r["ci95"] if np.isfinite(r["ci95"]) else 0.0
            filled = r["verdict"] != UNCLEAR
            ax.errorbar(r["mean_diff"], y[m], xerr=ci, fmt="o", ms=7, capsize=3, lw=1.4, color=colors[m],
                        mfc=colors[m] if filled else "white", mew=1.6, zorder=4)
            values = seeds[seeds["method"] == m]["diff"].to_numpy()
            ax.scatter(values, np.full(len(values), y[m] + 0.22), s=9, color=colors[m], alpha=0.7, zorder=3)
            tag = "" if r["verdict"] == UNCLEAR else (" better" if r["verdict"] == BETTER else " worse")
            ax.annotate(f"{r['mean_diff']:+.3f}{tag}", (r["mean_diff"] + ci, y[m]), textcoords="offset points",
                        xytext=(4, -3), fontsize=7.5, color="black" if filled else "dimgray")
            xs += [r["mean_diff"] - ci, r["mean_diff"] + ci, *values]
        ax.axvline(0, color=SFT_COLOR, ls=":", lw=1.6, zorder=2)
        lo, hi = min(xs), max(xs)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_xlim(lo - pad, hi + 3.5 * pad)  # room on the right for the value labels
        ax.set_title(f"pair: {pair}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(list(y.values()), list(y.keys()))
        ax.set_ylim(-0.6, len(methods) - 0.4)
    better = "" if higher is None else ("  (right of 0 is better)" if higher else "  (left of 0 is better)")
    fig.supxlabel(f"{label}: method − SFT of the same seed{better}\n"
                  "marker: mean · bar: 95% CI (Student t) · filled: CI excludes 0 · dots: seeds",
                  fontsize=8.5, color="dimgray")
    fig.suptitle(f"{TASK_TITLES.get(task, task)}: paired difference to SFT", fontsize=12)
    return _save(fig, path)


def quality_cost_figure(table: pd.DataFrame, paired: pd.DataFrame, path: Path, colors: dict, order: list[str],
                        metric: tuple[str, str] = HEADLINE) -> Path:
    """Per pair: each method's paired gain over SFT (95% CI) against its step time relative to SFT."""
    task, name = metric
    st = paired[(paired["task"] == task) & (paired["metric"] == name)]
    run = table[(table["task"] == RUN_TASK) & (table["metric"] == "seconds_per_step")]
    sft = run[run["method"] == SFT][["pair", "seed", "value"]].rename(columns={"value": "sft"})
    cost = run.merge(sft, on=["pair", "seed"])
    cost = cost.assign(ratio=cost["value"] / cost["sft"]).groupby(["pair", "method"])["ratio"].mean()
    pairs = sorted(st["pair"].unique())
    fig = Figure(figsize=(4.2 * len(pairs) + 0.4, 4.0), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        ax.axhline(0, color=SFT_COLOR, ls=":", lw=1.6, zorder=2)
        xs, ys = [1.0], [0.0]
        for r in st[st["pair"] == pair].itertuples():
            if (pair, r.method) not in cost.index:
                continue
            x = cost[(pair, r.method)]
            ci = r.ci95 if np.isfinite(r.ci95) else 0.0
            ax.errorbar(x, r.gain, yerr=ci, fmt="o", ms=7, capsize=3, color=colors[r.method], zorder=4,
                        mfc=colors[r.method] if r.verdict != UNCLEAR else "white", mew=1.6)
            ax.annotate(r.method, (x, r.gain), textcoords="offset points", xytext=(5, 3), fontsize=7.5)
            xs.append(x)
            ys += [r.gain - ci, r.gain + ci]
        ax.scatter([1.0], [0.0], marker="s", color=SFT_COLOR, zorder=4)
        ax.annotate("sft", (1.0, 0.0), textcoords="offset points", xytext=(5, -10), fontsize=7.5, color=SFT_COLOR)
        _pad_limits(ax, xs, ys)
        ax.set_title(f"pair: {pair}", fontsize=10)
        ax.set_xlabel("seconds per step / SFT's (same seed)")
        ax.grid(alpha=0.3)
    label = METRIC_LABELS.get(name, (name,))[0]
    axes[0].set_ylabel(f"gain over SFT, {label}\n(higher is better)")
    fig.suptitle("Quality against cost: paired gain (95% CI; filled: CI excludes 0) vs step time", fontsize=11)
    return _save(fig, path)


def _pad_limits(ax, xs, ys, frac: float = 0.1) -> None:
    """Axis limits that contain every point, with a margin (labels stay inside)."""
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        pad = frac * (hi - lo) if hi > lo else 0.1 * (abs(hi) or 1.0)
        setter(lo - pad, hi + 2 * pad)
