"""``deployer upgrade`` / ``deployer rollback`` as an engine call (no click here).

:func:`run_upgrade` does the whole run: plan every host (local errors exit 2
before any network call), fetch the provider's scripts and check the pinned
hashes (``deployer.source``: a refusal fails that host before any host
starts), then the rollout of :class:`~deployer.workflow.HostRun`
over the fleet with one API session, one rate limiter and one journal.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployer.events import EventSink, Fanout
from deployer.model import HostConfig, Inventory
from deployer.plan import HostPlan, plan_host
from deployer.result import RunResult
from deployer.rollout import HostControl, Rollout, RolloutPolicy
from deployer.workflow import HostRun, RunContext, UpgradeOptions

log = logging.getLogger("deployer.upgrade")


@dataclass(frozen=True)
class UpgradeRequest:
    inventory: Inventory
    hosts: Sequence[HostConfig]
    state_dir: Path
    options: UpgradeOptions = field(default_factory=UpgradeOptions)
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)
    template: Path | None = None
    online_timeout: float | None = None
    stable_for: float | None = None
    expect_sha256: str | None = None  # --expect-sha256: overrides each host's expect_sha256


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def owner_label() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def plan_all(request: UpgradeRequest, run_id: str) -> list[HostPlan]:
    """Stage 1 for every host; raises LocalInputError before any network call.
    A provider host's script is fetched later (``deployer.source.settle_scripts``)."""
    from deployer.source import TEMPLATE, check_template_option

    render = request.options.command != "rollback"
    if render:
        check_template_option(request.hosts, request.template)
    plans = [
        plan_host(
            request.inventory,
            host,
            run_id,
            render=render and host.source == TEMPLATE,
            template=request.template,
            online_timeout=request.online_timeout,
            stable_for=request.stable_for,
        )
        for host in request.hosts
    ]
    warn_short_soak(plans, request.inventory.provider.offline_detection)
    return plans


def warn_short_soak(plans: list[HostPlan], offline_detection: float) -> list[str]:
    """SPEC 4: a soak no longer than the provider's offline detection proves little."""
    short = [p.name for p in plans if p.stable_for <= offline_detection]
    if short:
        log.warning(
            "stable_for %gs does not exceed the provider's offline detection (%gs) on %d "
            "host(s), e.g. %s: a client that dies in the soak may still read online at "
            "commit; raise stable_for (or set provider.offline_detection)",
            min(p.stable_for for p in plans),
            offline_detection,
            len(short),
            short[0],
        )
    return short


def ssh_factory(inventory: Inventory):
    from deployer.remote import SshRemote

    def open_remote(host: HostConfig):
        return SshRemote(inventory.provider, host).open()

    return open_remote


def run_upgrade(
    request: UpgradeRequest, progress: EventSink | None = None, *, remote_factory=None, api=None
) -> RunResult:
    from deployer.api import ProviderAPI
    from deployer.journal import Journal, JournalSink
    from deployer.ratelimit import RateLimiter
    from deployer.source import Settled, report_refused

    run_id = new_run_id()
    plans = {p.name: p for p in plan_all(request, run_id)}
    request.policy.validate(len(plans))
    inventory = request.inventory
    journal = (
        None
        if request.options.dry_run
        else Journal(request.state_dir, secrets=inventory.secret_values())
    )
    events = Fanout(progress or EventSink(), JournalSink(journal, run_id) if journal else None)
    own_api = api is None
    if own_api:
        limiter = RateLimiter(inventory.provider.rate_limit)
        api = ProviderAPI(
            inventory.provider,
            limiter=limiter,
            events=events,
            pool_size=max(4, request.policy.parallel * 2),
        )
    ctx = RunContext(
        run_id=run_id,
        inventory=inventory,
        api=api,
        remote_factory=remote_factory or ssh_factory(inventory),
        options=request.options,
        events=events,
        journal=journal,
        owner=owner_label(),
    )
    run = RunResult(run_id=run_id, started=time.time())
    if journal:
        journal.start_run(
            run_id,
            request.options.command,
            str(inventory.path),
            list(plans),
            _journal_options(request),
        )
    events.run_started(run_id, list(plans))

    settled = Settled(plans)

    def run_host(host: HostConfig, control: HostControl):
        if host.name in settled.refused:
            return report_refused(settled.refused[host.name], events)
        return HostRun(ctx, settled.plans[host.name], control.abort).execute()

    rollout = Rollout(request.hosts, run_host, request.policy, events, host_events=False)
    try:
        settled = _settle(request, plans, api)
        run.hosts = rollout.run()  # Ctrl-C / SIGTERM handled inside (deployer.rollout)
    finally:
        run.finished = time.time()
        run.interrupted = rollout.interrupted
        _finish_quietly(run_id, lambda: events.run_finished(run_id))
        if journal:
            ok, interrupted = run.ok, run.interrupted
            _finish_quietly(
                run_id, lambda: journal.finish_run(run_id, ok=ok, interrupted=interrupted)
            )
            _finish_quietly(run_id, journal.close)
        if own_api:
            api.close()
    return run


def _finish_quietly(run_id: str, action) -> None:
    """The end of a run is reported even when the journal (or a sink) cannot
    write it: the hosts' results stand; ``recover`` may revisit the run."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - disk full, read-only, locked: all alike
        log.error(
            "run %s: could not record its end (%s: %s); its report stands, and "
            "`deployer recover` may revisit its hosts",
            run_id,
            type(exc).__name__,
            exc,
        )


def _settle(request: UpgradeRequest, plans: dict[str, HostPlan], api):
    """The plan phase's network part (upgrade only; a rollback takes a backup)."""
    from deployer.source import Settled, settle_scripts

    if request.options.command == "rollback":
        return Settled(plans)
    return settle_scripts(
        plans,
        api,
        request.inventory,
        expect_sha256=request.expect_sha256,
        parallel=request.policy.parallel,
    )


def _journal_options(request: UpgradeRequest) -> dict:
    p = request.policy
    return {
        "force": request.options.force,
        "parallel": p.parallel,
        "batch": p.batch,
        "canary": p.canary,
        "max_failures": p.max_failures,
        "online_timeout": request.online_timeout,
        "stable_for": request.stable_for,
        "expect_sha256": request.expect_sha256,
    }
