# One student per (pair, method, seed), all through the one training loop.

USE_CACHE = config["distill"]["teacher_cache"]


rule teacher_cache:
    input:
        train=rules.corpus.output.train,
        teacher=f"{RESULTS}/teachers/{{teacher}}/model",
        tokenizer=lambda w: f"{RESULTS}/tokenizers/{tokenizer_of_teacher(w.teacher)}",
    output:
        directory(f"{RESULTS}/teachers/{{teacher}}/cache"),
    params:
        spec=lambda w: as_arg(ctd_specs.teacher_cache_spec(config, w.teacher)),
        teacher_dir=f"{RESULTS}/teachers/{{teacher}}",
    threads: workflow.cores
    log:
        f"{LOGS}/teacher_cache_{{teacher}}.log",
    benchmark:
        f"{BENCH}/teacher_cache_{{teacher}}.tsv"
    shell:
        "ctdbench teacher-cache --spec {params.spec} --data {RESULTS:q}/data --teacher {params.teacher_dir:q}"
        " --tokenizer {input.tokenizer:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule mined_map:
    """MinED's student -> teacher vocabulary map, once per pair (methods/mined.py)."""
    input:
        teacher_tokenizer=lambda w: f"{RESULTS}/tokenizers/{tokenizer_of_teacher(teacher_of(w.pair))}",
        student_tokenizer=lambda w: f"{RESULTS}/tokenizers/{config['pairs'][w.pair]['student_tokenizer']}",
    output:
        map=f"{RESULTS}/maps/{{pair}}/mined.npy",
        receipt=f"{RESULTS}/maps/{{pair}}/mined.json",
    log:
        f"{LOGS}/mined_map_{{pair}}.log",
    benchmark:
        f"{BENCH}/mined_map_{{pair}}.tsv"
    shell:
        "python -m methods.mined --teacher-tokenizer {input.teacher_tokenizer:q}"
        " --student-tokenizer {input.student_tokenizer:q} --map-path {output.map:q} --receipt {output.receipt:q} > {log:q} 2>&1"


rule distill:
    input:
        train=rules.corpus.output.train,
        validation=rules.corpus.output.validation,
        teacher=lambda w: f"{RESULTS}/teachers/{teacher_of(w.pair)}/model",
        teacher_tokenizer=lambda w: f"{RESULTS}/tokenizers/{tokenizer_of_teacher(teacher_of(w.pair))}",
        student_tokenizer=lambda w: f"{RESULTS}/tokenizers/{config['pairs'][w.pair]['student_tokenizer']}",
        cache=lambda w: [f"{RESULTS}/teachers/{teacher_of(w.pair)}/cache"] if USE_CACHE else [],
        maps=lambda w: [ctd_specs.mined_map_path(config, w.pair)] if w.method == "mined" else [],
    output:
        student=directory(f"{RUN}/student"),
        run=f"{RUN}/run.json",
        log=f"{RUN}/train_log.jsonl",
    params:
        spec=lambda w: as_arg(ctd_specs.distill_spec(config, w.pair, w.method, w.seed)),
        out=RUN,
        teacher_dir=lambda w: f"{RESULTS}/teachers/{teacher_of(w.pair)}",
        cache=lambda w, input: f"--teacher-cache {shlex.quote(input.cache[0])}" if input.cache else "",
    threads: config["distill"]["threads"]
    resources:
        gpu=job_gpus(),
    log:
        f"{LOGS}/distill/{{pair}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/distill/{{pair}}/{{method}}/seed{{seed}}.tsv"
    shell:
        ctdbench_command(config["gpus_per_run"] > 1)
        + " distill --spec {params.spec} --data {RESULTS:q}/data --teacher {params.teacher_dir:q}"
        " --teacher-tokenizer {input.teacher_tokenizer:q} --student-tokenizer {input.student_tokenizer:q}"
        " --out {params.out:q} --threads {threads} {params.cache} > {log:q} 2>&1"
