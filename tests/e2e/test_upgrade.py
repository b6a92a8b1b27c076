"""``deployer upgrade HOST`` / ``deployer rollback HOST`` end to end, through
the CLI as a subprocess, against the sandbox (SPEC 4, 5, 7).

Every outcome is checked twice: in deployer's ``--json`` report and in the
simulator's independent ``/sandbox/state`` (which script runs, the window,
the tunnel, the exposure intervals, the API call counters).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from deployer.sandbox import processes
from tests.chaos.harness import ClientRun, client_runs
from tests.e2e.sandbox_checks import (
    assert_no_credentials,
    assert_window_shut,
    delta,
    installed_sha,
    rendered_sha,
    run_json,
    wait_running,
)
from tests.sandbox_fixture import Sandbox, requires_openssh, write_private
from tests.spec import SPEC_STEPS

pytestmark = pytest.mark.e2e

SSHD_KINDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("openssh", id="openssh", marks=[pytest.mark.openssh, requires_openssh]),
]


# --- helpers -------------------------------------------------------------------------


def upgrade(sb: Sandbox, host: str, *args: str) -> tuple[int, dict, str]:
    return run_json(sb, "upgrade", host, *args)


def clients_started_in(sb: Sandbox, host: str, sha: str, window: list) -> list[ClientRun]:
    """The clients of ``sha`` that started after the window opened, oldest first
    (from the host's client.log)."""
    return [
        r for r in client_runs(sb.dir, host) if sha.startswith(r.sha12) and r.started > window[0]
    ]


def assert_closed_after_first_poll(sb: Sandbox, host: str, sha: str, window: list) -> None:
    """First life on evidence (SPEC 4 step 9): the first client of ``sha`` started
    inside ``window``, and its first good poll (its own log) came before the window
    closed: the window never closed on the previous client's last polls."""
    started = clients_started_in(sb, host, sha, window)
    assert started, f"no client of {sha[:12]} started in {host}'s window {window}"
    first = started[0]
    assert first.first_good_poll is not None, f"the client of {sha[:12]} never polled: {first}"
    assert first.started <= first.first_good_poll < window[1], (window, first)


def assert_rolled_back(sb: Sandbox, host: str, code: int, report: dict, old_sha: str) -> None:
    assert (code, report["result"]) == (1, "rolled_back"), report
    assert report["error"] is not None and report["error"]["type"], report
    assert report["old_sha256"] == old_sha
    state = wait_running(sb, host, old_sha)
    assert_window_shut(state)
    pid = sb.client_pid(host)
    assert pid and processes.alive(pid)


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SSHD_KINDS)
def fleet(request, module_sandbox_factory) -> Sandbox:
    """One fleet per SSH server; each test below takes hosts of its own."""
    return module_sandbox_factory(hosts=3, sshd=request.param)


@pytest.fixture(scope="module")
def faults_fleet(module_sandbox_factory) -> Sandbox:
    """Embedded fleet for the rollback rehearsals: one host per failure kind.
    ``sandbox_fail`` is a var of the run, not a simulator fault, so they share."""
    return module_sandbox_factory(hosts=4)


# --- the happy path, with both SSH servers -------------------------------------------------


def test_upgrade_installs_the_new_script_with_one_short_window_and_a_rerun_is_unchanged(fleet):
    host = "sbx-01"
    before = fleet.host(host)
    old_sha = before["script_sha256"]
    new_sha = rendered_sha(fleet, host, "--var", "release=2")
    assert new_sha != old_sha

    code, report, err = upgrade(fleet, host, "--var", "release=2")

    assert code == 0, err
    assert report["result"] == "upgraded", report
    assert (report["old_sha256"], report["new_sha256"]) == (old_sha, new_sha)
    assert [s["step"] for s in report["steps"]] == list(SPEC_STEPS)
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["error"] is None
    assert report["exposure_seconds"] > 0
    after = wait_running(fleet, host, new_sha)
    assert_window_shut(after)
    assert installed_sha(fleet, host) == new_sha
    exposures = after["exposures"][len(before["exposures"]) :]
    assert len(exposures) == 1, after["exposures"]
    ((t_open, t_close),) = exposures
    assert t_close > t_open
    assert_closed_after_first_poll(fleet, host, new_sha, exposures[0])
    assert after["tunnel_cuts"] == before["tunnel_cuts"]
    made = delta(before["api_calls"], after["api_calls"])
    assert report["api_calls"] == sum(made.values()), (report["api_calls"], made)
    assert made["set_allow_clientless"] == 2 and made["connect"] == 1 == made["disconnect"]

    # the second run finds the same script: nothing to do, the window never opens
    code, again, err = upgrade(fleet, host, "--var", "release=2")

    assert code == 0, err
    assert again["result"] == "unchanged", again
    assert again["old_sha256"] == new_sha
    final = fleet.host(host)
    made = delta(after["api_calls"], final["api_calls"])
    assert made["set_allow_clientless"] == 0, made
    assert again["api_calls"] == sum(made.values()), (again["api_calls"], made)
    assert final["exposures"] == after["exposures"]
    assert final["script_sha256"] == new_sha
    assert_window_shut(final)


def test_rollback_after_an_upgrade_restores_the_previous_script(fleet):
    host = "sbx-02"
    original = fleet.host(host)["script_sha256"]
    code, report, err = upgrade(fleet, host, "--var", "release=2")
    assert (code, report["result"]) == (0, "upgraded"), err
    before = wait_running(fleet, host, report["new_sha256"])

    code, back, err = run_json(fleet, "rollback", host)

    assert code == 0, err
    assert back["result"] == "upgraded", back  # a rollback is an upgrade to the backup
    assert (back["old_sha256"], back["new_sha256"]) == (report["new_sha256"], original)
    state = wait_running(fleet, host, original)
    assert_window_shut(state)
    assert installed_sha(fleet, host) == original
    [window] = state["exposures"][len(before["exposures"]) :]
    assert_closed_after_first_poll(fleet, host, original, window)
    assert state["tunnel_cuts"] == before["tunnel_cuts"]


# --- rollbacks rehearsed with the sandbox client's failure modes ----------------------------


@pytest.mark.parametrize(
    ("host", "fail_args"),
    [
        pytest.param("sbx-01", ["--var", "sandbox_fail=crash"], id="crash"),
        pytest.param("sbx-02", ["--var", "sandbox_fail=silent", "--stable-for", "3"], id="silent"),
        pytest.param(
            "sbx-03",
            ["--var", "sandbox_fail=die-after", "--var", "sandbox_die_after=1"]
            + ["--stable-for", "3"],
            id="die-after",
        ),
    ],
)
def test_a_failing_new_client_is_rolled_back_to_the_old_one(faults_fleet, host, fail_args):
    sb = faults_fleet
    before = sb.host(host)
    old_sha = before["script_sha256"]

    code, report, err = upgrade(sb, host, "--var", "release=bad", *fail_args)

    assert_rolled_back(sb, host, code, report, old_sha)
    assert report["new_sha256"] != old_sha and installed_sha(sb, host) == old_sha
    assert "rollback" in [s["step"] for s in report["steps"]]
    if "sandbox_fail=die-after" in fail_args:
        return  # it polled, so its first life closed the window; then it died in the soak
    # A new client that never reaches the provider never has its tunnel cut: the
    # window stays open through the revert, until the restored old client polls.
    after = wait_running(sb, host, old_sha)
    [window] = after["exposures"][len(before["exposures"]) :]
    assert_closed_after_first_poll(sb, host, old_sha, window)
    assert after["tunnel_cuts"] == before["tunnel_cuts"], "the provider cut the tunnel"
    assert report["error"]["step"] == "first_life", report["error"]
    if "sandbox_fail=silent" in fail_args:  # no evidence until online_timeout, then the revert
        online_timeout = tomllib.loads(sb.inventory.read_text())["defaults"]["online_timeout"]
        assert window[1] - window[0] >= online_timeout, window


def test_a_revert_restarts_the_old_client_once_and_inside_the_window(faults_fleet):
    sb, host = faults_fleet, "sbx-01"
    before = sb.host(host)
    old_sha = before["script_sha256"]

    code, report, err = upgrade(
        sb, host, "--var", "release=bad-again", "--var", "sandbox_fail=crash"
    )

    assert_rolled_back(sb, host, code, report, old_sha)
    after = wait_running(sb, host, old_sha)
    [window] = after["exposures"][len(before["exposures"]) :]
    restarts = clients_started_in(sb, host, old_sha, window)
    assert [r.started < window[1] for r in restarts] == [True], (window, restarts)


def _last_step(journal: Path, host: str) -> tuple[str, str] | None:
    if not journal.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1)
        try:
            row = conn.execute(
                "SELECT step, phase FROM steps WHERE host = ? ORDER BY id DESC LIMIT 1", (host,)
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:  # created but not migrated yet
        return None
    return tuple(row) if row else None


def test_sigterm_during_the_soak_rolls_back_and_exits_130(faults_fleet):
    sb, host = faults_fleet, "sbx-04"
    old_sha = sb.host(host)["script_sha256"]
    new_sha = rendered_sha(sb, host, "--var", "release=term")
    journal = sb.inventory.parent / ".deployer" / "journal.sqlite3"
    argv = [sys.executable, "-m", "deployer", "-i", str(sb.inventory), "upgrade", host]
    argv += ["--json", "--var", "release=term", "--stable-for", "10"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while _last_step(journal, host) != ("soak", "begin"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the soak never began"
            time.sleep(0.05)
        # and the simulator agrees at once: first life was the new client's own poll
        # (not the old client's last one), so its sha256 is on record; the window closed
        state = sb.host(host)
        assert state["script_sha256"] == new_sha, "the soak began before the new client polled"
        assert state["exposures"][-1][1] is not None, state["exposures"]
        assert proc.poll() is None and _last_step(journal, host) == ("soak", "begin")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, err
    assert_no_credentials(sb, out + err)
    (report,) = json.loads(out)["hosts"]
    assert report["result"] == "rolled_back", report
    assert report["error"]["step"] == "soak", report["error"]
    state = wait_running(sb, host, old_sha)
    assert_window_shut(state)


# --- the provider misbehaves -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "bites"),
    [
        # ~25 calls: P(no 502 at all) = 0.8**25 < 0.4 %, so that is not asserted (a flake),
        # nor is P(5 in a row on one call) ~ 0.03 % per call avoidable at 20 %
        pytest.param({"fail_rate": 0.2}, lambda calls: True, id="502s"),
        # 3 hosts at once against 3 calls/s: the preflights alone make a burst of 22s
        pytest.param({"rate_limit": 3}, lambda calls: calls["by_code"].get("22", 0) > 0, id="22s"),
    ],
)
def test_api_faults_are_retried_and_the_fleet_still_upgrades(sandbox_factory, faults, bites):
    sb = sandbox_factory(hosts=3)
    sb.client.reset_counters()
    sb.set_faults(**faults)

    code, out, err = sb.run_cli("upgrade", "all", "--parallel", "3", "--json", "--var", "release=2")
    assert_no_credentials(sb, out + err)

    state = sb.state()
    assert bites(state["calls"]), state["calls"]
    assert code == 0, err
    report = json.loads(out)
    assert [h["result"] for h in report["hosts"]] == ["upgraded"] * 3, report
    for h in report["hosts"]:
        assert state["hosts"][h["host"]]["script_sha256"] in (h["new_sha256"], h["old_sha256"])
    sb.set_faults(fail_rate=0.0, rate_limit=50.0)
    for h in report["hosts"]:
        assert_window_shut(wait_running(sb, h["host"], h["new_sha256"]))


# --- refused before anything changes ---------------------------------------------------------


BAD_TEMPLATES = {
    "undefined": "print({{ undefined_name }})\n",
    "syntax": "print({{ release }\n",
}


@pytest.fixture(scope="module")
def quiet_fleet(module_sandbox_factory) -> Sandbox:
    return module_sandbox_factory(hosts=2)


@pytest.mark.parametrize(
    "case", ["undefined", "syntax", "missing-var", "missing-template"], ids=str
)
def test_a_template_error_exits_2_before_any_api_call(quiet_fleet, tmp_path, case):
    sb = quiet_fleet
    sb.client.reset_counters()
    args = ["upgrade", "sbx-01", "--json", "--var", "release=2"]
    if case in BAD_TEMPLATES:
        template = tmp_path / "bad.py.j2"
        template.write_text(BAD_TEMPLATES[case])
        args += ["--template", str(template)]
    elif case == "missing-template":
        args += ["--template", str(tmp_path / "nowhere.py.j2")]
    else:
        sb = without_poll_url(sb)

    code, out, err = sb.run_cli(*args)

    assert code == 2, (out, err)
    assert_no_credentials(sb, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if case == "undefined":
        assert "undefined_name" in err
    state = sb.state()
    assert state["calls"]["requests"] == 0, state["calls"]
    assert all(sum(h["api_calls"].values()) == 0 for h in state["hosts"].values())


def without_poll_url(sb: Sandbox) -> Sandbox:
    """The sandbox with an inventory that lacks the var ``poll_url`` its template needs
    (the client's one var without a default); beside the original, so the template
    path still resolves, and owner-only, as an inventory with credentials must be."""
    text = sb.inventory.read_text()
    broken = text.replace('poll_url = "', 'unused_url = "', 1)
    assert broken != text
    return Sandbox(sb.dir, write_private(sb.dir / "missing-var.toml", broken), sb.info, sb.client)


def test_a_missing_var_is_named_in_the_error(quiet_fleet):
    code, out, err = without_poll_url(quiet_fleet).run_cli("upgrade", "sbx-01", "--json")

    assert code == 2, err
    assert "poll_url" in err and "undefined" in err, err


def test_a_changed_host_key_is_refused_before_the_window_opens(quiet_fleet):
    sb, host = quiet_fleet, "sbx-02"
    port = sb.info.ssh_ports[host]
    known_hosts = sb.dir / "known_hosts"
    original = known_hosts.read_text()
    impostor, impostor_fingerprint = _impostor_key()
    name = f"[127.0.0.1]:{port}"
    lines = [f"{name} {impostor}" if ln.split()[0] == name else ln for ln in original.splitlines()]
    assert lines != original.splitlines()
    known_hosts.write_text("\n".join(lines) + "\n")
    before = sb.host(host)
    try:
        code, report, err = upgrade(sb, host, "--var", "release=2")
    finally:
        known_hosts.write_text(original)

    assert code == 1, err
    assert report["result"] == "failed", report
    assert report["error"]["step"] == "ssh" and report["error"]["type"] == "HostKeyError"
    message = report["error"]["message"]
    assert str(known_hosts) in message, message
    assert impostor_fingerprint in message, message
    after = sb.host(host)
    assert delta(before["api_calls"], after["api_calls"])["set_allow_clientless"] == 0
    assert after["exposures"] == before["exposures"]
    assert after["script_sha256"] == before["script_sha256"]
    assert after["allow_clientless"] is False
    # deployer connected but never held the host lock, so another run may ride on
    # this tunnel: it leaves it open and says how to close it (docs: stages, cleanup)
    assert "left the tunnel open" in err and f"api disconnect {host}" in err, err
    assert sb.call(host, "disconnect")["error_code"] == 0
    assert_window_shut(sb.client.wait_tunnel([host], open=False, timeout=10)[host])


def _impostor_key() -> tuple[str, str]:
    """A fresh ed25519 host key: (its known_hosts "type base64" part, its SHA256 fingerprint)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    kind, b64 = line.decode().split()[:2]
    digest = hashlib.sha256(base64.b64decode(b64)).digest()
    return f"{kind} {b64}", "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
