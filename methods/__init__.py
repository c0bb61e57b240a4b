"""Registry of distillation methods: one file per method in this package.

A method registers itself by name with the :func:`register` decorator. Every module of this
package is imported on first lookup, so adding a method means adding a file; nothing else
imports it by name.
"""

from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, type] = {}
_BROKEN: dict[str, str] = {}  # module -> import error, reported when a lookup fails
_discovered = False


def register(name: str, **defaults):
    """Class decorator registering a method under ``name``.

    A class may be registered several times under different names with different default
    hyperparameters (e.g. ``alm`` and ``alm+sft``).
    """

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' is registered twice")
        _REGISTRY[name] = (cls, dict(defaults))
        return cls

    return wrap


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            # A broken method file must not take the other methods down with it.
            try:
                importlib.import_module(f"{__name__}.{info.name}")
            except Exception as e:  # noqa: BLE001 - reported by get()
                _BROKEN[info.name] = f"{type(e).__name__}: {e}"


def available() -> list[str]:
    """Sorted names of all registered methods."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> tuple[type, dict]:
    """The method class registered as ``name`` and its registered default hyperparameters.

    Raises:
        KeyError: for an unknown name, listing the available ones.
    """
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        broken = "".join(f"; methods/{m}.py failed to import ({err})" for m, err in _BROKEN.items())
        raise KeyError(f"unknown method '{name}'; available: {', '.join(available())}{broken}") from None


def build(name: str, ctx, hparams: dict | None = None, *, seed: int = 0):
    """Instantiate method ``name`` with its registered defaults overridden by ``hparams``.

    The method's own parameters (heads, projectors) are initialised from their own seeded
    stream, so building a method never shifts the student's initialisation or any other RNG.
    """
    import torch

    cls, defaults = get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        return cls.from_config(ctx, {**defaults, **(hparams or {})}, name=name)
