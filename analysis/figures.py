"""Comparison figures: per-metric bars with 95% CIs, learning curves, cost per method."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.collect import learning_curves, mean_ci  # noqa: E402

LOWER_IS_BETTER = {"bits_per_byte", "byte_perplexity", "word_perplexity", "kl_per_byte"}
PLOTTED = {("ctd_heldout", "bits_per_byte"), ("ctd_heldout", "byte_perplexity"), ("ctd_cloze", "acc"),
           ("ctd_cloze", "acc_norm"), ("ctd_cloze", "acc_bytes")}


def method_order(methods) -> list[str]:
    """sft first (the reference), then the others alphabetically; the teacher is drawn as a line."""
    names = sorted(set(methods) - {"teacher"})
    return sorted(names, key=lambda m: (m != "sft", m))


def _colors(methods: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _panels(n: int, width: float = 4.2):
    fig, axes = plt.subplots(1, n, figsize=(width * n, 3.8), squeeze=False, sharey=False)
    return fig, axes[0]


def bar_figure(table: pd.DataFrame, task: str, metric: str, out: Path, colors: dict) -> Path:
    sel = table[(table.task == task) & (table.metric == metric)]
    pairs = sorted(sel.pair.unique())
    fig, axes = _panels(len(pairs))
    for ax, pair in zip(axes, pairs):
        sub = sel[sel.pair == pair]
        methods = method_order(sub.method)
        stats = [mean_ci(sub[sub.method == m].value) for m in methods]
        means, cis = [s[0] for s in stats], [s[1] for s in stats]
        ax.bar(range(len(methods)), means, yerr=cis, capsize=4, color=[colors[m] for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        teacher = sub[sub.method == "teacher"].value
        if len(teacher):
            ax.axhline(teacher.mean(), color="black", ls="--", lw=1.2, label="teacher")
        if "sft" in methods:
            ax.axhline(means[methods.index("sft")], color="gray", ls=":", lw=1.2, label="sft mean")
        values = [m for m in means if np.isfinite(m)] + list(teacher)
        if values:  # zoom on the differences: bars from a common floor, not from zero
            lo, hi = min(values), max(values)
            pad = 0.15 * (hi - lo or abs(hi) or 1.0)
            ax.set_ylim(lo - pad - max(cis or [0]), hi + pad + max(cis or [0]))
        ax.set_title(pair)
        ax.legend(fontsize=8, loc="best")
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    axes[0].set_ylabel(f"{metric} ({better})")
    fig.suptitle(f"{task}: {metric}, mean and 95% CI over seeds")
    fig.tight_layout()
    path = out / f"{task}__{metric}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curve_figure(curves: pd.DataFrame, out: Path, colors: dict) -> Path:
    pairs = sorted(curves.pair.unique())
    fig, axes = _panels(len(pairs))
    for ax, pair in zip(axes, pairs):
        sub = curves[curves.pair == pair]
        for m in method_order(sub.method):
            mean = sub[sub.method == m].groupby("step")[["bytes_seen", "val_bpb"]].mean()
            ax.plot(mean.bytes_seen / 1e6, mean.val_bpb, marker=".", label=m, color=colors[m])
        ax.set_title(pair)
        ax.set_xlabel("text seen (MB)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation bits per byte (lower is better)")
    fig.suptitle("Learning curves, mean over seeds")
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cost_figure(table: pd.DataFrame, out: Path, colors: dict) -> Path:
    run = table[table.task == "run"]
    fig, axes = _panels(2)
    for ax, (metric, label) in zip(axes, [("seconds_per_step", "seconds per optimizer step"),
                                          ("peak_rss_mb", "peak memory (MB, RSS)")]):
        sub = run[run.metric == metric]
        methods = method_order(sub.method)
        pairs = sorted(sub.pair.unique())
        width = 0.8 / max(1, len(pairs))
        for k, pair in enumerate(pairs):
            vals = [sub[(sub.pair == pair) & (sub.method == m)].value.mean() for m in methods]
            ax.bar(np.arange(len(methods)) + k * width, vals, width, label=pair, alpha=0.5 + 0.5 * k / max(1, len(pairs)))
        ax.set_xticks(np.arange(len(methods)) + width * (len(pairs) - 1) / 2, methods, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Cost per method (mean over seeds)")
    fig.tight_layout()
    path = out / "cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_figures(config_dir: Path, table: pd.DataFrame) -> list[Path]:
    """Every figure for one config into ``config_dir/figures``; returns the paths written."""
    out = Path(config_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    colors = _colors(method_order(table.method))
    paths = []
    for task, metric in sorted(set(zip(table.task, table.metric))):
        if (task, metric) in PLOTTED or task not in ("run", "ctd_heldout", "ctd_cloze"):
            paths.append(bar_figure(table, task, metric, out, colors))
    curves = learning_curves(config_dir)
    if len(curves):
        paths.append(learning_curve_figure(curves, out, colors))
    if (table.task == "run").any():
        paths.append(cost_figure(table, out, colors))
    return paths
