"""``--wait-offline`` in the fleet layer and around it, with fakes: parking and
upgrading hosts that come back, the deadline, the canary and batch rules, the
failure budget, Ctrl-C during the wait, the journal's record of a wait and a
re-run picking it up, the live view, and the reports.

The clock is real but the times are tiny (offline detection 50 ms), so each
test takes well under a second."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from deployer.clock import Clock, FakeClock
from deployer.errors import EXIT_OFFLINE, ClientBlocked
from deployer.events import EventSink
from deployer.journal import Journal, JournalSink
from deployer.parking import WAIT_STEP, WaitPolicy
from deployer.progress import PlainProgress, ProgressState, host_line
from deployer.report import to_junit_xml
from deployer.result import HostResult, Outcome, RunResult
from deployer.rollout import OfflineWait, Rollout, RolloutPolicy
from deployer.upgrade import SeenOnline, _wait_deadline
from tests.rollout_support import FakeRunner, failed, make_hosts, outcomes

pytestmark = pytest.mark.unit

OFFLINE_DETECTION = 0.05
POLICY = WaitPolicy(look_every=0.01, trust_margin=0.02, fresh=0.2, idle=0.01)
GAP = POLICY.trust_gap(OFFLINE_DETECTION)  # 70 ms


class World:
    """The fleet's ``client_status``: hosts online unless switched off; every look
    recorded as (kind, host, time, answer)."""

    def __init__(self, offline=()):
        self.offline = set(offline)
        self.looks: list[tuple[str, str, float, bool]] = []
        self.lock = threading.Lock()
        self.errors: dict[str, Exception] = {}

    def _answer(self, kind: str, host) -> bool:
        if host.name in self.errors:
            raise self.errors[host.name]
        with self.lock:
            online = host.name not in self.offline
            self.looks.append((kind, host.name, time.monotonic(), online))
        return online

    def look(self, host) -> bool:
        return self._answer("look", host)

    def watch(self, host) -> bool:
        return self._answer("watch", host)

    def back(self, name: str, after: float = 0.0) -> None:
        """``name``'s client comes back (after ``after`` seconds)."""
        if after:
            threading.Timer(after, self.back, args=(name,)).start()
            return
        with self.lock:
            self.offline.discard(name)

    def of(self, name: str, kind: str | None = None) -> list[tuple[str, str, float, bool]]:
        return [x for x in self.looks if x[1] == name and (kind is None or x[0] == kind)]


class Events(EventSink):
    def __init__(self):
        self.log: list[tuple] = []

    def step_started(self, host, step, facts=None):
        self.log.append(("start", host, step, facts))

    def step_finished(self, host, step, status, seconds, facts=None):
        self.log.append(("end", host, step, status, facts))

    def host_finished(self, result):
        self.log.append(("finished", result.host, result.result.value))


def rollout(hosts, runner, world, seconds=2.0, events=None, **policy) -> Rollout:
    clock = Clock()
    wait = OfflineWait(
        deadline=clock.now() + seconds,
        look=world.look,
        watch=world.watch,
        offline_detection=OFFLINE_DETECTION,
        policy=POLICY,
        clock=clock,
    )
    return Rollout(hosts, runner, RolloutPolicy(**policy), events, handle_signals=False, wait=wait)


def by_name(results: list[HostResult]) -> dict[str, HostResult]:
    return {r.host: r for r in results}


# --- parking and coming back -----------------------------------------------------------


def test_an_offline_host_is_parked_and_upgraded_once_its_client_is_trusted():
    hosts = make_hosts(3)
    world = World(offline={"sbx-001"})
    runner = FakeRunner()
    world.back("sbx-001", after=0.15)
    results = rollout(hosts, runner, world, parallel=3).run()

    assert outcomes(results) == ["upgraded"] * 3
    assert runner.calls.count("sbx-001") == 1  # never started while offline
    online = [t for kind, _, t, up in world.of("sbx-001", "watch") if up]
    assert online and online[-1] - online[0] >= GAP > OFFLINE_DETECTION  # two looks, apart
    parked = by_name(results)["sbx-001"]
    assert parked.waiting_seconds >= 0.15
    assert parked.steps[0].step == WAIT_STEP and parked.steps[0].status == "ok"
    assert by_name(results)["sbx-000"].waiting_seconds == 0


def test_the_workflow_takes_the_rollouts_fresh_look_as_its_preflight():
    hosts = make_hosts(2)
    world = World(offline={"sbx-001"})
    seen = {}
    runner = FakeRunner()
    runner.before = lambda host, control: seen.__setitem__(host.name, control.seen_online)
    world.back("sbx-001", after=0.05)
    rollout(hosts, runner, world, parallel=2).run()
    assert seen == {"sbx-000": True, "sbx-001": True}
    assert len(world.of("sbx-000")) == 1  # one look before its upgrade, no more


def test_seen_online_answers_the_first_client_status_of_its_host_only():
    calls = []

    class Api:
        def client_status(self, host):
            calls.append(host.name)
            return False

        def calls_for(self, name):
            return 42

    host, other = make_hosts(2)
    api = SeenOnline(Api(), host.name)
    assert api.client_status(other) is False  # another host: asked
    assert api.client_status(host) is True  # the preflight: the rollout's look
    assert api.client_status(host) is False  # later looks (soak, ...): asked
    assert calls == [other.name, host.name]
    assert api.calls_for(host.name) == 42


def test_a_host_that_never_comes_back_ends_offline_at_the_deadline():
    hosts = make_hosts(3)
    world = World(offline={"sbx-002"})
    runner = FakeRunner()
    started = time.monotonic()
    rollout_ = rollout(hosts, runner, world, seconds=0.4, parallel=1, max_failures="0")
    results = rollout_.run()
    elapsed = time.monotonic() - started

    assert outcomes(results) == ["upgraded", "upgraded", "offline"]
    assert 0.4 <= elapsed < 1.5
    offline = results[2]
    assert "sbx-002" not in runner.calls
    assert offline.error.step == WAIT_STEP and offline.error.type == "ClientOffline"
    assert offline.waiting_seconds == pytest.approx(0.4, abs=0.3)
    assert rollout_.failures == 0  # offline is not a failure: the budget of 0 held
    run = RunResult("r", 0, 1, results)
    assert run.summary()["offline"] == 1 and run.exit_code() == EXIT_OFFLINE


def test_a_client_that_only_blips_is_never_trusted():
    """Online for one look at a time (a client that starts, polls once, dies)."""
    hosts = make_hosts(1)
    world = World(offline={"sbx-000"})
    flips = {"n": 0}
    original = world.watch

    def blipping(host):
        flips["n"] += 1
        world.offline.discard(host.name) if flips["n"] % 3 == 0 else world.offline.add(host.name)
        return original(host)

    world.watch = blipping
    runner = FakeRunner()
    results = rollout(hosts, runner, world, seconds=0.5).run()
    assert outcomes(results) == ["offline"]
    assert runner.calls == []
    assert any(up for _, _, _, up in world.of("sbx-000", "watch"))  # it was seen online


def test_a_trusted_host_found_offline_just_before_its_upgrade_is_parked_again():
    hosts = make_hosts(1)
    world = World(offline={"sbx-000"})
    answers = iter([False, False])  # the first look, then the look before the upgrade
    world.look = lambda host: next(answers, True)
    world.offline.clear()  # the watcher sees it online from the start
    events = Events()
    runner = FakeRunner()
    policy = WaitPolicy(look_every=0.01, trust_margin=0.02, fresh=0.0, idle=0.01)
    wait = OfflineWait(time.monotonic() + 2, world.look, world.watch, OFFLINE_DETECTION, policy)
    results = Rollout(hosts, runner, RolloutPolicy(), events, handle_signals=False, wait=wait).run()
    assert outcomes(results) == ["upgraded"]
    assert runner.calls == ["sbx-000"]
    waits = [e for e in events.log if e[0] in ("start", "end") and e[2] == WAIT_STEP]
    assert [e[0] for e in waits] == ["start", "end"]  # one wait, across the re-park
    assert waits[1][3] == "ok" and waits[1][4]["looks"] >= 5


def gone(name: str, step: str = "ssh", kind: str = "TunnelNotUp") -> HostResult:
    result = failed(name, Outcome.FAILED)
    result.error.step, result.error.type = step, kind
    return result


def test_a_host_whose_client_vanishes_before_its_upgrade_changed_anything_waits_again():
    hosts = make_hosts(2)
    world = World()
    attempts = iter([gone("sbx-001"), gone("sbx-001", "tunnel", "ClientInactive")])
    events = Events()

    def first_two_fail(name):
        return next(attempts, HostResult(name, Outcome.UPGRADED))

    runner = FakeRunner({"sbx-001": first_two_fail})
    rollout_ = rollout(hosts, runner, world, events=events, parallel=2, max_failures="0")
    results = rollout_.run()
    assert outcomes(results) == ["upgraded", "upgraded"]
    assert runner.calls.count("sbx-001") == 3
    assert rollout_.failures == 0  # the two attempts without a client are not failures
    waits = [e[3] for e in events.log if e[0] == "end" and e[2] == WAIT_STEP]
    assert waits == ["ok", "ok"]
    assert results[1].waiting_seconds > 0


def test_a_client_that_keeps_vanishing_fails_after_the_attempts():
    hosts = make_hosts(1)
    runner = FakeRunner({"sbx-000": gone})
    results = rollout(hosts, runner, World()).run()
    assert outcomes(results) == ["failed"]
    assert runner.calls == ["sbx-000"] * POLICY.attempts


def test_other_failures_are_not_waited_for():
    hosts = make_hosts(1)
    runner = FakeRunner({"sbx-000": lambda n: gone(n, "stage", "VerifyError")})
    results = rollout(hosts, runner, World()).run()
    assert outcomes(results) == ["failed"] and runner.calls == ["sbx-000"]


def test_the_live_state_takes_back_the_result_of_a_host_that_waits_again():
    state = ProgressState(2, FakeClock())
    state.host_finished(gone("pi-01"))
    assert (state.done, state.failures) == (1, 1)
    state.stage("pi-01", WAIT_STEP, {"wait_deadline": None})
    assert (state.done, state.failures, state.counts["failed"]) == (0, 0, 0)
    assert state.host_finished(HostResult("pi-01", Outcome.UPGRADED))
    assert (state.done, state.failures) == (1, 0)


def test_a_look_that_fails_leaves_the_error_to_the_workflows_preflight():
    hosts = make_hosts(2)
    world = World()
    world.errors["sbx-001"] = ClientBlocked("blocked", call="client_status")
    seen = {}
    runner = FakeRunner({"sbx-001": lambda n: failed(n, Outcome.FAILED, code=23)})
    runner.before = lambda host, control: seen.__setitem__(host.name, control.seen_online)
    results = rollout(hosts, runner, world).run()
    assert outcomes(results) == ["upgraded", "failed"]
    assert seen == {"sbx-000": True, "sbx-001": False}  # its preflight asks again


def test_the_wait_is_journalled_as_a_step_with_its_deadline():
    hosts = make_hosts(1)
    world = World(offline={"sbx-000"})
    world.back("sbx-000", after=0.1)
    events = Events()
    rollout(hosts, FakeRunner(), world, events=events).run()
    start, end = [e for e in events.log if e[0] in ("start", "end")]
    assert start[:3] == ("start", "sbx-000", WAIT_STEP)
    assert start[3]["waiting"] is True and start[3]["wait_deadline"] > time.time()
    assert end[:4] == ("end", "sbx-000", WAIT_STEP, "ok")
    assert end[4]["waiting"] is False
    assert end[4]["looks"] >= 3  # offline, online, online again a gap later
    assert 0 <= end[4]["queued_seconds"] < 1  # from trusted to its free slot


# --- canary, batches, budget ----------------------------------------------------------------


def test_an_offline_canary_holds_every_other_host_until_it_is_back_and_upgraded():
    hosts = make_hosts(4)
    world = World(offline={"sbx-000"})
    runner = FakeRunner()
    world.back("sbx-000", after=0.2)
    results = rollout(hosts, runner, world, canary=1, parallel=4).run()
    assert outcomes(results) == ["upgraded"] * 4
    assert runner.calls[0] == "sbx-000"  # nothing else ran before the canary
    assert [name for kind, name, _, _ in world.looks if kind == "look"][0] == "sbx-000"


def test_a_canary_still_offline_at_the_deadline_fails_the_canary():
    hosts = make_hosts(3)
    world = World(offline={"sbx-000"})
    runner = FakeRunner()
    results = rollout(hosts, runner, world, seconds=0.3, canary=1).run()
    assert outcomes(results) == ["offline", "skipped", "skipped"]
    assert results[1].error.message == "canary failed (sbx-000: offline)"
    assert runner.calls == []
    assert {name for _, name, _, _ in world.looks} == {"sbx-000"}  # the others untouched


def test_a_parked_host_does_not_hold_its_batch_and_runs_beside_later_waves():
    hosts = make_hosts(4)
    world = World(offline={"sbx-000"})
    runner = FakeRunner()
    gate = threading.Event()

    def before(host, control):
        if host.name == "sbx-003":
            world.back("sbx-000")
            gate.wait(2)  # wave 3 still in flight when sbx-000 comes back
        if host.name == "sbx-000":
            gate.set()

    runner.before = before
    results = rollout(hosts, runner, world, batch="1", parallel=2).run()
    assert outcomes(results) == ["upgraded"] * 4
    assert runner.calls[:3] == ["sbx-001", "sbx-002", "sbx-003"]  # waves 1-3 did not wait
    assert runner.calls[3] == "sbx-000"
    assert ("start", "sbx-000") in runner.log and runner.peak == 2  # beside wave 3


def test_failures_beyond_the_budget_end_a_parked_host_at_once_as_skipped():
    hosts = make_hosts(4)
    world = World(offline={"sbx-003"})
    parked = threading.Event()

    class Sink(Events):
        def step_started(self, host, step, facts=None):
            super().step_started(host, step, facts)
            parked.set()

    runner = FakeRunner({n: failed for n in ("sbx-000", "sbx-001")})
    runner.before = lambda host, control: parked.wait(2)  # fail once sbx-003 is parked
    started = time.monotonic()
    results = rollout(
        hosts, runner, world, seconds=30, events=Sink(), parallel=4, max_failures="1"
    ).run()
    assert time.monotonic() - started < 2.0
    assert outcomes(results) == ["rolled_back", "rolled_back", "upgraded", "skipped"]
    assert results[3].error.message == "failure budget exceeded (2 > 1)"
    assert results[3].waiting_seconds > 0


def test_a_host_first_reached_after_the_deadline_and_offline_is_offline_at_once():
    hosts = make_hosts(2)
    world = World(offline={"sbx-001"})
    runner = FakeRunner()
    runner.before = lambda host, control: time.sleep(0.3) if host.name == "sbx-000" else None
    results = rollout(hosts, runner, world, seconds=0.1, batch="1").run()
    assert outcomes(results) == ["upgraded", "offline"]
    assert results[1].waiting_seconds < 0.05


# --- Ctrl-C during the wait -------------------------------------------------------------------


def test_an_interrupt_during_the_wait_ends_the_run_at_once():
    hosts = make_hosts(3)
    world = World(offline={"sbx-001", "sbx-002"})
    events = Events()
    rollout_ = rollout(hosts, FakeRunner(), world, seconds=30, events=events, parallel=3)

    def interrupt_when_parked():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if sum(1 for e in events.log if e[0] == "start") == 2:
                break
            time.sleep(0.01)
        rollout_.interrupt()

    threading.Thread(target=interrupt_when_parked, daemon=True).start()
    started = time.monotonic()
    results = rollout_.run()
    assert time.monotonic() - started < 2.0  # not the 30 s of the wait
    assert outcomes(results) == ["upgraded", "skipped", "skipped"]
    assert results[1].error.message == "interrupted" and results[1].waiting_seconds > 0
    ends = [e for e in events.log if e[0] == "end"]
    assert [(e[1], e[3], e[4]["waiting"]) for e in ends] == [
        ("sbx-001", "skipped", True),  # still waiting when it stopped: a re-run picks it up
        ("sbx-002", "skipped", True),
    ]


# --- the journal: a parked host is not dangling, and a re-run picks the wait up ------------


def journal_a_wait(journal: Journal, run_id: str, hosts: list[str], deadline: float, parked):
    journal.start_run(run_id, "upgrade", "/fleet/deployer.toml", hosts, {"wait_deadline": deadline})
    sink = JournalSink(journal, run_id)
    for name in parked:
        sink.step_started(name, WAIT_STEP, {"waiting": True, "wait_deadline": deadline})


def test_a_parked_host_is_not_dangling_and_a_rerun_of_the_same_targets_picks_it_up(tmp_path):
    journal = Journal(tmp_path / "state", clock=FakeClock())
    hosts = ["pi-01", "pi-02", "pi-03"]
    journal_a_wait(journal, "run-a", hosts, 5000.0, parked=["pi-02", "pi-03"])
    JournalSink(journal, "run-a").host_finished(HostResult("pi-01", Outcome.UPGRADED))
    journal.finish_host("run-a", "pi-03", "skipped")  # interrupted while it waited
    # the deployer of run-a died: it still "runs" only if its pid lives on this machine
    journal._conn.execute("UPDATE runs SET pid = 999999999 WHERE run_id = 'run-a'")

    assert journal.dangling() == []  # nothing in flight for a parked host
    assert journal.pending_wait("upgrade", "/fleet/deployer.toml", ["pi-01"]) is None
    assert journal.pending_wait("rollback", "/fleet/deployer.toml", hosts) is None
    pending = journal.pending_wait("upgrade", "/fleet/deployer.toml", hosts)
    assert pending.run_id == "run-a" and pending.hosts == ["pi-02", "pi-03"]
    assert pending.deadline == 5000.0 and pending.finished is False

    journal.start_run("run-b", "upgrade", "/fleet/deployer.toml", hosts, {})
    journal.hand_over_wait(pending, "run-b")
    state = journal.host_state("run-a", "pi-02")
    assert state["result"] == "skipped" and state["picked_up_by"] == "run-b"
    assert "picked up by run run-b" in state["error"]["message"]
    assert journal.run("run-a").finished is not None and journal.run("run-a").interrupted
    assert journal.pending_wait("upgrade", "/fleet/deployer.toml", hosts) is None  # run-b's


def test_a_wait_of_a_run_that_still_runs_is_not_picked_up(tmp_path):
    journal = Journal(tmp_path / "state", clock=FakeClock())
    journal_a_wait(journal, "run-a", ["pi-01"], 5000.0, parked=["pi-01"])  # this process
    assert journal.pending_wait("upgrade", "/fleet/deployer.toml", ["pi-01"]) is None


def test_the_runs_deadline_is_the_later_of_the_new_wait_and_the_one_picked_up():
    class Pending:
        deadline = 1_000.0

    assert _wait_deadline(None, None, 500.0) is None
    assert _wait_deadline(60.0, None, 500.0) == 560.0
    assert _wait_deadline(None, Pending, 500.0) == 1_000.0  # a plain re-run resumes it
    assert _wait_deadline(900.0, Pending, 500.0) == 1_400.0  # a longer new wait wins
    assert _wait_deadline(60.0, Pending, 500.0) == 1_000.0
    assert _wait_deadline(None, Pending, 2_000.0) is None  # that wait is over


# --- the live view and the reports -------------------------------------------------------------


class Stream:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_the_plain_log_and_the_live_state_show_waiting_hosts_and_the_time_left():
    clock = FakeClock()
    stream = Stream()
    progress = PlainProgress(stream, 3, clock=clock)
    deadline = clock.wall() + 1800
    progress.step_started("pi-02", WAIT_STEP, {"waiting": True, "wait_deadline": deadline})
    progress.step_started("pi-03", WAIT_STEP, {"waiting": True, "wait_deadline": deadline})
    assert "pi-02 offline: waiting for its client (30m00s left)" in stream.text
    clock.advance(60)
    state = progress.state
    assert state.status_line() == "0/3 done · 0 failed · 2 waiting for their client, 29m00s left"
    assert state.waiting_line() == "waiting: pi-02, pi-03"
    assert state.stages == {}  # parked hosts are not in flight
    progress.step_finished("pi-02", WAIT_STEP, "ok", 61.0, {"waiting": False})
    assert "pi-02 back online after waiting 1m01s: upgrading" in stream.text
    assert state.waiting_line() == "waiting: pi-03"


def test_host_lines_of_waiting_hosts():
    upgraded = HostResult("pi-01", Outcome.UPGRADED, duration_seconds=4.2, waiting_seconds=75)
    assert host_line(upgraded) == "pi-01 upgraded in 4.2s after waiting 1m15s"
    offline = HostResult("pi-02", Outcome.OFFLINE, waiting_seconds=90)
    offline.error = failed("pi-02").error
    offline.error.message = "client not seen online long enough to trust in 1m30s of waiting"
    assert host_line(offline).startswith("pi-02 offline: client not seen online")


def test_progress_state_counts_an_offline_host_done_not_failed():
    state = ProgressState(2, FakeClock())
    state.stage("pi-01", WAIT_STEP, {"wait_deadline": None})
    assert state.host_finished(HostResult("pi-01", Outcome.OFFLINE))
    assert (state.done, state.failures, state.waiting) == (1, 0, {})


def test_junit_reports_an_offline_host_as_skipped_with_its_wait():
    import xml.etree.ElementTree as ET

    offline = HostResult("pi-02", Outcome.OFFLINE, waiting_seconds=90)
    offline.error = failed("pi-02").error
    offline.error.message = "client not seen online long enough to trust in 1m30s of waiting"
    run = RunResult("r", 0.0, 1.0, [HostResult("pi-01", Outcome.UPGRADED), offline])
    suite = ET.fromstring(to_junit_xml(run)).find("testsuite")
    assert suite.get("skipped") == "1" and suite.get("failures") == "0"
    case = suite.findall("testcase")[1]
    assert case.find("skipped").get("message").startswith("offline: client not seen online")
    assert "waiting_seconds: 90.000" in case.find("system-out").text


def test_waiting_seconds_are_journalled_with_the_result(tmp_path):
    journal = Journal(tmp_path / "state", clock=FakeClock())
    journal.start_run("r", "upgrade", "/inv", ["pi-01"], {})
    result = HostResult("pi-01", Outcome.OFFLINE, waiting_seconds=12.3456)
    JournalSink(journal, "r").host_finished(result)
    assert journal.host_state("r", "pi-01")["waiting_seconds"] == 12.346
    assert Path(journal.path).exists()


# --- run_upgrade: the wait, and a re-run picking it up -----------------------------------------


def offline_fleet(root: Path):
    from deployer.inventory import load_inventory
    from tests.doubles import FakeApi
    from tests.provider_inventory import ENV, write_inventory

    inventory = load_inventory(write_inventory(root, hosts=2, source="template"), env=ENV)
    return inventory, FakeApi(online=lambda: False)


def upgrade_offline(root: Path, inventory, api, **kw) -> RunResult:
    from deployer.upgrade import UpgradeRequest, run_upgrade

    request = UpgradeRequest(
        inventory=inventory,
        hosts=list(inventory.hosts.values()),
        state_dir=root / "state",
        wait_policy=POLICY,
        **kw,
    )
    return run_upgrade(request, remote_factory=lambda host: None, api=api)


def test_run_upgrade_parks_offline_hosts_and_ends_them_offline(tmp_path):
    inventory, api = offline_fleet(tmp_path)
    run = upgrade_offline(tmp_path, inventory, api, wait_offline=0.3)
    assert [h.result for h in run.hosts] == [Outcome.OFFLINE, Outcome.OFFLINE]
    assert run.exit_code() == EXIT_OFFLINE
    assert all(h.waiting_seconds >= 0.2 for h in run.hosts)
    assert all(h.api_calls == api.calls_for(h.host) >= 3 for h in run.hosts)  # looks counted
    assert {call for call, _, _ in api.calls} == {"client_status"}  # nothing else touched
    with Journal(tmp_path / "state") as journal:
        (record,) = journal.runs()
        assert record.options["wait_offline"] == 0.3 and record.options["wait_deadline"]
        assert [h["result"] for h in journal.host_results(record.run_id)] == ["offline"] * 2
        assert journal.dangling() == []


def test_without_a_wait_an_offline_host_fails_at_preflight(tmp_path):
    inventory, api = offline_fleet(tmp_path)
    run = upgrade_offline(tmp_path, inventory, api)
    assert [h.result for h in run.hosts] == [Outcome.FAILED, Outcome.FAILED]
    assert run.hosts[0].error.step == "preflight"


def test_a_plain_rerun_of_the_same_targets_picks_up_an_interrupted_wait(tmp_path):
    inventory, api = offline_fleet(tmp_path)
    names = list(inventory.hosts)
    deadline = time.time() + 0.4
    with Journal(tmp_path / "state") as journal:  # a run that was interrupted while waiting
        journal_a_wait(journal, "run-a", names, deadline, parked=names)
        journal._conn.execute(
            "UPDATE runs SET inventory = ?, pid = 999999999", (str(inventory.path),)
        )
        for name in names:
            journal.finish_host("run-a", name, "skipped")
        journal.finish_run("run-a", ok=False, interrupted=True)

    run = upgrade_offline(tmp_path, inventory, api)  # no --wait-offline: the wait goes on
    assert [h.result for h in run.hosts] == [Outcome.OFFLINE, Outcome.OFFLINE]
    assert time.time() >= deadline - 0.05  # until the earlier run's deadline
    with Journal(tmp_path / "state") as journal:
        assert journal.host_state("run-a", names[0])["picked_up_by"] == run.run_id
        again = upgrade_offline(tmp_path, inventory, api)  # that wait is over now
    assert [h.result for h in again.hosts] == [Outcome.FAILED, Outcome.FAILED]
