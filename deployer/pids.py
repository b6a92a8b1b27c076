"""Is a local process alive? One answer for the journal, the sandbox and the tests.

``kill -0`` alone says yes for a zombie (killed, not yet reaped: common in
containers whose pid 1 reaps lazily), so the state in ``/proc/PID/stat`` is
checked too. (The on-host guard carries its own copy: it is stdlib-only.)
"""

from __future__ import annotations

import os
from pathlib import Path


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``R``, ``S``, ``Z``…), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else None


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
