"""Stage 1, plan: everything local that can fail, before any network call.

For each host: render the script and hash it, render the service, validate
and health commands, work out the remote paths, and build the guard's
per-run configuration. Any error here is a LocalInputError (exit 2) and
nothing has been touched.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from deployer.hostfiles import HostPaths
from deployer.model import HostConfig, Inventory

SOAK_MARGIN = 10.0  # seconds the guard waits past stable_for after first life,
# plus two API timeouts: the soak ends with a client_status call that may be retried
GO_DEADLINE = 60.0  # seconds an armed guard waits for the swap's go (window opening)
SILENCE_MIN = 15.0  # + 3 API timeouts: deployer unheard this long before commit is gone
GUARD_EXTRA = 60.0  # default guard deadline = online_timeout + stable_for + this
REVERT_EVIDENCE_MIN = 30.0  # a restored client gets at least this long to show it polls


@dataclass(frozen=True)
class HostPlan:
    host: HostConfig
    paths: HostPaths
    script: bytes | None = field(repr=False)  # None for a rollback: taken from the backup
    sha256: str | None
    service: dict[str, Any] = field(repr=False)
    validate: str
    health: str
    online_timeout: float
    stable_for: float
    guard_deadline: float
    template: str = ""

    @property
    def name(self) -> str:
        return self.host.name


def effective_timings(
    host: HostConfig,
    online_timeout: float | None,
    stable_for: float | None,
    offline_detection: float = 0.0,
) -> tuple[float, float, float]:
    """online_timeout, stable_for and the guard's deadline for ``host``.

    Without a ready probe, first life is only proven ``offline_detection``
    after the new client's start (the old client's polls must age out first):
    the guard's deadline leaves room for that wait too."""
    online = online_timeout if online_timeout is not None else host.online_timeout
    stable = stable_for if stable_for is not None else host.stable_for
    evidence = 0.0 if host.service.ready else offline_detection
    deadline = host.guard_deadline or online + evidence + stable + GUARD_EXTRA
    return online, stable, max(deadline, online + evidence + stable + 5.0)


def plan_host(
    inventory: Inventory,
    host: HostConfig,
    run_id: str,
    *,
    render: bool = True,
    template=None,
    online_timeout: float | None = None,
    stable_for: float | None = None,
) -> HostPlan:
    from deployer.render import host_context, render_command
    from deployer.source import TemplateSource

    paths = HostPaths(host.script_path, run_id)
    script = sha = None
    tmpl = ""
    if render:
        found = TemplateSource(inventory, template).script_for(host)  # provider: source.py
        script, sha, tmpl = found.data, found.sha256, found.origin
    context = host_context(inventory, host)
    online, stable, deadline = effective_timings(
        host, online_timeout, stable_for, inventory.provider.offline_detection
    )
    validate = health = ""
    if host.validate:
        validate = render_command(
            host.validate, {**context, "path": paths.staged}, f"host {host.name}: validate"
        )
    if host.health:
        health = render_command(host.health, context, f"host {host.name}: health")
    return HostPlan(
        host=host,
        paths=paths,
        script=script,
        sha256=sha,
        service=_service(host, context, paths),
        validate=validate,
        health=health,
        online_timeout=online,
        stable_for=stable,
        guard_deadline=deadline,
        template=tmpl,
    )


def _service(host: HostConfig, context: dict[str, Any], paths: HostPaths) -> dict[str, Any]:
    from deployer.remote import sh
    from deployer.render import render_command

    svc = host.service
    what = f"host {host.name}: service"
    ready = render_command(svc.ready, context, what + ".ready") if svc.ready else ""
    if svc.kind == "systemd":
        return {"kind": "systemd", "unit_q": sh(svc.unit), "ready": ready}
    if svc.kind == "pidfile":
        return {
            "kind": "pidfile",
            "pidfile": render_command(svc.pidfile, context, what + ".pidfile"),
            "run": render_command(svc.run, context, what + ".run"),
            "log": posixpath.join(paths.base, "client.log"),
            "ready": ready,
        }
    return {
        "kind": "command",
        "start": render_command(svc.start, context, what + ".start"),
        "stop": render_command(svc.stop, context, what + ".stop"),
        "check": render_command(svc.check, context, what + ".check"),
        "ready": ready,
    }


def guard_config(
    plan: HostPlan, inventory: Inventory, backup_path: str, *, tunnel_opened: bool = False
) -> dict[str, Any]:
    """The guard's CONFIG for this run. Holds API credentials: never log it.

    ``tunnel_opened``: deployer called ``connect`` for this run, so a guard that
    finds deployer gone also calls ``disconnect`` once the host is safe."""
    provider = inventory.provider
    return {
        "run_dir": plan.paths.run_dir,
        "script_path": plan.paths.script_path,
        "staged_path": plan.paths.staged,
        "backup_path": backup_path,
        "service": plan.service,
        "deadline": plan.guard_deadline,
        "soak_deadline": plan.stable_for + SOAK_MARGIN + 2 * provider.timeout,
        "go_deadline": go_deadline(plan),
        # deployer may be unheard while it reaches the host again after the swap
        "silence_limit": max(
            SILENCE_MIN + 3 * provider.timeout, SILENCE_MIN + provider.tunnel_timeout
        ),
        "ready": plan.service.get("ready", ""),
        "offline_detection": provider.offline_detection,
        "revert_online_wait": revert_online_wait(provider.offline_detection),
        "tunnel_opened": tunnel_opened,
        "api": {
            "url": provider.api_url,
            "timeout": provider.timeout,
            "params": {
                "user_id": provider.user_id.reveal(),
                "dbid": plan.host.dbid.reveal(),
                "host_uuid": plan.host.host_uuid.reveal(),
                "ports_id": str(plan.host.ports_id),
            },
        },
    }


def go_deadline(plan: HostPlan) -> float:
    """Seconds an armed guard waits for ``go`` before it gives up (and closes the
    window deployer may have opened)."""
    return min(plan.guard_deadline, GO_DEADLINE)


def revert_online_wait(offline_detection: float) -> float:
    """Seconds a reverting guard keeps the window open for the restored client's
    evidence (it must outlast the offline detection, see the guard)."""
    return max(REVERT_EVIDENCE_MIN, 2 * offline_detection + 10.0)


def guard_source() -> str:
    return resources.files("deployer").joinpath("guard.py").read_text(encoding="utf-8")


def render_guard(config: dict[str, Any]) -> bytes:
    """The guard program with ``config`` injected as a Python string literal."""
    source = guard_source()
    marker = "CONFIG = {}  # replaced per run by deployer.plan.render_guard"
    if marker not in source:
        raise RuntimeError("guard.py lost its CONFIG marker")
    literal = repr(json.dumps(config, sort_keys=True))
    return source.replace(marker, f"CONFIG = json.loads({literal})", 1).encode("utf-8")
