"""Is a local process alive? One answer for the journal, recover, the sandbox and the tests.

``kill -0`` alone says yes for a zombie (killed, not yet reaped: common in
containers whose pid 1 reaps lazily), so the state in ``/proc/PID/stat`` is
checked too. (The on-host guard carries its own copy: it is stdlib-only.)

A process recorded earlier (a run in the journal, a recover in a lock's owner
file) is told apart from a later one that got its pid by the machine's name and
the kernel's start time of the process (:func:`process_is_live`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# fields of /proc/PID/stat after the command name: field 3 (state) is [0], 22 (starttime) [19]
_STATE, _START_TIME = 0, 19


def _stat_field(pid: int, index: int) -> str | None:
    """Field ``index`` of /proc/PID/stat after the command name, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in field 2 may hold spaces
    return fields[index] if len(fields) > index else None


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``R``, ``S``, ``Z``…), or None."""
    return _stat_field(pid, _STATE)


def process_start_token(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a reused pid apart."""
    return _stat_field(pid, _START_TIME)


def machine_name() -> str:
    return socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    """``pid`` exists (ours or someone else's) and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return proc_state(pid) not in ("Z", "X")


def process_is_live(machine: str, pid: int, pid_start: str | None = None) -> bool:
    """Is ``pid`` alive on this machine (and the same process that was recorded)?

    A process recorded on another machine cannot be checked and counts as not live.
    """
    if machine != machine_name() or not pid_alive(pid):
        return False  # another machine, gone, or killed and not yet reaped
    if pid_start is not None:
        current = process_start_token(pid)
        if current is not None and current != pid_start:
            return False  # the pid was reused by another process
    return True
