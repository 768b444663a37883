"""The test helper that runs torchrun: a timeout ends the grandchildren too, not only the child
(``subprocess.run`` kills the child and leaves its workers running)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_process_group

# A child that starts a grandchild, prints the grandchild's pid, then both sleep.
SLEEPERS = (
    "import subprocess, sys, time; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(p.pid, flush=True); time.sleep(60)"
)


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(ln for ln in status.read_text().splitlines() if ln.startswith("State:"))
    except FileNotFoundError:
        return False
    return "Z" not in state.split()[1]  # a zombie has ended


def wait_until_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_timeout_kills_the_grandchildren():
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as err:
        run_process_group([sys.executable, "-c", SLEEPERS], timeout=3)
    assert time.monotonic() - start < 20
    grandchild = int(err.value.output.split()[0])
    assert wait_until_gone(grandchild, 10)


def test_output_and_return_code_come_back():
    done = run_process_group(
        [sys.executable, "-c", "import sys; print('out'); sys.exit('err')"], timeout=30
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "out\n", "err\n")
