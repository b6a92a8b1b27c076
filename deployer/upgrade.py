"""``deployer upgrade`` / ``deployer rollback`` as an engine call (no click here).

:func:`run_upgrade` does the whole run: plan every host (local errors exit 2
before any network call), fetch the provider's scripts and check the pinned
hashes (``deployer.source``: a refusal fails that host before any host
starts), then the rollout of :class:`~deployer.workflow.HostRun`
over the fleet with one API session, one rate limiter and one journal.

``--wait-offline`` (:attr:`UpgradeRequest.wait_offline`) adds an
:class:`~deployer.rollout.OfflineWait`: hosts whose client is offline are
parked and watched through a second API session whose calls take a low
share of the same limiter (:meth:`~deployer.ratelimit.RateLimiter.background`).
The run's wait deadline is the later of now + ``wait_offline`` and the
deadline of a wait that the newest earlier run of the same command and targets
left behind (:meth:`~deployer.journal.Journal.pending_wait`): a re-run picks
that wait up, with or without ``--wait-offline``.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deployer.events import EventSink, Fanout
from deployer.model import HostConfig, Inventory
from deployer.parking import WaitPolicy
from deployer.plan import HostPlan, plan_host
from deployer.result import RunResult
from deployer.rollout import HostControl, OfflineWait, Rollout, RolloutPolicy
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
    wait_offline: float | None = None  # --wait-offline, seconds: park offline hosts this long
    wait_policy: WaitPolicy = field(default_factory=WaitPolicy)


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
    """A soak no longer than the provider's offline detection proves little
    (docs/explanation/guard.md)."""
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
    from deployer.ratelimit import BackgroundShare, RateLimiter
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
    pending = _pending_wait(journal, request, list(plans))
    wait_deadline = _wait_deadline(request.wait_offline, pending, time.time())
    own_api = api is None
    watch_api = api
    if own_api:
        limiter = RateLimiter(inventory.provider.rate_limit)
        api = ProviderAPI(
            inventory.provider,
            limiter=limiter,
            events=events,
            pool_size=max(4, request.policy.parallel * 2),
        )
        if wait_deadline is not None:
            share = BackgroundShare(request.wait_policy.share)
            watch_api = ProviderAPI(inventory.provider, limiter=limiter.background(share))
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
            {**_journal_options(request), "wait_deadline": wait_deadline},
        )
        if pending is not None:
            journal.hand_over_wait(pending, run_id)
    _say_wait(pending, wait_deadline)
    events.run_started(run_id, list(plans))

    settled = Settled(plans)

    def run_host(host: HostConfig, control: HostControl):
        if host.name in settled.refused:
            return report_refused(settled.refused[host.name], events)
        host_ctx = replace(ctx, api=SeenOnline(api, host.name)) if control.seen_online else ctx
        return HostRun(host_ctx, settled.plans[host.name], control.abort).execute()

    wait = _offline_wait(request, wait_deadline, api, watch_api)
    rollout = Rollout(request.hosts, run_host, request.policy, events, host_events=False, wait=wait)
    try:
        settled = _settle(request, plans, api)
        run.hosts = rollout.run()  # Ctrl-C / SIGTERM handled inside (deployer.rollout)
        if wait is not None:
            _count_watch_calls(run, api, watch_api)
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
            if watch_api is not None and watch_api is not api:
                watch_api.close()
    return run


class SeenOnline:
    """The provider API as one host's workflow sees it when the rollout has just
    seen that host's client online (``--wait-offline``): the workflow's first
    ``client_status`` — its preflight — takes that look as its own instead of
    asking again. Every other call goes to the real API."""

    def __init__(self, api, host_name: str):
        self._api = api
        self._host_name = host_name
        self._used = False

    def client_status(self, host: HostConfig, **kwargs: Any) -> bool:
        if not self._used and host.name == self._host_name:
            self._used = True
            return True
        return self._api.client_status(host, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._api, name)


def _offline_wait(request: UpgradeRequest, deadline: float | None, api, watch_api):
    """The rollout's :class:`OfflineWait` for a wait ending at ``deadline`` (epoch)."""
    if deadline is None:
        return None
    return OfflineWait(
        deadline=time.monotonic() + (deadline - time.time()),
        look=api.client_status,
        watch=watch_api.client_status,
        offline_detection=request.inventory.provider.offline_detection,
        policy=request.wait_policy,
        wall_deadline=deadline,
    )


def _pending_wait(journal, request: UpgradeRequest, hosts: list[str]):
    if journal is None:
        return None
    return journal.pending_wait(request.options.command, str(request.inventory.path), hosts)


def _wait_deadline(wait_offline: float | None, pending, now: float) -> float | None:
    """The run's wait deadline (epoch seconds), or None: no wait. The later of
    now + ``wait_offline`` and the deadline of the wait a re-run picks up."""
    candidates = [now + wait_offline] if wait_offline else []
    if pending is not None and pending.deadline is not None and pending.deadline > now:
        candidates.append(pending.deadline)
    return max(candidates) if candidates else None


def _say_wait(pending, deadline: float | None) -> None:
    if pending is None:
        return
    hosts = ", ".join(pending.hosts[:3]) + (", …" if len(pending.hosts) > 3 else "")
    if deadline is None:
        log.warning(
            "run %s left %d host(s) waiting for their client (%s); that wait is over: "
            "they get one look now (pass --wait-offline to wait again)",
            pending.run_id,
            len(pending.hosts),
            hosts,
        )
        return
    until = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(deadline))
    log.warning(
        "picking up the wait of run %s: %d host(s) were waiting for their client (%s); "
        "waiting until %s",
        pending.run_id,
        len(pending.hosts),
        hosts,
        until,
    )


def _count_watch_calls(run: RunResult, api, watch_api) -> None:
    """Every host's API calls, the watcher's looks included."""
    for host in run.hosts:
        calls = api.calls_for(host.host)
        if watch_api is not api:
            calls += watch_api.calls_for(host.host)
        host.api_calls = calls


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
        "wait_offline": request.wait_offline,
    }
