"""End to end on the sandbox itself (SPEC 1b, 7): real client processes that
poll the simulator and own their `ssh -R` tunnels, a forwarding SSH server
(embedded and OpenSSH), one SSH server per host reached through the tunnel,
the offline rule cutting a live session, the adoption of a running tunnel by
a restarted client, `--ssh-latency`, `--profile real`, and `deployer sandbox
up/status/down` leaving nothing behind. Nothing here is mocked: real
processes, real sockets, 127.0.0.1 only."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import py_compile
import random
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from deployer.sandbox import fleet, processes, procnet
from tests.sandbox_fixture import Sandbox, requires_openssh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SSHD_KINDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("openssh", id="openssh", marks=[pytest.mark.openssh, requires_openssh]),
]
SSH = "/usr/bin/ssh"


# --- helpers ---------------------------------------------------------------------------


def ssh_connect(sb: Sandbox, name: str, key: Path | None = None, user: str | None = None):
    """paramiko to the forwarding server's IPORT of ``name``, host key checked."""
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(sb.dir / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        port=sb.iport(name),
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


def system_ssh(sb: Sandbox, name: str, command: str) -> subprocess.CompletedProcess:
    """/usr/bin/ssh to the host through its tunnel, as an operator would."""
    return subprocess.run(
        [
            SSH, "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={sb.dir / 'known_hosts'}", "-o", "IdentitiesOnly=yes",
            "-i", str(sb.dir / "id_ed25519"), "-p", str(sb.iport(name)),
            f"{getpass.getuser()}@127.0.0.1", command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def forward(sb: Sandbox, iport: int) -> subprocess.CompletedProcess:
    """A second `ssh -R` with the account key, as another client of the account would."""
    return subprocess.run(
        [
            SSH, "-F", "none", "-N", "-T", "-o", "ExitOnForwardFailure=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={sb.dir / 'forwarding_known_hosts'}",
            "-i", str(sb.dir / "account_key"), "-p", str(sb.info.forwarding_port),
            "-R", f"{iport}:localhost:9", f"{getpass.getuser()}@127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def tunnel_processes(sb: Sandbox, name: str) -> list[int]:
    """Every `ssh -R IPORT:localhost:SSHD_PORT` of ``name`` on the machine, by command line."""
    forward_spec = f"-R {sb.iport(name)}:localhost:{sb.info.sshd_ports[name]} "
    return [
        p for p in processes.processes_mentioning(forward_spec) if "ssh" in processes.cmdline(p)
    ]


def stop_client(sb: Sandbox, name: str) -> None:
    pid = sb.client_pid(name)
    assert pid and processes.alive(pid)
    assert processes.terminate([pid], timeout=3) == []  # exits on SIGTERM, promptly


def start_client(sb: Sandbox, name: str) -> int:
    """Start the installed client as the pidfile service (and the guard) does."""
    from deployer.sandbox.sshd import session_env

    host_dir = sb.host_dir(name)
    user = getpass.getuser()
    return processes.start_pidfile_service(
        run=f"exec python3 {host_dir / 'client.py'}",
        pidfile=host_dir / "client.pid",
        log_path=host_dir / "client.out",
        cwd=str(host_dir),
        env=session_env(user, os.path.expanduser(f"~{user}")),
    )


def ppid(pid: int) -> int | None:
    return procnet.ppid(pid)


def exec_seconds(client, runs: int = 3) -> float:
    """The fastest of ``runs`` exec round trips of `true` on an open session."""
    best = float("inf")
    for _ in range(runs):
        start = time.monotonic()
        assert run(client, "true")[0] == 0
        best = min(best, time.monotonic() - start)
    return best


# --- one world per SSH server kind -------------------------------------------------------


@pytest.fixture(scope="module", params=SSHD_KINDS)
def world(request, module_sandbox_factory) -> tuple[Sandbox, dict]:
    """Six hosts; each test below uses its own host. With the state right after `up`."""
    sb = module_sandbox_factory(hosts=6, sshd=request.param)
    return sb, sb.state()


def test_up_runs_release_1_everywhere_online_with_tunnels_closed(world):
    sb, first = world
    for name in sb.hosts:
        host = first["hosts"][name]
        script = sb.host_dir(name) / "client.py"
        assert host["online"] is True and host["polls"] >= 1
        assert (host["command"], host["tunnel_open"], host["tunnel_pids"]) == ("0", False, [])
        assert host["script_sha256"] == hashlib.sha256(script.read_bytes()).hexdigest()
        assert 'RELEASE = str("1")' in script.read_text()
        assert host["iport"] == sb.iport(name)
        assert processes.alive(sb.client_pid(name))
        assert os.stat(script).st_mode & 0o077 == 0  # it holds the host's credentials
    assert first["poll_url"] == sb.info.poll_url


def test_inventory_and_sandbox_json_describe_the_world_as_in_production(world):
    from deployer.inventory import load_inventory

    sb, _first = world
    inv = load_inventory(sb.inventory)
    doc = sb.document
    assert list(inv.hosts) == sb.hosts and inv.groups["sandbox"] == tuple(sb.hosts)
    assert (inv.provider.ssh_host, inv.provider.tunnel_timeout) == ("127.0.0.1", 10.0)
    assert inv.provider.api_key.reveal() == doc["api_key"]  # source = "provider" works too
    assert inv.provider.offline_detection == 1.5
    assert doc["forwarding_port"] == sb.info.forwarding_port
    assert doc["account_key"] == str(sb.dir / "account_key") and doc["profile"] == "fast"
    known = (sb.dir / "known_hosts").read_text()
    forwarding_known = (sb.dir / "forwarding_known_hosts").read_text()
    assert forwarding_known.startswith(f"[127.0.0.1]:{sb.info.forwarding_port} ssh-ed25519 ")
    for name, host in inv.hosts.items():
        ids = doc["hosts"][name]
        assert host.ssh_port == ids["iport"] == sb.iport(name)  # the tunnel's port, not sshd's
        assert host.vars["sshd_port"] == ids["sshd_port"] != ids["iport"]
        assert host.vars["log_file"] == str(sb.host_dir(name) / "client.log")
        assert (host.service.kind, host.host_key_policy) == ("pidfile", "strict")
        assert "$DEPLOYER_SWAP_MARK" in host.service.ready
        assert host.host_uuid.reveal() == ids["host_uuid"] and host.dbid.reveal() == ids["dbid"]
        assert host.client_id.reveal() == ids["client_id"]
        assert f"[127.0.0.1]:{host.ssh_port} ssh-ed25519 " in known
        assert ids["script_path"] == host.script_path
    assert oct(os.stat(sb.dir / "sandbox.json").st_mode & 0o777) == oct(0o600)


def test_connect_brings_one_tunnel_process_at_the_next_poll_and_ssh_reaches_the_host(world):
    sb, _first = world
    name = "sbx-01"
    connected = time.monotonic()
    assert sb.call(name, "connect") == {"message": "OK", "error_code": 0, "success": True}
    assert sb.host(name)["tunnel_pids"] == []  # not at once: at the client's next poll
    [pid] = sb.client.wait_tunnel([name], timeout=5)[name]["tunnel_pids"]
    assert time.monotonic() - connected < 2 * 0.5 + 2.0  # a poll or two and a handshake
    assert tunnel_processes(sb, name) == [pid]
    assert ppid(pid) != sb.client_pid(name)  # detached: it outlives the client
    argv = processes.cmdline(pid)
    assert argv.startswith("ssh ") and f"{getpass.getuser()}@127.0.0.1" in argv
    result = system_ssh(sb, name, "echo reached; pwd")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"reached\n{os.path.expanduser('~' + getpass.getuser())}\n"
    assert sb.call(name, "connect")["error_code"] == 0  # idempotent: still one process
    time.sleep(1.2)
    assert sb.tunnel_pids(name) == [pid] and tunnel_processes(sb, name) == [pid]


def test_exec_streams_output_and_exit_status_through_the_tunnel(world):
    sb, _first = world
    sb.connect("sbx-01")
    client = ssh_connect(sb, "sbx-01")
    try:
        status, out, err = run(client, "echo out; echo err >&2; exit 7")
        assert (status, out, err) == (7, b"out\n", b"err\n")
        status, out, _ = run(client, "cat; echo done", stdin=b"from stdin\n")
        assert (status, out) == (0, b"from stdin\ndone\n")
        status, out, _ = run(client, "head -c 2000000 /dev/zero")
        assert (status, len(out)) == (0, 2_000_000)
        assert sb.host("sbx-01")["connections"] == 1
        assert run(client, "kill -9 $$")[0] == -1  # killed by a signal: no exit status
        assert session_alive(client)
    finally:
        client.close()


def test_sftp_put_get_chmod_and_posix_rename_through_the_tunnel(world):
    sb, _first = world
    sb.connect("sbx-01")
    work = sb.host_dir("sbx-01") / "sftp"
    work.mkdir(exist_ok=True)
    client = ssh_connect(sb, "sbx-01")
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
        with sftp.open(str(work / "target"), "rb") as handle:
            assert handle.read() == data
    finally:
        client.close()


def test_a_second_forward_of_a_busy_iport_is_refused(world):
    sb, _first = world
    [pid] = sb.connect("sbx-02")
    result = forward(sb, sb.iport("sbx-02"))
    assert result.returncode == 255
    assert "remote port forwarding failed" in result.stderr
    assert sb.tunnel_pids("sbx-02") == [pid]  # the client's tunnel is untouched
    assert system_ssh(sb, "sbx-02", "true").returncode == 0


def test_a_port_that_is_no_iport_is_refused(world):
    sb, _first = world
    result = forward(sb, 9)
    assert result.returncode == 255
    assert "remote port forwarding failed" in result.stderr


def test_a_restarted_client_adopts_the_running_tunnel_and_the_session_survives(world):
    sb, _first = world
    name = "sbx-03"
    [pid] = sb.connect(name)
    client = ssh_connect(sb, name)
    try:
        assert sb.call(name, "set_allow_clientless", allow="true")["allow_clientless"] is True
        stop_client(sb, name)
        assert processes.alive(pid) and session_alive(client)  # the tunnel outlived its client
        sb.client.wait_offline([name], timeout=5)
        assert sb.host(name)["tunnel_pids"] == [pid]
        new_client = start_client(sb, name)
        sb.client.wait_for([name], lambda h: h["last_poll_age"] < 0.4, 10, "polled")
        time.sleep(1.0)  # two more polls: nothing else may start
        assert sb.call(name, "set_allow_clientless", allow="false")["success"] is True
        assert sb.tunnel_pids(name) == [pid] and tunnel_processes(sb, name) == [pid]
        log = (sb.host_dir(name) / "client.log").read_text()
        assert f"adopted the running tunnel pid {pid}" in log
        assert session_alive(client) and processes.alive(new_client)
        host = sb.host(name)
        assert (host["online"], host["tunnel_cuts"]) == (True, 0)
        [[t_open, t_close]] = host["exposures"]
        assert t_open < t_close
    finally:
        client.close()


def test_disconnect_ends_the_tunnel_at_once_without_counting_a_cut(world):
    sb, _first = world
    name = "sbx-04"
    [pid] = sb.connect(name)
    client = ssh_connect(sb, name)
    try:
        assert sb.call(name, "disconnect")["error_code"] == 0
        host = sb.host(name)  # at once: disconnect returned after the session ended
        assert (host["tunnel_open"], host["command"], host["tunnel_cuts"]) == (False, "0", 0)
        assert not session_alive(client)
        deadline = time.monotonic() + 5
        while processes.alive(pid):
            assert time.monotonic() < deadline, "the tunnel process outlived its session"
            time.sleep(0.05)
        time.sleep(1.2)  # the client polls "0" and starts nothing
        assert sb.tunnel_pids(name) == [] and tunnel_processes(sb, name) == []
        assert sb.host(name)["online"] is True
    finally:
        client.close()


def test_a_tunnel_comes_back_after_a_disconnect_that_cut_a_session(world):
    """The forwarding server ends deployer's session first (disconnect, or a cut):
    that connection's TIME_WAIT sits on the IPORT. The next connect must bring the
    tunnel back at once, not after the ~60 s TIME_WAIT."""
    sb, _first = world
    name = "sbx-04"
    sb.connect(name)
    client = ssh_connect(sb, name)
    try:
        assert sb.call(name, "disconnect")["error_code"] == 0
        assert not session_alive(client)
    finally:
        client.close()
    sb.client.wait_for([name], lambda h: not h["tunnel_pids"], 10.0, "without a tunnel")
    [pid] = sb.connect(name, timeout=10.0)
    again = ssh_connect(sb, name)
    try:
        assert session_alive(again)
    finally:
        again.close()
        sb.call(name, "disconnect")


def test_a_client_stopped_without_the_window_has_its_tunnel_cut(world):
    sb, _first = world
    name = "sbx-05"
    [pid] = sb.connect(name)
    client = ssh_connect(sb, name)
    try:
        offline_after = sb.state()["faults"]["offline_after"]
        stop_client(sb, name)
        stopped = time.monotonic()
        while session_alive(client):
            assert time.monotonic() - stopped < offline_after + 1.5, "session not cut in time"
            time.sleep(0.05)
        host = sb.host(name)
        assert (host["online"], host["tunnel_open"], host["tunnel_cuts"]) == (False, False, 1)
        assert host["command"] == "1" and host["tunnel_pids"] == []
        deadline = time.monotonic() + 5
        while processes.alive(pid):  # the client's ssh lost its session: it exits
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sb.call(name, "connect")["error_code"] == 24
    finally:
        client.close()


def test_only_the_sandbox_key_and_user_may_log_in(world, tmp_path):
    import paramiko

    from deployer.sandbox import keys

    sb, _first = world
    sb.connect("sbx-06")
    keys.generate_keypair(tmp_path / "other", "other")
    with pytest.raises(paramiko.AuthenticationException):
        ssh_connect(sb, "sbx-06", key=tmp_path / "other")
    with pytest.raises(paramiko.AuthenticationException):
        ssh_connect(sb, "sbx-06", user="nobody-here")
    with pytest.raises(paramiko.AuthenticationException):  # the account key opens no host
        ssh_connect(sb, "sbx-06", key=sb.dir / "account_key")


def test_the_forwarding_server_runs_no_commands(world):
    sb, _first = world
    result = subprocess.run(
        [
            SSH, "-F", "none", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={sb.dir / 'forwarding_known_hosts'}",
            "-i", str(sb.dir / "account_key"), "-p", str(sb.info.forwarding_port),
            f"{getpass.getuser()}@127.0.0.1", "echo ran",
        ],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "ran" not in result.stdout and result.returncode != 0


def test_the_ready_probe_passes_once_the_client_polled_after_the_mark(world, tmp_path):
    from deployer.inventory import load_inventory
    from deployer.render import host_context, render_command

    sb, _first = world
    inv = load_inventory(sb.inventory)
    host = inv.hosts["sbx-06"]
    probe = render_command(host.service.ready, host_context(inv, host), "ready")
    mark = tmp_path / "swap-mark"
    mark.touch()
    os.utime(mark, (time.time() + 60, time.time() + 60))  # a swap in the future: no poll since

    def passes() -> bool:
        env = dict(os.environ, DEPLOYER_SWAP_MARK=str(mark), DEPLOYER_SWAP_TIME=str(time.time()))
        return subprocess.run(["/bin/sh", "-c", probe], env=env).returncode == 0

    assert not passes()
    os.utime(mark, None)  # a swap now: the next poll passes it
    deadline = time.monotonic() + 3
    while not passes():
        assert time.monotonic() < deadline, "no poll after the mark"
        time.sleep(0.1)


def test_get_client_script_returns_the_production_client_the_provider_generated(world, tmp_path):
    sb, _first = world
    doc = sb.document
    ids = doc["hosts"]["sbx-06"]
    query = urllib.parse.urlencode({"api_key": doc["api_key"], "client_id": ids["client_id"]})
    url = doc["api_url"].format(call="get_client_script") + "?" + query
    with urllib.request.urlopen(url, timeout=10) as response:
        reply = json.loads(response.read())
    assert (reply["error_code"], reply["success"], reply["message"]) == (0, True, "OK")
    script = reply["script"]
    assert 'RELEASE = str("provider-1")' in script and "SANDBOX_FAIL" not in script
    assert json.dumps(ids["host_uuid"]) in script and json.dumps(ids["dbid"]) in script
    (tmp_path / "provider.py").write_text(script)
    py_compile.compile(str(tmp_path / "provider.py"), doraise=True)
    bad = urllib.parse.urlencode({"api_key": "wrong", "client_id": ids["client_id"]})
    url = doc["api_url"].format(call="get_client_script") + "?" + bad
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read())["error_code"] == 32


# --- the window open: no cut ---------------------------------------------------------------


@pytest.mark.parametrize("sshd", SSHD_KINDS)
def test_a_client_killed_with_the_window_open_keeps_its_tunnel(sandbox_factory, sshd):
    sb = sandbox_factory(hosts=1, sshd=sshd)
    [pid] = sb.connect("sbx-01")
    client = ssh_connect(sb, "sbx-01")
    try:
        assert sb.call("sbx-01", "set_allow_clientless", allow="true")["success"] is True
        os.kill(sb.client_pid("sbx-01"), signal.SIGKILL)
        sb.client.wait_offline(["sbx-01"], timeout=5)
        time.sleep(0.5)
        host = sb.host("sbx-01")
        assert (host["tunnel_open"], host["tunnel_pids"], host["tunnel_cuts"]) == (True, [pid], 0)
        assert session_alive(client)
        assert sb.call("sbx-01", "set_allow_clientless", allow="false")["success"] is True
        sb.client.wait_tunnel(["sbx-01"], open=False, timeout=5)  # the window closed: cut now
        assert sb.host("sbx-01")["tunnel_cuts"] == 1
    finally:
        client.close()


# --- latency and the real profile ------------------------------------------------------------


def test_ssh_latency_delays_every_round_trip_through_a_tunnel(sandbox_factory):
    latency = 0.15
    slow = sandbox_factory(hosts=1, ssh_latency=latency)
    quick = sandbox_factory(hosts=1)
    times = {}
    for label, sb in (("slow", slow), ("quick", quick)):
        sb.connect("sbx-01")
        client = ssh_connect(sb, "sbx-01")
        try:
            times[label] = exec_seconds(client)
        finally:
            client.close()
    assert times["slow"] >= 2 * latency  # at least one round trip: each direction delayed
    assert times["quick"] < latency, times


def test_profile_real_polls_every_5_s_and_sizes_the_inventory(sandbox_factory):
    from deployer.inventory import load_inventory

    sb = sandbox_factory(hosts=1, profile="real")
    assert sb.host("sbx-01")["online"] is True  # a client polls once at its start
    inv = load_inventory(sb.inventory)
    provider, host = inv.provider, inv.hosts["sbx-01"]
    assert (provider.offline_detection, provider.tunnel_timeout) == (30.0, 30.0)
    assert (host.online_timeout, host.stable_for) == (60.0, 35.0)
    assert host.stable_for > provider.offline_detection
    assert host.vars["poll_interval"] == 5.0 and sb.document["profile"] == "real"
    faults = sb.state()["faults"]
    assert (faults["latency"], faults["offline_after"]) == (0.2, 30.0)
    polls = sb.host("sbx-01")["polls"]
    time.sleep(1.5)
    assert sb.host("sbx-01")["polls"] <= polls + 1  # not every 0.5 s
    start = time.monotonic()
    sb.connect("sbx-01", timeout=5 + 5)  # at the next poll: up to 5 s later
    assert time.monotonic() - start < 5 + 5


# --- sandbox up/status/down ---------------------------------------------------------------


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
            "sandbox", "up", "--hosts", "2", "--dir", str(root), "--api-latency", "0.01",
            "--rate-limit", "30", "--fail-rate", "0.05", "--ssh-latency", "0.01",
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert f"deployer -i {root / 'deployer.toml'} status" in up.stdout
        again = deployer_cli("sandbox", "up", "--dir", str(root))
        assert again.returncode == 0 and "already runs" in again.stdout
        time.sleep(1.6)  # > offline_after: the shell that started it is gone, the world is not
        status = deployer_cli("sandbox", "status", "--dir", str(root), "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        faults = state["faults"]
        assert (faults["latency"], faults["rate_limit"], faults["fail_rate"]) == (0.01, 30, 0.05)
        assert all(h["online"] for h in state["hosts"].values())
        doc = json.loads((root / "sandbox.json").read_text())
        sb = Sandbox(root, root / "deployer.toml", fleet.info(root), fleet.info(root).client)
        sb.set_faults(fail_rate=0)
        [pid] = sb.connect("sbx-01")
        table = deployer_cli("sandbox", "status", "--dir", str(root))
        assert "sbx-02" in table.stdout and f"pid {pid}" in table.stdout
        ports = [doc["forwarding_port"], urllib.parse.urlsplit(doc["api_url"]).port]
        for host in doc["hosts"].values():
            ports += [host["iport"], host["sshd_port"]]
        down = deployer_cli("sandbox", "down", "--dir", str(root))
        assert down.returncode == 0, down.stderr
        assert not processes.alive(pid)
        assert processes.processes_mentioning(f"{root}/") == []
        assert [p for p in ports if processes.listening(p)] == []
        after = deployer_cli("sandbox", "status", "--dir", str(root))
        assert after.returncode == 1 and "no sandbox runs" in after.stderr
    finally:
        fleet.down(root)


@pytest.mark.parametrize("sshd", SSHD_KINDS)
def test_down_also_ends_sessions_tunnels_and_stray_host_processes(sandbox_factory, sshd):
    sb = sandbox_factory(hosts=2, sshd=sshd)
    [pid] = sb.connect("sbx-01")
    client = ssh_connect(sb, "sbx-01")  # a live session through a tunnel
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(sb.host_dir("sbx-02") / "x")],
        start_new_session=True,
    )
    ports = [sb.info.forwarding_port, *sb.info.ssh_ports.values(), *sb.info.sshd_ports.values()]
    try:
        report = fleet.down(sb.dir)
        assert report.clean, report
        assert stray.wait(5) != 0
        assert not processes.alive(pid)
        assert processes.processes_mentioning(f"{sb.dir}/") == []
        assert procnet.port_owners(ports) == []  # no sshd session left on any port
        assert not (sb.dir / "runner.json").exists()
    finally:
        client.close()
        stray.kill()


def test_up_after_the_runner_was_killed_clears_the_old_world(sandbox_factory):
    sb = sandbox_factory(hosts=2)
    [tunnel] = sb.connect("sbx-01")
    old_clients = [sb.client_pid(name) for name in sb.hosts]
    os.kill(sb.info.runner_pid, signal.SIGKILL)
    assert processes.terminate([sb.info.runner_pid], timeout=5) == []  # waits until it is gone
    with pytest.raises(fleet.SandboxNotRunning):
        fleet.status(sb.dir)
    info = fleet.up(sb.dir, hosts=2)
    assert info.runner_pid != sb.info.runner_pid
    assert not any(processes.alive(pid) for pid in [*old_clients, tunnel])
    hosts = info.client.state()["hosts"]
    assert all(h["online"] and not h["tunnel_pids"] for h in hosts.values())


def test_bad_options_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(fleet.SandboxInputError, match="--hosts"):
        fleet.up(tmp_path / "a", hosts=0)
    with pytest.raises(fleet.SandboxInputError, match="--fail-rate"):
        fleet.up(tmp_path / "b", fail_rate=1.5)
    with pytest.raises(fleet.SandboxInputError, match="--profile"):
        fleet.up(tmp_path / "b", profile="slow")
    project = tmp_path / "project"
    project.mkdir()
    (project / "deployer.toml").write_text("# a real inventory\n")
    with pytest.raises(fleet.SandboxInputError, match="not empty and holds no sandbox"):
        fleet.up(project)
    assert (project / "deployer.toml").read_text() == "# a real inventory\n"
    result = deployer_cli("sandbox", "up", "--dir", str(tmp_path / "c"), "--sshd", "dropbear")
    assert result.returncode == 2
    assert not (tmp_path / "c").exists()


@requires_openssh
def test_ssh_latency_with_openssh_is_refused_in_one_line(tmp_path):
    result = deployer_cli(
        "sandbox", "up", "--dir", str(tmp_path / "d"), "--sshd", "openssh", "--ssh-latency", "0.1"
    )
    assert result.returncode == 2
    assert "--ssh-latency" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
