"""HostRun through the SPEC 4 stages, on this machine: LocalRemote + FakeApi +
a real HostPlan, the real guard running detached, real client processes.

The provider says "online" exactly while the pidfile's process is alive, so a
crashed client really reads offline.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from deployer import workflow
from deployer.clock import Clock
from deployer.errors import ClientBlocked, TooManyCalls
from deployer.guardlink import SOAK_MARGIN
from deployer.inventory import load_inventory
from deployer.plan import plan_host
from deployer.remote import sha256_hex
from deployer.result import Outcome
from deployer.workflow import COMMIT_MARGIN, HostRun, RunContext, UpgradeOptions
from tests.doubles import (
    FakeApi,
    ProcessReaper,
    Recorder,
    client_source,
    pid_alive,
    pidfile_alive,
    read_pid,
    short_stop_waits,
    wait_for,
)
from tests.local_site import Site
from tests.spec import SPEC_STEPS

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("guard_without_api")]

FORWARD_STEPS = list(SPEC_STEPS)


@pytest.fixture
def site(tmp_path):
    reaper = ProcessReaper(tmp_path)
    yield Site(tmp_path)
    reaper.kill_all()


def assert_window_closed(api: FakeApi) -> None:
    assert not api.window_open
    assert all(t_close is not None for _, t_close in api.exposures)


def test_upgrade_walks_the_stages_in_spec_order(site):
    old_pid = read_pid(site.pidfile)
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert site.steps(res) == FORWARD_STEPS
    assert all(s.status == "ok" for s in res.steps)
    assert res.error is None
    new = client_source("2")
    assert site.script.read_bytes() == new
    assert res.old_sha256 == sha256_hex(site.old) and res.new_sha256 == sha256_hex(new)
    # exactly one exposure window, closed, and it is what the report says
    assert len(site.api.exposures) == 1
    assert_window_closed(site.api)
    assert site.api.count("set_allow_clientless") == 2
    assert res.exposure_seconds > 0
    (t_open, t_close) = site.api.exposures[0]
    assert res.exposure_seconds <= (t_close - t_open) + 0.5
    # the new client runs, the old one is gone
    assert read_pid(site.pidfile) != old_pid and pidfile_alive(site.pidfile)
    # cleanup: lock released, run dir removed, backup of the old script kept
    assert not (site.base / "lock").exists()
    assert site.runs() == []
    assert [b.read_bytes() for b in site.backups()] == [site.old]
    assert site.api.count("connect") == 1 and site.api.count("disconnect") == 1
    assert not site.api.tunnel_open
    assert res.api_calls == len(site.api.calls)
    remote = site.factory.current
    assert remote.closed
    # issue 12: one round trip for lock + inspect, one that stages (the guard's
    # stream stays open on it); the swap's and commit's words go on the stream,
    # and so does the cleanup (the run dir and lock are gone, with no third task)
    tasks = [c.split()[-2] for c in remote.commands]
    assert tasks == ["inspect", "stage"], remote.commands
    assert [w for w in remote.words if w not in ("alive", "sync")] == ["go", "firstlife", "commit"]


def test_second_run_is_unchanged_without_touching_the_window(site):
    assert site.run(release="2").result is Outcome.UPGRADED
    pid = read_pid(site.pidfile)
    before = len(site.api.calls)
    res = site.run(release="2")
    assert res.result is Outcome.UNCHANGED
    assert res.old_sha256 == res.new_sha256
    calls = [c for c, _, _ in site.api.calls[before:]]
    assert "set_allow_clientless" not in calls
    assert read_pid(site.pidfile) == pid
    assert "stage" not in site.steps(res)
    assert not (site.base / "lock").exists()


def test_force_reinstalls_the_same_script(site):
    assert site.run(release="2").result is Outcome.UPGRADED
    res = site.run(UpgradeOptions(force=True), release="2")
    assert res.result is Outcome.UPGRADED
    assert len(site.api.exposures) == 2
    assert_window_closed(site.api)


def warnings(site) -> list[str]:
    return [m for m in site.events.messages if m.startswith("warning:")]


def test_inspect_warns_about_a_script_others_can_read_without_failing(site, open_umask):
    site.script.chmod(0o755)
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert res.installed_mode == "0755" and res.to_json()["installed_mode"] == "0755"
    [warning] = warnings(site)
    assert warning.startswith(
        f"warning: the installed script {site.script} is mode 0755: group and others can read it"
    )
    assert "an upgrade installs it as 0700" in warning
    # the new script gets the default mode, and the old one's backup is owner-only too
    assert stat.S_IMODE(site.script.stat().st_mode) == 0o700
    [backup] = site.backups()
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700


def test_an_owner_only_script_gives_no_warning(site):
    site.script.chmod(0o700)
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED and res.installed_mode == "0700"
    assert warnings(site) == []


def test_an_unchanged_script_others_can_read_is_reported_with_the_fix(site):
    assert site.run(release="2").result is Outcome.UPGRADED
    site.script.chmod(0o644)
    site.events.messages.clear()
    res = site.run(release="2")
    assert res.result is Outcome.UNCHANGED and res.installed_mode == "0644"
    [warning] = warnings(site)
    assert "mode 0644: group and others can read it" in warning and "--force" in warning
    assert stat.S_IMODE(site.script.stat().st_mode) == 0o644  # reported, not changed


def test_dry_run_reports_the_mode_and_touches_nothing(site):
    site.script.chmod(0o640)
    res = site.run(UpgradeOptions(dry_run=True), release="2")
    assert res.result is Outcome.PLANNED and res.installed_mode == "0640"
    [warning] = warnings(site)
    assert "mode 0640: group can read it" in warning
    assert stat.S_IMODE(site.script.stat().st_mode) == 0o640


def test_keep_backups_prunes_the_oldest(tmp_path):
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, keep=2)
        backups = site.base / "backups"
        backups.mkdir(parents=True)
        for stamp in ("20200101T000000Z", "20210101T000000Z", "20220101T000000Z"):
            (backups / f"client.py.{stamp}.aaaaaaaa").write_text(stamp)
        res = site.run(release="2")
        assert res.result is Outcome.UPGRADED
        names = [b.name for b in site.backups()]
        assert len(names) == 2
        assert names[0] == "client.py.20220101T000000Z.aaaaaaaa"
        assert site.backups()[1].read_bytes() == site.old
    finally:
        reaper.kill_all()


def test_new_client_crash_rolls_back(site):
    res = site.run(release="2", fail="crash")
    assert res.result is Outcome.ROLLED_BACK
    assert site.script.read_bytes() == site.old
    assert sha256_hex(site.script.read_bytes()) == res.old_sha256
    assert pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    assert res.error is not None
    assert "rollback" in site.steps(res)
    assert site.steps(res)[-1] == "cleanup"
    assert not (site.base / "lock").exists()
    assert site.runs() == []


def test_new_client_dying_in_the_soak_rolls_back(site):
    res = site.run(release="2", fail="die-after", die_after="0.3")
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert site.script.read_bytes() == site.old
    assert pidfile_alive(site.pidfile)
    assert_window_closed(site.api)


def test_validate_failure_fails_before_anything_changed(tmp_path):
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, validate="false {{ path | quote }}")
        pid = read_pid(site.pidfile)
        res = site.run(release="2")
        assert res.result is Outcome.FAILED
        assert res.error.type == "VerifyError" and res.error.step == "stage"
        assert "validate" in res.error.message
        assert site.script.read_bytes() == site.old
        assert read_pid(site.pidfile) == pid and pidfile_alive(site.pidfile)
        assert site.api.count("set_allow_clientless") == 0
        assert site.api.exposures == []
        assert site.backups() == []
        assert site.runs() == []
        assert not (site.base / "lock").exists()
        assert not site.api.tunnel_open
    finally:
        reaper.kill_all()


def test_preflight_offline_fails_without_a_tunnel(site):
    site.api.online = lambda: False
    res = site.run(release="2")
    assert res.result is Outcome.FAILED
    assert res.error.type == "ClientOffline" and res.error.step == "preflight"
    assert site.api.count("connect") == 0
    assert site.factory.made == []


def test_open_window_error_closes_the_window_again(site):
    site.api.inject("set_allow_clientless", lambda: ClientBlocked("blocked", call="x"), allow=True)
    pid = read_pid(site.pidfile)
    res = site.run(release="2")
    assert res.result is Outcome.FAILED
    assert res.error.type == "ClientBlocked" and res.error.api_error_code == 23
    assert res.error.step == "open_window"
    assert ("set_allow_clientless", "pi-01", False) in site.api.calls
    assert_window_closed(site.api)
    assert site.script.read_bytes() == site.old
    assert read_pid(site.pidfile) == pid
    # the guard was armed at the end of staging: it never got its go, it was disarmed
    remote = site.factory.current
    assert remote.ran(" stage ") and remote.said("revert")
    assert not remote.said("go")
    assert site.runs() == []
    assert not (site.base / "lock").exists()


def test_window_that_cannot_be_closed_is_unsafe(site):
    site.api.inject("set_allow_clientless", lambda: TooManyCalls("slow down", call="x"), allow=True)
    site.api.inject(
        "set_allow_clientless", lambda: ClientBlocked("blocked", call="x"), allow=False, times=99
    )
    res = site.run(release="2")
    assert res.result is Outcome.UNSAFE


def test_abort_during_the_soak_rolls_back_as_interrupted(site):
    site.events.hooks["soak"] = site.abort.set
    res = site.run(release="2")
    assert res.result is Outcome.ROLLED_BACK
    assert res.error.type == "Interrupted"
    assert site.script.read_bytes() == site.old
    assert pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    assert site.runs() == []
    assert not (site.base / "lock").exists()


def test_lost_ssh_during_the_soak_reattaches_and_rolls_back(site):
    def lose_session():
        site.factory.current.lost = True

    site.events.hooks["soak"] = lose_session
    res = site.run(release="2")
    assert len(site.factory.made) == 2  # a new session after the loss
    assert site.api.count("connect") == 2
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert res.error.type == "SshSessionLost"
    assert site.script.read_bytes() == site.old
    assert pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    assert not (site.base / "lock").exists()
    assert not site.api.tunnel_open


def test_lock_held_by_another_run_fails_and_keeps_that_lock(site):
    lock = site.base / "lock"
    lock.mkdir(parents=True)
    (lock / "owner").write_text('{"owner": "alice@ci pid 7", "run_id": "other", "since": 0}')
    res = site.run(release="2")
    assert res.result is Outcome.FAILED
    assert res.error.type == "LockHeld"
    assert "alice@ci pid 7" in res.error.message and "--break-lock" in res.error.message
    assert (lock / "owner").exists()
    assert site.api.exposures == []


def test_break_lock_takes_over_a_stale_lock(site):
    lock = site.base / "lock"
    lock.mkdir(parents=True)
    (lock / "owner").write_text('{"owner": "gone", "run_id": "other", "since": 0}')
    res = site.run(UpgradeOptions(break_lock=True), release="2")
    assert res.result is Outcome.UPGRADED
    assert not lock.exists()


def test_dry_run_plans_with_a_diff_and_touches_nothing(site):
    pid = read_pid(site.pidfile)
    res = site.run(UpgradeOptions(dry_run=True), release="2")
    assert res.result is Outcome.PLANNED
    assert "-# test client, release 0" in res.diff
    assert "+# test client, release 2" in res.diff
    assert "lock" not in site.steps(res) and "stage" not in site.steps(res)
    assert site.api.count("set_allow_clientless") == 0
    assert site.script.read_bytes() == site.old
    assert read_pid(site.pidfile) == pid
    assert not (site.base / "lock").exists()
    assert site.backups() == [] and site.runs() == []
    assert not any("mkdir" in c for c in site.factory.current.commands)


def test_rollback_command_restores_the_newest_differing_backup(site):
    assert site.run(release="2").result is Outcome.UPGRADED
    assert site.run(release="3").result is Outcome.UPGRADED
    # backups now: release 0, release 2 (installed: release 3)
    res = site.run(UpgradeOptions(command="rollback"))
    assert res.result is Outcome.UPGRADED, res.error
    assert site.script.read_bytes() == client_source("2")
    assert res.new_sha256 == sha256_hex(client_source("2"))
    assert res.old_sha256 == sha256_hex(client_source("3"))
    assert pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    # a second rollback goes back to what the first one replaced
    res = site.run(UpgradeOptions(command="rollback"))
    assert site.script.read_bytes() == client_source("3")


def test_rollback_without_a_differing_backup_fails(site):
    res = site.run(UpgradeOptions(command="rollback"))
    assert res.result is Outcome.FAILED
    assert res.error.type == "VerifyError" and res.error.step == "inspect"
    assert site.api.exposures == []


HOSTILE_DIRS = [
    'q\'"$(touch$IFS"pwned")`x`;|&<>*?',
    "ünï✓",
    "my opt",  # sha256sum output once split on the space (fixed in ad14e57)
    "$(touch pwned) 'q'",
    "ünï ✓",
    "back\\slash",  # sha256sum escapes such names in its output (fixed in ad14e57)
]


@pytest.mark.parametrize("where", HOSTILE_DIRS)
def test_hostile_script_directories_upgrade(tmp_path, where):
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, where=where)
        res = site.run(release="2")
        assert res.result is Outcome.UPGRADED, res.error
        assert site.script.read_bytes() == client_source("2")
        assert pidfile_alive(site.pidfile)
        assert not list(tmp_path.rglob("pwned")) and not list(Path.cwd().glob("pwned"))
    finally:
        reaper.kill_all()


def guard_pid(site) -> int:
    status = site.runs()[0] / "status"
    return json.loads(status.read_text().splitlines()[0])["pid"]


def test_abort_after_the_window_opened_disarms_the_guard(site):
    pid = read_pid(site.pidfile)
    site.events.hooks["open_window"] = site.abort.set  # Ctrl-C while the window opens
    res = site.run(release="2")
    assert res.result is Outcome.FAILED
    assert res.error.type == "Interrupted"
    assert len(site.api.exposures) == 1
    assert_window_closed(site.api)
    remote = site.factory.current
    assert remote.said("revert") and not remote.said("go")
    assert site.script.read_bytes() == site.old and read_pid(site.pidfile) == pid
    assert site.runs() == [] and not (site.base / "lock").exists()


def test_lost_ssh_during_first_life_is_regained_and_the_upgrade_finishes(site):
    """The old client's stop may end the tunnel deployer's session rides on
    (systemd's default KillMode): deployer reaches the host again through the new
    client's tunnel, without another connect, and finishes (SPEC 1b)."""

    def lose_session():
        site.factory.current.lost = True

    site.events.hooks["first_life"] = lose_session
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert len(site.factory.made) == 2
    assert site.api.count("connect") == 1
    assert site.script.read_bytes() == client_source("2")
    assert pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    assert not (site.base / "lock").exists()
    assert any("SSH session lost at the swap" in m for m in site.events.messages)


def test_a_session_lost_at_go_is_regained(site):
    """The stop may end the session before `touch go` even returns its status."""
    site.factory.lose_first_after = lambda word: word == "go"
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert len(site.factory.made) == 2


def test_a_session_lost_after_the_window_closed_rolls_back(site):
    """With the window closed, a lost session means the new client's tunnel was cut."""
    site.factory.lose_first_after = lambda word: word == "firstlife"
    res = site.run(release="2")
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert site.script.read_bytes() == site.old
    assert_window_closed(site.api)


def test_a_tunnel_that_comes_up_late_is_waited_for(site):
    """connect takes effect at the client's next poll: refused at first, then up."""
    site.factory.refuse = 3
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert len(site.factory.made) == 1


def test_api_waits_inside_the_window_are_spent_heard_by_the_guard(site):
    """Closing the window and the soak's last look are retried hard (through an
    outage): their back-offs read the guard's stream, so the guard never takes a
    deployer that waits on the provider for one that is gone (and cuts its tunnel)."""
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    hooks = {(call, allow): idle for call, allow, idle in site.api.idles if idle is not None}
    assert set(hooks) == {("set_allow_clientless", False), ("client_status", None)}
    assert all(getattr(idle, "__name__", "") == "idle_heard" for idle in hooks.values())


def test_a_late_tunnel_is_tried_again_at_least_twice_a_second(site, monkeypatch):
    """A refusal costs one connect() (no SSH set-up): once the tunnel is up, the next
    try comes within 0.5 s, not up to 2 s later (the mean wait of a real fleet's
    ``ssh`` step)."""
    waits: list[float] = []
    real_sleep = Clock.sleep

    def sleep(self, seconds, cancel=None):
        if site.factory.refuse > 0:  # still refusing: a wait of the tunnel's retry
            waits.append(seconds)
        return real_sleep(self, seconds, cancel)

    monkeypatch.setattr(Clock, "sleep", sleep)
    site.factory.refuse = 8
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert len(waits) >= 7 and max(waits) <= 0.5, waits


def test_a_tunnel_that_never_comes_up_fails_before_anything_is_touched(site):
    site.factory.refuse = 10_000
    with_timeout = site.root / "deployer.toml"
    with_timeout.write_text(
        with_timeout.read_text().replace(
            "offline_detection = 0.3", "offline_detection = 0.3\ntunnel_timeout = 1.0"
        )
    )
    res = site.run(release="2")
    assert res.result is Outcome.FAILED
    assert res.error.type == "TunnelNotUp"
    assert "tunnel_timeout (1s)" in res.error.message
    assert site.api.count("set_allow_clientless") == 0
    assert site.script.read_bytes() == site.old
    # we connected but never held the host lock: another run may be using the
    # tunnel (its connect came first), so it is left open and the user told
    assert site.api.count("disconnect") == 0
    assert any("left the tunnel open" in m for m in site.events.messages)


def kill_guard_and_reuse_its_pid(site, new_pid: int) -> None:
    """The run's guard dies (a reboot, an OOM kill) and its pid now names ``new_pid``.

    (Rewriting the status pids keeps this deterministic: a SIGKILLed guard may
    linger as a zombie here, since this machine's init does not always reap.)"""
    pid = guard_pid(site)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid))
    status = site.runs()[0] / "status"
    status.write_text(status.read_text().replace(f'"pid": {pid}', f'"pid": {new_pid}'))


def test_a_guard_gone_in_the_soak_is_replaced_by_a_reverting_one(site, monkeypatch):
    monkeypatch.setattr(workflow, "COMMIT_WAIT", 1.0)
    dead = subprocess.Popen(["true"])
    dead.wait()
    site.events.hooks["soak"] = lambda: kill_guard_and_reuse_its_pid(site, dead.pid)
    res = site.run(release="2")
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert res.error.type == "GuardError"
    assert site.factory.current.ran("guard.py --detach --revert")
    assert site.script.read_bytes() == site.old
    assert pidfile_alive(site.pidfile)
    assert_window_closed(site.api)


def test_a_guard_whose_pid_was_reused_is_replaced_too(site, monkeypatch, tmp_path):
    monkeypatch.setattr(workflow, "COMMIT_WAIT", 1.0)
    monkeypatch.setattr(workflow, "REVERT_WAIT", 3.0)
    other = subprocess.Popen(["sleep", "30"], cwd=tmp_path)  # reaped by the fixture
    try:
        site.events.hooks["soak"] = lambda: kill_guard_and_reuse_its_pid(site, other.pid)
        res = site.run(release="2")
    finally:
        other.kill()
        other.wait()
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert site.script.read_bytes() == site.old


def test_validate_runs_on_the_staged_new_script(tmp_path):
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, validate="grep -q 'release 2' {{ path | quote }}")
        assert site.run(release="2").result is Outcome.UPGRADED
        assert site.run(release="3").result is Outcome.FAILED  # the staged file says 3
        assert site.script.read_bytes() == client_source("2")
    finally:
        reaper.kill_all()


def test_failing_health_command_in_the_soak_rolls_back(tmp_path):
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, health="grep -q 'release 0' {{ script_path | quote }}")
        res = site.run(release="2")
        assert res.result is Outcome.ROLLED_BACK
        assert res.error.type == "VerifyError" and res.error.step == "soak"
        assert "health" in res.error.message
        assert site.script.read_bytes() == site.old
        assert pidfile_alive(site.pidfile)
        assert_window_closed(site.api)
    finally:
        reaper.kill_all()


def test_a_guard_whose_status_file_is_gone_is_replaced_by_a_reverting_one(site, monkeypatch):
    # e.g. a host that lost its tmpfs-backed run files: the new script is installed but
    # no guard status is left to read; deployer must start a reverting guard itself
    monkeypatch.setattr(workflow, "COMMIT_WAIT", 1.0)

    def vanish():
        pid = guard_pid(site)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid))
        (site.runs()[0] / "status").write_text("")

    site.events.hooks["soak"] = vanish
    res = site.run(release="2")
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert site.factory.current.ran("guard.py --detach --revert")
    assert site.script.read_bytes() == site.old
    assert_window_closed(site.api)


# --- first life needs evidence from the NEW client (SPEC 4 step 9) ------------------------

READY = 'test -n "$(find {{ poll_file | quote }} -newer "$DEPLOYER_SWAP_MARK")"'


def test_without_a_probe_the_window_outlasts_the_offline_detection(site):
    """client_status still reports the old client's last poll: "online" proves
    nothing about the new client until offline_detection has passed."""
    path = site.root / "deployer.toml"
    path.write_text(path.read_text().replace("offline_detection = 0.3", "offline_detection = 1.5"))
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    t_open, t_close = site.api.exposures[0]
    assert t_close - t_open >= 1.5


def test_the_soaks_last_client_status_may_wait_out_an_api_outage_while_the_guard_waits(site):
    """The chaos campaign: an API outage at the end of the soak ended runs ``unsafe``
    after the default 5 tries (about 8 s) while the guard would have waited for the
    commit 20 s more. The last look now has what is left of the guard's soak
    deadline, less the commit's round trip."""
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    provider = load_inventory(site.root / "deployer.toml").provider
    stable_for = 0.5  # the site's
    left = stable_for + SOAK_MARGIN + 2 * provider.timeout - COMMIT_MARGIN - stable_for
    budget = site.api.status_within[-1]
    assert budget is not None and left - 3.0 < budget <= left, (budget, left)


def test_a_ready_probe_closes_the_window_as_soon_as_the_new_client_polled(tmp_path):
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, ready=READY)
        path = site.root / "deployer.toml"
        path.write_text(
            path.read_text().replace("offline_detection = 0.3", "offline_detection = 30")
        )
        poll = str(site.script) + ".poll"
        res = site.run(release="2", poll_file=poll)
        assert res.result is Outcome.UPGRADED, res.error
        t_open, t_close = site.api.exposures[0]
        assert t_close - t_open < 10  # not the 30 s of the offline detection
        assert site.api.count("client_status") == 2  # preflight and the soak's end only
    finally:
        reaper.kill_all()


def test_a_release_that_never_polls_is_rolled_back_with_the_window_open_until_then(tmp_path):
    """A silent release: the probe never passes; the window stays open until the
    guard has restored the old client (its tunnel is never cut)."""
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, ready=READY)
        poll = str(site.script) + ".poll"
        res = site.run(release="2", poll_file=poll, fail="silent")
        assert res.result is Outcome.ROLLED_BACK
        assert res.error.step == "first_life"
        assert site.script.read_bytes() == site.old
        # one window, never closed in between (a close would let the provider cut
        # the tunnel of a client that has not polled), open through the first life
        [(t_open, t_close)] = site.api.exposures
        assert t_close - t_open >= 3.0  # online_timeout
        assert_window_closed(site.api)
    finally:
        reaper.kill_all()


# --- systemd's KillMode (SPEC 1b: the stop must not end the client's tunnel) ------------


class _ShowRemote:
    """A remote whose `systemctl show` answers with a given KillMode."""

    def __init__(self, mode: str, ok: bool = True):
        self.name, self.mode, self.ok, self.commands = "pi-01", mode, ok, []

    def run(self, command, **kwargs):
        from deployer.remote import CommandResult

        self.commands.append(command)
        return CommandResult(command, 0 if self.ok else 1, self.mode + "\n", "")


@pytest.mark.parametrize(
    ("mode", "warned"), [("control-group", True), ("mixed", True), ("process", False)]
)
def test_a_unit_whose_stop_kills_the_tunnel_is_warned_about(site, mode, warned):
    from dataclasses import replace

    from deployer.model import ServiceConfig

    inventory = site.inventory()
    host = replace(inventory.hosts["pi-01"], service=ServiceConfig(kind="systemd", unit="my unit"))
    plan = plan_host(inventory, host, "R1")
    ctx = RunContext("R1", inventory, site.api, site.factory, events=site.events)
    run = HostRun(ctx, plan)
    run.remote = _ShowRemote(mode)
    run._warn_kill_mode()
    assert run.remote.commands == ["systemctl show -p KillMode --value 'my unit'"]
    assert any(f"KillMode={mode}" in m for m in site.events.messages) is warned


def test_no_kill_mode_check_for_other_service_kinds(site):
    inventory = site.inventory()
    plan = plan_host(inventory, inventory.hosts["pi-01"], "R1")
    run = HostRun(RunContext("R1", inventory, site.api, site.factory, events=site.events), plan)
    run.remote = _ShowRemote("control-group")
    run._warn_kill_mode()
    assert run.remote.commands == [] and site.events.messages == []


# --- issue 11: the opening call's budget, a commit racing a revert, an aborted swap ------


def test_opening_the_window_must_be_over_before_the_armed_guard_gives_up(site):
    """A 22 storm may keep set_allow_clientless(true) waiting; landing after the
    armed guard gave up would open a window nothing on the host closes."""
    from deployer.plan import go_deadline
    from deployer.workflow import OPEN_MARGIN

    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    opening = site.api.within[0]
    assert opening is not None
    assert 0 < opening <= go_deadline(site.plan) - OPEN_MARGIN
    assert site.api.within[1:] == [None]  # closing is never cut short


def slow_guard(monkeypatch, poll: float):
    """Render guards that look at their control files only every ``poll`` seconds."""
    real = workflow.render_guard

    def render(config):
        source = real(config)
        assert b"POLL = 0.1" in source
        return source.replace(b"POLL = 0.1", f"POLL = {poll}".encode(), 1)

    monkeypatch.setattr(workflow, "render_guard", render)


def test_a_commit_that_races_a_revert_request_ends_upgraded(site, monkeypatch):
    """The session dies right after `touch commit`; deployer reaches the host again
    before the guard has looked: the guard will take the commit first, so asking
    it to revert (and opening a second window for that) must not happen."""
    slow_guard(monkeypatch, 1.0)
    site.factory.lose_first_after = lambda word: word == "commit"
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert site.script.read_bytes() == client_source("2")
    assert len(site.api.exposures) == 1  # no second window
    assert_window_closed(site.api)
    assert not site.factory.current.said("revert")


def with_service(site: Site, block: str) -> None:
    path = site.root / "deployer.toml"
    text = path.read_text()
    head, rest = text.split("[defaults.service]\n", 1)
    path.write_text(head + "[defaults.service]\n" + block + "\n[" + rest.split("\n[", 1)[1])


def test_an_aborted_swap_is_failed_only_once_the_old_client_is_seen_online(site, monkeypatch):
    """The guard gave up (the old client would not stop: nothing changed). Before,
    deployer said `failed` without looking; a host whose client is gone by then
    must be `unsafe`, never a quiet `failed`."""
    with_service(site, 'kind = "command"\nstart = "true"\nstop = "true"\ncheck = "true"\n')
    real = workflow.render_guard
    monkeypatch.setattr(workflow, "render_guard", lambda c: short_stop_waits(0.3, 0.5)(real(c)))
    online = {"now": True}
    site.api.online = lambda: online["now"]
    site.events.hooks["first_life"] = lambda: online.update(now=False)  # the client is gone
    res = site.run(release="2")
    assert res.result is Outcome.UNSAFE, res.error
    assert site.script.read_bytes() == site.old
    assert_window_closed(site.api)


def test_an_aborted_swap_with_the_old_client_online_is_failed(site, monkeypatch):
    with_service(site, 'kind = "command"\nstart = "true"\nstop = "true"\ncheck = "true"\n')
    real = workflow.render_guard
    monkeypatch.setattr(workflow, "render_guard", lambda c: short_stop_waits(0.3, 0.5)(real(c)))
    site.api.online = lambda: True
    res = site.run(release="2")
    assert res.result is Outcome.FAILED, res.error
    assert "did not stop" in res.error.message
    assert site.script.read_bytes() == site.old
    assert_window_closed(site.api)


# --- issue 11: the journal fails while the run unwinds -----------------------------------


class BrokenJournal:
    """A journal that stops writing (disk full, read-only state dir) once broken."""

    def __init__(self) -> None:
        self.broken = False
        self.facts: list[dict] = []

    def update_host(self, run_id: str, host: str, **facts) -> None:
        from deployer.errors import JournalError

        if self.broken:
            raise JournalError("database or disk is full")
        self.facts.append(facts)


class BrokenSink(Recorder):
    """A live view that crashes on every event once broken."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def step_started(self, host, step, facts=None) -> None:
        super().step_started(host, step, facts)
        if self.broken:
            raise OSError("display gone")

    def message(self, host, text) -> None:
        super().message(host, text)
        if self.broken:
            raise OSError("display gone")


def test_a_journal_that_fails_after_the_swap_does_not_stop_the_rollback(site):
    """The new client crashes; the journal is full by then: the guard must still be
    told to revert, the window closed and the lock released, and the host reported."""
    site.journal = BrokenJournal()
    site.events.hooks["first_life"] = lambda: setattr(site.journal, "broken", True)
    res = site.run(release="2", fail="crash")
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert site.script.read_bytes() == site.old and pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    assert not (site.base / "lock").exists()
    assert any("journal could not record" in m for m in site.events.messages)


def test_a_journal_that_fails_before_the_swap_leaves_nothing_changed(site):
    site.journal = BrokenJournal()
    site.events.hooks["swap"] = lambda: setattr(site.journal, "broken", True)
    res = site.run(release="2")
    assert res.result is Outcome.FAILED
    assert res.error.type == "JournalError"
    assert site.script.read_bytes() == site.old and pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    assert not (site.base / "lock").exists()


def test_a_live_view_that_crashes_during_the_rollback_does_not_stop_it(site):
    sink = BrokenSink()
    site.events = sink
    sink.hooks["first_life"] = lambda: setattr(sink, "broken", True)
    res = site.run(release="2", fail="crash")
    assert res.result is Outcome.ROLLED_BACK, res.error
    assert site.script.read_bytes() == site.old and pidfile_alive(site.pidfile)
    assert_window_closed(site.api)
    assert not (site.base / "lock").exists()


def test_the_opening_budget_leaves_room_for_a_request_with_small_timings(site):
    """The sandbox's sizes: a 20 s guard deadline (so a 20 s go deadline) and 5 s
    API timeouts. The budget must still hold a whole request, or no window opens."""
    path = site.root / "deployer.toml"
    text = path.read_text().replace(
        "offline_detection = 0.3", "offline_detection = 0.3\ntimeout = 5.0"
    )
    path.write_text(
        text.replace("online_timeout = 3\n", "online_timeout = 3\nguard_deadline = 20\n")
    )
    res = site.run(release="2")
    assert res.result is Outcome.UPGRADED, res.error
    assert site.api.within[0] > 5.0 + 5.0  # room for the limiter and one full request


def test_a_failing_validate_never_shows_part_of_a_credential(tmp_path):
    """The output is cut to its last 300 characters: cut before masking, a
    credential straddling the cut would show its tail (issue 11, item 5)."""
    validate = "printf '%s' {{ dbid | quote }}; printf 'x%.0s' $(seq 290); exit 1"
    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path, validate=validate)
        res = site.run(release="2")
        assert res.result is Outcome.FAILED
        assert "validate command failed" in res.error.message
        # masked whole ("…" and the last 4 characters, as everywhere), then cut
        for fragment in ("CRET", "T-2222", "DBID-"):
            assert fragment not in res.error.message, res.error.message
        assert "…2222" + "x" * 100 in res.error.message
    finally:
        reaper.kill_all()
