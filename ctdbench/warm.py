"""A warm process that runs each ``ctdbench`` command of a local workflow in a fork of itself.

Every workflow job is a fresh ``ctdbench`` process, and importing torch, transformers and lm-eval
costs ~5 s of CPU before a job does anything: more than most jobs of the smoke config spend on
their work, and ~10 s of the ~18 s of each of the default grid's 85 evaluations. While a workflow
runs, one server holds those modules imported (the Snakefile starts it in ``onstart``). A job's
``ctdbench`` command connects to it and hands over its arguments, working directory, environment
and its standard streams; the server forks a child that runs the command exactly as the job's
process would have, writing straight into the job's log. The job's process waits, relays Ctrl-C
and termination to the child, and exits with the child's code.

Nothing depends on it: without a server (no ``CTDBENCH_WARM`` socket, a cluster node, another
Python environment, a server still importing) the command runs itself. Forking after the imports
is safe for the same reason PyTorch's DataLoader workers are: the server never runs a torch
operation, so no thread pool exists to be inherited. What the imported libraries read from the
environment at import (e.g. ``HF_HUB_OFFLINE``) comes from the workflow's environment, which
every job inherits anyway. A job's ``peak_rss_mb`` includes every preloaded module, also those
its stage does not use, and the CPU and memory columns of Snakemake's ``benchmarks/*.tsv`` see
only the waiting process (their wall time is the job's). ``CTDBENCH_WARM=off`` runs every command by itself.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

ENV = "CTDBENCH_WARM"
# What the stages import; each lazily loaded transformers module is named so that it is loaded here.
PRELOAD = (
    "torch", "numpy", "transformers", "transformers.models.gpt_neox.modeling_gpt_neox",
    "transformers.models.llama.modeling_llama", "lm_eval", "lm_eval.evaluator", "lm_eval.tasks",
    "lm_eval.models.huggingface", "methods", "ctdbench.train", "ctdbench.teacher", "ctdbench.evaluate",
    "ctdbench.agreement", "ctdbench.models", "ot",
)
_HEADER = struct.Struct("!I")  # byte length of the JSON request that follows the streams
_RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what the job's process passes on to its fork
_server: subprocess.Popen | None = None
# The server process: its command is the CLI's (which imports this module, not the other way round).
_SERVER = "import sys; from ctdbench import cli, warm; warm.serve(sys.argv[1], int(sys.argv[2]), cli.run_here)"


def run(argv: list[str]) -> int | None:
    """Run ``ctdbench argv`` in a fork of the warm server; its exit code, or None without a server."""
    path = os.environ.get(ENV)
    if not path or path == "off":
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    signal.pthread_sigmask(signal.SIG_BLOCK, _RELAYED)  # a Ctrl-C before the fork's pid is known waits
    try:
        conn.connect(path)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "installation": _installation()}).encode()
        socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        reply = conn.makefile("r")
        first = reply.readline().split()
        if first[:1] != ["pid"]:  # refused: another Python environment
            return None
        child = int(first[1])
        for signum in _RELAYED:
            signal.signal(signum, lambda signum, frame: os.kill(child, signum))
    except OSError:
        conn.close()
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _RELAYED)
    last = reply.readline().split()
    if last[:1] == ["exit"]:
        return int(last[1])
    print(f"ctdbench: process {child} ended without an exit status (killed?)", file=sys.stderr)
    return 1


def serve(path: str, parent: int, command) -> None:
    """Import :data:`PRELOAD`, then fork one child per connection on ``path`` until ``parent`` exits;
    each runs ``command()`` (``ctdbench.cli.run_here``) on the job's ``sys.argv``."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional dependency: the stage that needs it imports (and reports) it itself
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # only now: a job connecting earlier runs by itself
    try:
        listener.listen(64)
        listener.settimeout(2.0)
        while os.getppid() == parent:  # the workflow is gone (killed): so is the server
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            sys.stdout.flush(), sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                _child(conn, command)
            conn.close()
    finally:
        Path(path).unlink(missing_ok=True)


def _child(conn: socket.socket, command) -> None:
    """Become the job's process: its streams, folder, environment and arguments; never returns."""
    code = 1
    signal.pthread_sigmask(signal.SIG_BLOCK, _RELAYED)  # until the command runs (see _exit_code)
    try:
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        (size,) = _HEADER.unpack(header)
        request = json.loads(conn.makefile("rb").read(size))  # b"" if the job died meanwhile: an error
        if request["installation"] != _installation():
            conn.sendall(b"refused\n")
            os._exit(0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        conn.sendall(f"pid {os.getpid()}\n".encode())
        threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
        sys.argv = ["ctdbench", *request["argv"]]
        code = _exit_code(command)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        try:
            conn.sendall(f"exit {code}\n".encode())
        finally:
            os._exit(code)


def _die_with_client(conn: socket.socket) -> None:
    """The job's process never writes after its request: end of stream means it was killed, and a
    killed job's work must stop with it (a rerun would otherwise race it for the same files)."""
    while conn.recv(1):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _installation() -> list[str]:
    """What must match between a job and the server: the Python environment and this package."""
    return [sys.prefix, sys.version, str(Path(__file__).resolve().parent)]


def _exit_code(command) -> int:
    """Run the command as the console script does; its exit code as Python's own exit gives it."""
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _RELAYED)
        command()
    except KeyboardInterrupt:  # relayed before the command's own handler was in place: it stopped at once
        print("ctdbench: interrupted before it began; rerun the same command (or snakemake)", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


def start() -> None:
    """Start the server for this process's jobs (they inherit ``CTDBENCH_WARM``); :func:`stop` ends it."""
    global _server
    if os.environ.get(ENV) == "off" or _server is not None:
        return
    path = os.path.join(tempfile.mkdtemp(prefix="ctdbench-warm-"), "socket")
    _server = subprocess.Popen([sys.executable, "-c", _SERVER, path, str(os.getpid())],
                               stdin=subprocess.DEVNULL, start_new_session=True)
    os.environ[ENV] = path


def stop() -> None:
    """End the server started by :func:`start` (running children finish on their own)."""
    global _server
    if _server is None:
        return
    _server.terminate()
    _server.wait()
    _server = None
    path = Path(os.environ.pop(ENV))
    path.unlink(missing_ok=True)
    path.parent.rmdir()
