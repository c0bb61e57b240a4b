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
        "ctdbench corpus --spec {params.spec} --out {RESULTS:q}/data --cache resources --root {workflow.basedir:q} > {log:q} 2>&1"


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
        "ctdbench eval-data --spec {params.spec} --data {RESULTS:q}/data --out {RESULTS:q}/data/eval > {log:q} 2>&1"
