# Tokenizers trained on the train split; the teacher pretrained from scratch (its own budget).


rule tokenizer:
    input:
        rules.corpus.output.train,
    output:
        directory(layout.tokenizer_dir(RESULTS, "{tokenizer}")),
    params:
        spec=lambda w: as_arg(config["tokenizers"][w.tokenizer]),
    log:
        f"{LOGS}/tokenizer_{{tokenizer}}.log",
    benchmark:
        f"{BENCH}/tokenizer_{{tokenizer}}.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench tokenizer --spec {params.spec} --train {input:q} --out {output:q} > {log:q} 2>&1"


rule teacher:
    input:
        train=rules.corpus.output.train,
        validation=rules.corpus.output.validation,
        tokenizer=lambda w: layout.tokenizer_dir(RESULTS, tokenizer_of_teacher(w.teacher)),
    output:
        model=directory(f"{teacher_dir('{teacher}')}/model"),
        run=f"{teacher_dir('{teacher}')}/run.json",
    params:
        spec=lambda w: as_arg(ctd_specs.teacher_spec(config, w.teacher)),
        data=input_folder("train"),
        out=output_folder("run"),
    threads: workflow.cores
    resources:
        gpu=lambda w: job_gpus(trains=w.teacher in trained_teachers(config)),
    log:
        f"{LOGS}/teacher_{{teacher}}.log",
    benchmark:
        f"{BENCH}/teacher_{{teacher}}.tsv"
    conda:
        CONDA_ENV
    shell:
        ctdbench_command(config["gpus_per_run"] > 1 and any(t in trained_teachers(config) for t in used_teachers()))
        + " teacher --spec {params.spec} --data {params.data:q} --tokenizer {input.tokenizer:q}"
        " --out {params.out:q} --threads {threads} > {log:q} 2>&1"
