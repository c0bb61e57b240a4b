# results/ -> summary.csv, the aggregated / paired / transfer tables, the verdict and figures.
# `snakemake plots` regenerates them from whatever results exist, without (re)training anything.


rule summary:
    input:
        evals=all_runs("eval.json"),
        runs=all_runs("run.json"),
        teachers=expand(f"{RESULTS}/teachers/{{teacher}}/eval.json", teacher=used_teachers()),
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Summary"),
        tables=[f"{RESULTS}/{name}" for name in ("summary_stats.csv", "paired.csv", "transfer.csv", "headline.md")],
        figures=report(
            directory(f"{RESULTS}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        f"{LOGS}/summary.log",
    benchmark:
        f"{BENCH}/summary.tsv"
    shell:
        "ctdbench report {RESULTS:q} > {log:q} 2>&1"


rule plots:
    log:
        f"{LOGS}/plots.log",
    shell:
        "ctdbench report {RESULTS:q} 2>&1 | tee {log:q}"
