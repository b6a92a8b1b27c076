"""Writing a local file whole or not at all.

:func:`atomic_write` writes a temporary file beside the target and renames it
over the target, so a reader (a CI job reading a report, the sandbox polling
``runner.json``) sees the old file or the new one, never half of one. Local
files only: the guard writes on the host with its own code (it runs there
alone), and remote writes go through ``deployer.remote``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: the mode argument that keeps the process's umask: 0666 less the umask, as open() creates
UMASK = None


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int | None) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) in one rename.

    ``mode``: the file's exact permission bits (e.g. ``0o600`` for a file that
    holds credentials or maps the fleet: set whatever the umask), or
    :data:`UMASK` for a file created as ``open()`` creates one. The temporary
    file (``.NAME.RANDOM.tmp``, in the same directory) is created owner-only
    when ``mode`` is given, so the data is never readable wider on its way in;
    it is removed if anything fails. The directory must exist. Not fsynced: a
    crash of this process leaves the old file or the new one, a power loss may
    leave either or an empty one.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        if mode is not None:
            os.chmod(tmp, mode)  # exact: the umask may have cut the creation mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
