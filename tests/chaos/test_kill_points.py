"""SIGKILL ``deployer upgrade`` at stage boundaries, on the sandbox (SPEC 4, 6).

The stage is found from the journal (the step's ``begin`` record, written
before the step acts), never by sleeping. After the kill the host is judged
from outside: the simulator's ``/sandbox/state`` and the host's files (see
:mod:`tests.chaos.harness`).

(a) without ``recover``: by the guard's deadline (plus a margin for its
    revert) the window is closed and a client runs a complete script;
(b) with ``recover`` right after the kill: the same holds when it returns,
    and ``deployer history`` shows a final result for the host.

The default suite runs a few kill points; every stage, both ways, runs with
``DEPLOYER_CHAOS=1`` (marker ``chaos``). The >= 100 randomized points are
``benchmarks/chaos.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from pathlib import Path

import pytest

from tests.chaos.harness import (
    FINAL_RESULTS,
    KILL_STAGES,
    SANDBOX_SILENCE,
    SETTLE_MARGIN,
    FleetHandle,
    KillOutcome,
    UpgradeProcess,
    host_dir,
    kill_point,
    lock_held,
    recover,
    release_sha,
    sha256_file,
)

pytestmark = pytest.mark.e2e

GUARD_DEADLINE = 20.0  # the sandbox inventory's guard_deadline
CHAOS = os.environ.get("DEPLOYER_CHAOS") == "1"
chaos_only = pytest.mark.skipif(not CHAOS, reason="the full kill sweep: set DEPLOYER_CHAOS=1")

# Default suite: a few kill points each way, each on its own host.
WITHOUT_RECOVER = ["stage", "open_window", "swap", "first_life", "soak", "commit"]
WITH_RECOVER = ["lock", "stage", "swap", "close_window", "soak", "cleanup"]


def _handle(sb) -> FleetHandle:
    return FleetHandle(sb.dir, sb.client)


@pytest.fixture(scope="module")
def fleet(module_sandbox_factory):
    return module_sandbox_factory(hosts=len(WITHOUT_RECOVER) + len(WITH_RECOVER) + 2)


def _run_batch(handle: FleetHandle, points: dict[str, str], with_recover: bool, release: str):
    """Kill points on distinct hosts at once: {host: stage} -> {stage: KillOutcome}."""
    with cf.ThreadPoolExecutor(max_workers=len(points)) as pool:
        futures = {
            stage: pool.submit(kill_point, handle, host, stage, release, with_recover=with_recover)
            for host, stage in points.items()
        }
        return {stage: f.result() for stage, f in futures.items()}


@pytest.fixture(scope="module")
def unattended(fleet) -> dict[str, KillOutcome]:
    """(a): every WITHOUT_RECOVER kill point at once, watched until settled."""
    points = dict(zip(fleet.hosts[: len(WITHOUT_RECOVER)], WITHOUT_RECOVER, strict=True))
    outcomes = _run_batch(_handle(fleet), points, with_recover=False, release="2")
    recover(fleet.inventory)  # tidy up (locks, tunnels) for the tests that follow
    return outcomes


# The swap is one word on the guard's stream: the kill aimed at it, sent when the
# journal shows the step, may land in first_life, the next step inside the window.
# inspect reads what the lock's round trip already brought (no host work of its
# own): a kill aimed at it may land in stage.
LANDS_IN = {"swap": {"swap", "first_life"}, "inspect": {"inspect", "stage"}}


def _assert_killed_in(outcome: KillOutcome, stage: str) -> None:
    assert outcome.killed, f"the run ended before {stage}: {outcome}"
    assert outcome.killed_in in LANDS_IN.get(stage, {stage}), outcome


@pytest.mark.parametrize("stage", WITHOUT_RECOVER)
def test_without_recover_the_guard_leaves_the_window_closed_and_a_complete_client(
    unattended, stage
):
    outcome = unattended[stage]
    _assert_killed_in(outcome, stage)
    assert outcome.safe, f"killed in {stage}, not safe by the guard's deadline: {outcome.problems}"
    assert outcome.settled_after is not None
    # the deadline's revert, or the silence's: a guard that reverted at its deadline
    # waits out deployer's silence before it closes the tunnel and exits
    assert outcome.settled_after <= max(GUARD_DEADLINE, SANDBOX_SILENCE) + SETTLE_MARGIN


@pytest.mark.parametrize("stage", WITH_RECOVER)
def test_recover_right_after_a_kill_leaves_the_host_safe_and_a_final_result(fleet, stage):
    host = fleet.hosts[len(WITHOUT_RECOVER) + WITH_RECOVER.index(stage)]
    outcome = kill_point(_handle(fleet), host, stage, "3", with_recover=True)

    _assert_killed_in(outcome, stage)
    assert outcome.recover_code == 0, outcome
    assert outcome.recover_result in {"upgraded", "rolled_back", "failed"}, outcome
    assert outcome.safe, f"killed in {stage}, not safe after recover: {outcome.problems}"
    assert outcome.history_result == outcome.recover_result
    assert not outcome.lock_left, "recover left the host lock behind"


def test_recover_with_nothing_dangling_does_nothing(fleet):
    code, report, _ = recover(fleet.inventory)
    assert code == 0
    assert report["hosts"] == []


def test_a_kill_in_cleanup_after_commit_keeps_the_upgrade(fleet):
    """Regression: recover used to roll back a committed upgrade here."""
    host = fleet.hosts[-1]
    new_sha = release_sha(fleet.inventory, host, "4")
    up = UpgradeProcess(fleet.inventory, host, ("--var", "release=4"))
    assert up.wait_for_step("cleanup")
    runs = host_dir(fleet.dir, host) / ".client.py.deployer" / "runs"
    _wait_gone(runs / str(up.run_id))
    up.kill()

    code, report, _ = recover(fleet.inventory)

    assert code == 0
    assert [h["result"] for h in report["hosts"]] == ["upgraded"], report
    assert sha256_file(host_dir(fleet.dir, host) / "client.py") == new_sha


def test_a_kill_while_arming_the_guard_recovers_without_waiting_for_a_guard_that_never_ran(
    fleet,
):
    host = fleet.hosts[-2]
    old_sha = sha256_file(host_dir(fleet.dir, host) / "client.py")
    up = UpgradeProcess(fleet.inventory, host, ("--var", "release=5"))
    assert up.wait_for_fact("guard_armed")
    up.kill()

    code, report, _ = recover(fleet.inventory)

    assert code == 0
    [entry] = report["hosts"]
    assert entry["result"] == "failed", entry
    assert sha256_file(host_dir(fleet.dir, host) / "client.py") == old_sha
    assert not lock_held(fleet.dir, host), "recover left the host lock behind"
    assert entry["error"] is None or entry["error"]["type"] != "GuardError", entry["error"]


def _wait_gone(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < end, f"{path} still there"
        time.sleep(0.002)


# --- the full sweep (DEPLOYER_CHAOS=1) ------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_fleet(module_sandbox_factory):
    if not CHAOS:
        pytest.skip("the full kill sweep: set DEPLOYER_CHAOS=1")
    return module_sandbox_factory(hosts=2 * len(KILL_STAGES))


@pytest.fixture(scope="module")
def sweep_unattended(sweep_fleet) -> dict[str, KillOutcome]:
    points = dict(zip(sweep_fleet.hosts[: len(KILL_STAGES)], KILL_STAGES, strict=True))
    outcomes = _run_batch(_handle(sweep_fleet), points, with_recover=False, release="2")
    recover(sweep_fleet.inventory)
    return outcomes


@pytest.mark.chaos
@chaos_only
@pytest.mark.parametrize("stage", KILL_STAGES)
def test_sweep_without_recover(sweep_unattended, stage):
    outcome = sweep_unattended[stage]
    _assert_killed_in(outcome, stage)
    assert outcome.safe, outcome.problems


@pytest.mark.chaos
@chaos_only
@pytest.mark.parametrize("stage", KILL_STAGES)
def test_sweep_with_recover(sweep_fleet, stage):
    host = sweep_fleet.hosts[len(KILL_STAGES) + KILL_STAGES.index(stage)]
    outcome = kill_point(_handle(sweep_fleet), host, stage, "3", with_recover=True)
    _assert_killed_in(outcome, stage)
    assert outcome.recover_code == 0, outcome
    assert outcome.safe, outcome.problems
    assert outcome.history_result in FINAL_RESULTS
    assert not outcome.lock_left
