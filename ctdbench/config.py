"""Workflow configuration: JSON-schema validation with defaults, and cross-reference checks.

The schema lives in ``workflows/schema/config.schema.yaml``; the Snakefile and the CLI both call
:func:`validate`, so an invalid config fails before any job runs, naming the offending key.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflows" / "schema" / "config.schema.yaml"


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def _with_defaults(validator_class):
    """A validator class that fills ``default`` values of object properties while validating."""
    check_properties = validator_class.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": fill_then_check})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"'{_key([*error.absolute_path, k])}'" for k in extra)
        return f"unknown config key {keys}" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
    if error.validator == "oneOf" and error.context:
        # Report the branch that got furthest instead of the generic "is not valid under any".
        best = jsonschema.exceptions.best_match(error.context)
        return f"config key '{_key(error.absolute_path)}': {best.message}"
    return f"config key '{_key(error.absolute_path)}': {error.message}"


def load(path: str | Path) -> dict:
    """Read a YAML config and validate it."""
    with open(path) as f:
        return validate(yaml.safe_load(f) or {})


def validate(config: dict, *, check_methods: bool = True) -> dict:
    """Validate ``config`` in place (filling defaults) and return it.

    Raises:
        ConfigError: naming the first offending key.
    """
    with open(SCHEMA) as f:
        schema = yaml.safe_load(f)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0]))
    _check_references(config)
    _check_gpus_per_run(config)
    if check_methods:
        _check_methods(config)
    return config


def _check_references(config: dict) -> None:
    def need(section: str, name: str, where: str) -> None:
        if name not in config[section]:
            raise ConfigError(
                f"config key '{where}': '{name}' is not defined in {section} "
                f"(defined: {', '.join(config[section])})"
            )

    for name, t in config["teachers"].items():
        need("tokenizers", t["tokenizer"], f"teachers.{name}.tokenizer")
        need("models", t["model"], f"teachers.{name}.model")
        if "hf" not in config["models"][t["model"]] and "train" not in t:
            raise ConfigError(f"config key 'teachers.{name}.train': a from-scratch teacher needs a training budget")
    for name, p in config["pairs"].items():
        need("teachers", p["teacher"], f"pairs.{name}.teacher")
        need("tokenizers", p["student_tokenizer"], f"pairs.{name}.student_tokenizer")
        need("models", p["student_model"], f"pairs.{name}.student_model")
    for i, name in enumerate(config["run"].get("pairs", [])):
        need("pairs", name, f"run.pairs.{i}")
    from ctdbench.specs import RESERVED

    for name in config["pairs"]:
        if name in RESERVED:
            raise ConfigError(f"config key 'pairs.{name}': '{name}' is a reserved results folder name")


def _check_gpus_per_run(config: dict) -> None:
    gpus = config["gpus_per_run"]
    if gpus == 1:
        return
    if config["device"] != "cuda":
        raise ConfigError(f"config key 'gpus_per_run': {gpus} GPUs per run need device: cuda "
                          f"(device is {config['device']})")
    if not accelerate_config(config).is_file():
        raise ConfigError(f"config key 'accelerate_config': {accelerate_config(config)} is not a file")
    budgets = [("distill.train", config["distill"]["train"])]
    budgets += [(f"teachers.{name}.train", config["teachers"][name]["train"]) for name in trained_teachers(config)]
    for where, train in budgets:
        if train["batch_size"] % (train["grad_accum"] * gpus):
            raise ConfigError(
                f"config key '{where}.batch_size': {train['batch_size']} segments do not split into "
                f"grad_accum {train['grad_accum']} x gpus_per_run {gpus} equal micro-batches"
            )


def _check_methods(config: dict) -> None:
    import methods
    from methods.base import check_hparams

    lists = [("run.methods", config["run"]["methods"])]
    lists += [(f"pairs.{p}.methods", spec["methods"]) for p, spec in config["pairs"].items() if "methods" in spec]
    for where, names in lists:
        for i, name in enumerate(names):
            try:
                cls, defaults = methods.get(name)
            except KeyError as e:
                raise ConfigError(f"config key '{where}.{i}': {e.args[0]}") from None
            try:
                check_hparams(cls, {**defaults, **config["methods"].get(name, {})}, name=name)
            except ValueError as e:
                raise ConfigError(f"config key 'methods.{name}': {e}") from None
    for name in config["methods"]:
        if name not in methods.available():
            raise ConfigError(f"config key 'methods.{name}': unknown method; available: {', '.join(methods.available())}")
    from ctdbench.specs import teacher_cache_top_k

    top_k = teacher_cache_top_k(config)
    for pair in pairs(config):
        p = config["pairs"][pair]
        same = p["student_tokenizer"] == config["teachers"][p["teacher"]]["tokenizer"]
        where = f"pairs.{pair}.methods" if "methods" in p else "run.methods"
        for name in pair_methods(config, pair):
            if getattr(methods.get(name)[0], "requires_same_tokenizer", False) and not same:
                raise ConfigError(
                    f"config key '{where}': method '{name}' needs the teacher's tokenizer on the student side, "
                    f"but pair '{pair}' uses '{p['student_tokenizer']}'; list it only for a same-tokenizer pair"
                )
            if methods.get(name)[0].needs_full_teacher_vocab and top_k:
                raise ConfigError(
                    f"config key 'distill.teacher_cache_top_k': method '{name}' (in {where}) needs the teacher's "
                    f"full vocabulary, which a top-{top_k} cache does not keep; drop the key or the method"
                )


def trained_teachers(config: dict) -> list[str]:
    """Teachers pretrained from scratch (the others are copied from a checkpoint)."""
    return [name for name, t in config["teachers"].items() if "hf" not in config["models"][t["model"]]]


def accelerate_config(config: dict) -> Path:
    """The accelerate config file of multi-GPU jobs (relative paths are relative to the repository)."""
    return REPO / config["accelerate_config"]


def pair_methods(config: dict, pair: str) -> list[str]:
    """Methods run on ``pair``: its own ``methods`` list, else ``run.methods``."""
    return config["pairs"][pair].get("methods") or config["run"]["methods"]


def pairs(config: dict) -> list[str]:
    """The pairs this config runs (``run.pairs`` or all)."""
    return config["run"].get("pairs") or list(config["pairs"])
