# Corpus -> train/validation/test splits; held-out split -> local lm-eval task data.


rule corpus:
    output:
        train=f"{DATA}/train.jsonl",
        validation=f"{DATA}/validation.jsonl",
        test=f"{DATA}/test.jsonl",
        meta=f"{DATA}/corpus.json",
    params:
        spec=as_arg(config["corpus"]),
        out=output_folder("train"),
    log:
        f"{LOGS}/corpus.log",
    benchmark:
        f"{BENCH}/corpus.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench corpus --spec {params.spec} --out {params.out:q} --cache resources > {log:q} 2>&1"


rule eval_data:
    input:
        test=rules.corpus.output.test,
    output:
        heldout=f"{DATA}/eval/heldout.jsonl",
        cloze=f"{DATA}/eval/cloze.jsonl",
    params:
        spec=as_arg(ctd_specs.evaluate_spec(config)),
        data=input_folder("test"),
        out=output_folder("heldout"),
    log:
        f"{LOGS}/eval_data.log",
    benchmark:
        f"{BENCH}/eval_data.tsv"
    conda:
        CONDA_ENV
    shell:
        "ctdbench eval-data --spec {params.spec} --data {params.data:q} --out {params.out:q} > {log:q} 2>&1"
