"""Paired comparison with SFT, and the share of the distillation gain that crosses tokenizers.

Every method of one (pair, seed) starts from the same student initialisation and reads the same
segments in the same order as that seed's SFT run; only the loss differs. The difference
``method - sft`` of the same seed therefore cancels what the runs of a seed share, and its mean
over seeds, with a 95% Student-t interval, is the comparison this benchmark reports.

Transfer. For a cross-tokenizer pair, a method's gain over SFT divided by the same-tokenizer KD
gain over SFT on the reference pair (the pair of the same teacher where ``kd`` ran) is the
fraction of the distillation benefit that survives the tokenizer mismatch: 1 means the method
transfers everything plain KD gets without a mismatch, 0 nothing, below 0 it hurts. Its interval
is Fieller's for a ratio of two independent means (different pairs share no run), unbounded when
the KD gain itself is not distinguishable from zero.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.collect import RUN_TASK, SFT, TEACHER, describe, t_quantile_975

# Whether a larger value is better, per metric (the sign of a "gain"); unknown metrics are skipped.
HIGHER_IS_BETTER = {
    "bits_per_byte": False, "byte_perplexity": False, "word_perplexity": False,
    "acc": True, "acc_norm": True, "acc_bytes": True,
    "kl_per_byte": False, "top1": True, "kl_boundary": False, "top1_boundary": True,
}
HEADLINE = ("ctd_heldout", "bits_per_byte")
# Metrics with a paired figure: the headline, the tokenizer-agnostic cloze accuracy, and teacher
# agreement at shared token starts (the reading comparable across student tokenizers).
PAIRED_FIGURES = (HEADLINE, ("ctd_cloze", "acc_bytes"), ("byte_agreement", "kl_boundary"))
KD = "kd"
BETTER, WORSE, UNCLEAR = "better", "worse", "not distinguishable"
PAIRED_COLUMNS = ["pair", "method", "task", "metric", "n", "mean_diff", "sd_diff", "ci95", "gain", "verdict"]
TRANSFER_COLUMNS = ["pair", "method", "task", "metric", "reference_pair", "gain", "kd_gain", "transfer",
                    "transfer_lo", "transfer_hi"]


def per_seed_differences(table: pd.DataFrame) -> pd.DataFrame:
    """``method - sft`` of the same pair and seed for every evaluation metric.

    Returns:
        Columns ``pair, method, seed, task, metric, diff`` (no SFT or teacher rows; seeds without
        an SFT run are left out).
    """
    evals = table[(table["task"] != RUN_TASK) & (table["method"] != TEACHER)]
    keys = ["pair", "seed", "task", "metric"]
    sft = evals[evals["method"] == SFT][[*keys, "value"]].rename(columns={"value": "sft"})
    rows = evals[evals["method"] != SFT].merge(sft, on=keys)
    rows["diff"] = rows["value"] - rows["sft"]
    return rows[["pair", "method", "seed", "task", "metric", "diff"]]


def paired_differences(table: pd.DataFrame) -> pd.DataFrame:
    """Per (pair, method, metric): mean of the per-seed differences to SFT with its 95% CI.

    ``gain`` is the mean difference signed so that positive is an improvement; ``verdict`` is
    ``better`` or ``worse`` when the 95% interval excludes 0, else ``not distinguishable``
    (also with fewer than two seeds).
    """
    diffs = per_seed_differences(table)
    rows = []
    for (pair, method, task, metric), group in diffs.groupby(["pair", "method", "task", "metric"], sort=False):
        if metric not in HIGHER_IS_BETTER:
            continue
        n, mean, sd, ci = describe(group["diff"])
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        verdict = UNCLEAR
        if n > 1 and abs(mean) > ci:
            verdict = BETTER if sign * mean > 0 else WORSE
        rows.append({"pair": pair, "method": method, "task": task, "metric": metric, "n": n, "mean_diff": mean,
                     "sd_diff": sd, "ci95": ci, "gain": sign * mean, "verdict": verdict})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def reference_pairs(table: pd.DataFrame, teacher_of: dict[str, str] | None = None) -> dict[str, str]:
    """``pair -> reference pair``: the pair where ``kd`` ran (it needs the teacher's tokenizer) with
    the same teacher (``teacher_of``: pair -> teacher name; None: every pair shares one teacher)."""
    teacher_of = teacher_of or {}
    with_kd = sorted(set(table[table["method"] == KD]["pair"]))
    refs = {}
    for pair in sorted(set(table["pair"])):
        candidates = [p for p in with_kd if teacher_of.get(p) == teacher_of.get(pair)]
        if candidates:
            refs[pair] = candidates[0]
    return refs


def transfer(table: pd.DataFrame, teacher_of: dict[str, str] | None = None,
             metric: tuple[str, str] = HEADLINE) -> pd.DataFrame:
    """The share of the same-tokenizer KD gain each method keeps on each cross-tokenizer pair.

    ``transfer = gain(method, pair) / gain(kd, reference pair)``, both gains being mean paired
    differences to SFT (positive = better); ``transfer_lo/hi`` is Fieller's 95% interval
    (-inf/inf when the KD gain is not distinguishable from zero).
    """
    task, name = metric
    diffs = per_seed_differences(table)
    diffs = diffs[(diffs["task"] == task) & (diffs["metric"] == name)]
    sign = 1.0 if HIGHER_IS_BETTER[name] else -1.0
    rows = []
    for pair, ref in reference_pairs(table, teacher_of).items():
        if pair == ref:
            continue
        kd = sign * diffs[(diffs["pair"] == ref) & (diffs["method"] == KD)]["diff"].to_numpy(dtype=float)
        here = diffs[diffs["pair"] == pair]
        for method in sorted(set(here["method"])):
            g = sign * here[here["method"] == method]["diff"].to_numpy(dtype=float)
            ratio, lo, hi = fieller(g, kd)
            rows.append({"pair": pair, "method": method, "task": task, "metric": name, "reference_pair": ref,
                         "gain": _mean(g), "kd_gain": _mean(kd), "transfer": ratio, "transfer_lo": lo,
                         "transfer_hi": hi})
    return pd.DataFrame(rows, columns=TRANSFER_COLUMNS)


def fieller(a, b) -> tuple[float, float, float]:
    """mean(a) / mean(b) and Fieller's 95% interval for two independent samples.

    The interval is the set of ratios r with (mean_a - r mean_b)^2 <= t^2 (var_a + r^2 var_b),
    var = s^2 / n, t on min(n) - 1 degrees of freedom (conservative). It is bounded only when
    mean_b is itself distinguishable from zero; otherwise (-inf, inf).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0 or b.mean() == 0:
        return math.nan, math.nan, math.nan
    ma, mb = a.mean(), b.mean()
    ratio = float(ma / mb)
    if len(a) < 2 or len(b) < 2:
        return ratio, math.nan, math.nan
    t2 = t_quantile_975(min(len(a), len(b)) - 1) ** 2
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    qa = mb * mb - t2 * vb
    if qa <= 0:
        return ratio, -math.inf, math.inf
    qb, qc = ma * mb, ma * ma - t2 * va
    root = math.sqrt(max(qb * qb - qa * qc, 0.0))
    return ratio, float((qb - root) / qa), float((qb + root) / qa)


def verdict_text(paired: pd.DataFrame, transfers: pd.DataFrame, metric: tuple[str, str] = HEADLINE) -> str:
    """One sentence per pair: which methods beat (or trail) SFT on ``metric`` with 95% confidence."""
    task, name = metric
    sub = paired[(paired["task"] == task) & (paired["metric"] == name)]
    lines = []
    for pair in sorted(set(sub["pair"])):
        rows = sub[sub["pair"] == pair].sort_values("gain", ascending=False)
        n = int(rows["n"].max()) if len(rows) else 0
        if n < 2:  # one seed: differences, but no interval and so no verdict
            diffs = ", ".join(f"{r.method} ({_signed(r.mean_diff)})" for r in rows.itertuples())
            lines.append(f"{pair} (1 seed, so no confidence interval and no verdict): {diffs}.")
            continue
        phrase = lambda r: f"{r.method} ({_signed(r.mean_diff)} ± {r.ci95:.3f})"  # noqa: E731
        better = [phrase(r) for r in rows.itertuples() if r.verdict == BETTER]
        worse = [phrase(r) for r in rows.itertuples() if r.verdict == WORSE]
        unclear = [r.method for r in rows.itertuples() if r.verdict == UNCLEAR]
        parts = [f"{pair} ({n} seeds):"]
        parts.append(f"beat SFT: {', '.join(better)}." if better else "no method beats SFT with confidence.")
        if worse:
            parts.append(f"Worse than SFT: {', '.join(worse)}.")
        if unclear:
            parts.append(f"Not distinguishable from SFT: {', '.join(unclear)}.")
        kept = transfers[(transfers["pair"] == pair) & np.isfinite(transfers["transfer"].astype(float))]
        if len(kept):
            best = kept.sort_values("transfer", ascending=False).iloc[0]
            parts.append(f"Largest share of the same-tokenizer KD gain kept: {best.method} "
                         f"{best.transfer:.2f} [{best.transfer_lo:.2f}, {best.transfer_hi:.2f}].")
        lines.append(" ".join(parts))
    unit = f"{task}/{name}, method - SFT of the same seed, mean ± 95% CI"
    return f"Paired differences ({unit}):\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else math.nan


def _signed(x: float) -> str:
    return f"{x:+.3f}"
