"""The on-host guard, run for real as a detached local process (SPEC 4, the guard).

Each test renders the guard with a config pointing into tmp_path, starts it
with ``python guard.py --detach`` and follows its status file. The guard's own
provider calls are off (``api: None``); the e2e tests cover them.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from deployer import guard
from deployer.guardlink import render_guard
from tests.doubles import (
    PYTHON,
    FakeApi,
    ProcessReaper,
    ProviderServer,
    client_source,
    pid_alive,
    pidfile_alive,
    read_pid,
    run_command,
    short_stop_waits,
    start_client,
    wait_for,
)

pytestmark = pytest.mark.unit

OLD = client_source("old")
NEW = client_source("new")


@pytest.fixture
def reaper(tmp_path):
    reaper = ProcessReaper(tmp_path)
    yield reaper
    reaper.kill_all()


class Host:
    """A host's files under one directory, the old client running."""

    def __init__(self, root: Path, script_name: str = "client.py"):
        self.root = root
        self.script = root / script_name
        self.pidfile = root / "client.pid"
        self.run_dir = root / ".deployer" / "runs" / "R1"
        self.run_dir.mkdir(parents=True)
        self.staged = self.run_dir / "new-script"
        self.backup = root / ".deployer" / "backups" / "client.py.bak"
        self.status_path = self.run_dir / "status"

    def install_old(self, data: bytes = OLD) -> int:
        self.script.write_bytes(data)
        return start_client(self.script, self.pidfile, self.root / "old.log")

    def config(self, **over) -> dict:
        cfg = {
            "run_dir": str(self.run_dir),
            "script_path": str(self.script),
            "staged_path": str(self.staged),
            "backup_path": str(self.backup),
            "service": {
                "kind": "pidfile",
                "pidfile": str(self.pidfile),
                "run": run_command(self.script),
                "log": str(self.root / "client.log"),
            },
            "deadline": 30.0,
            "soak_deadline": 10.0,
            "go_deadline": 30.0,
            "api": None,
        }
        cfg.update(over)
        return cfg

    def start_guard(self, new: bytes = NEW, go: bool = True, tweak=None, **over) -> int:
        """Start the guard armed; with ``go`` also tell it to swap (as deployer's
        swap step does)."""
        self.staged.write_bytes(new)
        guard = self.run_dir / "guard.py"
        source = render_guard(self.config(**over))
        guard.write_bytes(tweak(source) if tweak else source)
        out = subprocess.run(
            [PYTHON, "guard.py", "--detach"],
            cwd=self.run_dir,
            capture_output=True,
            check=True,
            timeout=10,
        )
        if go:
            self.touch("go")
        return int(out.stdout.decode().strip())

    def lines(self) -> list[dict]:
        try:
            text = self.status_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def states(self) -> list[str]:
        return [line["state"] for line in self.lines()]

    def wait_state(self, state: str, timeout: float = 8.0) -> dict:
        def seen():
            return next((ln for ln in self.lines() if ln["state"] == state), None)

        return wait_for(seen, timeout)

    def touch(self, name: str) -> None:
        (self.run_dir / name).touch()


@pytest.fixture
def host(tmp_path, reaper):
    return Host(tmp_path / "host")


def test_clean_swap_then_commit(host):
    old_pid = host.install_old()
    guard_pid = host.start_guard()
    started = host.wait_state("started")
    assert host.script.read_bytes() == NEW
    assert host.backup.read_bytes() == OLD
    assert not host.staged.exists()
    assert not pid_alive(old_pid)
    new_pid = started["client_pid"]
    assert new_pid == read_pid(host.pidfile) and pid_alive(new_pid)
    host.touch("commit")
    host.wait_state("committed")
    wait_for(lambda: not pid_alive(guard_pid))
    assert host.states() == [
        "armed",
        "running",
        "backed_up",
        "stopped",
        "swapped",
        "started",
        "committed",
    ]
    assert pid_alive(new_pid)  # the committed client stays
    assert host.script.read_bytes() == NEW


@pytest.mark.parametrize(
    ("installed", "kept"),
    [(0o755, 0o700), (0o750, 0o700), (0o700, 0o700), (0o644, 0o600), (0o600, 0o600)],
    ids=oct,
)
def test_the_backup_is_owner_only_whatever_the_installed_mode(host, open_umask, installed, kept):
    """The script holds the host's credentials: a 0755 script must not leave a
    0755 backup (shutil.copy2 would copy its mode)."""
    host.install_old()
    host.script.chmod(installed)
    os.utime(host.script, (1_600_000_000, 1_600_000_000))
    host.backup.parent.mkdir(parents=True)
    host.backup.parent.chmod(0o755)  # as an older deployer may have left it
    host.start_guard()
    host.wait_state("started")
    assert host.backup.read_bytes() == OLD
    assert stat.S_IMODE(host.backup.stat().st_mode) == kept
    assert host.backup.stat().st_mtime == 1_600_000_000  # the times are kept, as copy2 does
    assert stat.S_IMODE(host.backup.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in host.backup.parent.iterdir()) == [host.backup.name]
    host.touch("commit")
    host.wait_state("committed")


def test_revert_on_request_restores_old_script_byte_for_byte(host):
    old = OLD + b"# \xc3\xa9 trailing bytes \\ ' \"\n"
    host.install_old(old)
    host.start_guard()
    new_pid = host.wait_state("started")["client_pid"]
    host.touch("revert")
    done = host.wait_state("reverted")
    assert done["ok"] is True and done["window_closed"] is False  # no api in unit tests
    assert host.script.read_bytes() == old
    assert not pid_alive(new_pid)
    restored = host.wait_state("restored")["client_pid"]
    assert restored == read_pid(host.pidfile) and pid_alive(restored)
    reverting = host.wait_state("reverting")
    assert reverting["reason"] == "deployer asked for a revert"


def test_revert_when_the_new_client_crashes(host):
    host.install_old()
    host.start_guard(new=client_source("new", fail="crash"))
    reverting = host.wait_state("reverting")
    assert reverting["reason"] == "the new client's process exited"
    host.wait_state("reverted")
    assert host.script.read_bytes() == OLD
    assert pidfile_alive(host.pidfile)
    assert "committed" not in host.states()


def test_revert_at_the_deadline_without_commit(host):
    host.install_old()
    host.start_guard(deadline=1.0)
    reverting = host.wait_state("reverting")
    assert reverting["reason"] == "deadline passed without a commit"
    host.wait_state("reverted")
    assert host.script.read_bytes() == OLD
    assert pidfile_alive(host.pidfile)


def test_armed_guard_waits_for_go_and_changes_nothing_before(host):
    old_pid = host.install_old()
    host.start_guard(go=False)
    armed = host.wait_state("armed")
    assert armed["go_deadline"] == 30.0
    assert host.staged.exists() and host.script.read_bytes() == OLD
    host.touch("go")
    host.wait_state("started")
    assert not pid_alive(old_pid)
    host.touch("commit")
    host.wait_state("committed")


def test_armed_guard_disarmed_by_revert_aborts_without_change(host):
    old_pid = host.install_old()
    guard_pid = host.start_guard(go=False)
    host.wait_state("armed")
    host.touch("revert")
    aborted = host.wait_state("aborted")
    assert aborted["changed"] is False and aborted["reason"] == "disarmed before the swap"
    wait_for(lambda: not pid_alive(guard_pid))
    assert host.states() == ["armed", "aborted"]
    assert host.script.read_bytes() == OLD and not host.backup.exists()
    assert pid_alive(old_pid) and read_pid(host.pidfile) == old_pid
    host.touch("go")  # too late: the guard is gone, nothing happens
    assert host.script.read_bytes() == OLD


def test_armed_guard_gives_up_at_the_go_deadline(host):
    old_pid = host.install_old()
    host.start_guard(go=False, go_deadline=0.5)
    aborted = host.wait_state("aborted")
    assert aborted["changed"] is False
    assert aborted["reason"] == "no go from deployer before the go deadline"
    assert host.script.read_bytes() == OLD and pid_alive(old_pid)


def test_first_life_tightens_the_deadline_to_the_soak_deadline(host):
    host.install_old()
    host.start_guard(deadline=60.0, soak_deadline=0.5)
    host.wait_state("started")
    host.touch("firstlife")
    first = host.wait_state("first_life")
    assert 0 < first["deadline_in"] <= 0.5
    # without the tightening the guard would wait the whole 60 s deadline
    reverting = host.wait_state("reverting", timeout=6.0)
    assert reverting["reason"] == "deadline passed without a commit"
    host.wait_state("reverted")
    assert host.script.read_bytes() == OLD


def test_first_life_never_extends_the_deadline(host):
    host.install_old()
    host.start_guard(deadline=1.5, soak_deadline=60.0)
    host.wait_state("started")
    host.touch("firstlife")
    first = host.wait_state("first_life")
    assert first["deadline_in"] <= 1.5
    assert host.wait_state("reverting", timeout=6.0)["reason"].startswith("deadline")


def test_sigterm_makes_the_guard_revert(host):
    host.install_old()
    guard_pid = host.start_guard()
    host.wait_state("started")
    os.kill(guard_pid, signal.SIGTERM)
    assert host.wait_state("reverting")["reason"] == "the guard was terminated"
    host.wait_state("reverted")
    assert host.script.read_bytes() == OLD


def test_a_terminated_guard_does_not_linger_for_deployers_silence(host, provider):
    """SIGTERM (a shutdown): revert and exit, without waiting out deployer's
    silence first as after a deadline revert (found reviewing that change)."""
    host.install_old()
    open_window(provider)
    guard_pid = host.start_guard(silence_limit=30.0, api=provider.api_config(), tunnel_opened=True)
    host.wait_state("started")
    os.kill(guard_pid, signal.SIGTERM)
    reverted = host.wait_state("reverted", timeout=8.0)
    assert reverted["disconnected"] is None
    wait_for(lambda: not pid_alive(guard_pid), timeout=5.0)


def test_the_guard_deletes_its_own_file(host):
    host.install_old()
    host.start_guard()
    host.wait_state("armed")
    assert not (host.run_dir / "guard.py").exists()  # it holds API credentials
    host.touch("commit")
    host.wait_state("committed")


def test_every_status_line_is_json_with_state_time_and_pid(host):
    host.install_old()
    guard_pid = host.start_guard()
    host.wait_state("started")
    host.touch("revert")
    host.wait_state("reverted")
    raw = host.status_path.read_text()
    assert raw.endswith("\n")
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [ln["state"] for ln in lines] == [
        "armed",
        "running",
        "backed_up",
        "stopped",
        "swapped",
        "started",
        "reverting",
        "restored",
        "reverted",
    ]
    assert all(ln["pid"] == guard_pid and isinstance(ln["t"], float) for ln in lines)
    assert [ln["t"] for ln in lines] == sorted(ln["t"] for ln in lines)


def test_no_installed_script_is_backed_up_as_none(host):
    host.start_guard()
    assert host.wait_state("backed_up")["backup"] is None
    host.wait_state("started")
    assert host.script.read_bytes() == NEW
    host.touch("commit")
    host.wait_state("committed")


HOSTILE_NAMES = [
    "with space.py",
    'it\'s "quoted".py',
    "$(touch pwned).py",
    "`touch pwned2`;x.py",
    "ünï cødé ✓.py",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_script_paths_are_handled_literally(tmp_path, reaper, name):
    root = tmp_path / "dir $(touch evil) 'q'"
    root.mkdir()
    host = Host(root, script_name=name)
    host.install_old()
    host.start_guard()
    new_pid = host.wait_state("started")["client_pid"]
    assert pid_alive(new_pid)
    assert host.script.read_bytes() == NEW
    host.touch("revert")
    host.wait_state("reverted")
    assert host.script.read_bytes() == OLD
    assert pidfile_alive(host.pidfile)
    cmdline = Path(f"/proc/{read_pid(host.pidfile)}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1] == str(host.script).encode()
    made = {p.name for p in tmp_path.rglob("*")}
    assert not made & {"pwned", "pwned2", "evil", "x.py"}


# --- the guard's own provider calls (a FakeApi behind HTTP on 127.0.0.1) -------------


@pytest.fixture
def provider(host):
    api = FakeApi(online=lambda: pidfile_alive(host.pidfile))
    with ProviderServer(api) as server:
        yield server


def open_window(provider) -> None:
    provider.api.set_allow_clientless(provider.host, True)  # as deployer's open_window


def test_after_a_revert_the_guard_closes_the_window_itself(host, provider):
    host.install_old()
    open_window(provider)
    host.start_guard(new=client_source("new", fail="crash"), api=provider.api_config())
    done = host.wait_state("reverted")
    assert done["ok"] is True and done["window_closed"] is True
    assert not provider.api.window_open
    assert provider.api.count("client_status") >= 1  # it waited for the old client online
    assert host.script.read_bytes() == OLD


def test_armed_guard_without_go_closes_the_window_itself(host, provider):
    host.install_old()
    open_window(provider)
    host.start_guard(go=False, go_deadline=0.3, api=provider.api_config())
    aborted = host.wait_state("aborted")
    assert aborted["window_closed"] is True and aborted["changed"] is False
    assert not provider.api.window_open


def fast_stop(source: bytes) -> bytes:
    """The guard with short stop waits (8 s, then 30 s more for a slow stop, as
    shipped) and a short grace after giving up, to keep the test quick."""
    for old, new in (
        (b"STOP_WAIT = 8.0", b"STOP_WAIT = 0.3"),
        (b"SLOW_STOP_WAIT = 30.0", b"SLOW_STOP_WAIT = 0.5"),
        (b"ABORT_GRACE = 120.0", b"ABORT_GRACE = 3.0"),
    ):
        assert old in source
        source = source.replace(old, new, 1)
    return source


def test_old_client_that_will_not_stop_aborts_and_closes_the_window(host, provider):
    host.script.write_bytes(OLD)
    service = {"kind": "command", "start": "true", "stop": "true", "check": "true"}
    open_window(provider)
    host.start_guard(tweak=fast_stop, service=service, api=provider.api_config())
    aborted = host.wait_state("aborted")
    assert aborted["changed"] is False and aborted["reason"] == "the old client did not stop"
    assert host.script.read_bytes() == OLD
    wait_for(lambda: not provider.api.window_open, timeout=3.0)


def test_guard_error_before_the_swap_closes_the_window(host, provider):
    host.install_old()
    blocker = host.root / "not-a-dir"
    blocker.write_text("")
    open_window(provider)
    host.start_guard(backup_path=str(blocker / "backup"), api=provider.api_config())
    error = host.wait_state("error")
    assert "Error" in error["reason"]
    assert host.script.read_bytes() == OLD and pidfile_alive(host.pidfile)
    wait_for(lambda: not provider.api.window_open, timeout=3.0)


def test_a_silent_deployer_makes_the_guard_revert_before_its_deadline(host):
    host.install_old()
    host.start_guard(deadline=60.0, silence_limit=1.0)
    host.wait_state("started")
    host.touch("alive")  # deployer read the status once, then vanished
    reverting = host.wait_state("reverting", timeout=8.0)
    assert reverting["reason"] == "deployer went silent before the commit"
    host.wait_state("reverted")
    assert host.script.read_bytes() == OLD


def test_a_deployer_that_keeps_reading_is_not_silent(host):
    host.install_old()
    host.start_guard(deadline=60.0, silence_limit=1.0)
    host.wait_state("started")
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        host.touch("alive")
        time.sleep(0.2)
    assert "reverting" not in host.states()
    host.touch("commit")
    host.wait_state("committed")
    assert host.script.read_bytes() == NEW


# --- evidence of first life: the ready probe (SPEC 4 step 9) ---------------------------

PROBE = 'test -n "$(find {poll} -newer "$DEPLOYER_SWAP_MARK" 2>/dev/null)"'


def probe_for(host: Host) -> str:
    import shlex

    return PROBE.format(poll=shlex.quote(str(host.root / "client.py.poll")))


def test_ready_comes_from_the_new_client_not_the_old_clients_last_polls(host):
    """The old client polled right up to its stop; only a poll by the NEW client,
    after the swap mark, may count as its first life."""
    poll = str(host.root / "client.py.poll")
    host.install_old(client_source("old", poll_file=poll))
    wait_for(lambda: os.path.exists(poll))
    host.start_guard(new=client_source("new", fail="silent", poll_file=poll), ready=probe_for(host))
    host.wait_state("started")
    time.sleep(1.0)
    assert "ready" not in host.states()  # the poll file is the old client's, older than the mark
    host.touch("revert")
    host.wait_state("reverted")


def test_ready_is_reported_once_the_new_client_polls(host):
    poll = str(host.root / "client.py.poll")
    host.install_old(client_source("old", poll_file=poll))
    host.start_guard(new=client_source("new", poll_file=poll), ready=probe_for(host))
    ready = host.wait_state("ready")
    assert ready["after"] >= 0
    states = host.states()
    assert states.index("started") < states.index("ready")
    host.touch("commit")
    host.wait_state("committed")


def test_the_probe_sees_the_swap_mark_and_time(host):
    seen = host.root / "probe-env"
    probe = f'env | grep ^DEPLOYER_SWAP_ > {seen} && test -f "$DEPLOYER_SWAP_MARK"'
    host.install_old()
    host.start_guard(ready=probe)
    host.wait_state("ready")
    env = dict(line.split("=", 1) for line in seen.read_text().split())
    assert env["DEPLOYER_SWAP_MARK"] == str(host.run_dir / "swap-mark")
    assert abs(float(env["DEPLOYER_SWAP_TIME"]) - time.time()) < 30
    host.touch("commit")
    host.wait_state("committed")


def test_a_probe_that_does_not_pass_runs_a_few_times_a_second_after_the_first(host):
    """A silent client keeps the probe failing for online_timeout (60 s in
    production): each run forks a shell on the host, which a Pi's client needs."""
    runs = host.root / "probe-runs"
    host.install_old()
    host.start_guard(new=client_source("new", fail="silent"), ready=f"date +%s.%N >> {runs}; false")
    started = host.wait_state("started")["t"]
    time.sleep(3.5)
    host.touch("revert")
    host.wait_state("reverted")
    times = [float(t) - started for t in runs.read_text().split()]
    assert sum(t < 0.5 for t in times) >= 5  # at once: the healthy client's first poll
    assert sum(1.5 <= t < 3.5 for t in times) <= 2.0 / guard.READY_BACKOFF + 2


# --- the revert keeps the window open until the old client polls again -------------------


def test_after_a_revert_the_window_stays_open_until_the_restored_client_polls(host, provider):
    """client_status still says online from the failed client's last polls: without
    a probe the guard waits out the offline detection before it closes the window."""
    host.install_old()
    open_window(provider)
    host.start_guard(
        new=client_source("new", fail="crash"), api=provider.api_config(), offline_detection=1.5
    )
    restored = host.wait_state("restored")
    reverted = host.wait_state("reverted")
    assert reverted["window_closed"] is True
    closed_at = provider.api.exposures[-1][1]
    assert closed_at - restored["t"] >= 1.4


def test_after_a_revert_a_passing_probe_closes_the_window_without_waiting(host, provider):
    poll = str(host.root / "client.py.poll")
    host.install_old(client_source("old", poll_file=poll))
    open_window(provider)
    host.start_guard(
        new=client_source("new", fail="crash"),
        api=provider.api_config(),
        offline_detection=30.0,
        ready=probe_for(host),
    )
    reverted = host.wait_state("reverted", timeout=8.0)
    assert reverted["ok"] is True and reverted["window_closed"] is True


# --- a vanished deployer: silence from go, the monotonic clock, disconnect ----------------


def test_silence_counts_from_go_even_if_deployer_never_read_the_status(host):
    """A deployer killed right after `touch go` never touches alive: the guard must
    not keep the window open for its whole deadline."""
    host.install_old()
    host.start_guard(deadline=60.0, silence_limit=1.0)
    reverting = host.wait_state("reverting", timeout=8.0)
    assert reverting["reason"] == "deployer went silent before the commit"


def test_a_deployer_touching_alive_with_a_clock_far_behind_is_not_silent(host):
    """The host's wall clock stepped back an hour (NTP on a board without RTC):
    alive's mtime is an hour old each time, but it changes, so deployer is alive."""
    host.install_old()
    host.start_guard(deadline=60.0, silence_limit=1.0)
    host.wait_state("started")
    alive = host.run_dir / "alive"
    end = time.monotonic() + 2.5
    stamp = time.time() - 3600
    while time.monotonic() < end:
        alive.touch()
        stamp += 0.2
        os.utime(alive, (stamp, stamp))
        time.sleep(0.2)
    assert "reverting" not in host.states()
    host.touch("commit")
    host.wait_state("committed")


def test_a_vanished_deployer_that_opened_the_tunnel_gets_it_disconnected(host, provider):
    host.install_old()
    open_window(provider)
    host.start_guard(
        deadline=60.0, silence_limit=1.0, api=provider.api_config(), tunnel_opened=True
    )
    reverted = host.wait_state("reverted", timeout=10.0)
    assert reverted["disconnected"] is True
    assert provider.api.count("disconnect") == 1
    assert not provider.api.window_open


def test_a_deadline_revert_of_a_deployer_gone_silent_disconnects_too(host, provider):
    """The deadline came before the silence limit (the sandbox's fast profile: 20 s
    against 30 s): once the host is safe, the guard waits out the silence and
    closes the tunnel of the deployer that vanished (the chaos runs left it open)."""
    host.install_old()
    open_window(provider)
    host.start_guard(deadline=0.5, silence_limit=2.0, api=provider.api_config(), tunnel_opened=True)
    reverted = host.wait_state("reverted", timeout=15.0)
    assert host.wait_state("reverting")["reason"] == "deadline passed without a commit"
    assert reverted["disconnected"] is True and provider.api.count("disconnect") == 1


def test_a_deadline_revert_of_a_deployer_still_heard_leaves_it_the_tunnel(host, provider):
    host.install_old()
    open_window(provider)
    host.start_guard(deadline=0.5, silence_limit=2.0, api=provider.api_config(), tunnel_opened=True)
    host.wait_state("restored", timeout=10.0)
    while "reverted" not in host.states():
        host.touch("alive")  # deployer reads the status: it will clean up itself
        time.sleep(0.2)
    assert host.wait_state("reverted")["disconnected"] is None
    assert provider.api.count("disconnect") == 0


def test_a_tunnel_deployer_did_not_open_is_left_alone(host, provider):
    host.install_old()
    open_window(provider)
    host.start_guard(deadline=60.0, silence_limit=1.0, api=provider.api_config())
    host.wait_state("reverted", timeout=10.0)
    assert provider.api.count("disconnect") == 0


def test_a_revert_deployer_asked_for_leaves_the_tunnel_to_deployer(host, provider):
    host.install_old()
    open_window(provider)
    host.start_guard(api=provider.api_config(), tunnel_opened=True)
    host.wait_state("started")
    host.touch("revert")
    host.wait_state("reverted")
    assert provider.api.count("disconnect") == 0


def test_an_armed_guard_of_a_vanished_deployer_disconnects_too(host, provider):
    host.install_old()
    open_window(provider)
    host.start_guard(go=False, go_deadline=0.3, api=provider.api_config(), tunnel_opened=True)
    aborted = host.wait_state("aborted")
    assert aborted["disconnected"] is True and provider.api.count("disconnect") == 1


# --- issue 11: a slow-stopping old client, a restored script's mode ---------------------


def command_service(host: Host, stop_after: float) -> dict:
    """The command kind with an asynchronous stop: it returns at once, the client
    exits ``stop_after`` seconds later (a client in its retry backoff)."""
    import shlex

    pidfile, log = shlex.quote(str(host.pidfile)), shlex.quote(str(host.root / "client.log"))
    return {
        "kind": "command",
        "start": f"setsid {run_command(host.script)} </dev/null >>{log} 2>&1 & echo $! > {pidfile}",
        "stop": f"(sleep {stop_after}; kill $(cat {pidfile})) >/dev/null 2>&1 &",
        "check": f"kill -0 $(cat {pidfile}) 2>/dev/null",
    }


def test_slow_stopping_old_client_is_waited_for_and_the_swap_goes_on(host):
    old_pid = host.install_old()
    host.start_guard(service=command_service(host, 1.0), tweak=short_stop_waits(10.0, 1.0))
    started = host.wait_state("started", timeout=10.0)
    assert "stopping" in host.states() and "aborted" not in host.states()
    assert not pid_alive(old_pid)
    assert host.script.read_bytes() == NEW
    wait_for(lambda: pidfile_alive(host.pidfile))
    assert started["state"] == "started"
    host.touch("commit")
    host.wait_state("committed")


def test_slow_stopping_old_client_exits_after_the_guard_gave_up_and_is_started_again(host):
    """The guard gave up waiting (nothing changed, window closed), then the old
    client's stop took effect after all: a host without a client, unless the
    guard starts it again."""
    old_pid = host.install_old()
    host.start_guard(service=command_service(host, 2.0), tweak=short_stop_waits(0.5, 8.0))
    aborted = host.wait_state("aborted", timeout=10.0)
    assert aborted["changed"] is False
    wait_for(lambda: not pid_alive(old_pid), timeout=5.0)
    wait_for(lambda: pidfile_alive(host.pidfile) and read_pid(host.pidfile) != old_pid)
    assert host.script.read_bytes() == OLD


def test_a_late_exit_is_left_alone_once_another_run_holds_the_host(host):
    """Past the abort, a new run may stop the client for its own swap: the old
    guard must not start it behind that run's back."""
    old_pid = host.install_old()
    host.start_guard(service=command_service(host, 2.0), tweak=short_stop_waits(0.5, 8.0))
    host.wait_state("aborted", timeout=10.0)
    lock = host.root / ".deployer" / "lock"
    lock.mkdir()
    (lock / "owner").write_text(json.dumps({"owner": "x", "run_id": "R2", "since": 0}))
    wait_for(lambda: not pid_alive(old_pid), timeout=5.0)
    time.sleep(1.5)
    assert not pidfile_alive(host.pidfile)


def test_a_revert_restores_the_script_with_the_inventorys_mode(host):
    """The backup is owner-only (it holds credentials); the restored script takes
    the installed script's mode (the inventory's), e.g. 0750 for a group reader."""
    host.install_old()
    crash = client_source("new", fail="crash")
    host.staged.write_bytes(crash)
    os.chmod(host.staged, 0o750)  # as deployer's stage sets the inventory's mode
    host.start_guard(new=crash)  # rewrites the staged file in place: the mode stays
    host.wait_state("reverted")
    assert host.script.read_bytes() == OLD
    assert os.stat(host.script).st_mode & 0o777 == 0o750
