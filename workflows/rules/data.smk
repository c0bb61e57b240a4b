# Corpus -> train/validation/test splits; held-out split -> local lm-eval task data.


rule corpus:
    output:
        train=f"{RESULTS}/data/train.jsonl",
        validation=f"{RESULTS}/data/validation.jsonl",
        test=f"{RESULTS}/data/test.jsonl",
        meta=f"{RESULTS}/data/corpus.json",
    params:
        spec=as_arg(config["corpus"]),
    log:
        f"{LOGS}/corpus.log",
    benchmark:
        f"{BENCH}/corpus.tsv"
    shell:
        "ctdbench corpus --spec {params.spec} --out {RESULTS}/data --cache resources --root {workflow.basedir} > {log} 2>&1"


rule eval_data:
    input:
        rules.corpus.output.test,
    output:
        heldout=f"{RESULTS}/data/eval/heldout.jsonl",
        cloze=f"{RESULTS}/data/eval/cloze.jsonl",
    params:
        spec=as_arg(ctd_specs.evaluate_spec(config)),
    log:
        f"{LOGS}/eval_data.log",
    benchmark:
        f"{BENCH}/eval_data.tsv"
    shell:
        "ctdbench eval-data --spec {params.spec} --data {RESULTS}/data --out {RESULTS}/data/eval > {log} 2>&1"
