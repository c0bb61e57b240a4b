"""The method registry: discovery, lookup errors, hyperparameter checking."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(ValueError, match="gamma: unknown hyperparameter.*accepted: alpha, beta"):
        check_hparams(_Method, {"alpha": 1.0, "gamma": 3}, name="m")
    with pytest.raises(ValueError, match="methods.m.alpha: missing hyperparameter"):
        check_hparams(_Method, {}, name="m")
    check_hparams(_Method, {"alpha": 1.0}, name="m")


LOOKUP = """
import sys
import methods
assert methods.__file__.startswith(sys.argv[1]), methods.__file__
print(methods.available())
try:
    methods.get("oops")
except KeyError as e:
    print(e)
"""


def test_a_broken_method_file_is_reported_not_fatal(tmp_path):
    """Real broken files in a copy of this package (a failing import, a syntax error): every other
    method still registers, and a failed lookup names each broken file and its error."""
    package = Path(methods.__file__).parent
    shutil.copytree(package, tmp_path / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "methods" / "oops.py").write_text("import a_module_that_does_not_exist\n")
    (tmp_path / "methods" / "typo.py").write_text("def loss(:\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(package.parent)])}
    run = subprocess.run([sys.executable, "-c", LOOKUP, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    available, error = run.stdout.splitlines()
    assert ast.literal_eval(available) == methods.available()
    assert "unknown method 'oops'" in error
    assert "methods/oops.py failed to import (ModuleNotFoundError: No module named 'a_module_that_does_not_exist')" in error
    assert "methods/typo.py failed to import (SyntaxError" in error
