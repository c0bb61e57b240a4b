# lm-eval on every student checkpoint and on every teacher, written to fixed-path eval.json.


rule evaluate_student:
    input:
        model=f"{RUN}/student",
        data=rules.eval_data.output,
        teacher=lambda w: f"{RESULTS}/teachers/{teacher_of(w.pair)}/model",
    output:
        f"{RUN}/eval.json",
    params:
        spec=as_arg(ctd_specs.evaluate_spec(config)),
    threads: 1
    resources:
        gpu=lambda w: 1 if config.get("device") == "cuda" else 0,
    log:
        f"{LOGS}/evaluate/{{pair}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{pair}}/{{method}}/seed{{seed}}.tsv"
    shell:
        "ctdbench evaluate --spec {params.spec} --model {input.model:q} --data {RESULTS:q}/data/eval"
        " --teacher {input.teacher:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule evaluate_teacher:
    input:
        model=f"{RESULTS}/teachers/{{teacher}}/model",
        data=rules.eval_data.output,
    output:
        f"{RESULTS}/teachers/{{teacher}}/eval.json",
    params:
        spec=as_arg(ctd_specs.evaluate_spec(config)),
    threads: 1
    resources:
        gpu=lambda w: 1 if config.get("device") == "cuda" else 0,
    log:
        f"{LOGS}/evaluate/teacher_{{teacher}}.log",
    benchmark:
        f"{BENCH}/evaluate/teacher_{{teacher}}.tsv"
    shell:
        "ctdbench evaluate --spec {params.spec} --model {input.model:q} --data {RESULTS:q}/data/eval"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"
