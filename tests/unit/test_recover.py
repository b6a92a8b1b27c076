"""``deployer recover`` (SPEC 6) on this machine: a journal left by a run that
died, hosts as local directories (LocalRemote), the provider a FakeApi.

Each test writes the journal a crashed run would have left (its process gone),
puts the host's files in the state that run left them, runs
:func:`deployer.recover.run_recover` and judges by the host's files, the
provider's calls and the journal.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from deployer.clock import Clock, FakeClock
from deployer.errors import TooManyCalls, TunnelNotUp
from deployer.events import Fanout
from deployer.hostfiles import HostPaths
from deployer.inventory import load_inventory
from deployer.journal import Journal, JournalSink, journal_path
from deployer.plan import plan_host
from deployer.recover import run_recover
from deployer.remote import sha256_hex
from deployer.result import Outcome
from deployer.workflow import HostRun, RunContext
from tests.doubles import PYTHON, FakeApi, LocalRemote, ProcessReaper

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("guard_without_api")]

USER_ID = "USERID-SECRET-1111"
HOSTS = ("pi-01", "pi-02")

INVENTORY = """\
[provider]
api_url = "http://127.0.0.1:9/api/{{call}}"
ssh_host = "127.0.0.1"
user_id = "USERID-SECRET-1111"
offline_detection = 0.3

[defaults]
template = "client.py.j2"
python = {python}
online_timeout = 3
stable_for = 0.5

[defaults.service]
kind = "pidfile"
pidfile = {pidfile}
run = "true"
"""

HOST = """
[hosts.{name}]
dbid = {dbid}
host_uuid = "UUID-SECRET-{n}{n}{n}{n}"
ports_id = 12{n}
ssh_port = 1234{n}
script_path = {script}
"""


def toml_str(value: object) -> str:
    return json.dumps(str(value), ensure_ascii=False)


class HostsApi(FakeApi):
    """A FakeApi whose client_status answers per host."""

    def __init__(self) -> None:
        super().__init__()
        self.offline: set[str] = set()

    def client_status(self, host: Any, **kwargs: Any) -> bool:
        self._call("client_status", host)
        return host.name not in self.offline


class Hosts:
    """A remote factory: a LocalRemote per SSH connect, none for an unreachable host."""

    def __init__(self) -> None:
        self.unreachable: set[str] = set()
        self.made: list[LocalRemote] = []

    def __call__(self, host: Any) -> LocalRemote:
        if host.name in self.unreachable:
            raise TunnelNotUp("SSH connect refused (simulated)", host=host.name, step="ssh")
        remote = LocalRemote(host.name)
        self.made.append(remote)
        return remote


class Fleet:
    """Two hosts as directories under ``root``, their inventory and state dir."""

    def __init__(self, root: Path, dbids: dict[str, str] | None = None):
        self.root = root
        self.state = root / "state"
        dbids = dbids or {name: f"DBID-SECRET-{n}{n}{n}{n}" for n, name in enumerate(HOSTS, 1)}
        text = INVENTORY.format(python=toml_str(PYTHON), pidfile=toml_str(root / "client.pid"))
        for n, name in enumerate(HOSTS, 1):
            script = root / name / "client.py"
            script.parent.mkdir(parents=True)
            script.write_text("# old client\n")
            text += HOST.format(name=name, n=n, dbid=toml_str(dbids[name]), script=toml_str(script))
        (root / "client.py.j2").write_text("# client {{ host }}\n")
        (root / "deployer.toml").write_text(text)
        (root / "deployer.toml").chmod(0o600)
        self.api = HostsApi()
        self.hosts = Hosts()
        self.clock = FakeClock()

    def inventory(self):
        return load_inventory(self.root / "deployer.toml")

    def script(self, host: str) -> Path:
        return self.root / host / "client.py"

    def paths(self, host: str, run_id: str) -> HostPaths:
        return HostPaths(str(self.script(host)), run_id)

    def lock(self, host: str) -> Path:
        return Path(self.paths(host, "x").lock)

    def hold_lock(self, host: str, run_id: str) -> None:
        """The host lock as ``take_lock`` leaves it for ``run_id``."""
        lock = self.lock(host)
        lock.mkdir(parents=True)
        owner = {"owner": "tester@box pid 1", "run_id": run_id, "since": 1.0}
        (lock / "owner").write_text(json.dumps(owner))

    def crashed_run(
        self,
        run_id: str,
        facts: dict[str, dict[str, Any]],
        step: str,
        clock: FakeClock | None = None,
    ) -> None:
        """The journal of a run whose process died with ``facts`` noted per host and
        ``step`` begun (as an upgrade journals it: secrets given to the journal)."""
        inventory = self.inventory()
        secrets = inventory.secret_values()
        with Journal(self.state, secrets=secrets, clock=clock) as journal:
            journal.start_run(run_id, "upgrade", str(self.root / "deployer.toml"), list(facts), {})
            for host, host_facts in facts.items():
                journal.update_host(run_id, host, **host_facts)
                journal.step_begin(run_id, host, step)
        conn = sqlite3.connect(journal_path(self.state))
        with conn:
            conn.execute("UPDATE runs SET pid = ? WHERE pid = ?", (exited_pid(), os.getpid()))
        conn.close()

    def facts(self, host: str, run_id: str, **more: Any) -> dict[str, Any]:
        """What a run notes up to taking the lock, and ``more``."""
        paths = self.paths(host, run_id)
        return {
            "tunnel_opened": True,
            "script_path": paths.script_path,
            "run_dir": paths.run_dir,
            "lock_path": paths.lock,
            "lock_maybe_held": True,
            **more,
        }

    def recover(self, **kwargs: Any):
        return run_recover(
            self.inventory(),
            self.state,
            remote_factory=self.hosts,
            api=self.api,
            clock=self.clock,
            **kwargs,
        )

    def journal_state(self, run_id: str, host: str) -> dict[str, Any]:
        with Journal(self.state) as journal:
            return journal.host_state(run_id, host)


def exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path)


def by_host(run) -> dict[str, Any]:
    return {h.host: h for h in run.hosts}


# --- item 9: one unreachable host does not take the others down ----------------------------


def test_an_unreachable_host_armed_guard_is_unsafe_and_the_other_hosts_are_recovered(fleet):
    run_id = "20250101T000000Z-abc123"
    armed = fleet.facts("pi-01", run_id, staged=True, guard_armed=True, window_maybe_open=False)
    fleet.crashed_run(
        run_id, {"pi-01": armed, "pi-02": fleet.facts("pi-02", run_id)}, step="open_window"
    )
    fleet.hold_lock("pi-02", run_id)
    fleet.hosts.unreachable.add("pi-01")

    run = fleet.recover()

    results = by_host(run)
    assert sorted(results) == ["pi-01", "pi-02"]
    unreachable = results["pi-01"]
    assert unreachable.result is Outcome.UNSAFE
    assert "reach" in unreachable.error.message, unreachable.error
    assert "recover" in unreachable.error.message  # what to do: run it again once reachable
    assert results["pi-02"].result is Outcome.FAILED, results["pi-02"].error
    assert not fleet.lock("pi-02").exists()
    assert fleet.journal_state(run_id, "pi-02")["result"] == "failed"


def test_a_host_lost_between_reaching_it_and_disarming_its_guard_is_unsafe_and_stays_pending(
    fleet,
):
    run_id = "20250101T000000Z-abc124"
    armed = fleet.facts("pi-01", run_id, staged=True, guard_armed=True)
    fleet.crashed_run(run_id, {"pi-01": armed}, step="stage")
    fleet.hold_lock("pi-01", run_id)
    Path(fleet.paths("pi-01", run_id).run_dir).mkdir(parents=True)
    hosts = fleet.hosts

    def once_then_refused(host):
        remote = hosts(host)
        hosts.unreachable.add(host.name)  # the first session works; then the host is lost
        return remote

    fleet.hosts = once_then_refused  # type: ignore[assignment]

    (result,) = fleet.recover().hosts

    assert result.result is Outcome.UNSAFE, result
    assert result.error.type == "SshConnectError", result.error  # not a crash of recover
    assert "recover" in result.error.message
    assert fleet.lock("pi-01").exists()  # kept for the next recover
    with Journal(fleet.state) as journal:
        assert [(d.run_id, d.host) for d in journal.dangling()] == [(run_id, "pi-01")]


# --- item 6: identifiers are stored and compared as they are --------------------------------

SHORT_DBID = "0556"  # a short, numeric credential: its digits turn up in run ids and hashes


def test_a_short_dbid_inside_the_run_id_does_not_hide_the_run_dir_or_leave_the_lock(tmp_path):
    fleet = Fleet(tmp_path, dbids={"pi-01": SHORT_DBID, "pi-02": "DBID-SECRET-2222"})
    run_id = f"20250101T000000Z-{SHORT_DBID}ab"
    old_sha = "ab" + SHORT_DBID + "c" * 58
    paths = fleet.paths("pi-01", run_id)
    facts = fleet.facts("pi-01", run_id, staged=True, old_sha256=old_sha)
    fleet.crashed_run(run_id, {"pi-01": facts}, step="stage")
    fleet.hold_lock("pi-01", run_id)
    Path(paths.staged).parent.mkdir(parents=True)
    Path(paths.staged).write_text("# staged new client\n")

    (result,) = fleet.recover().hosts

    assert result.result is Outcome.FAILED, result.error  # nothing had changed
    assert not Path(paths.run_dir).exists(), "the staged files of the run are left"
    assert not fleet.lock("pi-01").exists(), "the host lock is left"
    with Journal(fleet.state) as journal:
        (run,) = journal.runs()
        assert run.run_id == run_id
        state = journal.host_state(run_id, "pi-01")
        assert state["result"] == "failed"
        assert not state["lock_maybe_held"]
        assert (state["run_dir"], state["old_sha256"]) == (paths.run_dir, old_sha)
        assert journal.dangling() == []


# --- item 3: recover acts on a host only while it holds the host lock ---------------------------


def other_machine(fleet: Fleet, run_id: str, machine: str = "ci-runner-7") -> None:
    """The run was recorded on another machine (a CI job's container)."""
    conn = sqlite3.connect(journal_path(fleet.state))
    with conn:
        conn.execute("UPDATE runs SET machine = ? WHERE run_id = ?", (machine, run_id))
    conn.close()


def recover_steps(fleet: Fleet, run_id: str, host: str) -> int:
    with Journal(fleet.state) as journal:
        return sum(1 for s in journal.steps(run_id, host) if s["step"] == "recover")


def test_a_lock_held_by_another_run_leaves_the_host_alone_and_says_so(fleet):
    run_id = "20250101T000000Z-aaaaaa"
    facts = fleet.facts("pi-01", run_id)  # it died at the lock step: the lock was not its
    fleet.crashed_run(run_id, {"pi-01": facts}, step="lock")
    fleet.hold_lock("pi-01", "20250101T000500Z-bbbbbb")  # another run works on the host

    (result,) = fleet.recover().hosts

    assert result.result is Outcome.SKIPPED, result
    assert "20250101T000500Z-bbbbbb" in result.error.message
    assert fleet.api.count("disconnect") == 0, "the other run's tunnel was closed"
    assert fleet.api.count("set_allow_clientless") == 0
    owner = json.loads((fleet.lock("pi-01") / "owner").read_text())
    assert owner["run_id"] == "20250101T000500Z-bbbbbb"
    assert fleet.journal_state(run_id, "pi-01")["result"] is None  # still to recover


def test_a_run_whose_run_dir_is_gone_is_only_closed_and_marked(fleet):
    """It was rolled back and cleaned up; deployer died in the last disconnect."""
    run_id = "20250101T000000Z-cccccc"
    old_sha = sha256_hex(fleet.script("pi-01").read_bytes())
    facts = fleet.facts(
        "pi-01",
        run_id,
        staged=True,
        guard_armed=True,
        swap_started=True,
        lock_maybe_held=False,
        old_sha256=old_sha,
        new_sha256="f" * 64,
        backup_path=str(fleet.root / "pi-01" / "backup-that-must-not-come-back"),
    )
    fleet.crashed_run(run_id, {"pi-01": facts}, step="cleanup")
    fleet.api.inject("set_allow_clientless", lambda: TooManyCalls("no window"), allow=True, times=9)

    (result,) = fleet.recover().hosts

    assert result.result is Outcome.ROLLED_BACK, result.error
    assert fleet.api.count("disconnect") == 1
    assert ("set_allow_clientless", "pi-01", True) not in fleet.api.calls
    assert sha256_hex(fleet.script("pi-01").read_bytes()) == old_sha
    assert not fleet.lock("pi-01").exists()
    state = fleet.journal_state(run_id, "pi-01")
    assert (state["result"], state["tunnel_opened"], state["lock_maybe_held"]) == (
        "rolled_back",
        False,
        False,
    )


def killed_before_the_lock(fleet, run_id: str) -> Hosts:
    """A run of pi-01 killed in its ``ssh`` step; returns the fleet's remote factory."""
    facts = fleet.facts("pi-01", run_id, lock_maybe_held=False)
    fleet.crashed_run(run_id, {"pi-01": facts}, step="ssh")
    return fleet.hosts


def test_a_session_cut_while_recover_takes_the_lock_leaves_no_ownerless_lock(fleet):
    """Another recover closed the tunnel this one rode on (its disconnect, after it
    finished the same run) right after the lock was made: found by the chaos
    campaign, which met empty lock dirs that refused every later upgrade."""
    run_id = "20250101T000000Z-c0ffee"
    reach = killed_before_the_lock(fleet, run_id)

    def cut_after_the_lock_is_made(host):
        remote = reach(host)
        if len(reach.made) == 1:
            remote.lose_after = lambda command: "mkdir" in command
        return remote

    fleet.hosts = cut_after_the_lock_is_made

    (result,) = fleet.recover().hosts

    assert result.result is Outcome.FAILED, result.error
    assert "nothing to undo" in result.error.message
    assert len(reach.made) == 2  # reached again after the cut
    assert not fleet.lock("pi-01").exists()
    assert fleet.journal_state(run_id, "pi-01")["result"] == "failed"


@pytest.mark.parametrize("fails", ["owner", "claim"])
def test_a_lock_the_host_cannot_write_is_taken_back_not_left_ownerless(fleet, fails):
    """A full disk right after recover made the lock: its claim or owner file cannot
    be written. Left there, an empty lock refused every later run of the host until
    --break-lock; now the take is undone and the next recover finishes the host."""
    run_id = "20250101T000000Z-d15cf0"
    reach = killed_before_the_lock(fleet, run_id)

    def disk_full(host):
        remote = reach(host)
        run = remote.run

        def full_at_the_take(command, **kwargs):
            original = command
            if "mkdir" in command and "then" in command:  # the one-command take
                if fails == "owner":  # the owner file's write gets ENOSPC
                    command = re.sub(r"> \S*\.owner\.\S*", "> /dev/full", command, count=1)
                else:  # the claim's mkdir fails
                    command = re.sub(r"\bmkdir (\S*/taken-)", r"false \1", command, count=1)
                assert command != original, original
            return run(command, **kwargs)

        remote.run = full_at_the_take
        return remote

    fleet.hosts = disk_full
    (first,) = fleet.recover().hosts
    assert first.result is Outcome.SKIPPED, first
    assert "cannot take the host lock" in first.error.message
    if fails == "owner":
        assert "printf" in first.error.message  # the host's own words are quoted
    assert not fleet.lock("pi-01").exists()
    assert fleet.journal_state(run_id, "pi-01")["result"] is None  # still to recover

    fleet.hosts = reach  # space again
    (second,) = fleet.recover().hosts
    assert second.result is Outcome.FAILED, second.error
    assert not fleet.lock("pi-01").exists()
    assert fleet.journal_state(run_id, "pi-01")["result"] == "failed"


def test_a_run_recorded_on_another_machine_is_left_alone_while_it_may_be_alive(fleet):
    run_id = "20250101T000000Z-dddddd"
    fleet.crashed_run(run_id, {"pi-02": fleet.facts("pi-02", run_id)}, step="inspect")
    other_machine(fleet, run_id)
    fleet.hold_lock("pi-02", run_id)

    (result,) = fleet.recover().hosts

    assert result.result is Outcome.SKIPPED, result
    assert "ci-runner-7" in result.error.message and "--force" in result.error.message
    assert fleet.api.calls == []  # not even reached: that run may be working on it
    assert fleet.lock("pi-02").exists()
    assert fleet.journal_state(run_id, "pi-02")["result"] is None

    (forced,) = fleet.recover(force=True).hosts
    assert forced.result is Outcome.FAILED, forced.error
    assert not fleet.lock("pi-02").exists()


def test_a_run_recorded_on_another_machine_is_recovered_once_past_its_deadline(fleet):
    run_id = "20250101T000000Z-eeeeee"
    fleet.crashed_run(
        run_id, {"pi-02": fleet.facts("pi-02", run_id)}, step="inspect", clock=FakeClock(0.0)
    )
    other_machine(fleet, run_id)
    fleet.hold_lock("pi-02", run_id)
    fleet.clock = FakeClock(start=24 * 3600.0)  # a day after its last record

    (result,) = fleet.recover().hosts

    assert result.result is Outcome.FAILED, result.error
    assert not fleet.lock("pi-02").exists()


def test_two_recovers_at_once_finish_a_host_once(fleet):
    run_id = "20250101T000000Z-ffffff"
    staged = fleet.facts("pi-02", run_id, staged=True)
    fleet.crashed_run(run_id, {"pi-02": staged}, step="stage")
    fleet.hold_lock("pi-02", run_id)
    Path(fleet.paths("pi-02", run_id).run_dir).mkdir(parents=True)

    def slow_connect(call, allow):
        if call == "connect":
            time.sleep(0.3)  # both recovers reach the host at about the same time

    fleet.api.on_call = slow_connect
    fleet.clock = Clock()  # the two wait for each other in real time
    start = threading.Barrier(2)
    results: list[Any] = []

    def recover():
        start.wait()
        results.extend(fleet.recover().hosts)

    threads = [threading.Thread(target=recover) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    # one recovered the host; the other met it at work, waited and reports its result
    assert [r.result.value for r in results] == ["failed", "failed"], results
    assert recover_steps(fleet, run_id, "pi-02") == 1, "the host was recovered twice"
    assert fleet.journal_state(run_id, "pi-02")["result"] == "failed"
    assert not fleet.lock("pi-02").exists()
    assert not Path(fleet.paths("pi-02", run_id).run_dir).exists()


class Killed(BaseException):
    """deployer killed (``kill -9``) in the middle of a call: nothing after it runs."""


def journalled_upgrade(site, state: Path, run_id: str, **vars: str):
    """One upgrade of the test_workflow site, journalled as ``deployer upgrade`` does."""
    inventory = site.inventory(**vars)
    plan = plan_host(inventory, inventory.hosts["pi-01"], run_id)
    with Journal(state, secrets=inventory.secret_values()) as journal:
        journal.start_run(run_id, "upgrade", str(site.root / "deployer.toml"), ["pi-01"], {})
        ctx = RunContext(
            run_id=run_id,
            inventory=inventory,
            api=site.api,
            remote_factory=site.factory,
            events=Fanout(site.events, JournalSink(journal, run_id)),
            journal=journal,
            owner="tester@box pid 1",
        )
        result = HostRun(ctx, plan).execute()
        journal.finish_run(run_id, ok=result.succeeded)
        return result


def test_recover_never_reinstalls_a_rolled_back_runs_backup_over_a_later_upgrade(tmp_path):
    """A rolled-back run killed in cleanup's disconnect; a later run upgrades the
    host; recover must not put the first run's backup (the old script) back."""
    from tests.local_site import Site

    reaper = ProcessReaper(tmp_path)
    try:
        site = Site(tmp_path)
        state = tmp_path / "state"
        first = "20250101T000000Z-111111"
        site.api.inject("disconnect", Killed)
        with pytest.raises(Killed):
            journalled_upgrade(site, state, first, release="2", fail="crash")
        assert site.script.read_bytes() == site.old  # it was rolled back
        assert not (site.base / "runs" / first).exists()  # and cleaned up on the host
        site.api.injections.clear()
        later = journalled_upgrade(site, state, "20250101T000100Z-222222", release="3")
        assert later.result is Outcome.UPGRADED, later.error
        upgraded = site.script.read_bytes()
        conn = sqlite3.connect(journal_path(state))
        with conn:  # the first run's process is gone
            conn.execute("UPDATE runs SET pid = ? WHERE run_id = ?", (exited_pid(), first))
        conn.close()

        before = len(site.api.calls)
        run = run_recover(site.inventory(), state, remote_factory=site.factory, api=site.api)

        (result,) = run.hosts
        assert site.script.read_bytes() == upgraded, "recover downgraded the later upgrade"
        assert result.result is Outcome.ROLLED_BACK, result.error
        assert ("set_allow_clientless", "pi-01", True) not in site.api.calls[before:]
        assert ("disconnect", "pi-01", None) in site.api.calls[before:]
        assert not (site.base / "lock").exists()
        with Journal(state) as journal:
            assert journal.dangling() == []
            assert journal.host_state(first, "pi-01")["result"] == "rolled_back"
    finally:
        reaper.kill_all()
