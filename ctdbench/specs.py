"""Per-job specs: the slice of the validated config that one workflow job needs.

Rules pass these as JSON, so Snakemake reruns exactly the jobs whose inputs changed (a new
hyperparameter of one method retrains that method only). ``ctdbench bench`` builds the same specs.
"""

from __future__ import annotations

from ctdbench import layout
from ctdbench.config import pair_methods, pairs, teacher_cache_top_k


def teacher_spec(config: dict, name: str) -> dict:
    t = config["teachers"][name]
    return {
        "name": name,
        "tokenizer": t["tokenizer"],
        "model": config["models"][t["model"]],
        "train": t.get("train"),
        "data": t.get("data", {}),
        "seed": t.get("seed", 0),
        "device": config.get("device", "auto"),
    }


def precomputed_path(config: dict, pair: str, method: str) -> str | None:
    """Where the workflow's ``precompute`` rule writes ``method``'s file for ``pair``; None if the
    method precomputes nothing (``DistillationMethod.precompute``)."""
    cls = _method(method)
    if cls.precomputed_arg is None:
        return None
    return layout.precomputed_path(layout.results_dir(config), pair, method, cls.precomputed_suffix)


def precompute_spec(method: str) -> dict:
    """The ``precompute`` job's spec: the method only (its file depends on the tokenizer pair alone)."""
    return {"method": method}


def distill_spec(config: dict, pair: str, method: str, seed: int) -> dict:
    p = config["pairs"][pair]
    teacher = config["teachers"][p["teacher"]]
    cls = _method(method)
    hparams = dict(config["methods"].get(method, {}))
    if path := precomputed_path(config, pair, method):  # unless the config names the file itself
        hparams.setdefault(cls.precomputed_arg, path)
    return {
        "config_name": config["name"],
        "pair": pair,
        # Without the pair's method list: adding a method to it must not rerun the others.
        "pair_spec": {**{k: v for k, v in p.items() if k != "methods"}, "teacher_tokenizer": teacher["tokenizer"]},
        "student_model": config["models"][p["student_model"]],
        "method": method,
        "hparams": hparams,
        "seed": int(seed),
        "train": config["distill"]["train"],
        "data": config["distill"].get("data", {}),
        "device": config.get("device", "auto"),
        # Only when set: a key added to every spec would rerun every existing run.
        **({"lora": config["distill"]["lora"]} if config["distill"].get("lora") else {}),
        # A truncated teacher changes what a run learns (a full cache reproduces the online
        # teacher, so it stays out of the spec); methods without a teacher do not see it.
        **({"teacher_cache_top_k": k} if (k := teacher_cache_top_k(config)) and cls.needs_teacher else {}),
    }


def evaluate_spec(config: dict) -> dict:
    return dict(config.get("evaluate", {}))


def teacher_cache_spec(config: dict, teacher: str) -> dict:
    spec = {"data": config["distill"].get("data", {}), "device": config.get("device", "auto")}
    if k := teacher_cache_top_k(config):
        # Only for top-k caches (full-cache specs stay as they were, so no cache is rebuilt): the
        # hidden states, which dwarf the top-k arrays, only if a method of this teacher reads them.
        used = {m for p in pairs(config) if config["pairs"][p]["teacher"] == teacher for m in pair_methods(config, p)}
        spec.update(top_k=k, hidden_states=any(_method(m).needs_teacher_hidden_states for m in used))
    return spec


def _method(name: str) -> type:
    import methods  # here: the registry imports torch and every method, which the other specs never need

    return methods.get(name)[0]
