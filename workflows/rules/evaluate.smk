# lm-eval on every student checkpoint and on every teacher, written to fixed-path eval.json.


rule evaluate_student:
    input:
        model=f"{RUN}/student",
        heldout=rules.eval_data.output.heldout,
        cloze=rules.eval_data.output.cloze,
        teacher=lambda w: f"{teacher_dir(teacher_of(w.pair))}/model",
    output:
        f"{RUN}/eval.json",
    params:
        spec=as_arg(ctd_specs.evaluate_spec(config)),
        data=input_folder("heldout"),
    threads: 1
    resources:
        gpu=lambda w: 1 if config.get("device") == "cuda" else 0,
    log:
        f"{LOGS}/evaluate/{{pair}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{pair}}/{{method}}/seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench evaluate --spec {params.spec} --model {input.model:q} --data {params.data:q}"
        " --teacher {input.teacher:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule evaluate_teacher:
    input:
        model=rules.teacher.output.model,
        heldout=rules.eval_data.output.heldout,
        cloze=rules.eval_data.output.cloze,
    output:
        f"{teacher_dir('{teacher}')}/eval.json",
    params:
        spec=as_arg(ctd_specs.evaluate_spec(config)),
        data=input_folder("heldout"),
    threads: 1
    resources:
        gpu=lambda w: 1 if config.get("device") == "cuda" else 0,
    log:
        f"{LOGS}/evaluate/teacher_{{teacher}}.log",
    benchmark:
        f"{BENCH}/evaluate/teacher_{{teacher}}.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench evaluate --spec {params.spec} --model {input.model:q} --data {params.data:q}"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"
