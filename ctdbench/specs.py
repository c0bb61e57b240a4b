"""Per-job specs: the slice of the validated config that one workflow job needs.

Rules pass these as JSON, so Snakemake reruns exactly the jobs whose inputs changed (a new
hyperparameter of one method retrains that method only). ``ctdbench bench`` builds the same specs.
"""

from __future__ import annotations

RESERVED = {"data", "tokenizers", "teachers", "maps", "figures", "logs", "benchmarks"}


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


def mined_map_path(config: dict, pair: str) -> str:
    """Where the workflow's ``mined_map`` rule caches the pair's MinED vocabulary map."""
    return f"results/{config['name']}/maps/{pair}/mined.npy"


def distill_spec(config: dict, pair: str, method: str, seed: int) -> dict:
    p = config["pairs"][pair]
    teacher = config["teachers"][p["teacher"]]
    hparams = dict(config["methods"].get(method, {}))
    if method == "mined":
        hparams.setdefault("map_path", mined_map_path(config, pair))
    return {
        "config_name": config["name"],
        "pair": pair,
        "pair_spec": {**p, "teacher_tokenizer": teacher["tokenizer"]},
        "student_model": config["models"][p["student_model"]],
        "method": method,
        "hparams": hparams,
        "seed": int(seed),
        "train": config["distill"]["train"],
        "data": config["distill"].get("data", {}),
        "device": config.get("device", "auto"),
        # Only when set: a key added to every spec would rerun every existing run.
        **({"lora": config["distill"]["lora"]} if config["distill"].get("lora") else {}),
    }


def evaluate_spec(config: dict) -> dict:
    return dict(config.get("evaluate", {}))


def teacher_cache_spec(config: dict) -> dict:
    return {"data": config["distill"].get("data", {}), "device": config.get("device", "auto")}
