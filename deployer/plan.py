"""Stage 1, plan: everything local that can fail, before any network call.

For each host: render the script and hash it, render the service, validate
and health commands, and work out the remote paths; the guard's per-run
configuration is built from the plan by :mod:`deployer.guardlink`. Any error
here is a LocalInputError (exit 2) and nothing has been touched.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

# the guard's configuration and program live with the rest of its protocol
from deployer.guardlink import (  # noqa: F401 - re-exported for plan's callers
    GO_DEADLINE,
    SILENCE_MIN,
    SOAK_MARGIN,
    go_deadline,
    guard_config,
    guard_source,
    render_guard,
    revert_online_wait,
)
from deployer.hostfiles import HostPaths
from deployer.model import HostConfig, Inventory

GUARD_EXTRA = 60.0  # default guard deadline = online_timeout + stable_for + this


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
