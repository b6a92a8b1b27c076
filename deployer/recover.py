"""``deployer recover``: finish every run that a vanished deployer left behind.

For each (run, host) the journal holds without a final result (and whose
deployer process is gone), a :class:`~deployer.workflow.HostRun` is resumed
from the facts journalled before each action: the window is closed first,
an uncommitted guard is asked to revert (or one is started to revert, if the
run's guard is gone), the old client is verified online, the lock and the
staged files are removed, the tunnel closed, and the final result written
to the journal. Idempotent: with nothing dangling it does nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from collections import defaultdict
from pathlib import Path

from deployer.events import EventSink, Fanout
from deployer.hostfiles import HostPaths
from deployer.model import Inventory
from deployer.plan import plan_host
from deployer.result import ErrorInfo, HostResult, Outcome, RunResult
from deployer.upgrade import new_run_id, owner_label, ssh_factory
from deployer.workflow import HostRun, RunContext, UpgradeOptions

RECOVER_PARALLEL = 8  # hosts recovered at once (each may wait for a guard's deadline)


def run_recover(
    inventory: Inventory,
    state_dir: Path,
    progress: EventSink | None = None,
    *,
    remote_factory=None,
    api=None,
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
                events = Fanout(sink, JournalSink(journal, run_id))
                ctx = RunContext(
                    run_id=run_id,
                    inventory=inventory,
                    api=api,
                    remote_factory=remote_factory or ssh_factory(inventory),
                    options=UpgradeOptions(command="recover"),
                    events=events,
                    journal=journal,
                    owner=owner_label(),
                )
                futures += [pool.submit(_recover_host, ctx, item) for item in items]
            result.hosts = [f.result() for f in futures]
        for run_id in by_run:
            record = journal.run(run_id)
            if record is not None and record.finished is None:
                journal.finish_run(run_id, ok=False, interrupted=True)
    finally:
        result.finished = time.time()
        journal.close()
        if own_api:
            api.close()
    return result


def _recover_host(ctx: RunContext, item) -> HostResult:
    host = ctx.inventory.hosts.get(item.host)
    if host is None:
        result = HostResult(
            host=item.host,
            result=Outcome.UNSAFE,
            error=ErrorInfo(
                step="recover",
                type="HostNotInInventory",
                message=f"host {item.host} of run {item.run_id} is not in this inventory; run "
                "recover with the inventory that run used (see `deployer history`)",
            ),
        )
        ctx.events.host_finished(result)
        return result
    plan = plan_host(ctx.inventory, host, item.run_id, render=False)
    script_path = item.facts.get("script_path") or host.script_path
    plan = dataclasses.replace(plan, paths=HostPaths(script_path, item.run_id))
    return HostRun(ctx, plan).resume(item.facts)
