# results/ -> summary.csv, the aggregated / paired / transfer tables, the verdict and figures.
# `snakemake plots` regenerates them from whatever results exist, without (re)training anything.


rule summary:
    input:
        evals=all_runs("eval.json"),
        runs=all_runs("run.json"),
        teachers=[f"{teacher_dir(t)}/eval.json" for t in used_teachers()],
    output:
        summary=report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Summary"),
        tables=[f"{RESULTS}/{name}" for name in ("summary_stats.csv", "paired.csv", "transfer.csv", "headline.md")],
        figures=report(
            directory(f"{RESULTS}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        results=output_folder("summary"),
    log:
        f"{LOGS}/summary.log",
    benchmark:
        f"{BENCH}/summary.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench report {params.results:q} > {log:q} 2>&1"


rule plots:
    params:
        results=RESULTS,
    log:
        f"{LOGS}/plots.log",
    conda:
        CONDA_ENV
    shell:
        "ctdbench report {params.results:q} 2>&1 | tee {log:q}"
