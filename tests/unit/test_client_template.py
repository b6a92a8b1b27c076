"""The shipped client (templates/client.py.j2, contract A of issue 10) as a real process.

Each test renders the template with deployer's own renderer, runs the rendered
script with this Python against :class:`PollServer` (the provider's poll endpoint
on 127.0.0.1, in a thread) and a fake ``ssh``: a script that records its argv
and environment, then execs Python with argv[0] "ssh" and the tunnel's options,
so its /proc command line is what a real tunnel's looks like. The one ``e2e``
test runs the real /usr/bin/ssh against a throwaway OpenSSH sshd.

Every client and every tunnel a test starts is killed at teardown, by pid.
"""

from __future__ import annotations

import ast
import getpass
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from deployer.errors import TemplateError
from deployer.inventory import load_inventory
from deployer.pids import pid_alive
from deployer.render import render_script
from tests.doubles import ProcessReaper, wait_for

pytestmark = pytest.mark.timeout(30)
unit = pytest.mark.unit

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SSHD = Path("/usr/sbin/sshd")
USER_ID = "uid-SECRET-0001-aaaa"
DBID = "dbid-SECRET-0002-bbbb"
HOST_UUID = "uuid-SECRET-0003-cccc"
CREDENTIALS = (USER_ID, DBID, HOST_UUID)
IPORT = 20001
SSHD_PORT = 2222
POLL_INTERVAL = 0.2
STOP_WITHIN = 1.0  # seconds: SIGTERM to exit (contract A)


def python_3_6() -> str | None:
    """A python3.6 binary (the oldest Python a host may have), not a pyenv shim."""
    found = sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.6*/bin/python3.6")))
    found.append(shutil.which("python3.6") or "")
    return next((path for path in found if path and "/shims/" not in path), None)


PYTHON_3_6 = python_3_6()

INVENTORY = """\
[provider]
api_url = "http://127.0.0.1:9/api/{{call}}"
ssh_host = "127.0.0.1"
user_id = "${{T_USER_ID}}"

[defaults]
template = "{template}"
script_path = "{script}"

[hosts.pi-01]
dbid = "${{T_DBID}}"
host_uuid = "${{T_HOST_UUID}}"
ports_id = 1234
ssh_port = 12345
"""
ENV = {"T_USER_ID": USER_ID, "T_DBID": DBID, "T_HOST_UUID": HOST_UUID}

# Records its call, then becomes a long sleep whose command line starts with
# "ssh" and carries the tunnel's options. With a file "fail" in the records
# directory it exits at once instead, as ssh does when the port is still held.
FAKE_SSH = """\
#!{python}
import json, os, sys
records = {records!r}
record = {{"pid": os.getpid(), "argv": sys.argv, "env": dict(os.environ)}}
path = os.path.join(records, "%d.json" % os.getpid())
with open(path + ".tmp", "w") as handle:
    json.dump(record, handle)
os.replace(path + ".tmp", path)
if os.path.exists(os.path.join(records, "fail")):
    sys.exit(255)
os.execv(sys.executable, ["ssh", "-c", "import time; time.sleep(3600)", *sys.argv[1:]])
"""


def reply(command="1", iport=IPORT, server="127.0.0.1", disconnect="F", upgrade="F"):
    return {
        "command": command,
        "iport": iport,
        "forwarding_server": server,
        "disconnect_ssl_when_server_unreachable": disconnect,
        "upgrade": upgrade,
    }


# --- the provider's poll endpoint -------------------------------------------------------


class PollServer:
    """``GET /poll/get_port4.php`` on 127.0.0.1: records each query and answers
    ``self.answer`` (a dict as JSON, bytes as they are), after ``self.delay`` s."""

    def __init__(self) -> None:
        self.answer: Any = reply()
        self.delay = 0.0
        self.queries: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/poll"

    def polls(self) -> int:
        with self.lock:
            return len(self.queries)

    def wait_polls(self, more: int) -> None:
        target = self.polls() + more
        wait_for(lambda: self.polls() >= target, timeout=10)

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.running = False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/poll/get_port4.php":
                    self.send_error(404)
                    return
                with server.lock:
                    server.queries.append(dict(urllib.parse.parse_qsl(url.query)))
                time.sleep(server.delay)
                answer = server.answer
                body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client was stopped mid-poll

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


# --- the world of one test ---------------------------------------------------------------


class World:
    """A poll server, a fake ssh, and the clients and tunnels of one test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # A client takes every tunnel of its forwarding user for its own (adopts
        # it or ends it): one user per test keeps parallel runs apart.
        self.user = "acct-" + uuid.uuid4().hex[:10]
        self.server = PollServer()
        self.records = root / "ssh-records"
        self.records.mkdir()
        self.ssh = root / "bin" / "ssh"
        self.ssh.parent.mkdir()
        self.ssh.write_text(FAKE_SSH.format(python=sys.executable, records=str(self.records)))
        self.ssh.chmod(0o755)
        self.script = root / "client.py"
        self.clients: list[subprocess.Popen] = []
        self.strays: list[subprocess.Popen] = []

    def vars(self, **changes: Any) -> dict[str, str]:
        values = {
            "poll_url": self.server.url,
            "forwarding_user": self.user,
            "key_path": str(self.root / "account_key"),
            "forwarding_known_hosts": str(self.root / "forwarding_known_hosts"),
            "sshd_port": str(SSHD_PORT),
            "poll_interval": str(POLL_INTERVAL),
            "ssh_binary": str(self.ssh),
        }
        for name, value in changes.items():  # None: leave the var out
            if value is None:
                values.pop(name, None)
            else:
                values[name] = str(value)
        return values

    def render(self, template: str = "client.py.j2", **changes: Any) -> str:
        """Render ``template`` for pi-01 through deployer (vars as --var) into self.script."""
        return render_text(self.root, template, self.vars(**changes), self.script)

    def start(self, extra_env: dict | None = None, python: str = sys.executable):
        env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **(extra_env or {})}
        with open(self.root / "client.err", "ab") as log:
            proc = subprocess.Popen(
                [python, str(self.script)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.clients.append(proc)
        return proc

    def log(self, name: str = "client.err") -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the fake tunnels

    def starts(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.records.glob("*.json"))]

    def live_tunnels(self) -> list[int]:
        """Pids of fake tunnels alive now (zombies are dead), in start order."""
        return [r["pid"] for r in self.starts() if is_fake_tunnel(r["pid"])]

    def one_tunnel(self) -> int:
        pids = wait_for(self.live_tunnels)
        assert len(pids) == 1, pids
        return pids[0]

    def stray_tunnel(self, iport: int = IPORT) -> int:
        """A tunnel that no client of this test started (as a crashed old client leaves)."""
        argv = [
            str(self.ssh),
            "-N",
            "-R",
            f"{iport}:localhost:{SSHD_PORT}",
            f"{self.user}@127.0.0.1",
        ]
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        self.strays.append(proc)
        wait_for(lambda: is_fake_tunnel(proc.pid))
        return proc.pid

    def teardown(self) -> None:
        for proc in self.clients + self.strays:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        for record in self.starts():
            if is_fake_tunnel(record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)
        ProcessReaper(self.root).kill_all()
        self.server.stop()


def render_text(root: Path, template: str, variables: dict[str, str], script: Path) -> str:
    inventory_path = root / "deployer.toml"
    inventory_path.write_text(
        INVENTORY.format(template=TEMPLATES / template, script=script), encoding="utf-8"
    )
    inventory = load_inventory(inventory_path, overrides=variables, env=ENV)
    rendered = render_script(inventory, inventory.hosts["pi-01"])
    script.write_text(rendered.text, encoding="utf-8")
    script.chmod(0o700)
    return rendered.text


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def is_fake_tunnel(pid: int) -> bool:
    argv = cmdline(pid)
    return pid_alive(pid) and bool(argv) and argv[0] == "ssh"


def forward_of(pid: int) -> str:
    argv = cmdline(pid)
    return argv[argv.index("-R") + 1]


def stop_client(proc: subprocess.Popen) -> float:
    """SIGTERM ``proc``; the seconds it took to exit (asserting exit status 0)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    return time.monotonic() - started


@pytest.fixture
def world(tmp_path):
    world = World(tmp_path)
    yield world
    world.teardown()


# --- rendering ----------------------------------------------------------------------------


@unit
@pytest.mark.parametrize("template", ["client.py.j2", "sandbox-client.py.j2"])
def test_rendered_script_compiles_and_parses_as_python_3_6(world, template):
    text = world.render(template)
    assert text.startswith("#!/usr/bin/env python3\n")
    compiled = subprocess.run(
        [sys.executable, "-m", "py_compile", str(world.script)], capture_output=True, text=True
    )
    assert compiled.returncode == 0, compiled.stderr
    ast.parse(text, feature_version=(3, 6))  # the hosts' oldest Python (a Raspberry Pi's)


HOSTILE = [
    'it\'s "quoted" """triple"""',
    "back\\slash \\n \\x00",
    "line one\nline two\r\n\ttab",
    "{{ 7 * 7 }} {% if true %}x{% endif %} ${HOME} $(touch PWNED)",
]


@unit
@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_var_values_stay_literal(world, value):
    value = value.replace("PWNED", str(world.root / "pwned"))
    names = ("release", "client_version", "forwarding_user", "key_path", "good_poll_file")
    text = world.render("sandbox-client.py.j2", sandbox_fail=value, **dict.fromkeys(names, value))
    module: dict = {"__name__": "rendered_client"}
    exec(compile(text, str(world.script), "exec"), module)
    constants = ("RELEASE", "CLIENT_VERSION", "FORWARDING_USER", "KEY_PATH", "GOOD_POLL_FILE")
    assert [module[name] for name in constants] == [value] * len(constants)
    assert module["SANDBOX_FAIL"] == value
    argv = module["tunnel_argv"](module["Target"](IPORT, "fw.example"))
    assert argv[-1] == value + "@fw.example"  # one argv element, as given
    assert not (world.root / "pwned").exists()


def client_module(world) -> dict:
    """The rendered client's module body (not its main), executed here."""
    text = world.render()
    module: dict = {"__name__": "rendered_client"}
    exec(compile(text, str(world.script), "exec"), module)
    return module


@unit
def test_log_records_are_masked_tracebacks_included(world):
    module = client_module(world)
    try:
        raise ValueError(f"unknown url type: get_port4.php?uid={USER_ID}&dbid={DBID}")
    except ValueError:
        record = logging.LogRecord(
            "c", logging.ERROR, "f", 1, "key %s", (HOST_UUID,), sys.exc_info()
        )
    assert module["MaskCredentials"]().filter(record)
    text = logging.Formatter().format(record)
    assert "key ***cccc" in text and "uid=***aaaa&dbid=***bbbb" in text
    assert not [c for c in CREDENTIALS if c in text]


@unit
def test_ssh_paths_are_absolute_with_tilde_expanded_and_percent_doubled(world):
    module = client_module(world)
    assert module["ssh_path"]("~/keys/id") == str(Path.home() / "keys" / "id")
    assert module["ssh_path"]("rel/k%h") == str(Path.cwd() / "rel" / "k%%h")
    assert module["ssh_path_option"]("/a b/known") == '"/a b/known"'


@unit
@pytest.mark.parametrize("missing", ["poll_url", "forwarding_user"])
def test_a_missing_required_var_is_a_render_error_naming_it(world, missing):
    with pytest.raises(TemplateError) as caught:
        world.render(**{missing: None})
    assert f"undefined name '{missing}'" in str(caught.value)
    assert f"--var {missing}=VALUE" in str(caught.value)


# --- the poll ----------------------------------------------------------------------------


@unit
def test_poll_parameters_and_no_credential_reaches_ssh_or_the_log(world):
    text = world.render(client_version="deployer-7", log_file=world.root / "client.log")
    # a credential in the client's environment must not reach the tunnel's either
    client = world.start(extra_env={"SSHREACH_DBID": DBID})
    world.one_tunnel()
    query = world.server.queries[0]
    assert query == {
        "ports_id": "1234",
        "key": HOST_UUID,
        "uid": USER_ID,
        "dbid": DBID,
        "ver": "deployer-7",
        "upgradable": "False",
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    (record,) = world.starts()
    assert record["argv"][1:] == [
        "-N", "-T",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=3",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={world.root / 'forwarding_known_hosts'}",
        "-o", "IdentitiesOnly=yes",
        "-i", str(world.root / "account_key"),
        "-p", "22",
        "-R", f"{IPORT}:localhost:{SSHD_PORT}",
        f"{world.user}@127.0.0.1",
    ]  # fmt: skip
    exposed = json.dumps([record["argv"], record["env"]])
    assert not [c for c in CREDENTIALS if c in exposed]
    world.server.answer = {"error": f"wrong data for {DBID}"}
    world.server.wait_polls(2)
    stop_client(client)
    logs = world.log() + world.log("client.log")
    assert "release 1" in world.log("client.log")  # log_file gets the same lines
    assert "wrong data for ***bbbb" in logs
    assert not [c for c in CREDENTIALS if c in logs]
    assert (world.root / "client.log").stat().st_mode & 0o077 == 0  # umask 077


@unit
def test_good_poll_file_after_good_polls_only(world):
    text = world.render()
    client = world.start()
    good = world.root / "client.py.poll"
    wait_for(good.exists)
    record = json.loads(good.read_text())
    assert record["pid"] == client.pid and record["command"] == "1"
    assert record["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert abs(record["time"] - time.time()) < 5
    assert good.stat().st_mode & 0o777 == 0o600
    for bad in ({"error": "wrong data"}, b"<html>busy</html>", b"[1, 2]"):
        world.server.answer = bad
        world.server.wait_polls(2)  # any good poll in flight has written by now
        good.unlink(missing_ok=True)
        world.server.wait_polls(3)
        assert not good.exists(), bad
    world.server.answer = reply(command="0")
    wait_for(good.exists)
    assert json.loads(good.read_text())["command"] == "0"
    assert not list(world.root.glob("client.py.poll.tmp*"))


# --- the tunnel ---------------------------------------------------------------------------


@unit
def test_command_1_starts_one_detached_tunnel_and_keeps_it(world):
    world.render()
    client = world.start()
    tunnel = world.one_tunnel()
    world.server.wait_polls(5)
    assert world.live_tunnels() == [tunnel] and len(world.starts()) == 1
    # detached: not the client's child, not in its session (a stop of the client's
    # process group or session cannot reach it)
    ppid = int(Path(f"/proc/{tunnel}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid != client.pid
    assert os.getsid(tunnel) != os.getsid(client.pid)
    assert os.readlink(f"/proc/{tunnel}/cwd") == "/"


@unit
def test_sigterm_exits_0_at_once_and_the_tunnel_survives(world):
    world.render()
    client = world.start()
    tunnel = world.one_tunnel()
    assert stop_client(client) < STOP_WITHIN
    time.sleep(0.5)
    assert world.live_tunnels() == [tunnel]
    assert "the tunnel process stays up for the next client" in world.log()


@unit
def test_sigterm_interrupts_a_poll_in_flight(world):
    world.render()
    client = world.start()
    world.server.wait_polls(1)
    world.server.delay = 5.0
    world.server.wait_polls(1)
    time.sleep(0.1)  # the client is waiting for this reply now
    assert stop_client(client) < STOP_WITHIN


@unit
def test_a_restarted_client_adopts_the_running_tunnel(world):
    world.render()
    first = world.start()
    tunnel = world.one_tunnel()
    stop_client(first)
    world.render(release="2")  # an upgrade: another script, the same tunnel
    world.start()
    world.server.wait_polls(5)
    assert world.live_tunnels() == [tunnel] and len(world.starts()) == 1
    assert f"adopted the running tunnel pid {tunnel}" in world.log()


@unit
def test_never_two_tunnels_the_oldest_is_kept(world):
    older, newer = world.stray_tunnel(), world.stray_tunnel()
    world.render()
    world.start()
    wait_for(lambda: not is_fake_tunnel(newer))
    world.server.wait_polls(3)
    assert world.live_tunnels() == [older] and len(world.starts()) == 2


@unit
def test_command_0_ends_the_tunnel(world):
    world.render()
    world.start()
    tunnel = world.one_tunnel()
    world.server.answer = reply(command="0")
    wait_for(lambda: not is_fake_tunnel(tunnel))
    world.server.wait_polls(3)
    assert world.live_tunnels() == [] and len(world.starts()) == 1


@unit
def test_a_new_iport_replaces_the_tunnel(world):
    world.render()
    world.start()
    old = world.one_tunnel()
    world.server.answer = {**reply(), "iport": IPORT + 1, "command": 1}  # numbers work too
    wait_for(lambda: not is_fake_tunnel(old))
    new = world.one_tunnel()
    assert forward_of(new) == f"{IPORT + 1}:localhost:{SSHD_PORT}"
    world.server.wait_polls(3)
    assert world.live_tunnels() == [new]


@unit
def test_a_stale_tunnel_to_another_iport_is_ended_at_start(world):
    stale = world.stray_tunnel(iport=IPORT + 7)
    world.render()
    world.start()
    wait_for(lambda: not is_fake_tunnel(stale))
    assert forward_of(world.one_tunnel()) == f"{IPORT}:localhost:{SSHD_PORT}"


@unit
def test_unreachable_provider_with_T_ends_the_tunnel(world):
    world.server.answer = reply(disconnect="T")
    world.render()
    world.start()
    tunnel = world.one_tunnel()
    world.server.stop()
    wait_for(lambda: not is_fake_tunnel(tunnel))
    assert "disconnect_ssl_when_server_unreachable T" in world.log()


@unit
def test_unreachable_provider_with_F_keeps_the_tunnel(world):
    world.server.answer = reply(disconnect="F")
    world.render()
    world.start()
    tunnel = world.one_tunnel()
    world.server.stop()
    wait_for(lambda: "poll failed" in world.log())
    time.sleep(5 * POLL_INTERVAL)
    assert world.live_tunnels() == [tunnel] and len(world.starts()) == 1


@unit
def test_upgrade_T_is_ignored_and_logged_once(world):
    text = world.render()
    world.server.answer = reply(upgrade="T")
    client = world.start()
    tunnel = world.one_tunnel()
    world.server.wait_polls(5)
    assert client.poll() is None and world.live_tunnels() == [tunnel]
    assert world.script.read_text() == text
    assert world.log().count("offers an upgrade") == 1
    assert {q["upgradable"] for q in world.server.queries} == {"False"}


@unit
def test_a_tunnel_that_fails_at_once_is_retried_with_backoff(world):
    (world.records / "fail").touch()  # every "ssh" exits at once
    world.render()
    world.start()
    time.sleep(3.5)  # 17 polls; backoff 1 s, 2 s, 4 s allows 3 starts
    assert 2 <= len(world.starts()) <= 3, len(world.starts())
    assert "in a row" in world.log()
    (world.records / "fail").unlink()
    wait_for(world.live_tunnels, timeout=10)


@unit
@pytest.mark.skipif(PYTHON_3_6 is None, reason="no python3.6 here")
def test_the_client_runs_on_python_3_6(world):
    world.render()
    first = world.start(python=PYTHON_3_6)
    tunnel = world.one_tunnel()
    wait_for((world.root / "client.py.poll").exists)
    assert stop_client(first) < STOP_WITHIN
    world.start(python=PYTHON_3_6)
    wait_for(lambda: f"adopted the running tunnel pid {tunnel}" in world.log())
    world.server.answer = reply(command="0")
    wait_for(lambda: not is_fake_tunnel(tunnel))


# --- the sandbox template's rehearsal faults -----------------------------------------------


@unit
def test_sandbox_crash_exits_3_at_start_without_polling(world):
    world.render("sandbox-client.py.j2", sandbox_fail="crash")
    assert world.start().wait(timeout=10) == 3
    assert world.server.polls() == 0 and world.starts() == []


@unit
def test_sandbox_silent_runs_without_polling_and_stops_on_sigterm(world):
    world.render("sandbox-client.py.j2", sandbox_fail="silent")
    client = world.start()
    time.sleep(5 * POLL_INTERVAL)
    assert client.poll() is None and world.server.polls() == 0
    assert stop_client(client) < STOP_WITHIN


@unit
def test_sandbox_die_after_polls_then_exits_4(world):
    world.render("sandbox-client.py.j2", sandbox_fail="die-after", sandbox_die_after="1.5")
    started = time.monotonic()
    client = world.start()
    assert client.wait(timeout=10) == 4
    assert 1.4 < time.monotonic() - started < 5
    assert world.server.polls() >= 3 and len(world.starts()) == 1


@unit
def test_sandbox_slow_stop_goes_on_after_sigterm_then_exits_0(world):
    world.render("sandbox-client.py.j2", sandbox_fail="slow-stop", sandbox_slow_stop="2")
    client = world.start()
    wait_for(lambda: world.server.polls() >= 1)
    client.send_signal(signal.SIGTERM)
    wait_for(lambda: "rehearsal fault slow-stop: exiting in 2.0 s" in world.log())
    client.send_signal(signal.SIGTERM)  # deaf to a second one
    polls = world.server.polls()
    time.sleep(1.0)
    assert client.poll() is None and world.server.polls() == polls
    assert client.wait(timeout=10) == 0


@unit
def test_sandbox_healthy_is_the_production_client(world):
    world.render("sandbox-client.py.j2", sandbox_fail="")
    client = world.start()
    world.one_tunnel()
    assert stop_client(client) < STOP_WITHIN


# --- the real ssh against a throwaway OpenSSH sshd ------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EchoServer(socketserver.ThreadingTCPServer):
    """Plays the host's sshd: echoes what it gets."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Echo(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = self.request.recv(1024)
                while data:
                    self.request.sendall(data)
                    data = self.request.recv(1024)

        super().__init__(("127.0.0.1", 0), Echo)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def echo_through(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"ping")
            return sock.recv(16) == b"ping"
    except OSError:
        return False


def start_sshd(root: Path, port: int, iport: int) -> subprocess.Popen:
    for name in ("host_key", "account_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True
        )
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"PidFile {root / 'sshd.pid'}\nAuthorizedKeysFile {root / 'account_key.pub'}\n"
        f"AllowTcpForwarding remote\nPermitListen localhost:{iport}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    key_type, key = (root / "host_key.pub").read_text().split()[:2]
    (root / "forwarding_known_hosts").write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with open(root / "sshd.log", "ab") as log:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=log)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout=10)
    return proc


@pytest.mark.e2e
@pytest.mark.openssh
@pytest.mark.timeout(60)
@pytest.mark.skipif(not SSHD.is_file(), reason=f"{SSHD} not installed")
def test_real_ssh_tunnel_carries_traffic_and_outlives_the_client(world):
    port, iport = free_port(), free_port()
    sshd = start_sshd(world.root, port, iport)
    echo = EchoServer()
    try:
        world.server.answer = reply(iport=iport)
        world.render(
            ssh_binary="/usr/bin/ssh",
            forwarding_user=getpass.getuser(),
            forwarding_port=port,
            sshd_port=echo.server_address[1],
        )
        client = world.start()
        assert wait_for(lambda: echo_through(iport), timeout=20)
        stop_client(client)
        time.sleep(0.5)
        assert echo_through(iport), "the tunnel ended with the client"
        ours = ProcessReaper(world.root).ours()
        tunnels = [pid for pid in ours if cmdline(pid)[:1] == ["/usr/bin/ssh"]]
        assert len(tunnels) == 1, tunnels
        world.start()  # the next client adopts the real ssh by its command line
        wait_for(lambda: f"adopted the running tunnel pid {tunnels[0]}" in world.log())
        assert echo_through(iport)
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)
        echo.shutdown()
        echo.server_close()
