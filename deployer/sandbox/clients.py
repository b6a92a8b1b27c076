"""A sandbox host's client process, handled as its init system would, and a
schedule of such changes (the flapping fault of the sandbox's rehearsals).

* :func:`start` — the pidfile service convention, as ``sandbox up`` and the
  guard start a client: ``setsid sh -c 'exec python3 client.py'``, its pid in
  ``hosts/NAME/client.pid``, its cwd the host directory. A client that runs
  is left alone.
* :func:`stop` — SIGTERM to the pid in the pidfile only (SIGKILL after
  :data:`STOP_TIMEOUT`). The client's tunnel process stays, as in production
  (systemd ``KillMode=process``, a pidfile service): the provider sees the
  host offline once ``offline_after`` passed, and the client started next
  adopts the tunnel. ``with_tunnel=True`` also ends the tunnel processes, as
  a reboot or systemd's default KillMode would.
* :class:`Schedule` — changes at given times, run by a thread of the sandbox
  runner (so a schedule outlives the command that posted it): ``POST
  /sandbox/clients`` with ``{"events": [{"after": S, "host": NAME, "action":
  "stop"|"start", "with_tunnel": false}]}``; ``{"clear": true}`` drops every
  pending change; ``GET /sandbox/clients`` lists the pending and done ones.
  :func:`flap_events` writes the events of a host whose client goes down and
  up on a fixed rhythm.

Everything is found from the sandbox directory: ``config.json`` (the user
and home a client runs as) and ``runner.json`` (each host's IPORT and SSHD
port, which the tunnel's command line carries).
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployer.sandbox import processes
from deployer.sandbox.sshd import session_env

log = logging.getLogger("deployer.sandbox.clients")

STOP_TIMEOUT = 5.0  # seconds from SIGTERM to SIGKILL, as the pidfile convention does
ACTIONS = ("stop", "start")
MAX_EVENTS = 10_000
ACCOUNT_KEY_FILE = "account_key"  # the tunnels' key: in every tunnel's command line


@dataclass(frozen=True)
class ClientChange:
    """What :func:`stop` or :func:`start` did to one host's client."""

    host: str
    action: str
    pid: int | None  # the client's pid (stopped, started or already running)
    changed: bool  # False: it was already stopped / running
    tunnel_pids: list[int] = field(default_factory=list)  # ended (stop --with-tunnel)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def host_dir(root: Path, name: str) -> Path:
    return Path(root) / "hosts" / name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _known_host(root: Path, name: str) -> None:
    names = [h["name"] for h in _read_json(Path(root) / "config.json").get("hosts", [])]
    if name not in names:
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        raise KeyError(f"no host {name!r} in the sandbox in {root} (hosts: {shown or 'none'})")


def client_pid(root: Path, name: str) -> int | None:
    """The pid of ``name``'s client if it runs (the pidfile's, and it is that client)."""
    folder = host_dir(root, name)
    pid = processes.read_pidfile(folder / "client.pid")
    if pid and processes.alive(pid) and str(folder) in processes.cmdline(pid):
        return pid
    return None


def tunnel_pids(root: Path, name: str) -> list[int]:
    """The host's tunnel processes (``ssh -N -R IPORT:localhost:SSHD_PORT``), whoever
    started them, found by their command line."""
    runner = _read_json(Path(root) / "runner.json")
    iport = (runner.get("iports") or {}).get(name)
    sshd_port = (runner.get("sshd_ports") or {}).get(name)
    if not iport or not sshd_port:
        return []
    forward = f"{iport}:localhost:{sshd_port}"
    key = f"{Path(root)}/{ACCOUNT_KEY_FILE}"
    return [p for p in processes.processes_mentioning(forward) if key in processes.cmdline(p)]


def stop(root: Path, name: str, with_tunnel: bool = False) -> ClientChange:
    """SIGTERM ``name``'s client (its pid only); ``with_tunnel``: its tunnel too."""
    _known_host(root, name)
    pid = client_pid(root, name)
    if pid is not None:
        processes.terminate([pid], STOP_TIMEOUT)
    ended = tunnel_pids(root, name) if with_tunnel else []
    if ended:
        processes.terminate(ended, 2.0)
    log.info("%s: client %s", name, f"pid {pid} stopped" if pid else "was not running")
    return ClientChange(name, "stop", pid, pid is not None, ended)


def start(root: Path, name: str) -> ClientChange:
    """Start ``name``'s client as the pidfile service does, unless it runs."""
    _known_host(root, name)
    running = client_pid(root, name)
    if running is not None:
        return ClientChange(name, "start", running, False)
    config = _read_json(Path(root) / "config.json")
    folder = host_dir(root, name)
    pid = processes.start_pidfile_service(
        run=f"exec python3 {shlex.quote(str(folder / 'client.py'))}",  # "exec " + RUN_COMMAND
        pidfile=folder / "client.pid",
        log_path=folder / "client.out",
        cwd=str(folder),
        env=session_env(config["user"], config["home"]),
    )
    log.info("%s: client started, pid %d", name, pid)
    return ClientChange(name, "start", pid, True)


def apply(root: Path, name: str, action: str, with_tunnel: bool = False) -> ClientChange:
    if action == "stop":
        return stop(root, name, with_tunnel)
    if action == "start":
        return start(root, name)
    raise ValueError(f"action must be one of {', '.join(ACTIONS)} (got {action!r})")


def flap_events(
    name: str,
    down: float,
    up: float,
    cycles: int,
    after: float = 0.0,
    with_tunnel: bool = False,
) -> list[dict[str, Any]]:
    """``cycles`` times: stop, ``down`` seconds later start, ``up`` seconds later
    the next stop; the client is left running after the last cycle."""
    if down <= 0 or up <= 0 or cycles < 1 or after < 0:
        raise ValueError("flap needs --down and --up > 0, --cycles >= 1 and --after >= 0")
    events = []
    at = after
    for _ in range(cycles):
        events.append({"after": at, "host": name, "action": "stop", "with_tunnel": with_tunnel})
        at += down
        events.append({"after": at, "host": name, "action": "start", "with_tunnel": False})
        at += up
    return events


@dataclass(order=True)
class _Event:
    at: float  # monotonic
    seq: int
    host: str = field(compare=False)
    action: str = field(compare=False)
    with_tunnel: bool = field(compare=False, default=False)
    wall: float = field(compare=False, default=0.0)  # when it is due, seconds since the epoch

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "action": self.action,
            "with_tunnel": self.with_tunnel,
            "at": round(self.wall, 3),
        }


class Schedule:
    """Client changes at given times, run by one daemon thread of the runner."""

    def __init__(self, root: Path, hosts: list[str]):
        self.root = Path(root)
        self.hosts = set(hosts)
        self._lock = threading.Condition()
        self._pending: list[_Event] = []
        self._done: list[dict[str, Any]] = []
        self._seq = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="client-schedule", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._pending.clear()
            self._lock.notify_all()
        self._thread.join(STOP_TIMEOUT + 2)

    def add(self, events: list[dict[str, Any]]) -> int:
        """Queue ``events`` (checked first: ValueError names a bad one)."""
        parsed = [self._parse(e) for e in events]
        with self._lock:
            if len(self._pending) + len(parsed) > MAX_EVENTS:
                raise ValueError(f"at most {MAX_EVENTS} pending client changes")
            for event in parsed:
                self._seq += 1
                event.seq = self._seq
                self._pending.append(event)
            self._pending.sort()
            self._lock.notify_all()
        return len(parsed)

    def clear(self) -> int:
        with self._lock:
            count = len(self._pending)
            self._pending.clear()
            self._lock.notify_all()
            return count

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pending": [e.to_json() for e in self._pending],
                "done": list(self._done[-100:]),
            }

    def handle(self, method: str, body: Any) -> tuple[int, dict[str, Any]]:
        """The ``/sandbox/clients`` route: (HTTP status, JSON reply)."""
        if method == "GET":
            return 200, self.to_json()
        if not isinstance(body, dict):
            return 400, {"ok": False, "error": "body must be a JSON object"}
        if body.get("clear"):
            return 200, {"ok": True, "cleared": self.clear()}
        events = body.get("events")
        if not isinstance(events, list):
            return 400, {"ok": False, "error": "body needs 'events': a list, or 'clear': true"}
        try:
            added = self.add(events)
        except ValueError as exc:
            return 400, {"ok": False, "error": str(exc)}
        return 200, {"ok": True, "added": added}

    def _parse(self, event: Any) -> _Event:
        if not isinstance(event, dict):
            raise ValueError("each event must be an object")
        unknown = set(event) - {"after", "host", "action", "with_tunnel"}
        if unknown:
            raise ValueError(f"unknown event key(s): {', '.join(sorted(unknown))}")
        after, host, action = event.get("after", 0), event.get("host"), event.get("action")
        if isinstance(after, bool) or not isinstance(after, int | float) or after < 0:
            raise ValueError("after must be a number of seconds >= 0")
        if host not in self.hosts:
            raise ValueError(f"unknown host {host!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
        with_tunnel = event.get("with_tunnel", False)
        if not isinstance(with_tunnel, bool):
            raise ValueError("with_tunnel must be true or false")
        return _Event(time.monotonic() + after, 0, host, action, with_tunnel, time.time() + after)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and (
                    not self._pending or self._pending[0].at > time.monotonic()
                ):
                    wait = self._pending[0].at - time.monotonic() if self._pending else None
                    self._lock.wait(wait)
                if self._stop:
                    return
                event = self._pending.pop(0)
            self._apply(event)

    def _apply(self, event: _Event) -> None:
        record = event.to_json()
        try:
            change = apply(self.root, event.host, event.action, event.with_tunnel)
            record.update(done=round(time.time(), 3), pid=change.pid, changed=change.changed)
        except Exception as exc:  # noqa: BLE001 - the schedule must keep running
            log.exception("client change %s %s failed", event.action, event.host)
            record.update(done=round(time.time(), 3), error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._done.append(record)
