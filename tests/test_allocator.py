import os
import platform
import subprocess
import sys

import pytest

CALL = "from ctdbench.allocator import reuse_freed_memory; print(reuse_freed_memory())"


def run(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tunes_glibc_unless_the_user_chose_an_allocator():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    assert run(env) == "True"
    assert run({**env, "MALLOC_ARENA_MAX": "2"}) == "False"    # the user's own glibc tuning is kept
