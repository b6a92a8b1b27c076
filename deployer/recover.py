"""``deployer recover``: finish every run that a vanished deployer left behind.

For each (run, host) the journal holds without a final result (and whose
deployer process is gone), a :class:`~deployer.workflow.HostRun` is resumed
from the facts journalled before each action: the window is closed first,
an uncommitted guard is asked to revert (or one is started to revert, if the
run's guard is gone), the old client is verified online, the lock and the
staged files are removed, the tunnel closed, and the final result written
to the journal. Idempotent: with nothing dangling it does nothing.

Each host is recovered on its own: one that cannot be reached, or whose
recovery fails in any way, is reported ``unsafe`` and the others go on. A
host that the run may have touched is reached first (for as long as its
guard may still be at work); one that cannot be reached stays pending in the
journal, for the next ``recover``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from deployer.clock import Clock
from deployer.errors import ApiError, RemoteError, SshConnectError
from deployer.events import EventSink, Fanout
from deployer.hostfiles import HostPaths
from deployer.model import HostConfig, Inventory
from deployer.plan import HostPlan, plan_host
from deployer.remote import Remote
from deployer.result import ErrorInfo, HostResult, Outcome, RunResult
from deployer.secrets import scrub
from deployer.upgrade import new_run_id, owner_label, ssh_factory
from deployer.workflow import REATTACH_EVERY, REATTACH_MARGIN, HostRun, RunContext, UpgradeOptions

log = logging.getLogger("deployer.recover")

RECOVER_PARALLEL = 8  # hosts recovered at once (each may wait for a guard's deadline)
RECOVER_STEP = "recover"
# facts that say the run may have left something on the host (or a tunnel to it)
HOST_FACTS = (
    "tunnel_opened",
    "lock_maybe_held",
    "staged",
    "guard_armed",
    "window_maybe_open",
    "swap_started",
    "committed",
)


def run_recover(
    inventory: Inventory,
    state_dir: Path,
    progress: EventSink | None = None,
    *,
    remote_factory=None,
    api=None,
    clock: Clock | None = None,
) -> RunResult:
    from deployer.api import ProviderAPI
    from deployer.journal import Journal, JournalSink
    from deployer.ratelimit import RateLimiter

    journal = Journal(state_dir, secrets=inventory.secret_values())
    result = RunResult(run_id=new_run_id(), started=time.time())
    own_api = api is None
    if own_api:
        api = ProviderAPI(inventory.provider, limiter=RateLimiter(inventory.provider.rate_limit))
    try:
        by_run = defaultdict(list)
        dangling = journal.dangling()
        for item in dangling:
            by_run[item.run_id].append(item)
        sink = progress(len(dangling)) if progress and dangling else EventSink()
        with cf.ThreadPoolExecutor(max_workers=RECOVER_PARALLEL) as pool:
            futures = []
            for run_id, items in by_run.items():
                ctx = RunContext(
                    run_id=run_id,
                    inventory=inventory,
                    api=api,
                    remote_factory=remote_factory or ssh_factory(inventory),
                    options=UpgradeOptions(command="recover"),
                    events=_Unfinished(journal, run_id, sink, JournalSink(journal, run_id)),
                    journal=journal,
                    owner=owner_label(),
                    clock=clock or Clock(),
                )
                futures += [pool.submit(_recover_host, ctx, item, sink) for item in items]
            result.hosts = [f.result() for f in futures]
        for run_id in by_run:
            record = journal.run(run_id)
            if record is not None and record.finished is None and _all_final(journal, run_id):
                journal.finish_run(run_id, ok=False, interrupted=True)
    finally:
        result.finished = time.time()
        journal.close()
        if own_api:
            api.close()
    return result


def _all_final(journal, run_id: str) -> bool:
    return all(h["result"] is not None for h in journal.host_results(run_id))


def _recover_host(ctx: RunContext, item, progress: EventSink) -> HostResult:
    """One host, isolated: whatever goes wrong is this host's ``unsafe`` result."""
    try:
        return _recover_one(ctx, item, progress)
    except Exception as exc:  # noqa: BLE001 - one host's failure must not lose the others
        log.debug("%s: recover failed", item.host, exc_info=True)
        message = (
            f"recover failed: {type(exc).__name__}: {exc}; the host stays pending in the "
            "journal: check it (`deployer status`, `deployer history HOST`) and run "
            "`deployer recover` again"
        )
        return _report(ctx, progress, item.host, "RecoverError", message)


def _recover_one(ctx: RunContext, item, progress: EventSink) -> HostResult:
    host = ctx.inventory.hosts.get(item.host)
    if host is None:
        message = (
            f"host {item.host} of run {item.run_id} is not in this inventory; run "
            "recover with the inventory that run used (see `deployer history`)"
        )
        return _report(ctx, ctx.events, item.host, "HostNotInInventory", message)
    plan = _plan(ctx, host, item)
    if any(item.facts.get(name) for name in HOST_FACTS):
        try:
            remote = _reach(ctx, plan)
        except SshConnectError as exc:
            return _unreachable(ctx, plan, item, exc, progress)
        remote.close()
    return HostRun(ctx, plan).resume(item.facts)


def _plan(ctx: RunContext, host: HostConfig, item) -> HostPlan:
    plan = plan_host(ctx.inventory, host, item.run_id, render=False)
    script_path = item.facts.get("script_path") or host.script_path
    return dataclasses.replace(plan, paths=HostPaths(script_path, item.run_id))


def _reach(ctx: RunContext, plan: HostPlan) -> Remote:
    """An SSH session to the host through its tunnel, trying for as long as the
    run's guard may still be at work there (a reverting guard restarts the old
    client: offline for a while). SshConnectError if it never answers."""
    within = plan.guard_deadline + REATTACH_MARGIN
    end = ctx.clock.now() + within
    why = "the client is offline"
    while True:
        try:
            if ctx.api.client_status(plan.host):
                ctx.api.connect(plan.host)
                return ctx.remote_factory(plan.host)
            why = "the client is offline"
        except (ApiError, RemoteError) as exc:
            why = str(exc)
        if ctx.clock.now() + REATTACH_EVERY > end:
            raise SshConnectError(
                f"could not reach {plan.name} within {within:g}s: {why}", host=plan.name
            )
        ctx.clock.sleep(REATTACH_EVERY)


def _unreachable(
    ctx: RunContext, plan: HostPlan, item, exc: SshConnectError, progress: EventSink
) -> HostResult:
    """Close the window the run may have left open (the API needs no host), and
    leave the host pending in the journal: nothing on it could be checked."""
    host, events = plan.host, ctx.events
    events.host_started(host.name)
    events.step_started(host.name, RECOVER_STEP)
    t0 = ctx.clock.now()
    window = ""
    if item.facts.get("window_maybe_open"):
        try:
            ctx.api.set_allow_clientless(host, False)
            ctx.journal.update_host(item.run_id, host.name, window_maybe_open=False)
            window = "closed the allow-clientless window; "
        except ApiError as err:
            window = f"could not close the allow-clientless window ({err}); "
    events.step_finished(host.name, RECOVER_STEP, "failed", ctx.clock.now() - t0)
    message = (
        f"{exc}; {window}the host stays pending: its guard reverts or gives up by itself, "
        "and the lock, staged files and tunnel are left; run `deployer recover` again "
        "once the host is online"
    )
    return _report(ctx, progress, host.name, type(exc).__name__, message)


def _report(ctx: RunContext, sink: EventSink, host: str, kind: str, message: str) -> HostResult:
    """An ``unsafe`` result told to ``sink`` (the journal only if it is in it)."""
    message = scrub(message, ctx.inventory.secret_values())
    result = HostResult(
        host=host,
        result=Outcome.UNSAFE,
        error=ErrorInfo(step=RECOVER_STEP, type=kind, message=message),
    )
    sink.host_finished(result)
    return result


class _Unfinished(Fanout):
    """The run's sinks; a host result that leaves the host lock behind (the
    journal still says it may be held: the host was lost again, a guard could
    not be disarmed) is not finished, whatever the workflow concluded: it is
    reported ``unsafe``, so that ``recover`` does not exit 0 with work left."""

    def __init__(self, journal: Any, run_id: str, *sinks: EventSink):
        super().__init__(*sinks)
        self.journal, self.run_id = journal, run_id

    def host_finished(self, result: HostResult) -> None:
        held = self.journal.host_state(self.run_id, result.host).get("lock_maybe_held")
        if held and result.result is not Outcome.UNSAFE:
            note = "the host lock and run files stay; run `deployer recover` again"
            error = result.error or ErrorInfo(step=RECOVER_STEP, type="Unfinished", message="")
            error.message = f"{error.message}; {note}" if error.message else note
            result.error, result.result = error, Outcome.UNSAFE
        super().host_finished(result)
