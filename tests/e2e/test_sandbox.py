"""End to end on the sandbox itself: tunnels and the offline rule over real TCP,
the client template as a real process, both SSH servers (exec and SFTP),
the negative control through a live SSH session, and `deployer sandbox
up/status/down` leaving nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from deployer.sandbox import fleet, ports, processes
from deployer.sandbox.client import SandboxClient
from deployer.sandbox.simulator import Faults, HostSpec, Simulator
from tests.sandbox_fixture import Sandbox, requires_openssh

pytestmark = pytest.mark.e2e

SSHD_KINDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("openssh", id="openssh", marks=[pytest.mark.openssh, requires_openssh]),
]


# --- helpers ---------------------------------------------------------------------------


def call(api_url: str, name: str, params: dict) -> dict:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{api_url.format(call=name)}?{query}", timeout=5) as resp:
        return json.loads(resp.read())


def host_ids(sb: Sandbox, name: str) -> tuple[str, dict]:
    """(api_url, the host's query parameters), read from the sandbox inventory."""
    from deployer.inventory import load_inventory

    inv = load_inventory(sb.inventory)
    host = inv.hosts[name]
    params = {
        "user_id": inv.provider.user_id.reveal(),
        "dbid": host.dbid.reveal(),
        "host_uuid": host.host_uuid.reveal(),
        "ports_id": host.ports_id,
    }
    return inv.provider.api_url, params


def sb_call(sb: Sandbox, name: str, call_name: str, **extra) -> dict:
    api_url, params = host_ids(sb, name)
    return call(api_url, call_name, {**params, **extra})


def ssh_connect(sb: Sandbox, name: str, key: Path | None = None, user: str | None = None):
    import getpass

    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(sb.dir / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        port=sb.info.ssh_ports[name],
        username=user or getpass.getuser(),
        key_filename=str(key or sb.dir / "id_ed25519"),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
        banner_timeout=10,
        auth_timeout=10,
    )
    return client


def run(client, command: str, stdin: bytes | None = None, timeout: float = 20):
    chan_in, out, err = client.exec_command(command, timeout=timeout)
    if stdin is not None:
        chan_in.write(stdin)
    chan_in.channel.shutdown_write()
    data, errors = out.read(), err.read()
    return out.channel.recv_exit_status(), data, errors


def session_alive(client) -> bool:
    try:
        return run(client, "echo alive", timeout=3)[1] == b"alive\n"
    except Exception:  # noqa: BLE001 - any failure means the session is gone
        return False


def stop_client(sb: Sandbox, name: str) -> None:
    pid = sb.client_pid(name)
    assert pid and processes.alive(pid)
    assert processes.terminate([pid]) == []


def start_client(sb: Sandbox, name: str) -> int:
    from deployer.sandbox.sshd import session_env

    host_dir = sb.host_dir(name)
    return processes.start_pidfile_service(
        run=f"exec python3 {host_dir / 'client.py'}",
        pidfile=host_dir / "client.pid",
        log_path=host_dir / "client.log",
        cwd=str(host_dir),
        env=session_env("nobody", str(host_dir)),
    )


# --- tunnels over real TCP (simulator in process, an echo server as the target) -------


class EchoServer:
    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:  # cut by the relay (RST)
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def tunnel_sim():
    echo = EchoServer()
    specs = [HostSpec(f"h{i}", f"db{i}", f"uuid-{i}", 100 + i, 0) for i in range(3)]
    sim = Simulator("u1", specs, ("127.0.0.1", echo.port), Faults(offline_after=0.5))
    sim.start()  # picks and holds a port for each host
    hosts = [replace(h, ssh_port=sim.ssh_ports[h.name]) for h in specs]
    try:
        yield sim, hosts, SandboxClient(sim.base_url)
    finally:
        sim.stop()
        echo.close()


@pytest.fixture
def dial():
    """Open TCP connections to 127.0.0.1; all closed after the test."""
    opened: list[socket.socket] = []

    def connect(port: int) -> socket.socket:
        opened.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        return opened[-1]

    yield connect
    for sock in opened:
        sock.close()


def sim_call(sim: Simulator, host: HostSpec, name: str, **extra) -> dict:
    params = {"user_id": "u1", "dbid": host.dbid, "host_uuid": host.host_uuid}
    params["ports_id"] = host.ports_id
    return call(sim.api_url, name, {**params, **extra})


def echo_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def cut(sock: socket.socket, timeout: float) -> bool:
    """True when the connection ends (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connect_opens_a_relaying_tunnel_and_disconnect_cuts_it(tunnel_sim, dial):
    sim, hosts, admin = tunnel_sim
    host = hosts[0]
    admin.heartbeat(host.host_uuid)
    assert sim_call(sim, host, "connect")["error_code"] == 0
    assert sim_call(sim, host, "connect")["error_code"] == 0  # idempotent
    conn = dial(host.ssh_port)
    payload = random.randbytes(300_000)
    assert echo_roundtrip(conn, payload) == payload
    state = admin.host("h0")
    assert (state["tunnel_open"], state["connections"]) == (True, 1)
    assert sim_call(sim, host, "disconnect")["error_code"] == 0
    assert cut(conn, 2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host.ssh_port), timeout=2)
    assert admin.host("h0")["tunnel_open"] is False


def test_closed_tunnel_ports_stay_reserved_and_a_busy_port_gives_11():
    echo = EchoServer()
    free, busy = ports.free_ports(2)
    squatter = socket.create_server(("127.0.0.1", busy))  # taken before the simulator starts
    hosts = [HostSpec("h0", "db0", "uuid-0", 100, free), HostSpec("h1", "db1", "uuid-1", 101, busy)]
    sim = Simulator("u1", hosts, ("127.0.0.1", echo.port), Faults())
    sim.start()
    try:
        admin = SandboxClient(sim.base_url)
        for host in hosts:
            admin.heartbeat(host.host_uuid)
        with pytest.raises(OSError):  # another program cannot take a sandbox tunnel port
            socket.create_server(("127.0.0.1", free))
        assert sim_call(sim, hosts[1], "connect")["error_code"] == 11
        assert admin.host("h1")["tunnel_open"] is False
        assert sim_call(sim, hosts[0], "connect")["error_code"] == 0
        assert sim_call(sim, hosts[0], "disconnect")["error_code"] == 0
        with pytest.raises(OSError):  # held again once the tunnel is closed
            socket.create_server(("127.0.0.1", free))
    finally:
        sim.stop()
        squatter.close()
        echo.close()


def test_half_close_is_relayed(tunnel_sim, dial):
    sim, hosts, admin = tunnel_sim
    admin.heartbeat(hosts[0].host_uuid)
    sim_call(sim, hosts[0], "connect")
    conn = dial(hosts[0].ssh_port)
    conn.sendall(b"last words")
    conn.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := conn.recv(100):
        got += chunk
    assert got == b"last words"


def test_offline_client_without_allow_clientless_loses_tunnel_and_connections(tunnel_sim, dial):
    sim, hosts, admin = tunnel_sim
    host = hosts[0]
    before_beat = time.monotonic()
    admin.heartbeat(host.host_uuid)
    sim_call(sim, host, "connect")
    conns = [dial(host.ssh_port) for _ in range(3)]
    for conn in conns:
        assert echo_roundtrip(conn, b"ping") == b"ping"
    assert all(cut(conn, 0.5 + 0.5) for conn in conns)  # offline_after + 0.5
    assert time.monotonic() - before_beat >= 0.5  # not before offline_after
    state = admin.host("h0")
    assert (state["tunnel_open"], state["online"], state["tunnel_cuts"]) == (False, False, 1)
    assert sim_call(sim, host, "connect")["error_code"] == 24


def test_allow_clientless_keeps_the_tunnel_of_an_offline_client_until_revoked(tunnel_sim, dial):
    sim, hosts, admin = tunnel_sim
    host = hosts[2]
    admin.heartbeat(host.host_uuid)
    sim_call(sim, host, "connect")
    sim_call(sim, host, "set_allow_clientless", allow="true")
    conn = dial(host.ssh_port)
    time.sleep(1.0)  # twice offline_after
    assert admin.host("h2")["online"] is False
    assert echo_roundtrip(conn, b"still here") == b"still here"
    sim_call(sim, host, "set_allow_clientless", allow="false")
    assert cut(conn, 1.0)
    assert admin.host("h2")["tunnel_open"] is False


def test_many_concurrent_tunnels_relay_independently(tunnel_sim, dial):
    sim, hosts, admin = tunnel_sim
    for host in hosts:
        admin.heartbeat(host.host_uuid)
        sim_call(sim, host, "connect")
    conns = [dial(hosts[i % 3].ssh_port) for i in range(60)]
    payloads = [random.randbytes(5000) for _ in conns]
    for conn, payload in zip(conns, payloads, strict=True):
        conn.sendall(payload)
    for conn, payload in zip(conns, payloads, strict=True):
        got = b""
        while len(got) < len(payload):
            got += conn.recv(65536)
        assert got == payload
    assert sum(admin.host(h.name)["connections"] for h in hosts) == 60


# --- the client template as a process ---------------------------------------------------


@pytest.fixture
def client_script(tmp_path, tunnel_sim):
    """Render the shipped sandbox client for host h0 of ``tunnel_sim``; run it."""
    import jinja2

    from deployer.render import quote

    sim, hosts, admin = tunnel_sim
    source = resources.files("deployer.templates").joinpath("sandbox-client.py.j2")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["quote"] = quote

    def start(fail: str = "", die_after: str = "0.6", release: str = "1"):
        text = env.from_string(source.read_text()).render(
            host="h0",
            host_uuid=hosts[0].host_uuid,
            release=release,
            sandbox_fail=fail,
            sandbox_die_after=die_after,
            sandbox_url=sim.base_url,
            heartbeat_interval="0.1",
        )
        path = tmp_path / f"client-{fail or 'ok'}.py"
        path.write_text(text)
        proc = subprocess.Popen(
            [sys.executable, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(proc)
        return path, proc

    started: list[subprocess.Popen] = []
    yield start, admin
    for proc in started:
        proc.kill()
        proc.wait()


def test_healthy_client_heartbeats_its_own_sha256_and_stops_on_sigterm(client_script):
    start, admin = client_script
    path, proc = start()
    admin.wait_online(["h0"], timeout=10)
    host = admin.host("h0")
    assert host["script_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert host["client_pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0


def test_crash_client_exits_at_start_without_a_heartbeat(client_script):
    start, admin = client_script
    _path, proc = start("crash")
    assert proc.wait(10) == 3
    assert admin.host("h0")["last_heartbeat_age"] is None


def test_silent_client_runs_but_never_heartbeats(client_script):
    start, admin = client_script
    _path, proc = start("silent")
    time.sleep(0.8)
    assert proc.poll() is None
    assert admin.host("h0")["last_heartbeat_age"] is None


def test_die_after_client_heartbeats_then_exits(client_script):
    start, admin = client_script
    _path, proc = start("die-after", die_after="0.6")
    admin.wait_online(["h0"], timeout=10)
    assert proc.wait(10) == 4


def test_release_changes_the_script_and_values_stay_literal(client_script):
    start, admin = client_script
    hostile = "2\"; import os; os._exit(9) #'''\n"
    path, proc = start(release=hostile)
    admin.wait_online(["h0"], timeout=10)
    assert f"release {hostile.strip()}" not in path.read_text()
    assert proc.poll() is None  # the hostile value did not run
    namespace: dict = {}
    exec(compile(path.read_text().split("\ndef ", 1)[0], str(path), "exec"), namespace)  # noqa: S102
    assert namespace["RELEASE"] == hostile


# --- the fleet: both SSH servers -----------------------------------------------------------


@pytest.fixture(scope="module", params=SSHD_KINDS)
def fleet_sb(request, module_sandbox_factory) -> Sandbox:
    sb = module_sandbox_factory(hosts=3, sshd=request.param)
    for name in sb.hosts:
        assert sb_call(sb, name, "connect")["error_code"] == 0
    return sb


def test_up_runs_release_1_on_every_host(fleet_sb):
    sb = fleet_sb
    state = sb.state()
    assert state["api_url"] == sb.info.api_url
    for name in sb.hosts:
        host = state["hosts"][name]
        script = sb.host_dir(name) / "client.py"
        assert host["online"] is True
        assert host["script_sha256"] == hashlib.sha256(script.read_bytes()).hexdigest()
        assert 'RELEASE = "1"' in script.read_text()
        assert host["client_pid"] == sb.client_pid(name)


def test_inventory_loads_with_strict_host_keys_for_every_tunnel(fleet_sb):
    from deployer.inventory import load_inventory

    sb = fleet_sb
    inv = load_inventory(sb.inventory)
    assert list(inv.hosts) == sb.hosts
    assert inv.groups["sandbox"] == tuple(sb.hosts)
    known = (sb.dir / "known_hosts").read_text()
    for name, host in inv.hosts.items():
        assert host.host_key_policy == "strict"
        assert host.service.kind == "pidfile"
        assert f"[127.0.0.1]:{host.ssh_port} ssh-ed25519 " in known
        assert host.script_path == str(sb.host_dir(name) / "client.py")


def test_exec_streams_output_and_exit_status(fleet_sb):
    client = ssh_connect(fleet_sb, "sbx-01")
    try:
        status, out, err = run(client, "echo out; echo err >&2; exit 7")
        assert (status, out, err) == (7, b"out\n", b"err\n")
        status, out, _ = run(client, "cat; echo done", stdin=b"from stdin\n")
        assert (status, out) == (0, b"from stdin\ndone\n")
        status, out, _ = run(client, "head -c 2000000 /dev/zero")
        assert (status, len(out)) == (0, 2_000_000)
        status, out, _ = run(client, 'echo "$HOME"; pwd; command -v python3')
        home, cwd, python = out.decode().split()
        assert home == cwd and python.endswith("python3")
        assert run(client, "kill -9 $$")[0] == -1  # killed by a signal: no exit status
        assert session_alive(client)
    finally:
        client.close()


def test_sftp_put_get_chmod_and_posix_rename(fleet_sb):
    work = fleet_sb.host_dir("sbx-02") / "sftp"
    work.mkdir(exist_ok=True)
    client = ssh_connect(fleet_sb, "sbx-02")
    try:
        sftp = client.open_sftp()
        data = random.randbytes(100_000)
        with sftp.open(str(work / "staged"), "wb") as handle:
            handle.write(data)
        sftp.chmod(str(work / "staged"), 0o755)
        (work / "target").write_bytes(b"old")
        sftp.posix_rename(str(work / "staged"), str(work / "target"))
        assert (work / "target").read_bytes() == data
        assert oct((work / "target").stat().st_mode & 0o777) == oct(0o755)
        assert not (work / "staged").exists()
        with sftp.open(str(work / "target"), "rb") as handle:
            assert handle.read() == data
        assert "target" in sftp.listdir(str(work))
        assert sftp.normalize(".") == run(client, "pwd")[1].decode().strip()
        sftp.remove(str(work / "target"))
        assert not (work / "target").exists()
    finally:
        client.close()


def test_a_detached_process_survives_the_session(fleet_sb):
    client = ssh_connect(fleet_sb, "sbx-03")
    marker = fleet_sb.host_dir("sbx-03") / "detached"
    command = f"setsid sh -c 'sleep 30' >{marker}.log 2>&1 </dev/null & echo $!"
    status, out, _ = run(client, command)
    pid = int(out)
    client.close()
    try:
        time.sleep(0.5)
        assert status == 0 and processes.alive(pid)
    finally:
        processes.terminate([pid], 1)


def test_only_the_sandbox_key_and_user_may_log_in(fleet_sb, tmp_path):
    import paramiko

    from deployer.sandbox import keys

    keys.generate_keypair(tmp_path / "other", "other")
    with pytest.raises(paramiko.AuthenticationException):
        ssh_connect(fleet_sb, "sbx-01", key=tmp_path / "other")
    with pytest.raises(paramiko.AuthenticationException):
        ssh_connect(fleet_sb, "sbx-01", user="nobody-here")


# --- the negative control through a live SSH session ------------------------------------------


@pytest.mark.parametrize("sshd", SSHD_KINDS)
def test_stopping_a_client_without_the_window_cuts_the_ssh_session(sandbox_factory, sshd):
    sb = sandbox_factory(hosts=1, sshd=sshd)
    assert sb_call(sb, "sbx-01", "connect")["error_code"] == 0
    client = ssh_connect(sb, "sbx-01")
    try:
        assert session_alive(client)
        offline_after = sb.state()["faults"]["offline_after"]
        stop_client(sb, "sbx-01")
        stopped = time.monotonic()
        while session_alive(client):
            assert time.monotonic() - stopped < offline_after + 0.5, "session not cut in time"
            time.sleep(0.05)
        assert time.monotonic() - stopped <= offline_after + 0.5
        host = sb.host("sbx-01")
        assert (host["tunnel_open"], host["online"], host["tunnel_cuts"]) == (False, False, 1)
    finally:
        client.close()


@pytest.mark.parametrize("sshd", SSHD_KINDS)
def test_with_the_window_open_the_session_survives_a_client_restart(sandbox_factory, sshd):
    sb = sandbox_factory(hosts=1, sshd=sshd)
    assert sb_call(sb, "sbx-01", "connect")["error_code"] == 0
    client = ssh_connect(sb, "sbx-01")
    try:
        assert sb_call(sb, "sbx-01", "set_allow_clientless", allow="true")["allow_clientless"]
        stop_client(sb, "sbx-01")
        sb.client.wait_offline(["sbx-01"], timeout=5)
        assert session_alive(client)
        new_pid = start_client(sb, "sbx-01")
        sb.client.wait_online(["sbx-01"], timeout=10)
        assert sb_call(sb, "sbx-01", "set_allow_clientless", allow="false")["success"]
        time.sleep(0.3)
        assert session_alive(client)
        host = sb.host("sbx-01")
        assert host["client_pid"] == new_pid and host["tunnel_open"] is True
        [[t_open, t_close]] = host["exposures"]
        assert t_open < t_close
    finally:
        client.close()


# --- sandbox up/status/down through the CLI ---------------------------------------------------


def deployer_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_cli_up_status_down_leaves_nothing_behind(tmp_path):
    root = tmp_path / "sbx"
    try:
        up = deployer_cli(
            "sandbox", "up", "--hosts", "2", "--dir", str(root),
            "--api-latency", "0.01", "--rate-limit", "30", "--fail-rate", "0.05",
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert f"deployer -i {root / 'deployer.toml'} status" in up.stdout
        again = deployer_cli("sandbox", "up", "--dir", str(root))
        assert again.returncode == 0 and "already runs" in again.stdout
        time.sleep(1.6)  # > offline_after: the shell that started it is gone, the fleet is not
        status = deployer_cli("sandbox", "status", "--dir", str(root), "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["api_url"].endswith("/api/{call}")
        faults = state["faults"]
        assert (faults["latency"], faults["rate_limit"], faults["fail_rate"]) == (0.01, 30, 0.05)
        assert all(h["online"] for h in state["hosts"].values())
        table = deployer_cli("sandbox", "status", "--dir", str(root))
        assert "sbx-02" in table.stdout
        ports = [h["ssh_port"] for h in state["hosts"].values()]
        ports.append(urllib.parse.urlsplit(state["api_url"]).port)
        fleet_status = deployer_cli("-i", str(root / "deployer.toml"), "status", "--json")
        assert {h["host"] for h in json.loads(fleet_status.stdout)} == {"sbx-01", "sbx-02"}
        down = deployer_cli("sandbox", "down", "--dir", str(root))
        assert down.returncode == 0, down.stderr
        assert processes.processes_mentioning(f"{root}/") == []
        assert [p for p in ports if processes.listening(p)] == []
        after = deployer_cli("sandbox", "status", "--dir", str(root))
        assert after.returncode == 1 and "no sandbox runs" in after.stderr
    finally:
        fleet.down(root)


def test_down_also_stops_stray_host_processes_and_openssh(tmp_path, sandbox_factory):
    sshd = "openssh" if Path("/usr/sbin/sshd").exists() else "embedded"
    sb = sandbox_factory(hosts=2, sshd=sshd)
    assert sb_call(sb, "sbx-01", "connect")["error_code"] == 0
    client = ssh_connect(sb, "sbx-01")  # a live session through a tunnel
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(sb.host_dir("sbx-02") / "x")],
        start_new_session=True,
    )
    try:
        report = fleet.down(sb.dir)
        assert report.clean, report
        assert stray.wait(5) != 0
        assert processes.processes_mentioning(f"{sb.dir}/") == []
        assert not os.path.exists(sb.dir / "runner.json")
    finally:
        client.close()
        stray.kill()


def test_up_after_the_runner_was_killed_clears_the_old_fleet(sandbox_factory):
    sb = sandbox_factory(hosts=2)
    old_clients = [sb.client_pid(name) for name in sb.hosts]
    os.kill(sb.info.runner_pid, signal.SIGKILL)
    assert processes.terminate([sb.info.runner_pid], timeout=5) == []  # waits until it is gone
    with pytest.raises(fleet.SandboxNotRunning):
        fleet.status(sb.dir)
    info = fleet.up(sb.dir, hosts=2)
    assert info.runner_pid != sb.info.runner_pid
    assert not any(processes.alive(pid) for pid in old_clients)
    assert all(h["online"] for h in info.client.state()["hosts"].values())


def test_bad_options_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(fleet.SandboxInputError, match="--hosts"):
        fleet.up(tmp_path / "a", hosts=0)
    with pytest.raises(fleet.SandboxInputError, match="--fail-rate"):
        fleet.up(tmp_path / "b", fail_rate=1.5)
    project = tmp_path / "project"
    project.mkdir()
    (project / "deployer.toml").write_text("# a real inventory\n")
    with pytest.raises(fleet.SandboxInputError, match="not empty and holds no sandbox"):
        fleet.up(project)
    assert (project / "deployer.toml").read_text() == "# a real inventory\n"
    result = deployer_cli("sandbox", "up", "--dir", str(tmp_path / "c"), "--sshd", "dropbear")
    assert result.returncode == 2
    assert not (tmp_path / "c").exists()
