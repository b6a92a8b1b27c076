"""End to end: ``--wait-offline`` (issue 15) on the sandbox, with real clients
stopped and started by the sandbox (``deployer sandbox client``), as a fleet
that is never all online at once.

Every run is ``python -m deployer`` as a subprocess and is judged by the
simulator's own record (API calls per host, exposure windows with their wall
times, the sha256 each client reports) and by the ``--json``/``--junit``
reports. Timings are the fast profile's: a client is offline 1.5 s after its
last poll, and a parked host is trusted after two online looks 2 s apart.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from deployer.journal import Journal
from deployer.sandbox import fleet
from tests.sandbox_fixture import Sandbox

pytestmark = pytest.mark.e2e

STABLE_FOR = "1"
RUN_TIMEOUT = 120.0
EXIT_INTERRUPTED, EXIT_OFFLINE = 130, 4


def upgrade(release: str, *extra: str) -> list[str]:
    return ["upgrade", "all", "--var", f"release={release}", "--stable-for", STABLE_FOR, *extra]


def deployer(sb: Sandbox, *args: str) -> tuple[int, dict, str]:
    """Run the CLI with ``--json``: (exit code, report, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(sb.inventory), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        return proc.returncode, json.loads(proc.stdout), proc.stderr
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}")


def sandbox_cli(sb: Sandbox, *args: str) -> str:
    """``deployer sandbox … --dir DIR``; its stdout (it must succeed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "sandbox", *args, "--dir", str(sb.dir)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def stop_clients(sb: Sandbox, *names: str) -> None:
    for name in names:
        sandbox_cli(sb, "client", name, "stop")
    sb.client.wait_offline(names, timeout=10)


def by_host(report: dict) -> dict[str, dict]:
    return {h["host"]: h for h in report["hosts"]}


def started_at(sb: Sandbox, name: str) -> float:
    """When the runner last started ``name``'s client (epoch seconds)."""
    done = [e for e in sb.client.client_schedule()["done"] if e["host"] == name]
    starts = [e["done"] for e in done if e["action"] == "start"]
    assert starts, f"{name}: no scheduled start was done"
    return max(starts)


def assert_safe(state: dict, names) -> None:
    for name in names:
        host = state["hosts"][name]
        assert host["allow_clientless"] is False, f"{name}: window left open"
        assert all(close is not None for _, close in host["exposures"]), name
        assert host["tunnel_cuts"] == 0, f"{name}: its tunnel was cut"


def assert_untouched(state: dict, name: str) -> None:
    """Only looked at: no tunnel, no window, no SSH."""
    calls = state["hosts"][name]["api_calls"]
    assert calls["client_status"] >= 2, calls  # it was watched
    assert calls["connect"] == calls["set_allow_clientless"] == 0, calls
    assert state["hosts"][name]["exposures"] == []


# --- the tests ----------------------------------------------------------------------------


def test_hosts_that_come_back_are_upgraded_and_one_that_never_does_ends_offline(
    sandbox_factory, tmp_path
):
    sb = sandbox_factory(hosts=4)
    stop_clients(sb, "sbx-02", "sbx-03", "sbx-04")
    sb.client.reset_counters()
    sb.client.schedule_clients(
        [
            {"after": 2.0, "host": "sbx-02", "action": "start"},
            {"after": 4.0, "host": "sbx-03", "action": "start"},
        ]
    )
    junit = tmp_path / "junit.xml"
    started = time.time()
    code, report, stderr = deployer(
        sb, *upgrade("back", "--wait-offline", "12s", "--parallel", "4", "--junit", str(junit))
    )
    elapsed = time.time() - started
    state = sb.state()
    hosts = by_host(report)

    assert code == EXIT_OFFLINE, stderr[-3000:]
    assert {n: h["result"] for n, h in hosts.items()} == {
        "sbx-01": "upgraded",
        "sbx-02": "upgraded",
        "sbx-03": "upgraded",
        "sbx-04": "offline",
    }, stderr[-3000:]
    assert report["summary"]["offline"] == 1 and report["ok"] is False
    assert hosts["sbx-01"]["waiting_seconds"] == 0
    for name in ("sbx-02", "sbx-03"):
        host = hosts[name]
        assert host["steps"][0]["step"] == "wait" and host["steps"][0]["status"] == "ok"
        # upgraded only once its client had been back long enough to trust: the
        # window opened more than offline_detection (1.5 s) after the client started
        opened = state["hosts"][name]["exposures"][0][0]
        assert opened - started_at(sb, name) > 1.5, name
        assert state["hosts"][name]["script_sha256"] == host["new_sha256"]
    assert hosts["sbx-03"]["waiting_seconds"] > hosts["sbx-02"]["waiting_seconds"] >= 1.5
    offline = hosts["sbx-04"]
    assert offline["error"]["step"] == "wait" and offline["error"]["type"] == "ClientOffline"
    assert 11 <= offline["waiting_seconds"] <= 13
    assert offline["api_calls"] == sum(state["hosts"]["sbx-04"]["api_calls"].values())
    assert_untouched(state, "sbx-04")
    assert_safe(state, sb.hosts)
    assert elapsed < 40
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("skipped") == "1" and suite.get("failures") == "0"
    case = {c.get("name"): c for c in suite.iter("testcase")}["sbx-04"]
    assert case.find("skipped").get("message").startswith("offline: ")


def test_a_flapping_client_is_upgraded_only_once_it_stays_up(sandbox_factory):
    sb = sandbox_factory(hosts=2)
    stop_clients(sb, "sbx-02")
    # up for 0.3 s at a time: at most one poll, online for ~1.5 s, never trusted (2 s)
    out = sandbox_cli(sb, "client", "sbx-02", "flap", "--down", "2.5", "--up", "0.3",
                      "--cycles", "3", "--after", "0.5")  # fmt: skip
    assert "flapping 3x" in out
    code, report, stderr = deployer(
        sb, *upgrade("flap", "--wait-offline", "40s", "--parallel", "2")
    )
    state = sb.state()
    host = by_host(report)["sbx-02"]

    assert code == 0, stderr[-3000:]
    assert host["result"] == "upgraded"
    starts = [e for e in sb.client.client_schedule()["done"] if e["action"] == "start"]
    assert len(starts) == 3 and all(e.get("changed") for e in starts)
    assert state["hosts"]["sbx-02"]["polls"] > 0
    opened = state["hosts"]["sbx-02"]["exposures"][-1][0]
    assert opened > started_at(sb, "sbx-02") + 1.5  # not during a blip: after the last start
    assert len(state["hosts"]["sbx-02"]["exposures"]) == 1
    assert_safe(state, sb.hosts)


def test_ctrl_c_during_the_wait_ends_at_once_and_a_rerun_picks_the_wait_up(
    sandbox_factory, tmp_path
):
    sb = sandbox_factory(hosts=3)
    stop_clients(sb, "sbx-03")
    args = upgrade("cc", "--wait-offline", "90s", "--parallel", "3")
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployer", "-i", str(sb.inventory), *args, "--json"],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    try:
        wanted = ("sbx-01 upgraded", "sbx-02 upgraded", "sbx-03 offline: waiting for its client")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if all(w in log.read_text() for w in wanted):
                break
            time.sleep(0.1)
        assert all(w in log.read_text() for w in wanted), log.read_text()[-3000:]
        time.sleep(0.5)  # the watcher at work: nothing is in flight
        interrupted_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=RUN_TIMEOUT)
        took = time.monotonic() - interrupted_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = log.read_text()

    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert took < 3.0, f"the wait did not end at once ({took:.1f} s)"
    report = json.loads(stdout)
    hosts = by_host(report)
    assert [hosts[n]["result"] for n in ("sbx-01", "sbx-02")] == ["upgraded", "upgraded"]
    parked = hosts["sbx-03"]
    assert parked["result"] == "skipped" and parked["error"]["message"] == "interrupted"
    assert parked["waiting_seconds"] > 0
    state = sb.state()
    assert_untouched(state, "sbx-03")
    assert_safe(state, sb.hosts)
    assert report["summary"]["unsafe"] == 0
    first_run = report["run_id"]

    # the same targets again, without --wait-offline: the wait goes on, and the
    # client that comes back meanwhile is upgraded
    sb.client.schedule_clients([{"after": 2.0, "host": "sbx-03", "action": "start"}])
    code, again, stderr = deployer(sb, *upgrade("cc", "--parallel", "3"))
    assert code == 0, stderr[-3000:]
    assert f"picking up the wait of run {first_run}" in stderr
    assert {h["host"]: h["result"] for h in again["hosts"]} == {
        "sbx-01": "unchanged",
        "sbx-02": "unchanged",
        "sbx-03": "upgraded",
    }
    assert by_host(again)["sbx-03"]["waiting_seconds"] >= 1.5
    with Journal(sb.dir / ".deployer") as journal:
        old = journal.host_state(first_run, "sbx-03")
        assert old["picked_up_by"] == again["run_id"] and old["waiting"] is False
        assert journal.dangling() == []
    assert_safe(sb.state(), sb.hosts)


def test_sandbox_client_stop_leaves_the_tunnel_and_start_adopts_it(sandbox_factory):
    sb = sandbox_factory(hosts=2)
    tunnel = sb.connect("sbx-01")
    sb.call("sbx-01", "set_allow_clientless", allow="true")  # or the provider cuts it
    old = sb.client_pid("sbx-01")

    out = sandbox_cli(sb, "client", "sbx-01", "stop")
    assert f"client pid {old} stopped" in out
    sb.client.wait_offline(["sbx-01"], timeout=10)
    assert sb.tunnel_pids("sbx-01") == tunnel  # the tunnel process stayed
    out = sandbox_cli(sb, "client", "sbx-01", "stop")
    assert "client not running" in out

    out = sandbox_cli(sb, "client", "sbx-01", "start")
    new = sb.client_pid("sbx-01")
    assert new != old and f"client started, pid {new}" in out
    sb.client.wait_online(["sbx-01"], timeout=10)
    time.sleep(1.0)  # a few polls: still the same tunnel, adopted
    assert sb.tunnel_pids("sbx-01") == tunnel

    change = fleet.stop_client(sb.dir, "sbx-01", with_tunnel=True)
    assert change.pid == new and change.tunnel_pids == tunnel
    sb.client.wait_tunnel(["sbx-01"], open=False, timeout=10)
    fleet.start_client(sb.dir, "sbx-01")
    sb.call("sbx-01", "set_allow_clientless", allow="false")
    sb.call("sbx-01", "disconnect")
    sb.client.wait_online(["sbx-01"], timeout=10)
    assert Path(sb.host_dir("sbx-01") / "client.pid").read_text().strip() == str(
        sb.client_pid("sbx-01")
    )
