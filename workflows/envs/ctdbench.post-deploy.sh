#!/usr/bin/env bash
# Snakemake runs this once in the new environment, from its working directory: the repository
# (README, Quick start), whose pyproject.toml pins every dependency (torch==2.13.0 included).
set -euo pipefail
pip install -e .
