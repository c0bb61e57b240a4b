"""The ``ctdbench`` command: check-config, help text, errors, Ctrl-C."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctdbench import cli
from ctdbench import config as ctd_config
from ctdbench.config import ConfigError
from ctdbench.tokbytes import UnsupportedTokenizerError
from methods.base import HparamError

REPO = Path(__file__).resolve().parents[1]
SMOKE = (REPO / "workflows" / "config" / "smoke.yaml").read_text()
LR = "lr: 3.0e-3, eval_every"  # the smoke config's distillation learning rate, as written there


def with_lr(value: str) -> str:
    assert SMOKE.count(LR) == 1
    return SMOKE.replace(LR, f"lr: {value}, eval_every")


# ------------------------------------------------------------------------------------ check-config


def test_check_config_reports_every_file_in_one_line_each(tmp_path, capsys):
    files = {
        "good.yaml": (SMOKE, "ok"),
        "syntax.yaml": ("name: [unclosed\n", "not valid YAML (line 2, column 1: did not find expected ',' or ']'"),
        "missing.yaml": (None, "cannot be read (No such file or directory)"),
        "folder.yaml": ("", "cannot be read (Is a directory)"),
        "binary.yaml": (b"\xff\xfe", "not valid YAML ('utf-8' codec can't decode byte 0xff"),
        "list.yaml": ("- name\n- pairs\n", "holds a list, not a mapping of config keys"),
        "empty.yaml": ("# nothing yet\n", "holds nothing, not a mapping of config keys"),
        "key.yaml": (with_lr("fast"), "config key 'distill.train.lr': 'fast' is not of type 'number'"),
        "twice.yaml": (SMOKE.replace("name: smoke", "name: smoke\nname: other"), "config key 'name': written twice"),
    }
    for name, (text, _) in files.items():
        path = tmp_path / name
        if name == "folder.yaml":
            path.mkdir()
        elif isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
    paths = [str(tmp_path / name) for name in files]
    with pytest.raises(SystemExit) as failed:
        cli.main(["check-config", *paths])
    assert failed.value.code == "ctdbench check-config: 8 of 9 config files are invalid"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files)  # one line per file, in order, each naming its file
    for line, path, (_, expected) in zip(lines, paths, files.values()):
        assert line.startswith(f"config file {path}: ") and expected in line, line


def test_check_config_passes_good_files_with_exit_code_0(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(SMOKE)
    cli.main(["check-config", str(tmp_path / "a.yaml"), str(tmp_path / "a.yaml")])
    assert capsys.readouterr().out == f"config file {tmp_path / 'a.yaml'}: ok\n" * 2


def test_the_console_command_exits_1_without_a_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "ctdbench.cli", "check-config", str(tmp_path / "bad.yaml")],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert result.stdout.startswith(f"config file {tmp_path / 'bad.yaml'}: not valid YAML (line 2, column 1")
    assert result.stderr == "ctdbench check-config: 1 of 1 config files are invalid\n"


# ------------------------------------------------------------------ numbers YAML 1.1 reads as strings


@pytest.mark.parametrize("written, number", [("3e-3", 3e-3), ("1E-2", 1e-2), ("+2.5e-2", 2.5e-2), ("5.e-3", 5e-3),
                                             (".5e-2", 5e-3), ("0.01", 0.01), ("1.0e-2", 1e-2)])
def test_an_exponent_is_a_number_through_ctdbench_and_snakemake(written, number, tmp_path):
    from snakemake.common.configfile import load_configfile  # how the workflow reads --configfile

    path = tmp_path / "lr.yaml"
    path.write_text(with_lr(written))
    for config in (ctd_config.load(path), ctd_config.validate(load_configfile(str(path)))):
        lr = config["distill"]["train"]["lr"]
        assert lr == pytest.approx(number) and isinstance(lr, float), written


@pytest.mark.parametrize("written, problem", [("'3e-3x'", "'3e-3x' is not of type 'number'"),
                                              ("e-3", "'e-3' is not of type 'number'"),
                                              ("1e999", "inf is not a finite number")])
def test_other_strings_stay_strings(written, problem, tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text(with_lr(written))
    with pytest.raises(ConfigError, match=f"config key 'distill.train.lr': {problem}"):
        ctd_config.load(path)


def test_an_exponent_is_a_number_in_method_hyperparameters_and_never_an_integer(tmp_path):
    config = ctd_config.load(_written(tmp_path, SMOKE.replace("  bld: {}", "  bld: {lambda_kl: 5e-2}")))
    assert config["methods"]["bld"]["lambda_kl"] == 0.05
    steps = _written(tmp_path, SMOKE.replace("{steps: 6,", "{steps: 6e0,"))
    with pytest.raises(ConfigError, match=r"'distill.train.steps': 6.0 is not of type 'integer'"):
        ctd_config.load(steps)


def _written(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- help


def test_every_stage_and_argument_has_help_text():
    parser = cli.build_parser()
    stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest for c in stages._choices_actions} == set(stages.choices)
    undocumented = [c.dest for c in stages._choices_actions if not c.help]
    for name, sub in stages.choices.items():
        undocumented += [f"{name} {a.dest}" for a in sub._actions if not a.help or a.help == argparse.SUPPRESS]
        sub.format_help()  # every %(default)s expands
    assert not undocumented and len(stages.choices) == 11


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("error", [ConfigError("config key 'x': bad"), HparamError("methods.bld.x", "bad"),
                                   UnsupportedTokenizerError("bad"), FloatingPointError("NaN at step 3")])
def test_project_errors_end_in_one_line(error, monkeypatch):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "cmd_report", fails)
    monkeypatch.delenv("CTDBENCH_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as ended:
        cli.main(["report", "results/x"])
    assert ended.value.code == f"ctdbench report: {error}"
    monkeypatch.setenv("CTDBENCH_TRACEBACK", "1")
    with pytest.raises(type(error)):
        cli.main(["report", "results/x"])


@pytest.mark.parametrize("bug", [KeyError("pairs"), ValueError("bad"), TypeError("bad")])
def test_bugs_keep_their_traceback(bug, monkeypatch):
    def fails(args):
        raise bug

    monkeypatch.setattr(cli, "cmd_report", fails)
    monkeypatch.delenv("CTDBENCH_TRACEBACK", raising=False)
    with pytest.raises(type(bug)):
        cli.main(["report", "results/x"])


def test_bench_names_an_unknown_pair():
    refused = r"ctdbench bench: --pair nope: no such pair in .*smoke.yaml \(bpe_to_sp, bpe_to_byte\)"
    with pytest.raises(SystemExit, match=refused):
        cli.main(["bench", "--config", str(REPO / "workflows" / "config" / "smoke.yaml"), "--pair", "nope"])


# ----------------------------------------------------------------------------------------- Ctrl-C


def distill_argv(out: Path) -> list[str]:
    return ["ctdbench", "distill", "--spec", "{}", "--data", "d", "--teacher", "t", "--teacher-tokenizer", "tt",
            "--student-tokenizer", "st", "--out", str(out)]


@pytest.mark.parametrize("checkpointed", [True, False])
def test_ctrl_c_says_how_to_resume(checkpointed, tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    if checkpointed:
        (tmp_path / "run" / "checkpoint").mkdir(parents=True)
        (tmp_path / "run" / "checkpoint" / "last.pt").write_bytes(b"")
    monkeypatch.setattr(cli, "cmd_distill", interrupted)
    monkeypatch.setattr(sys, "argv", distill_argv(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):  # a Python caller of main() sees the interrupt
        cli.main(sys.argv[1:])
    with pytest.raises(SystemExit) as ended:
        cli.console()
    assert ended.value.code == 130
    how = (f"its checkpoint is kept in {tmp_path / 'run' / 'checkpoint'}: rerun the same command (or snakemake) "
           "to resume" if checkpointed else "rerun the same command (or snakemake) to run it again")
    assert capsys.readouterr().err == f"ctdbench distill: interrupted; {how}\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_a_real_sigint_ends_the_command_in_one_line(tmp_path):
    """SIGINT while the command waits on a pipe nobody writes: exit 130, one line, no traceback."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "ctdbench.cli", "check-config", str(fifo)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # opening a pipe's write end without blocking succeeds once its reader waits
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    try:
        time.sleep(0.2)  # the command now waits in read() for data that never comes, inside main()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(writer)
    assert proc.returncode == 130, err
    assert err == "ctdbench check-config: interrupted; rerun the same command (or snakemake) to run it again\n"
