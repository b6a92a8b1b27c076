"""deployer against real SSHReach clients (SPEC 1b): clients that poll the
provider, own a detached ``ssh -R`` that outlives them, and open it only at
their next poll after ``connect``. Judged by the simulator's record
(``/sandbox/state``) and by the processes on this machine, never by deployer's
own report alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sandbox_fixture import Sandbox, requires_openssh

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 150.0
SSHDS = ["embedded", pytest.param("openssh", marks=[requires_openssh, pytest.mark.openssh])]


# --- helpers ---------------------------------------------------------------------------


def cli(inventory: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deployer", "-i", str(inventory), *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    try:
        report = json.loads(out)
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}); stderr:\n{err[-3000:]}")
    return proc.returncode, report, err


def deployer(inventory: Path, *args: str) -> tuple[int, dict, str]:
    return finish(cli(inventory, *args))


def ssh_r_processes(iport: int) -> list[int]:
    """Every ``ssh`` process on this machine that forwards ``iport`` (``-R IPORT:…``),
    whoever started it: what a host would show in ``ps``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != b"ssh":
            continue
        pairs = zip(argv, argv[1:], strict=False)
        if any(a == b"-R" and b.startswith(f"{iport}:".encode()) for a, b in pairs):
            found.append(int(entry))
    return found


def wait_until(predicate, timeout: float = 15.0, every: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(every)


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def assert_host_safe(state: dict, name: str) -> None:
    host = state["hosts"][name]
    assert host["allow_clientless"] is False, f"{name}: window left open"
    assert all(close is not None for _, close in host["exposures"]), name
    assert host["online"], f"{name}: no client polling"
    assert host["tunnel_cuts"] == 0, f"{name}: the provider cut its tunnel"


def no_tunnel_left(sb: Sandbox, names: list[str]) -> bool:
    state = sb.state()["hosts"]
    return all(not state[n]["tunnel_pids"] and not ssh_r_processes(sb.iport(n)) for n in names)


# --- cold start: tunnels closed before the run ------------------------------------------


@pytest.mark.parametrize("sshd", SSHDS)
def test_cold_start_upgrades_every_host_and_leaves_no_tunnel(sandbox_factory, sshd):
    sb = sandbox_factory(hosts=3, sshd=sshd)
    names = sb.hosts
    assert no_tunnel_left(sb, names)  # as after `sandbox up`: command "0" everywhere
    before = {n: h["script_sha256"] for n, h in sb.state()["hosts"].items()}
    code, report, err = deployer(
        sb.inventory, "upgrade", "all", "--var", "release=2", "--parallel", "3"
    )
    assert code == 0, err[-2000:]
    assert {h["result"] for h in report["hosts"]} == {"upgraded"}
    state = sb.state()
    for host in report["hosts"]:
        name = host["host"]
        assert_host_safe(state, name)
        # the provider heard the NEW script: its sha256 rides on every poll
        assert state["hosts"][name]["script_sha256"] == host["new_sha256"] != before[name]
        assert state["hosts"][name]["api_calls"]["connect"] == 1
        assert state["hosts"][name]["api_calls"]["disconnect"] == 1
    # deployer connected, so it disconnected: no tunnel process is left anywhere
    assert wait_until(lambda: no_tunnel_left(sb, names)), sb.state()


# --- the tunnel belongs to the client, and the new client adopts it --------------------


def test_the_new_client_adopts_the_old_clients_tunnel(sandbox_factory):
    """deployer's session rides on the old client's tunnel process; a stop that
    signals only the client leaves it up, and the new client adopts it: one
    tunnel process for the host at every moment of the run, the same one."""
    sb = sandbox_factory(hosts=1)
    (name,) = sb.hosts
    first = sb.connect(name)
    assert len(first) == 1 and ssh_r_processes(sb.iport(name)) == first
    proc = cli(sb.inventory, "upgrade", name, "--var", "release=2", "--stable-for", "3")
    seen: list[list[int]] = []
    while proc.poll() is None:
        seen.append(sorted(ssh_r_processes(sb.iport(name))))
        time.sleep(0.05)
    code, report, err = finish(proc)
    assert code == 0, err[-2000:]
    assert report["hosts"][0]["result"] == "upgraded"
    # at most one tunnel process at any time, and until deployer's disconnect it is
    # the one the old client started: never a second, never a restart
    assert all(len(pids) <= 1 for pids in seen), seen
    assert {pid for pids in seen for pid in pids} == set(first)
    assert_host_safe(sb.state(), name)


# --- releases that never reach the provider -----------------------------------------------


@pytest.mark.parametrize("fail", ["silent", "crash"])
def test_a_release_that_never_polls_is_rolled_back_without_a_cut(sandbox_factory, fail):
    """The window stays open until the guard has restored the old client and it
    polls again: the provider never cuts the tunnel (tunnel_cuts 0)."""
    sb = sandbox_factory(hosts=2)
    old = {n: h["script_sha256"] for n, h in sb.state()["hosts"].items()}
    code, report, err = deployer(
        sb.inventory,
        "upgrade",
        "all",
        "--var",
        "release=2",
        "--var",
        f"sandbox_fail={fail}",
        "--online-timeout",
        "4",
    )
    assert code == 1, err[-2000:]
    assert {h["result"] for h in report["hosts"]} == {"rolled_back"}
    assert all(h["error"]["step"] == "first_life" for h in report["hosts"])
    state = sb.state()
    for name in sb.hosts:
        assert_host_safe(state, name)
        host = state["hosts"][name]
        assert host["script_sha256"] == old[name]  # the OLD client polls again
        assert host["last_poll_age"] < 2.0
        assert len(host["exposures"]) == 1  # one window, never closed in between
    assert wait_until(lambda: no_tunnel_left(sb, sb.hosts)), sb.state()


# --- a stop that kills the tunnel too (systemd's default KillMode) ----------------------

HOST_DIR = "{dir}/hosts/{{{{ host }}}}"
KILLING_SERVICE = (
    "[defaults.service]\n"
    'kind = "command"\n'
    f'start = "cd {HOST_DIR} && {{{{ setsid python3 {{{{{{{{ script_path | quote }}}}}}}} '
    '</dev/null >>client.out 2>&1 & echo $! > client.pid; }}"\n'
    f'stop = "kill $(cat {HOST_DIR}/client.pid); '
    "pkill -f -- '-R {{{{ ssh_port }}}}[:]localhost'; sleep 0.2\"\n"
    f'check = "kill -0 $(cat {HOST_DIR}/client.pid) 2>/dev/null"\n'
    "ready = {ready}\n"
)


def with_killing_stop(sb: Sandbox) -> Path:
    """The sandbox inventory with a stop that also ends the client's tunnel
    process, as systemd's KillMode=control-group ends every process of a unit."""
    text = sb.inventory.read_text()
    head, rest = text.split("[defaults.service]\n", 1)
    block, tail = rest.split("\n[", 1)
    ready = next(line for line in block.splitlines() if line.startswith("ready = "))
    service = KILLING_SERVICE.format(dir=sb.dir, ready=ready.split(" = ", 1)[1])
    return write_private(sb.dir / "killing.toml", head + service + "\n[" + tail)


@pytest.mark.parametrize("sshd", SSHDS)
def test_a_stop_that_kills_the_tunnel_still_upgrades(sandbox_factory, sshd):
    """deployer's session dies at the swap with the old tunnel; it reaches the
    host again through the tunnel the new client opens, and finishes."""
    sb = sandbox_factory(hosts=1, sshd=sshd)
    (name,) = sb.hosts
    inventory = with_killing_stop(sb)
    old_tunnel = sb.connect(name)
    proc = cli(inventory, "upgrade", name, "--var", "release=2", "--stable-for", "3")
    seen: list[list[int]] = []
    while proc.poll() is None:
        seen.append(sorted(ssh_r_processes(sb.iport(name))))
        time.sleep(0.05)
    code, report, err = finish(proc)
    assert code == 0, err[-3000:]
    assert report["hosts"][0]["result"] == "upgraded"
    assert "SSH session lost at the swap" in err
    # the old tunnel died at the stop, the new client opened exactly one
    pids = {pid for p in seen for pid in p}
    assert not set(old_tunnel) & {p for p in seen[-5:] for p in p}
    assert all(len(p) <= 1 for p in seen), seen
    assert len(pids - set(old_tunnel)) >= 1
    assert_host_safe(sb.state(), name)


# --- the real profile ----------------------------------------------------------------------


def test_one_upgrade_in_the_real_profile(sandbox_factory):
    """Polls every 5 s, offline after 30 s, 0.2 s API latency: the tunnel comes up
    seconds after connect, and the ready probe closes the window long before the
    30 s that client_status alone would need."""
    sb = sandbox_factory(hosts=1, profile="real")
    (name,) = sb.hosts
    code, report, err = deployer(sb.inventory, "upgrade", name, "--var", "release=2")
    assert code == 0, err[-2000:]
    host = report["hosts"][0]
    assert host["result"] == "upgraded"
    steps = {s["step"]: s["seconds"] for s in host["steps"]}
    assert host["exposure_seconds"] < 10.0  # not offline_detection (30 s)
    assert steps["soak"] >= 35.0
    state = sb.state()
    assert_host_safe(state, name)
    assert state["hosts"][name]["script_sha256"] == host["new_sha256"]
    (t_open, t_close) = state["hosts"][name]["exposures"][-1]
    assert t_close - t_open < 10.0
