"""The configuration model that the inventory loader produces and every other
part of deployer consumes. Plain frozen dataclasses; credentials are
:class:`~deployer.secrets.Secret`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.secrets import Secret, secret_forms


@dataclass(frozen=True)
class ProviderConfig:
    api_url: str  # contains "{call}"
    ssh_host: str
    user_id: Secret
    rate_limit: float = 5.0  # API calls per second for the whole run
    timeout: float = 10.0  # seconds per API request
    offline_detection: float = 30.0  # seconds the provider takes to see a client offline
    tunnel_timeout: float = 30.0  # seconds to wait for the client's tunnel after connect
    api_key: Secret | None = None  # the account key of get_client_script (source = "provider")


@dataclass(frozen=True)
class ServiceConfig:
    kind: str = "systemd"  # systemd | pidfile | command
    unit: str = "sshreach-client"  # systemd
    pidfile: str = ""  # pidfile (jinja2, host context)
    run: str = ""  # pidfile: the command that runs the client (jinja2)
    start: str = ""  # command (jinja2)
    stop: str = ""  # command (jinja2)
    check: str = ""  # command (jinja2): exit 0 while the client runs
    ready: str = ""  # any kind (jinja2): exit 0 once the NEW client has polled since the swap


@dataclass(frozen=True)
class HostConfig:
    name: str
    dbid: Secret
    host_uuid: Secret
    ports_id: int
    ssh_port: int
    groups: tuple[str, ...] = ()
    ssh_user: str = "pi"
    ssh_key: str = "~/.ssh/id_ed25519"
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_policy: str = "accept-new"  # strict | accept-new
    template: Path = Path("templates/client.py.j2")  # absolute after loading
    script_path: str = "/opt/sshreach/client.py"
    mode: str = "0700"  # the script holds the host's credentials: owner-only
    sudo: bool = False
    online_timeout: float = 120.0
    stable_for: float = 30.0
    keep_backups: int = 3
    validate: str = ""  # jinja2 with {{ path }}
    health: str = ""
    guard_deadline: float | None = None  # None: online_timeout + stable_for + 60
    python: str = "python3"  # the interpreter that runs the guard on the host
    service: ServiceConfig = field(default_factory=ServiceConfig)
    vars: dict[str, Any] = field(default_factory=dict)
    source: str = "template"  # template | provider (get_client_script, deployer.source)
    client_id: Secret | None = None  # the host's client at the provider (source = "provider")
    expect_sha256: str = ""  # pinned sha256 of the script to install; "" = not pinned

    def secret_values(self) -> list[str]:
        values = [self.dbid.reveal(), self.host_uuid.reveal()]
        if self.client_id:
            values.append(self.client_id.reveal())
        return values


@dataclass(frozen=True)
class Inventory:
    path: Path  # the inventory file
    provider: ProviderConfig
    hosts: dict[str, HostConfig]  # in file order
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> host names

    def secret_values(self) -> list[str]:
        """Every credential in every form text may hold it (``secrets.secret_forms``)."""
        values = [self.provider.user_id.reveal()]
        if self.provider.api_key:
            values.append(self.provider.api_key.reveal())
        for host in self.hosts.values():
            values.extend(host.secret_values())
        return secret_forms(values)
