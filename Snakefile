# ctdbench: cross-tokenizer distillation benchmark.
#   snakemake --cores all                         default config (CPU, offline after install)
#   snakemake --cores all --configfile workflows/config/smoke.yaml
#   snakemake plots --cores 1                     figures + summary from existing results only
import sys

from snakemake.utils import min_version

from ctdbench import config as ctd_config
from ctdbench import warm

min_version("9.27.1")  # the version pyproject.toml pins and the tests run

# A --configfile replaces the default instead of being merged into it (Snakemake would merge
# the two recursively, leaking default pairs and models into e.g. the smoke config).
if "name" not in config:
    configfile: f"{workflow.basedir}/workflows/config/default.yaml"

# One line naming the key, no traceback. The files are read again by ctdbench's own loader, which
# refuses keys written twice (Snakemake's YAML loading keeps the last silently).
try:
    for path in workflow.configfiles:
        ctd_config.read_yaml(path)
    ctd_config.validate(config)
except ctd_config.ConfigError as e:
    sys.exit(f"invalid config: {e}")

# The HTML report (`snakemake --report`) opens with the headline figure and the verdict.
report: "workflows/report/workflow.rst"

include: "workflows/rules/common.smk"
include: "workflows/rules/data.smk"
include: "workflows/rules/models.smk"
include: "workflows/rules/distill.smk"
include: "workflows/rules/evaluate.smk"
include: "workflows/rules/report.smk"

# Jobs of seconds and little memory run in the Snakemake process's host, never as cluster jobs.
localrules:
    all,
    corpus,
    eval_data,
    tokenizer,
    summary,
    plots,


rule all:
    default_target: True
    input:
        f"{RESULTS}/summary.csv",


# Every job's `ctdbench` runs in a fork of one process that has torch, transformers and lm-eval
# imported (ctdbench/warm.py), instead of spending ~5 s importing them; CTDBENCH_WARM=off disables it.
onstart:
    warm.start()


onsuccess:
    warm.stop()


onerror:
    warm.stop()
