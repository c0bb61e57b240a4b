"""analysis.paired: differences to SFT of the same seed, their verdicts, and the transfer ratio."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.collect import t_quantile_975
from analysis.paired import (BETTER, UNCLEAR, WORSE, fieller, paired_differences, reference_pairs, transfer,
                             verdict_text)

# bits per byte of (pair, method, seed): SFT varies a lot across seeds, each method follows it.
SFT_BPB = {0: 3.00, 1: 3.20, 2: 2.90, 3: 3.10}
SHIFT = {"kd": [-0.30, -0.32, -0.28, -0.30], "bld": [-0.10, -0.12, -0.08, -0.11],
         "uld": [0.05, 0.07, 0.06, 0.05], "alm": [0.02, -0.03, 0.01, -0.01]}


def table(rows=None) -> pd.DataFrame:
    rows = rows or []
    for pair, methods in {"same": ["kd", "bld"], "cross": ["bld", "uld", "alm"]}.items():
        for seed, base in SFT_BPB.items():
            sft = base + (0.5 if pair == "cross" else 0.0)
            rows += [("sft", pair, seed, sft), *((m, pair, seed, sft + SHIFT[m][seed]) for m in methods)]
    frame = pd.DataFrame(rows, columns=["method", "pair", "seed", "value"])
    frame["config"], frame["task"], frame["metric"], frame["stderr"] = "c", "ctd_heldout", "bits_per_byte", math.nan
    # A cost row and a teacher row must be ignored.
    extra = pd.DataFrame([{"config": "c", "pair": "cross", "method": "bld", "seed": 0, "task": "run",
                           "metric": "seconds_per_step", "value": 1.0, "stderr": math.nan},
                          {"config": "c", "pair": "cross", "method": "teacher", "seed": 0, "task": "ctd_heldout",
                           "metric": "bits_per_byte", "value": 2.2, "stderr": math.nan}])
    return pd.concat([frame, extra], ignore_index=True)


def test_paired_differences_against_the_definition():
    paired = paired_differences(table()).set_index(["pair", "method"])
    for pair, methods in {"same": ["kd", "bld"], "cross": ["bld", "uld", "alm"]}.items():
        for m in methods:
            d = np.array(SHIFT[m])
            row = paired.loc[(pair, m)]
            assert row["n"] == 4
            assert row["mean_diff"] == pytest.approx(d.mean())
            assert row["sd_diff"] == pytest.approx(d.std(ddof=1))
            assert row["ci95"] == pytest.approx(t_quantile_975(3) * d.std(ddof=1) / 2)
            assert row["gain"] == pytest.approx(-d.mean())  # lower bits per byte is better
    assert paired.loc[("cross", "bld"), "verdict"] == BETTER
    assert paired.loc[("cross", "uld"), "verdict"] == WORSE
    assert paired.loc[("cross", "alm"), "verdict"] == UNCLEAR
    assert "teacher" not in paired.index.get_level_values("method")
    # Pairing matters: the unpaired seed spread of SFT (sd 0.13) would hide bld's -0.10.
    assert paired.loc[("cross", "bld"), "sd_diff"] < 0.02


def test_higher_is_better_metric_flips_the_gain():
    t = table()
    t["metric"] = "acc"
    paired = paired_differences(t).set_index(["pair", "method"])
    assert paired.loc[("cross", "bld"), "verdict"] == WORSE and paired.loc[("cross", "uld"), "verdict"] == BETTER
    assert paired.loc[("cross", "bld"), "gain"] == pytest.approx(np.mean(SHIFT["bld"]))


def test_seed_without_sft_is_left_out():
    t = table()
    t = t[~((t["method"] == "sft") & (t["pair"] == "cross") & (t["seed"] == 3))]
    paired = paired_differences(t).set_index(["pair", "method"])
    assert paired.loc[("cross", "bld"), "n"] == 3
    assert paired.loc[("cross", "bld"), "mean_diff"] == pytest.approx(np.mean(SHIFT["bld"][:3]))


def test_fieller_interval_is_the_set_its_definition_gives():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(0.1, 0.03, 4), rng.normal(0.3, 0.02, 3)
        ratio, lo, hi = fieller(a, b)
        assert ratio == pytest.approx(a.mean() / b.mean())
        t2 = t_quantile_975(2) ** 2
        va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
        inside = lambda r: (a.mean() - r * b.mean()) ** 2 <= t2 * (va + r * r * vb)  # noqa: E731
        assert inside(lo + 1e-9) and inside(hi - 1e-9) and inside(ratio)
        assert not inside(lo - 1e-3) and not inside(hi + 1e-3)
    ratio, lo, hi = fieller([0.1, 0.2, 0.15], [0.01, -0.02, 0.03])  # denominator indistinguishable from 0
    assert lo == -math.inf and hi == math.inf and math.isfinite(ratio)


def test_transfer_against_the_definition():
    t = table()
    assert reference_pairs(t) == {"cross": "same", "same": "same"}
    assert reference_pairs(t, {"same": "T1", "cross": "T2"}) == {"same": "same"}  # another teacher: no reference
    rows = transfer(t).set_index("method")
    kd_gain = -np.mean(SHIFT["kd"])
    for m in ("bld", "uld", "alm"):
        assert rows.loc[m, "reference_pair"] == "same" and rows.loc[m, "pair"] == "cross"
        assert rows.loc[m, "transfer"] == pytest.approx(-np.mean(SHIFT[m]) / kd_gain)
        assert rows.loc[m, "transfer_lo"] < rows.loc[m, "transfer"] < rows.loc[m, "transfer_hi"]
    assert rows.loc["bld", "transfer_lo"] > 0 and rows.loc["uld", "transfer_hi"] < 0


def test_verdict_text_names_each_class():
    t = table()
    text = verdict_text(paired_differences(t), transfer(t))
    cross = next(line for line in text.splitlines() if line.startswith("- cross"))
    assert "beat SFT: bld (-0.103" in cross and "Worse than SFT: uld" in cross
    assert "Not distinguishable from SFT: alm" in cross and "(4 seeds)" in cross
    assert "bld 0.34" in cross  # share of the KD gain kept: 0.1025 / 0.30


def test_one_seed_gives_differences_without_a_verdict():
    t = table()
    t = t[t["seed"] == 0]
    text = verdict_text(paired_differences(t), transfer(t))
    cross = next(line for line in text.splitlines() if line.startswith("- cross"))
    assert cross.startswith("- cross (1 seed, so no confidence interval and no verdict): bld (-0.100)")
    assert "beat" not in cross and "nan" not in cross
