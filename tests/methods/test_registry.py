"""The method registry: discovery, lookup errors, hyperparameter checking."""

import pytest

import methods
from methods.base import DistillationMethod, check_hparams


def test_sft_is_registered_and_template_is_not():
    assert "sft" in methods.available()
    assert all(not name.startswith("_") for name in methods.available())
    assert methods.available() == sorted(methods.available())


def test_unknown_method_lists_available():
    with pytest.raises(KeyError, match=r"unknown method 'nope'; available: .*sft"):
        methods.get("nope")


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="twice"):
        methods.register("sft")(type("Dup", (DistillationMethod,), {}))


class _Method(DistillationMethod):
    def __init__(self, ctx, alpha: float, beta: int = 2):
        super().__init__(ctx)


def test_check_hparams_names_unknown_and_missing():
    with pytest.raises(ValueError, match="unknown hyperparameter.*gamma.*accepted: alpha, beta"):
        check_hparams(_Method, {"alpha": 1.0, "gamma": 3}, name="m")
    with pytest.raises(ValueError, match="missing hyperparameter.*alpha"):
        check_hparams(_Method, {}, name="m")
    check_hparams(_Method, {"alpha": 1.0}, name="m")


def test_a_broken_method_file_is_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(methods._BROKEN, "oops", "SyntaxError: invalid syntax")
    assert "sft" in methods.available()
    with pytest.raises(KeyError, match=r"unknown method 'oops'.*methods/oops.py failed to import \(SyntaxError"):
        methods.get("oops")
