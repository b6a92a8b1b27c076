"""The fleet layer's fakes, shared by the rollout and wait-offline tests: hosts,
a host runner that records its calls, and results."""

from __future__ import annotations

import threading
from collections.abc import Callable

from deployer.model import HostConfig
from deployer.result import ErrorInfo, HostResult, Outcome
from deployer.rollout import HostControl
from deployer.secrets import Secret


def make_hosts(n: int) -> list[HostConfig]:
    return [
        HostConfig(
            name=f"sbx-{i:03d}",
            dbid=Secret(f"dbid-secret-{i:04d}"),
            host_uuid=Secret(f"uuid-secret-{i:04d}"),
            ports_id=1000 + i,
            ssh_port=20000 + i,
        )
        for i in range(n)
    ]


def failed(name: str, outcome: Outcome = Outcome.ROLLED_BACK, code: int | None = None):
    error = ErrorInfo(step="verify", type="ClientOffline", message="boom", api_error_code=code)
    return HostResult(name, outcome, error=error)


class FakeRunner:
    """Records calls; returns results from ``plan`` (name -> HostResult factory)."""

    def __init__(self, plan: dict[str, Callable[[str], HostResult]] | None = None):
        self.plan = plan or {}
        self.calls: list[str] = []
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.before: Callable[[HostConfig, HostControl], None] | None = None

    def __call__(self, host: HostConfig, control: HostControl) -> HostResult:
        with self.lock:
            self.calls.append(host.name)
            self.log.append(("start", host.name))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            if self.before:
                self.before(host, control)
            factory = self.plan.get(host.name)
            return factory(host.name) if factory else HostResult(host.name, Outcome.UPGRADED)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.log.append(("end", host.name))


def outcomes(results: list[HostResult]) -> list[str]:
    return [r.result.value for r in results]
