import subprocess
import sys
import time

import pytest

from deployer.pids import pid_alive, proc_state

pytestmark = pytest.mark.unit


def test_a_running_process_is_alive():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    end = time.monotonic() + 10
    while proc_state(proc.pid) != "Z" and time.monotonic() < end:
        time.sleep(0.02)  # exited, not reaped: a zombie until wait()
    try:
        assert proc_state(proc.pid) == "Z"
        assert not pid_alive(proc.pid)
    finally:
        proc.wait()
    assert not pid_alive(proc.pid)


def test_no_pid_is_not_alive():
    assert not pid_alive(None) and not pid_alive(0) and not pid_alive(-3)
