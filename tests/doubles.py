"""Reusable test doubles for the single-host upgrade machinery.

* :class:`LocalRemote` is the Remote protocol of ``deployer.remote`` on this
  machine: commands run with ``/bin/sh -c``, files are written locally, and a
  channel is a real local process with pipes, so the real guard and its link
  really run as local processes. It records every command and every word
  written on a channel, and can simulate a lost SSH session.
* :class:`FakeApi` is an in-memory provider with the ProviderAPI methods the
  workflow uses. Its "online" answer comes from a callable (e.g. "the
  pidfile's process is alive"), it records the allow-clientless intervals
  (like the simulator's exposures) and injects ApiErrors on given calls.
* :func:`client_source` / :data:`CLIENT_TEMPLATE`: a tiny client for the
  pidfile service kind (sleeps, exits 0 on SIGTERM; may crash at start or die
  after N seconds).
* :func:`short_stop_waits`: the guard's stop waits made short.
* :class:`ProcessReaper`: kills, by pid, every process whose command line or
  working directory lies under a test's tmp dir (guards and clients).
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.errors import (
    ApiError,
    RemoteCommandError,
    SshConnectError,
    SshSessionLost,
    TunnelNotUp,
)
from deployer.events import EventSink
from deployer.pids import pid_alive
from deployer.remote import CommandResult

PYTHON = sys.executable

# --- the client program -----------------------------------------------------------

# A jinja2 template (SPEC 3) of a pidfile-kind client. Vars: release, fail
# ("" | "crash" | "die-after" | "silent"), die_after (seconds), poll_file (rewritten
# every loop unless silent, as the shipped client's good-poll file after each poll).
CLIENT_TEMPLATE = """\
# test client, release {{ release }}
import signal
import sys
import time

FAIL = "{{ fail }}"
DIE_AFTER = float("{{ die_after }}")
POLL_FILE = "{{ poll_file | default('') }}"


def stop(signum, frame):
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
if FAIL == "crash":
    sys.exit(3)
start = time.time()
while True:
    if FAIL == "die-after" and time.time() - start > DIE_AFTER:
        sys.exit(4)
    if POLL_FILE and FAIL != "silent":
        with open(POLL_FILE, "w") as fh:
            fh.write("polled\\n")
    time.sleep(0.05)
"""


def client_source(
    release: str = "1", fail: str = "", die_after: str = "1", poll_file: str = ""
) -> bytes:
    """The client program as :data:`CLIENT_TEMPLATE` renders it."""
    import jinja2

    text = jinja2.Template(CLIENT_TEMPLATE, keep_trailing_newline=True).render(
        release=release, fail=fail, die_after=die_after, poll_file=poll_file
    )
    return text.encode("utf-8")


def run_command(script_path: str | Path) -> str:
    """The pidfile service's ``run`` command for a script, quoted."""
    return f"{shlex.quote(PYTHON)} {shlex.quote(str(script_path))}"


def start_client(script_path: str | Path, pidfile: str | Path, log: str | Path) -> int:
    """Start the client detached (own session, reparented away from pytest), as
    an init system would; write its pid to ``pidfile``; return the pid."""
    cmd = (
        f"{run_command(script_path)} </dev/null >>{shlex.quote(str(log))} 2>&1 & "
        f"echo $! > {shlex.quote(str(pidfile))}"
    )
    subprocess.run(["setsid", "/bin/sh", "-c", cmd], check=True, timeout=10)
    return read_pid(pidfile) or 0


# --- processes ------------------------------------------------------------------------


def read_pid(pidfile: str | Path) -> int | None:
    try:
        return int(Path(pidfile).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def pidfile_alive(pidfile: str | Path) -> bool:
    return pid_alive(read_pid(pidfile))


def wait_for(predicate: Callable[[], Any], timeout: float = 8.0, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError on timeout."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(every)


class ProcessReaper:
    """Kill, by pid, the processes a test started under ``root`` (guards, clients)."""

    def __init__(self, root: Path):
        self.root = str(root).rstrip("/") + "/"

    def ours(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if self.root in cmdline.decode("utf-8", "replace") or (cwd + "/").startswith(self.root):
                found.append(int(entry))
        return found

    def kill_all(self, rounds: int = 20) -> list[int]:
        """SIGKILL ours until none is left (a guard may start a client meanwhile)."""
        killed: list[int] = []
        for _ in range(rounds):
            pids = [p for p in self.ours() if pid_alive(p)]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            killed.extend(pids)
            time.sleep(0.05)
        return killed


# --- the guard ----------------------------------------------------------------------


def short_stop_waits(slow: float, grace: float):
    """A tweak of the guard's source (``deployer/guard.py``): STOP_WAIT 0.3 s,
    SLOW_STOP_WAIT ``slow`` s and ABORT_GRACE ``grace`` s."""

    def tweak(source: bytes) -> bytes:
        for old, new in (
            (b"STOP_WAIT = 8.0", b"STOP_WAIT = 0.3"),
            (b"SLOW_STOP_WAIT = 30.0", f"SLOW_STOP_WAIT = {slow}".encode()),
            (b"ABORT_GRACE = 120.0", f"ABORT_GRACE = {grace}".encode()),
        ):
            assert old in source
            source = source.replace(old, new, 1)
        return source

    return tweak


# --- the remote ---------------------------------------------------------------------


class LocalRemote:
    """The Remote protocol on the local machine (``/bin/sh -c``, local files)."""

    def __init__(self, name: str = "local", *, lost: bool = False):
        self.name = name
        self.lost = lost
        self.closed = False
        self.commands: list[str] = []
        self.writes: list[str] = []
        self.words: list[str] = []  # lines deployer wrote on channels (go, commit, …)
        self.channels: list[LocalChannel] = []
        self.lose_after: Callable[[str], bool] | None = None

    def _alive(self, what: str) -> None:
        if self.lost:
            raise SshSessionLost(f"SSH session lost (simulated) during {what}", host=self.name)
        if self.closed:
            raise SshConnectError("SSH session is not open", host=self.name)

    def run(
        self,
        command: str,
        *,
        timeout: float | None = 60.0,
        check: bool = True,
        sudo: bool | None = None,
    ) -> CommandResult:
        self._alive(command)
        self.commands.append(command)
        try:
            proc = subprocess.run(
                ["/bin/sh", "-c", command],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RemoteCommandError(
                f"remote command timed out after {timeout}s", host=self.name, command=command
            ) from None
        out = proc.stdout.decode("utf-8", "surrogateescape")
        err = proc.stderr.decode("utf-8", "surrogateescape")
        result = CommandResult(command, proc.returncode, out, err)
        if self.lose_after is not None and self.lose_after(command):
            self.lost = True
        if check and not result.ok:
            raise RemoteCommandError(
                f"remote command failed (exit {proc.returncode}): {command}: {err.strip()}",
                host=self.name,
                command=command,
                exit_status=proc.returncode,
                output_tail=err.strip(),
            )
        return result

    def write_file(self, path: str, data: bytes) -> None:
        self._alive(f"upload to {path}")
        self.writes.append(path)
        with open(path, "wb") as fh:
            fh.write(data)

    def open_channel(self, command: str, *, sudo: bool | None = None) -> LocalChannel:
        self._alive(command)
        self.commands.append(command)
        channel = LocalChannel(self, command)
        self.channels.append(channel)
        return channel

    def close(self) -> None:
        self.closed = True
        for channel in self.channels:
            channel.close()

    def ran(self, fragment: str) -> list[str]:
        """The commands that contain ``fragment``."""
        return [c for c in self.commands if fragment in c]

    def said(self, word: str) -> bool:
        """Did deployer write ``word`` (a line) on one of the channels?"""
        return word in self.words


class LocalChannel:
    """A Channel of :class:`LocalRemote`: the command runs as a real local process
    (``/bin/sh -c``) with its stdin and stdout piped. When the remote is lost
    (simulated), its stdin is closed, as sshd closes a session's pipes."""

    def __init__(self, remote: LocalRemote, command: str):
        self.remote, self.command = remote, command
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.buf = b""

    def _lost(self) -> SshSessionLost:
        self._end_input()
        return SshSessionLost(f"SSH session lost (simulated) on {self.command[:60]}", host="")

    def _end_input(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def write(self, data: bytes) -> None:
        if self.remote.lost or self.proc.stdin.closed:
            raise self._lost()
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._ended() from None
        if len(data) < 64:  # a word, not a program or a file
            for word in data.decode("utf-8", "replace").split("\n")[:-1]:
                self.remote.words.append(word)
                if self.remote.lose_after is not None and self.remote.lose_after(word):
                    self.remote.lost = True

    def readline(self, timeout: float) -> str | None:
        end = time.monotonic() + max(timeout, 0.0)
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            if self.remote.lost:
                raise self._lost()
            ready, _, _ = select.select([fd], [], [], max(end - time.monotonic(), 0.0))
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise self._lost() if self.remote.lost else self._ended()
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _ended(self) -> RemoteCommandError:
        try:
            status = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            status = -1
        err = self.proc.stderr.read().decode("utf-8", "replace").strip()
        return RemoteCommandError(
            f"remote command ended (exit {status}): {err[-300:]}",
            host=self.remote.name,
            command=self.command,
            exit_status=status,
            output_tail=err[-300:],
        )

    def close(self) -> None:
        self._end_input()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


@dataclass
class RemoteFactory:
    """A RunContext.remote_factory that hands out fresh LocalRemotes and keeps them."""

    made: list[LocalRemote] = field(default_factory=list)
    refuse: int = 0  # how many next calls raise TunnelNotUp (no tunnel yet)
    lose_first_after: Callable[[str], bool] | None = None  # the first session dies after…

    def __call__(self, host: Any) -> LocalRemote:
        if self.refuse > 0:
            self.refuse -= 1
            raise TunnelNotUp("SSH connect refused (simulated)", host=host.name, step="ssh")
        remote = LocalRemote(host.name)
        if not self.made:
            remote.lose_after = self.lose_first_after
        self.made.append(remote)
        return remote

    @property
    def current(self) -> LocalRemote:
        return self.made[-1]


# --- the provider -----------------------------------------------------------------------


@dataclass
class Injection:
    call: str
    error: Callable[[], ApiError]
    allow: bool | None = None  # only set_allow_clientless with this value
    at: int = 1  # the nth matching call fails first
    times: int = 1  # and this many in a row
    seen: int = 0

    def matches(self, call: str, allow: bool | None) -> bool:
        if call != self.call or (self.allow is not None and allow is not self.allow):
            return False
        self.seen += 1
        return self.at <= self.seen < self.at + self.times


class FakeApi:
    """An in-memory SSHReach provider with the ProviderAPI methods the workflow uses."""

    def __init__(
        self, online: Callable[[], bool] | None = None, clock: Callable[[], float] = time.time
    ):
        self.online = online or (lambda: True)
        self.clock = clock
        self.calls: list[tuple[str, str, bool | None]] = []  # (call, host, allow)
        self.allow = False
        self.exposures: list[list[float | None]] = []  # [t_open, t_close|None]
        self.tunnel_open = False
        self.injections: list[Injection] = []
        self.on_call: Callable[[str, bool | None], None] | None = None
        self.within: list[float | None] = []  # each set_allow_clientless's time budget
        self.status_within: list[float | None] = []  # each client_status's time budget
        self.idles: list[tuple[str, bool | None, Any]] = []  # (call, allow, its idle hook)
        self.scripts: dict[str, str] = {}  # host -> what get_client_script answers
        self._lock = threading.Lock()

    def inject(
        self,
        call: str,
        error: Callable[[], ApiError],
        *,
        allow: bool | None = None,
        at: int = 1,
        times: int = 1,
    ) -> None:
        """Make the ``at``-th matching call (and ``times - 1`` after it) raise ``error()``."""
        self.injections.append(Injection(call, error, allow, at, times))

    def _call(self, call: str, host: Any, allow: bool | None = None) -> None:
        with self._lock:
            self.calls.append((call, host.name, allow))
        if self.on_call is not None:
            self.on_call(call, allow)
        for rule in self.injections:
            if rule.matches(call, allow):
                raise rule.error()

    # -- the ProviderAPI surface ----------------------------------------------------------

    def client_status(
        self, host: Any, *, retry: Any = None, within: float | None = None, idle: Any = None
    ) -> bool:
        self.status_within.append(within)
        self.idles.append(("client_status", None, idle))
        self._call("client_status", host)
        return bool(self.online())

    def connect(self, host: Any) -> None:
        self._call("connect", host)
        self.tunnel_open = True

    def disconnect(self, host: Any) -> None:
        self._call("disconnect", host)
        self.tunnel_open = False

    def set_allow_clientless(
        self,
        host: Any,
        allow: bool,
        *,
        retry: Any = None,
        within: float | None = None,
        idle: Any = None,
    ) -> None:
        self.within.append(within)
        self.idles.append(("set_allow_clientless", allow, idle))
        self._call("set_allow_clientless", host, allow)
        if allow and not self.allow:
            self.exposures.append([self.clock(), None])
        elif not allow and self.allow:
            self.exposures[-1][1] = self.clock()
        self.allow = allow

    def get_client_script(self, host: Any) -> str:
        self._call("get_client_script", host)
        return self.scripts[host.name]

    def calls_for(self, name: str) -> int:
        with self._lock:
            return sum(1 for _, host, _ in self.calls if host == name)

    # -- what the tests look at -------------------------------------------------------------

    def count(self, call: str) -> int:
        return sum(1 for c, _, _ in self.calls if c == call)

    @property
    def window_open(self) -> bool:
        return self.allow


class Recorder(EventSink):
    """An EventSink that records step events and runs hooks when a step starts."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[tuple[str, str]] = []
        self.messages: list[str] = []
        self.hooks: dict[str, Callable[[], None]] = {}

    def step_started(self, host: str, step: str, facts: dict[str, Any] | None = None) -> None:
        self.started.append(step)
        hook = self.hooks.pop(step, None)
        if hook is not None:
            hook()

    def step_finished(self, host, step, status, seconds, facts=None) -> None:  # noqa: ANN001
        self.finished.append((step, status))

    def message(self, host: str | None, text: str) -> None:
        self.messages.append(text)


# --- the provider over HTTP (for the guard's own calls) ------------------------------


class ProviderServer:
    """:class:`FakeApi` behind the SPEC 1 HTTP interface on 127.0.0.1, so the guard's
    own ``client_status`` / ``set_allow_clientless`` calls reach it. Use as a
    context manager; ``api_config()`` is the guard CONFIG's ``api`` entry."""

    def __init__(self, api: FakeApi, host_name: str = "guard"):
        self.api = api
        self.host = type("Host", (), {"name": host_name})()
        self.server = None
        self.thread = None

    def __enter__(self) -> ProviderServer:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                call = url.path.rsplit("/", 1)[-1]
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                reply = outer.reply(call, query)
                body = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, call: str, query: dict[str, str]) -> dict[str, Any]:
        ok = {"message": "OK", "error_code": 0, "success": True}
        try:
            if call == "client_status":
                if self.api.client_status(self.host):
                    return {"message": "online", "error_code": 0, "success": True}
                return {"message": "offline", "error_code": 24, "success": True}
            if call == "set_allow_clientless":
                allow = query.get("allow") == "true"
                self.api.set_allow_clientless(self.host, allow)
                return {
                    "allow_clientless": allow,
                    "message": "success",
                    "error_code": 0,
                    "success": True,
                }
            if call in ("connect", "disconnect"):
                getattr(self.api, call)(self.host)
                return ok
        except ApiError as exc:
            return {"message": str(exc), "error_code": exc.code, "success": False}
        return {"message": "invalid api call", "error_code": 21, "success": False}

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/api/{{call}}"

    def api_config(self) -> dict[str, Any]:
        params = {"user_id": "u", "dbid": "d", "host_uuid": "h", "ports_id": "1"}
        return {"url": self.url, "timeout": 2.0, "params": params}
