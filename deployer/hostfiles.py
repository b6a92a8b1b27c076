"""Where deployer keeps its files on a host, and the remote operations on them.

Everything lives in one directory beside the client script, so renames
stay on one filesystem (atomic) and one ``mkdir`` is the host lock::

    /opt/sshreach/client.py                      the installed script
    /opt/sshreach/.client.py.deployer/lock/      the host lock (owner file inside)
    /opt/sshreach/.client.py.deployer/backups/   client.py.<UTC time>.<sha8>
    /opt/sshreach/.client.py.deployer/runs/RUN/  staged script, guard, status, control files

The script, its backups and the guard hold the host's credentials: ``backups/``
and ``runs/`` are created owner-only (umask 077), backups are kept owner-only
(see :func:`prune_backups`), and inspect reports an installed script that group
or others can read (:func:`remote_script_info`, :func:`loose_mode_warning`).

Every remote word goes through :func:`deployer.remote.sh` (shlex.quote).
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any

from deployer.errors import LockHeld, RemoteCommandError, VerifyError
from deployer.remote import Remote, sh
from deployer.result import readable_by

BACKUP_STAMP = "%Y%m%dT%H%M%SZ"
MODE_RE = re.compile(r"^[0-7]{3,4}$")


@dataclass(frozen=True)
class HostPaths:
    script_path: str
    run_id: str

    @property
    def base(self) -> str:
        head, name = posixpath.split(self.script_path)
        return posixpath.join(head, f".{name}.deployer")

    @property
    def lock(self) -> str:
        return posixpath.join(self.base, "lock")

    @property
    def backups(self) -> str:
        return posixpath.join(self.base, "backups")

    @property
    def run_dir(self) -> str:
        return posixpath.join(self.base, "runs", self.run_id)

    @property
    def staged(self) -> str:
        return posixpath.join(self.run_dir, "new-script")

    @property
    def guard(self) -> str:
        return posixpath.join(self.run_dir, "guard.py")

    @property
    def status(self) -> str:
        return posixpath.join(self.run_dir, "status")

    def control(self, name: str) -> str:
        return posixpath.join(self.run_dir, name)

    def backup_for(self, sha256: str | None, now: float) -> str:
        stamp = time.strftime(BACKUP_STAMP, time.gmtime(now))
        name = posixpath.basename(self.script_path)
        return posixpath.join(self.backups, f"{name}.{stamp}.{(sha256 or 'none')[:8]}")


@dataclass(frozen=True)
class LockInfo:
    owner: str
    run_id: str
    since: float

    def describe(self, now: float) -> str:
        return f"held by {self.owner} (run {self.run_id}) for {max(0, now - self.since):.0f}s"

    @classmethod
    def from_json(cls, data: Any) -> LockInfo | None:
        """From the lock's owner file as parsed JSON; None if it is not one."""
        try:
            return cls(str(data["owner"]), str(data["run_id"]), float(data["since"]))
        except (KeyError, TypeError, ValueError):
            return None


def lock_owner(paths: HostPaths, owner: str, now: float) -> str:
    """What the lock's owner file holds for this run."""
    return json.dumps({"owner": owner, "run_id": paths.run_id, "since": now})


def lock_held(paths: HostPaths, held: LockInfo | None, now: float, host: str) -> LockHeld:
    what = held.describe(now) if held else "held by an unknown owner"
    return LockHeld(
        f"host lock {paths.lock} is {what}; if that deployer is gone, run "
        f"`deployer recover` or pass --break-lock",
        host=host,
        step="lock",
    )


def remote_sha256(remote: Remote, path: str) -> str | None:
    """sha256 of a remote file, or None if it does not exist."""
    # from stdin: sha256sum escapes odd file names (backslash, newline) in its output
    res = remote.run(f"if [ -f {sh(path)} ]; then sha256sum < {sh(path)}; else echo MISSING; fi")
    out = res.stdout.strip()
    return None if out == "MISSING" else _digest(remote, path, out)


def remote_script_info(remote: Remote, path: str) -> tuple[str | None, str | None]:
    """``(sha256, mode)`` of a remote file in one round trip; ``(None, None)`` if it
    does not exist. ``mode`` is four octal digits (``"0755"``), None if ``stat``
    could not tell."""
    p = sh(path)
    res = remote.run(
        f"if [ -f {p} ]; then sha256sum < {p} && (stat -c %a {p} 2>/dev/null || echo -); "
        "else echo MISSING; fi"
    )
    out = res.stdout.strip()
    if out == "MISSING":
        return None, None
    first, _, rest = out.partition("\n")
    mode = rest.strip()
    return _digest(remote, path, first), (f"{int(mode, 8):04o}" if MODE_RE.match(mode) else None)


def _digest(remote: Remote, path: str, out: str) -> str:
    digest = out.split()[0] if out else ""
    if len(digest) != 64:
        raise VerifyError(f"unexpected sha256sum output for {path}: {out[:80]!r}", host=remote.name)
    return digest


def loose_mode_warning(path: str, mode: str | None, wanted: str) -> str | None:
    """The warning for an installed script that group or others can read, or None.

    ``wanted`` is the inventory's ``mode``: the fix is a reinstall when it is
    owner-only, else the inventory itself."""
    readers = readable_by(mode)
    if readers is None:
        return None
    text = (
        f"warning: the installed script {path} is mode {mode}: {readers} can read it, "
        "and it holds the host's credentials; "
    )
    if readable_by(wanted):
        return (
            text + f'the inventory asks for mode "{wanted}": set mode = "0700" to keep it private'
        )
    return text + f"an upgrade installs it as {wanted} (add --force if the script is unchanged)"


def read_file(remote: Remote, path: str) -> bytes:
    res = remote.run(sh("base64", path))
    import base64

    return base64.b64decode(res.stdout)


def take_lock(
    remote: Remote, paths: HostPaths, owner: str, now: float, break_lock: bool = False
) -> None:
    """``mkdir`` the lock directory (atomic) and record the owner inside it."""
    info = lock_owner(paths, owner, now)
    if break_lock:
        remote.run(sh("rm", "-rf", paths.lock))
    mk = remote.run(f"mkdir -p {sh(paths.base)} && mkdir {sh(paths.lock)}", check=False)
    if not mk.ok:
        held = read_lock(remote, paths)
        if held is None and "File exists" not in (mk.stderr + mk.stdout):
            raise RemoteCommandError(
                f"cannot create the host lock {paths.lock}: {mk.stderr.strip()[:200]}",
                host=remote.name,
                command=mk.command,
                exit_status=mk.exit_status,
            )
        raise lock_held(paths, held, now, remote.name)
    remote.run(f"printf %s {sh(info)} > {sh(paths.lock + '/owner')}")


def read_lock(remote: Remote, paths: HostPaths) -> LockInfo | None:
    res = remote.run(sh("cat", paths.lock + "/owner"), check=False)
    if not res.ok:
        return None
    try:
        return LockInfo.from_json(json.loads(res.stdout))
    except ValueError:
        return None


def release_lock(remote: Remote, paths: HostPaths) -> None:
    """Remove the lock if it is ours (same run id)."""
    held = read_lock(remote, paths)
    if held is not None and held.run_id != paths.run_id:
        return
    remote.run(sh("rm", "-rf", paths.lock))


def list_backups(remote: Remote, paths: HostPaths) -> list[str]:
    """Backup file paths, oldest first (their names sort by time)."""
    res = remote.run(f"ls -1 {sh(paths.backups)} 2>/dev/null || true")
    name = posixpath.basename(paths.script_path) + "."
    names = sorted(
        n for n in res.stdout.split("\n") if n.startswith(name) and not n.endswith(".tmp")
    )
    return [posixpath.join(paths.backups, n) for n in names]


def prune_backups(remote: Remote, paths: HostPaths, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` backups, and make the rest owner-only:
    they hold credentials (backups made before deployer kept them private may
    still be readable by group or others)."""
    backups = list_backups(remote, paths)
    doomed = backups[: max(0, len(backups) - keep)]
    private = f"(chmod -R go-rwx {sh(paths.backups)} 2>/dev/null || true)"
    remote.run(f"{sh('rm', '-f', *doomed)} && {private}" if doomed else private)
    return doomed
