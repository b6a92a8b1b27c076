"""The fleet layer with a fake host runner: concurrency bounds, waves, canary,
failure budget, account-level stops and interrupts. Ordering is controlled with
threading primitives, never by sleeping."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from deployer.errors import UsageError
from deployer.events import EventSink
from deployer.result import HostResult, Outcome
from deployer.rollout import Rollout, RolloutPolicy, parse_count
from tests.rollout_support import FakeRunner, failed, make_hosts, outcomes

pytestmark = pytest.mark.unit

WAIT = 5.0  # generous upper bound for a fake to wait on a gate; never reached when green


class Recorder(EventSink):
    def __init__(self):
        self.finished: list[HostResult] = []
        self.started: list[str] = []
        self.on_finished: Callable[[HostResult], None] | None = None

    def host_started(self, host):
        self.started.append(host)

    def host_finished(self, result):
        self.finished.append(result)
        if self.on_finished:
            self.on_finished(result)


def run(hosts, runner, **policy) -> tuple[Rollout, list[HostResult]]:
    rollout = Rollout(hosts, runner, RolloutPolicy(**policy))
    return rollout, rollout.run()


# --- parse_count and policy validation ------------------------------------------


@pytest.mark.parametrize(
    ("spec", "total", "expected"),
    [("3", 10, 3), ("10%", 10, 1), ("25%", 10, 3), ("1%", 7, 1), ("100%", 7, 7), (" 2 ", 5, 2)],
)
def test_parse_count_numbers_and_percentages_round_up(spec, total, expected):
    assert parse_count(spec, total, "--batch") == expected


@pytest.mark.parametrize("spec", ["", "x", "-1", "1.5", "10 %%", "150%", "0", "0%", "3x"])
def test_parse_count_rejects_bad_specs_with_a_one_line_usage_error(spec):
    with pytest.raises(UsageError) as info:
        parse_count(spec, 10, "--batch")
    assert "--batch" in str(info.value)
    assert "\n" not in str(info.value)


def test_failure_budget_may_be_zero():
    assert parse_count("0", 10, "--max-failures", minimum=0) == 0
    assert parse_count("0%", 10, "--max-failures", minimum=0) == 0
    assert parse_count("10%", 15, "--max-failures", minimum=0) == 2


@pytest.mark.parametrize(
    "policy",
    [
        RolloutPolicy(parallel=0),
        RolloutPolicy(canary=-1),
        RolloutPolicy(batch="0"),
        RolloutPolicy(max_failures="abc"),
    ],
)
def test_bad_policy_raises_before_any_host_runs(policy):
    runner = FakeRunner()
    with pytest.raises(UsageError):
        Rollout(make_hosts(3), runner, policy).run()
    assert runner.calls == []


def test_waves_are_canary_then_batches_of_all_hosts():
    waves = RolloutPolicy(canary=2, batch="30%").waves(10)
    assert [list(w) for w in waves] == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    assert [list(w) for w in RolloutPolicy().waves(3)] == [[0, 1, 2]]
    assert [list(w) for w in RolloutPolicy(canary=5).waves(3)] == [[0, 1, 2]]


# --- concurrency and waves ------------------------------------------------------------


def test_peak_in_flight_never_exceeds_parallel_and_reaches_it():
    parallel = 8
    hosts = make_hosts(200)
    barrier = threading.Barrier(parallel, timeout=WAIT)
    threads: set[str] = set()
    runner = FakeRunner()

    def before(host, control):
        threads.add(threading.current_thread().name)
        barrier.wait()  # trips only with 8 in flight

    runner.before = before
    _, results = run(hosts, runner, parallel=parallel)
    assert runner.peak == parallel
    assert outcomes(results) == ["upgraded"] * 200
    assert len(threads) == parallel  # one bounded pool reused, not a thread per host


def test_results_are_in_inventory_order_whatever_the_finish_order():
    hosts = make_hosts(3)
    first_done = threading.Event()
    runner = FakeRunner({"sbx-002": lambda n: HostResult(n, Outcome.UNCHANGED)})

    def before(host, control):
        if host.name == "sbx-002":
            first_done.set()
        else:
            first_done.wait(WAIT)

    runner.before = before
    _, results = run(hosts, runner, parallel=3)
    assert [r.host for r in results] == ["sbx-000", "sbx-001", "sbx-002"]
    assert outcomes(results) == ["upgraded", "upgraded", "unchanged"]


def test_a_wave_finishes_before_the_next_starts():
    hosts = make_hosts(9)
    barrier = threading.Barrier(3, timeout=WAIT)  # each wave's 3 hosts run together
    runner = FakeRunner()
    runner.before = lambda host, control: barrier.wait()
    _, results = run(hosts, runner, parallel=5, batch="3")
    assert outcomes(results) == ["upgraded"] * 9
    position = {(kind, name): i for i, (kind, name) in enumerate(runner.log)}
    for wave in range(2):
        this = [f"sbx-{i:03d}" for i in range(wave * 3, wave * 3 + 3)]
        after = [f"sbx-{i:03d}" for i in range(wave * 3 + 3, 9)]
        last_end = max(position["end", n] for n in this)
        first_start = min(position["start", n] for n in after)
        assert last_end < first_start, f"wave {wave} overlapped the next one"


# --- canary ---------------------------------------------------------------------------


def test_canary_failure_skips_every_other_host_untouched():
    hosts = make_hosts(10)
    runner = FakeRunner({"sbx-000": failed})
    rollout, results = run(hosts, runner, parallel=4, canary=2, batch="3")
    assert sorted(runner.calls) == ["sbx-000", "sbx-001"]
    assert outcomes(results)[:2] == ["rolled_back", "upgraded"]
    assert outcomes(results)[2:] == ["skipped"] * 8
    assert all(r.error.message.startswith("canary failed") for r in results[2:])
    assert rollout.stop_reason.startswith("canary failed (sbx-000: rolled_back)")


def test_first_failed_canary_stops_the_remaining_canaries_too():
    hosts = make_hosts(5)
    runner = FakeRunner({"sbx-000": lambda n: failed(n, Outcome.FAILED)})
    _, results = run(hosts, runner, parallel=1, canary=3)
    assert runner.calls == ["sbx-000"]
    assert outcomes(results) == ["failed"] + ["skipped"] * 4


def test_canary_success_goes_on_to_the_rest_in_waves():
    hosts = make_hosts(6)
    runner = FakeRunner({"sbx-000": lambda n: HostResult(n, Outcome.UNCHANGED)})
    rollout, results = run(hosts, runner, parallel=2, canary=1, batch="2")
    assert outcomes(results) == ["unchanged"] + ["upgraded"] * 5
    assert rollout.stop_reason is None
    assert runner.log[:2] == [("start", "sbx-000"), ("end", "sbx-000")]


# --- failure budget ---------------------------------------------------------------------


def test_failure_budget_counts_over_the_whole_run_not_per_batch():
    hosts = make_hosts(10)
    plan = {name: failed for name in ("sbx-000", "sbx-002", "sbx-005")}
    plan["sbx-003"] = lambda n: HostResult(n, Outcome.UNSAFE)  # unsafe counts too
    runner = FakeRunner(plan)
    rollout, results = run(hosts, runner, parallel=1, batch="2", max_failures="2")
    # batches of 2 never hold more than 2 failures; the whole run reaches 3 at sbx-003
    assert runner.calls == [f"sbx-{i:03d}" for i in range(4)]
    assert rollout.stop_reason == "failure budget exceeded (3 > 2)"
    assert outcomes(results)[4:] == ["skipped"] * 6
    assert results[9].error.message == "failure budget exceeded (3 > 2)"


def test_failure_budget_as_percentage_and_default_unlimited():
    hosts = make_hosts(20)
    plan = {f"sbx-{i:03d}": failed for i in range(0, 20, 2)}  # every other host fails
    rollout, results = run(hosts, FakeRunner(plan), parallel=1)
    assert rollout.stop_reason is None
    assert outcomes(results).count("skipped") == 0

    rollout, results = run(hosts, FakeRunner(plan), parallel=1, max_failures="10%")  # 2 hosts
    assert rollout.stop_reason == "failure budget exceeded (3 > 2)"
    assert outcomes(results)[:5] == ["rolled_back", "upgraded", "rolled_back", "upgraded"] + [
        "rolled_back"
    ]
    assert outcomes(results)[5:] == ["skipped"] * 15


def test_skipped_hosts_do_not_count_as_failures():
    hosts = make_hosts(4)
    plan = {"sbx-000": lambda n: HostResult(n, Outcome.SKIPPED)}
    rollout, results = run(hosts, FakeRunner(plan), max_failures="0")
    assert rollout.stop_reason is None
    assert rollout.failures == 0
    assert outcomes(results) == ["skipped", "upgraded", "upgraded", "upgraded"]


def test_in_flight_hosts_finish_after_the_budget_is_exceeded():
    hosts = make_hosts(8)
    events = Recorder()
    decided = threading.Event()
    events.on_finished = lambda r: decided.set() if r.host == "sbx-000" else None
    runner = FakeRunner({"sbx-000": failed})

    def before(host, control):
        if host.name != "sbx-000":
            assert decided.wait(WAIT)  # finish only after the stop was decided

    runner.before = before
    rollout = Rollout(hosts, runner, RolloutPolicy(parallel=3, max_failures="0"), events)
    results = rollout.run()
    assert sorted(runner.calls) == ["sbx-000", "sbx-001", "sbx-002"]
    assert outcomes(results) == ["rolled_back", "upgraded", "upgraded"] + ["skipped"] * 5
    assert [r.host for r in events.finished][-5:] == [f"sbx-{i:03d}" for i in range(3, 8)]
    assert len(events.finished) == 8
    assert sorted(events.started) == ["sbx-000", "sbx-001", "sbx-002"]


# --- fleet policy by API code -------------------------------------------------------------


def test_code_21_stops_the_run():
    hosts = make_hosts(5)
    runner = FakeRunner({"sbx-001": lambda n: failed(n, Outcome.FAILED, code=21)})
    rollout, results = run(hosts, runner, parallel=1)
    assert runner.calls == ["sbx-000", "sbx-001"]
    assert outcomes(results) == ["upgraded", "failed", "skipped", "skipped", "skipped"]
    assert rollout.stop_reason.startswith("run stopped: account-level error")
    assert "21" in results[4].error.message


def test_code_32_invalid_api_key_stops_the_run_even_after_a_success():
    # the api_key is the account's: a 32 on one fetch means every fetch fails
    hosts = make_hosts(5)
    runner = FakeRunner({"sbx-001": lambda n: failed(n, Outcome.FAILED, code=32)})
    rollout, results = run(hosts, runner, parallel=1)
    assert runner.calls == ["sbx-000", "sbx-001"]
    assert outcomes(results) == ["upgraded", "failed", "skipped", "skipped", "skipped"]
    assert rollout.stop_reason.startswith("run stopped: account-level error (API code 32")


@pytest.mark.parametrize("code", [40, 41, 45])
def test_other_client_script_codes_fail_only_that_host(code):
    hosts = make_hosts(3)
    runner = FakeRunner({"sbx-000": lambda n: failed(n, Outcome.FAILED, code=code)})
    rollout, results = run(hosts, runner, parallel=1)
    assert outcomes(results) == ["failed", "upgraded", "upgraded"]
    assert rollout.stop_reason is None


def test_code_23_fails_only_that_host():
    hosts = make_hosts(4)
    runner = FakeRunner({"sbx-000": lambda n: failed(n, Outcome.FAILED, code=23)})
    rollout, results = run(hosts, runner, parallel=1)
    assert outcomes(results) == ["failed", "upgraded", "upgraded", "upgraded"]
    assert rollout.stop_reason is None


def test_code_31_before_any_success_stops_the_run():
    hosts = make_hosts(4)
    runner = FakeRunner({"sbx-000": lambda n: failed(n, Outcome.FAILED, code=31)})
    rollout, results = run(hosts, runner, parallel=1)
    assert runner.calls == ["sbx-000"]
    assert outcomes(results) == ["failed", "skipped", "skipped", "skipped"]
    assert "account-level" in rollout.stop_reason


def test_code_31_after_a_success_is_that_hosts_wrong_data_only():
    hosts = make_hosts(4)
    runner = FakeRunner({"sbx-001": lambda n: failed(n, Outcome.FAILED, code=31)})
    rollout, results = run(hosts, runner, parallel=1)
    assert outcomes(results) == ["upgraded", "failed", "upgraded", "upgraded"]
    assert rollout.stop_reason is None


# --- defensive ---------------------------------------------------------------------------


def test_an_exception_escaping_run_host_is_unsafe_and_counts():
    hosts = make_hosts(3)

    def explode(name):
        raise RuntimeError("bug in workflow")

    rollout, results = run(hosts, FakeRunner({"sbx-000": explode}), max_failures="0")
    assert outcomes(results) == ["unsafe", "skipped", "skipped"]
    assert results[0].error.type == "RuntimeError"
    assert results[0].error.message == "bug in workflow"


def test_an_escaping_exception_message_is_scrubbed_of_the_hosts_credentials(caplog):
    hosts = make_hosts(1)

    def leaky(host, control):
        raise ConnectionError(f"GET /api/connect?dbid={host.dbid.reveal()} refused")

    with caplog.at_level(logging.DEBUG, logger="deployer.rollout"):
        results = Rollout(hosts, leaky, RolloutPolicy()).run()
    assert "ConnectionError" in caplog.text and "Traceback" in caplog.text
    assert hosts[0].dbid.reveal() not in caplog.text
    assert results[0].result is Outcome.UNSAFE
    assert hosts[0].dbid.reveal() not in results[0].error.message
    assert "…0000 refused" in results[0].error.message


def test_a_broken_event_sink_does_not_break_the_rollout():
    class Broken(EventSink):
        def host_finished(self, result):
            raise ValueError("display broke")

    rollout = Rollout(make_hosts(2), FakeRunner(), RolloutPolicy(), Broken())
    assert outcomes(rollout.run()) == ["upgraded", "upgraded"]


# --- interrupts -----------------------------------------------------------------------------


def start_in_thread(rollout: Rollout) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(rollout.run()))
    thread.start()
    return thread, box


def test_first_interrupt_starts_no_new_host_and_lets_in_flight_finish():
    hosts = make_hosts(6)
    both_running = threading.Barrier(3, timeout=WAIT)
    release = threading.Event()
    aborts: list[bool] = []
    runner = FakeRunner()

    def before(host, control):
        both_running.wait()
        assert release.wait(WAIT)
        aborts.append(control.abort.is_set())

    runner.before = before
    rollout = Rollout(hosts, runner, RolloutPolicy(parallel=2))
    thread, box = start_in_thread(rollout)
    both_running.wait()
    assert rollout.interrupt() == 1
    release.set()
    thread.join(WAIT)
    results = box[0]
    assert outcomes(results) == ["upgraded", "upgraded"] + ["skipped"] * 4
    assert all(r.error.message == "interrupted" for r in results[2:])
    assert aborts == [False, False]
    assert rollout.interrupted and rollout.stop_reason == "interrupted"


def test_second_interrupt_aborts_in_flight_hosts_now():
    hosts = make_hosts(5)
    all_running = threading.Barrier(4, timeout=WAIT)
    runner = FakeRunner()

    def before(host, control):
        all_running.wait()
        assert control.abort.wait(WAIT)  # the workflow polls abort and rolls back

    runner.before = before
    runner.plan = {h.name: lambda n: HostResult(n, Outcome.ROLLED_BACK) for h in hosts}
    rollout = Rollout(hosts, runner, RolloutPolicy(parallel=3))
    thread, box = start_in_thread(rollout)
    all_running.wait()
    assert rollout.interrupt() == 1
    assert rollout.interrupt() == 2
    thread.join(WAIT)
    assert outcomes(box[0]) == ["rolled_back"] * 3 + ["skipped"] * 2
    assert sorted(runner.calls) == ["sbx-000", "sbx-001", "sbx-002"]


def test_interrupt_after_a_budget_stop_keeps_the_first_reason():
    hosts = make_hosts(3)
    rollout = Rollout(hosts, FakeRunner({"sbx-000": failed}), RolloutPolicy(max_failures="0"))
    results = rollout.run()
    assert rollout.interrupt() == 1
    assert rollout.stop_reason == "failure budget exceeded (1 > 0)"
    assert outcomes(results) == ["rolled_back", "skipped", "skipped"]


def test_signal_handlers_map_sigint_to_interrupt_and_sigterm_to_abort():
    import signal

    from deployer.rollout import interrupt_on_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    rollout = Rollout(make_hosts(1), FakeRunner(), RolloutPolicy())
    with interrupt_on_signals(rollout):
        signal.raise_signal(signal.SIGINT)
        assert rollout.interrupted and rollout.interrupts == 1
        signal.raise_signal(signal.SIGTERM)
        assert rollout.interrupts == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_real_sigint_during_a_main_thread_run_is_a_first_interrupt_not_an_exception():
    import signal

    hosts = make_hosts(4)
    main = threading.main_thread().ident
    noticed = threading.Event()
    runner = FakeRunner()
    rollout: Rollout | None = None

    def before(host, control):
        if host.name == "sbx-000":
            signal.pthread_kill(main, signal.SIGINT)  # a real Ctrl-C to the waiting thread
            for _ in range(500):  # wait (bounded) until the main thread handled it
                if rollout.interrupted:
                    noticed.set()
                    break
                threading.Event().wait(0.01)

    runner.before = before
    rollout = Rollout(hosts, runner, RolloutPolicy(parallel=1))
    results = rollout.run()
    assert noticed.is_set()
    assert runner.calls == ["sbx-000"]
    assert outcomes(results) == ["upgraded", "skipped", "skipped", "skipped"]
    assert rollout.stop_reason == "interrupted"


def test_with_host_events_off_only_made_up_results_are_emitted():
    """The workflow reports its own host_started/host_finished; the rollout then
    reports only what the workflow cannot: skipped hosts and crashed runs."""
    hosts = make_hosts(4)

    def crash(name):
        raise RuntimeError("bug")

    events = Recorder()
    runner = FakeRunner({"sbx-001": crash})
    policy = RolloutPolicy(max_failures="0")
    results = Rollout(hosts, runner, policy, events, host_events=False).run()
    assert outcomes(results) == ["upgraded", "unsafe", "skipped", "skipped"]
    assert events.started == []
    assert [r.host for r in events.finished] == ["sbx-001", "sbx-002", "sbx-003"]
