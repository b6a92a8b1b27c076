"""A small client of the simulator's sandbox routes (state, faults, counters),
for tests, the benchmark and ``deployer sandbox status``. Stdlib only."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from deployer.errors import DeployerError

REQUEST_TIMEOUT = 5.0
POLL = 0.1


class SandboxClientError(DeployerError):
    """The simulator did not answer, refused a request, or a wait timed out."""


class SandboxClient:
    """Talks to one simulator; ``base_url`` may also be its ``/sandbox/state`` URL."""

    def __init__(self, base_url: str, timeout: float = REQUEST_TIMEOUT):
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/sandbox/state")
        self.timeout = timeout

    @property
    def state_url(self) -> str:
        return f"{self.base_url}/sandbox/state"

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace").strip()
            raise SandboxClientError(f"sandbox {path}: HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise SandboxClientError(f"sandbox simulator at {self.base_url}: {exc}") from None

    def state(self) -> dict[str, Any]:
        """The ``/sandbox/state`` document."""
        return self._request("/sandbox/state")

    def host(self, name: str) -> dict[str, Any]:
        """One host's entry of the state document."""
        return self.state()["hosts"][name]

    def faults(self) -> dict[str, Any]:
        return self._request("/sandbox/faults")

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change faults at run time (latency, fail_rate, garbage_rate, rate_limit,
        blocked, offline_after, connect_wait, client_script_error, poll_fail_rate,
        disconnect_ssl_when_server_unreachable, offer_upgrade); returns the
        faults now in force."""
        return self._request("/sandbox/faults", changes)

    def reset_counters(self) -> None:
        self._request("/sandbox/reset-counters", {})

    def schedule_clients(self, events: list[dict[str, Any]]) -> int:
        """Queue client stops and starts in the runner (see deployer.sandbox.clients):
        ``[{"after": S, "host": NAME, "action": "stop"|"start", "with_tunnel": bool}]``;
        returns how many were queued."""
        return self._request("/sandbox/clients", {"events": events})["added"]

    def clear_client_schedule(self) -> int:
        """Drop every pending client change; returns how many there were."""
        return self._request("/sandbox/clients", {"clear": True})["cleared"]

    def client_schedule(self) -> dict[str, Any]:
        """``{"pending": [...], "done": [...]}``: the runner's client changes."""
        return self._request("/sandbox/clients")

    def wait_for(
        self, names: Iterable[str], predicate, timeout: float, what: str
    ) -> dict[str, Any]:
        """Poll the state until ``predicate(host_state)`` holds for every name."""
        names = list(names)
        deadline = time.monotonic() + timeout
        while True:
            hosts = self.state()["hosts"]
            missing = [n for n in names if not predicate(hosts[n])]
            if not missing:
                return hosts
            if time.monotonic() >= deadline:
                raise SandboxClientError(f"not {what} after {timeout:g} s: {', '.join(missing)}")
            time.sleep(POLL)

    def wait_online(self, names: Iterable[str], timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_for(names, lambda h: h["online"], timeout, "online")

    def wait_offline(self, names: Iterable[str], timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_for(names, lambda h: not h["online"], timeout, "offline")

    def wait_tunnel(
        self,
        names: Iterable[str],
        open: bool = True,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        """Wait until each host's tunnel is open (a session forwards its IPORT and its
        tunnel process is known) or, with ``open=False``, closed with no tunnel pid."""
        if open:
            return self.wait_for(
                names, lambda h: h["tunnel_open"] and h["tunnel_pids"], timeout, "tunnel open"
            )
        return self.wait_for(
            names, lambda h: not h["tunnel_open"] and not h["tunnel_pids"], timeout, "tunnel closed"
        )
