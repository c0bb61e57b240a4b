# One student per (pair, method, seed), all through the one training loop; before them, what a
# method computes once per tokenizer pair.

USE_CACHE = config["distill"]["teacher_cache"]


rule teacher_cache:
    input:
        train=rules.corpus.output.train,
        teacher=rules.teacher.output.model,
        tokenizer=lambda w: layout.tokenizer_dir(RESULTS, tokenizer_of_teacher(w.teacher)),
    output:
        directory(f"{teacher_dir('{teacher}')}/cache"),
    params:
        spec=lambda w: as_arg(ctd_specs.teacher_cache_spec(config, w.teacher)),
        data=input_folder("train"),
        teacher_dir=input_folder("teacher"),
    threads: workflow.cores
    log:
        f"{LOGS}/teacher_cache_{{teacher}}.log",
    benchmark:
        f"{BENCH}/teacher_cache_{{teacher}}.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench teacher-cache --spec {params.spec} --data {params.data:q} --teacher {params.teacher_dir:q}"
        " --tokenizer {input.tokenizer:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule precompute:
    """A method's file for one tokenizer pair, e.g. a vocabulary map (DistillationMethod.precompute)."""
    input:
        teacher_tokenizer=teacher_tokenizer_dir,
        student_tokenizer=student_tokenizer_dir,
    output:
        file=layout.precomputed_path(RESULTS, "{pair}", "{method}", "{suffix}"),
        receipt=layout.precomputed_path(RESULTS, "{pair}", "{method}", "{suffix}.json"),
    wildcard_constraints:
        suffix=r"\.[A-Za-z0-9]+",
    params:
        spec=lambda w: as_arg(ctd_specs.precompute_spec(w.method)),
    log:
        f"{LOGS}/precompute/{{pair}}/{{method}}{{suffix}}.log",
    benchmark:
        f"{BENCH}/precompute/{{pair}}/{{method}}{{suffix}}.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench precompute --spec {params.spec} --student-tokenizer {input.student_tokenizer:q}"
        " --teacher-tokenizer {input.teacher_tokenizer:q} --out {output.file:q} --receipt {output.receipt:q} > {log:q} 2>&1"


rule distill:
    input:
        train=rules.corpus.output.train,
        validation=rules.corpus.output.validation,
        teacher=lambda w: f"{teacher_dir(teacher_of(w.pair))}/model",
        teacher_tokenizer=teacher_tokenizer_dir,
        student_tokenizer=student_tokenizer_dir,
        cache=lambda w: [f"{teacher_dir(teacher_of(w.pair))}/cache"] if USE_CACHE else [],
        precomputed=lambda w: [path] if (path := ctd_specs.precomputed_path(config, w.pair, w.method)) else [],
    output:
        student=directory(f"{RUN}/student"),
        run=f"{RUN}/run.json",
        log=f"{RUN}/train_log.jsonl",
    params:
        spec=lambda w: as_arg(ctd_specs.distill_spec(config, w.pair, w.method, w.seed)),
        data=input_folder("train"),
        out=output_folder("run"),
        teacher_dir=input_folder("teacher"),
        cache=lambda w, input: f"--teacher-cache {shlex.quote(input.cache[0])}" if input.cache else "",
    threads: config["distill"]["threads"]
    resources:
        gpu=job_gpus(),
    log:
        f"{LOGS}/distill/{{pair}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/distill/{{pair}}/{{method}}/seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    shell:
        ctdbench_command(config["gpus_per_run"] > 1)
        + " distill --spec {params.spec} --data {params.data:q} --teacher {params.teacher_dir:q}"
        " --teacher-tokenizer {input.teacher_tokenizer:q} --student-tokenizer {input.student_tokenizer:q}"
        " --out {params.out:q} --threads {threads} {params.cache} > {log:q} 2>&1"
