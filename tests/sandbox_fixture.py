"""The ``sandbox`` pytest fixtures: a real local SSHReach world (simulator,
forwarding SSH server, one SSH server and one real client per host) in a tmp
directory, torn down even when the test fails.

- ``sandbox_factory(hosts=3, sshd="embedded", **options)`` -> :class:`Sandbox`
  (function scope; any number of sandboxes per test);
- ``module_sandbox_factory`` — the same, torn down at the end of the module;
- ``sandbox`` — 3 hosts, embedded SSH servers, profile fast, per test.

``options``: anything :func:`deployer.sandbox.fleet.up` takes: ``profile``,
``api_latency``, ``ssh_latency``, ``rate_limit``, ``fail_rate``,
``garbage_rate``, ``offline_after``; faults later with ``sb.set_faults(...)``.
``sshd="openssh"`` skips the test when /usr/sbin/sshd is missing.

Tunnels start closed: ``sb.connect(name)`` (the API call, as deployer makes it)
then ``sb.client.wait_tunnel([name])`` before reaching a host by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployer.sandbox import fleet, openssh, processes
from deployer.sandbox.client import SandboxClient

CLI_TIMEOUT = 90.0

requires_openssh = pytest.mark.skipif(
    not openssh.available(), reason=f"{openssh.SSHD} not installed (apt-get install openssh-server)"
)


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` owner-only (0600), whatever the umask: a copy of a
    sandbox inventory holds its credentials, and deployer refuses such a file when
    others can read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it first
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


@dataclass
class Sandbox:
    """A running sandbox as tests see it."""

    dir: Path
    inventory: Path
    info: fleet.SandboxInfo
    client: SandboxClient

    @property
    def hosts(self) -> list[str]:
        return list(self.info.hosts)

    def state(self) -> dict[str, Any]:
        return self.client.state()

    def host(self, name: str) -> dict[str, Any]:
        return self.client.host(name)

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        return self.client.set_faults(**changes)

    def host_dir(self, name: str) -> Path:
        return self.dir / "hosts" / name

    def client_pid(self, name: str) -> int | None:
        return processes.read_pidfile(self.host_dir(name) / "client.pid")

    @property
    def document(self) -> dict[str, Any]:
        """DIR/sandbox.json: ids, ports and paths (SPEC 7)."""
        return json.loads((self.dir / "sandbox.json").read_text())

    def iport(self, name: str) -> int:
        """The host's tunnel port on the forwarding server (its inventory ssh_port)."""
        return self.info.ssh_ports[name]

    def tunnel_pids(self, name: str) -> list[int]:
        return self.host(name)["tunnel_pids"]

    def call(self, name: str, call: str, **extra: Any) -> dict[str, Any]:
        """One provider API call for host ``name`` (no retry), its JSON reply."""
        host = self.document["hosts"][name]
        params = {k: host[k] for k in ("user_id", "dbid", "host_uuid", "ports_id")}
        query = urllib.parse.urlencode({**params, **extra})
        url = self.info.api_url.format(call=call) + "?" + query
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def connect(self, name: str, timeout: float = 15.0) -> list[int]:
        """``connect``, then wait for the client's tunnel; its pids."""
        reply = self.call(name, "connect")
        assert reply["error_code"] == 0, reply
        return self.client.wait_tunnel([name], timeout=timeout)[name]["tunnel_pids"]

    def run_cli(
        self, *args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        """``python -m deployer -i INVENTORY ARGS…`` -> (exit code, stdout, stderr)."""
        proc = subprocess.run(
            [sys.executable, "-m", "deployer", "-i", str(self.inventory), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env if env is not None else dict(os.environ),
            stdin=subprocess.DEVNULL,
        )
        return proc.returncode, proc.stdout, proc.stderr


class _Factory:
    def __init__(self, tmp_factory: pytest.TempPathFactory):
        self._tmp = tmp_factory
        self._dirs: list[Path] = []

    def __call__(self, hosts: int = 3, sshd: str = "embedded", **options: Any) -> Sandbox:
        if sshd == "openssh" and not openssh.available():
            pytest.skip(f"{openssh.SSHD} not installed")
        root = self._tmp.mktemp("sandbox")
        self._dirs.append(root)
        info = fleet.up(root, hosts=hosts, sshd=sshd, **options)
        return Sandbox(root, info.inventory, info, info.client)

    def teardown(self) -> None:
        for root in self._dirs:
            report = fleet.down(root)
            if not report.clean:
                leftovers = processes.processes_mentioning(f"{root}/")
                processes.kill_now(leftovers)
                warnings.warn(
                    f"sandbox {root} left pids {report.leftover_pids} ports {report.open_ports}",
                    stacklevel=1,
                )


@pytest.fixture
def sandbox_factory(tmp_path_factory):
    factory = _Factory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.teardown()


@pytest.fixture(scope="module")
def module_sandbox_factory(tmp_path_factory):
    factory = _Factory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.teardown()


@pytest.fixture
def sandbox(sandbox_factory) -> Sandbox:
    return sandbox_factory()
