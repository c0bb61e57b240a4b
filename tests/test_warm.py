"""The warm process: a command run in its fork behaves as the command run by itself."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ctdbench import warm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    """A warm server for this module's commands; yields its pid once it accepts connections."""
    saved = os.environ.get(warm.ENV)
    os.environ.pop(warm.ENV, None)
    warm.start()
    path, deadline = Path(os.environ[warm.ENV]), time.monotonic() + 120
    while not path.exists():
        assert warm._server.poll() is None and time.monotonic() < deadline, "the warm server did not start"
        time.sleep(0.1)
    yield warm._server.pid
    warm.stop()
    assert not path.parent.exists()
    if saved is not None:
        os.environ[warm.ENV] = saved


def ctdbench(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["ctdbench", *args], capture_output=True, text=True, cwd=REPO, **kwargs)


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in tasks.read_text().split()] if tasks.exists() else []


def settled(server_pid: int) -> None:
    """Wait until the forks of earlier commands are gone (a job returns just before its fork exits)."""
    deadline = time.monotonic() + 30
    while children(server_pid):
        assert time.monotonic() < deadline, "a fork outlived its command"
        time.sleep(0.05)


def start(*args, **kwargs) -> subprocess.Popen:
    """``ctdbench args`` waiting on its stdin (a pipe), once the server is idle."""
    settled(warm._server.pid)
    return subprocess.Popen(["ctdbench", *args], stdin=subprocess.PIPE, **kwargs)


def forked_child(server_pid: int) -> int:
    deadline = time.monotonic() + 30
    while not (found := children(server_pid)):
        assert time.monotonic() < deadline, "no child forked"
        time.sleep(0.05)
    return found[0]


@pytest.mark.parametrize("args", [
    ("check-config", "workflows/config/smoke.yaml", "no/such.yaml"),  # exit 1, a line per file
    ("check-config", "workflows/config/smoke.yaml"),  # exit 0
    ("no-such-stage",),  # argparse: exit 2, usage on stderr
])
def test_a_command_in_the_warm_process_prints_and_exits_as_by_itself(server, args):
    env = {**os.environ, warm.ENV: "off"}
    alone, warmed = ctdbench(*args, env=env), ctdbench(*args)
    assert (warmed.returncode, warmed.stdout, warmed.stderr) == (alone.returncode, alone.stdout, alone.stderr)
    settled(server)  # the fork is gone with its command


def test_the_command_runs_in_a_fork_with_the_jobs_folder_and_streams(server, tmp_path):
    (tmp_path / "smoke.yaml").write_bytes((REPO / "workflows/config/smoke.yaml").read_bytes())
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:
        job = start("check-config", "/dev/stdin", "smoke.yaml", cwd=tmp_path, stdout=stdout,
                    stderr=subprocess.STDOUT, text=True)
        child = forked_child(server)  # it waits on the job's stdin: the job's streams are its own
        job.communicate("{}")
    assert child != job.pid and job.returncode == 1
    assert out.read_text().splitlines()[1] == "config file smoke.yaml: ok"  # relative to the job's folder


def reading_a_pipe(pid: int) -> bool:
    try:
        return "pipe_read" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("when", ["running", "starting"])
def test_ctrl_c_reaches_the_fork_and_says_how_to_resume(server, when):
    job = start("check-config", "/dev/stdin", cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child, deadline = forked_child(server), time.monotonic() + 30
    while when == "running" and not reading_a_pipe(child):  # the command waits on the job's stdin
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 130
    if when == "running":
        assert stderr == "ctdbench check-config: interrupted; rerun the same command (or snakemake) to run it again\n"
    else:  # possibly before the command began: it says so
        assert "rerun the same command (or snakemake)" in stderr.splitlines()[-1]


def test_a_killed_job_takes_its_fork_with_it(server):
    job = start("check-config", "/dev/stdin", cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = forked_child(server)
    job.kill()  # SIGKILL: nothing is relayed, the fork must notice by itself
    job.wait()
    deadline = time.monotonic() + 10
    while child in children(server):
        assert time.monotonic() < deadline, "the fork outlived its killed job"
        time.sleep(0.05)
    job.stdin.close()


def test_without_a_server_the_command_runs_by_itself(tmp_path):
    for value in ("off", str(tmp_path / "no-socket")):
        result = ctdbench("check-config", "workflows/config/smoke.yaml", env={**os.environ, warm.ENV: value})
        assert result.returncode == 0 and result.stdout.endswith(": ok\n")


def test_a_server_of_another_python_environment_is_not_used(server, monkeypatch):
    monkeypatch.setattr(warm, "_installation", lambda: ["another", "environment"])
    assert warm.run(["check-config", "workflows/config/smoke.yaml"]) is None
