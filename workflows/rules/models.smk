# Tokenizers trained on the train split; the teacher pretrained from scratch (its own budget).


rule tokenizer:
    input:
        rules.corpus.output.train,
    output:
        directory(f"{RESULTS}/tokenizers/{{tokenizer}}"),
    params:
        spec=lambda w: as_arg(config["tokenizers"][w.tokenizer]),
    log:
        f"{LOGS}/tokenizer_{{tokenizer}}.log",
    benchmark:
        f"{BENCH}/tokenizer_{{tokenizer}}.tsv"
    shell:
        "ctdbench tokenizer --spec {params.spec} --train {input:q} --out {output:q} > {log:q} 2>&1"


rule teacher:
    input:
        train=rules.corpus.output.train,
        validation=rules.corpus.output.validation,
        tokenizer=lambda w: f"{RESULTS}/tokenizers/{tokenizer_of_teacher(w.teacher)}",
    output:
        model=directory(f"{RESULTS}/teachers/{{teacher}}/model"),
        run=f"{RESULTS}/teachers/{{teacher}}/run.json",
    params:
        spec=lambda w: as_arg(ctd_specs.teacher_spec(config, w.teacher)),
        out=lambda w: f"{RESULTS}/teachers/{w.teacher}",
    threads: workflow.cores
    resources:
        gpu=lambda w: job_gpus(trains=w.teacher in trained_teachers(config)),
    log:
        f"{LOGS}/teacher_{{teacher}}.log",
    benchmark:
        f"{BENCH}/teacher_{{teacher}}.tsv"
    shell:
        ctdbench_command(config["gpus_per_run"] > 1 and any(t in trained_teachers(config) for t in used_teachers()))
        + " teacher --spec {params.spec} --data {RESULTS:q}/data --tokenizer {input.tokenizer:q}"
        " --out {params.out:q} --threads {threads} > {log:q} 2>&1"
