# One student per (pair, method, seed), all through the one training loop.


rule distill:
    input:
        train=rules.corpus.output.train,
        validation=rules.corpus.output.validation,
        teacher=lambda w: f"{RESULTS}/teachers/{teacher_of(w.pair)}/model",
        teacher_tokenizer=lambda w: f"{RESULTS}/tokenizers/{tokenizer_of_teacher(teacher_of(w.pair))}",
        student_tokenizer=lambda w: f"{RESULTS}/tokenizers/{config['pairs'][w.pair]['student_tokenizer']}",
    output:
        student=directory(f"{RUN}/student"),
        run=f"{RUN}/run.json",
        log=f"{RUN}/train_log.jsonl",
    params:
        spec=lambda w: as_arg(ctd_specs.distill_spec(config, w.pair, w.method, w.seed)),
        out=RUN,
        teacher_dir=lambda w: f"{RESULTS}/teachers/{teacher_of(w.pair)}",
    threads: config["distill"]["threads"]
    resources:
        gpu=lambda w: 1 if config.get("device") == "cuda" else 0,
    log:
        f"{LOGS}/distill/{{pair}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/distill/{{pair}}/{{method}}/seed{{seed}}.tsv"
    shell:
        "ctdbench distill --spec {params.spec} --data {RESULTS}/data --teacher {params.teacher_dir}"
        " --teacher-tokenizer {input.teacher_tokenizer} --student-tokenizer {input.student_tokenizer}"
        " --out {params.out} --threads {threads} > {log} 2>&1"
