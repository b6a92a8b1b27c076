"""Process and port housekeeping for the sandbox: detached starts that outlive
the caller, the pidfile service convention, and the checks ``down`` uses to
prove nothing is left behind. Linux only (reads /proc)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from deployer.pids import pid_alive

STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL after this long (the pidfile convention)
POLL = 0.05


def spawn_detached(
    argv: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None
) -> int:
    """Start ``argv`` in a new session, not our child (double fork); return its pid."""
    script = 'setsid "$@" >>"$LOG" 2>&1 </dev/null & echo $!'
    run_env = dict(env if env is not None else os.environ, LOG=str(log_path))
    out = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *argv],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return int(out.stdout.strip())


def start_pidfile_service(
    run: str, pidfile: Path, log_path: Path, cwd: str, env: dict[str, str]
) -> int:
    """Start a client as the pidfile service kind does: ``setsid sh -c 'exec RUN'``
    detached, its pid (the client's own, thanks to exec) written to ``pidfile``."""
    command = (
        f"setsid sh -c {shlex.quote(run)} >>{shlex.quote(str(log_path))} 2>&1 </dev/null & "
        f"echo $! >{shlex.quote(str(pidfile))}"
    )
    subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env, timeout=10, check=True)
    return int(pidfile.read_text().strip())


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """``kill -0`` succeeds and the process is not a zombie."""
    return pid_alive(pid)


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_mentioning(*markers: str) -> list[int]:
    """Live processes (not us, not our ancestors) whose command line contains a marker."""
    own = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in own or not alive(pid):
            continue
        line = cmdline(pid)
        if any(marker in line for marker in markers):
            found.append(pid)
    return sorted(found)


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if alive(p)]
        if pending:
            time.sleep(POLL)
    return [p for p in pending if alive(p)]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(pids: Iterable[int], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; return pids still alive after all."""
    pids = [p for p in pids if alive(p)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    stubborn = _wait_gone(pids, timeout)
    for pid in stubborn:
        _signal(pid, signal.SIGKILL)
    return _wait_gone(stubborn, 2.0)


def kill_now(pids: Iterable[int]) -> list[int]:
    """Freeze all, then SIGKILL all (so none can restart another); return survivors."""
    pids = [p for p in pids if alive(p)]
    for pid in pids:
        _signal(pid, signal.SIGSTOP)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    return _wait_gone(pids, 2.0)


def listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
