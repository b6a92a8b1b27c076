"""One local 'host' for the single-host workflow tests (:class:`Site`): its
inventory, the old client running, the real guard, a FakeApi that says "online"
while the pidfile's process is alive, and LocalRemotes."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from deployer.inventory import load_inventory
from deployer.plan import plan_host
from deployer.workflow import HostRun, RunContext, UpgradeOptions
from tests.doubles import (
    CLIENT_TEMPLATE,
    PYTHON,
    FakeApi,
    Recorder,
    RemoteFactory,
    client_source,
    pidfile_alive,
    start_client,
)
from tests.inventories import toml_str

INVENTORY = """\
[provider]
api_url = "http://127.0.0.1:9/api/{{call}}"
ssh_host = "127.0.0.1"
user_id = "USERID-SECRET-1111"
offline_detection = 0.3

[defaults]
template = "client.py.j2"
script_path = {script}
python = {python}
online_timeout = 3
stable_for = 0.5
keep_backups = {keep}
validate = {validate}
health = {health}
vars = {{ release = "1", fail = "", die_after = "1" }}

[defaults.service]
kind = "pidfile"
pidfile = {pidfile}
run = {run}
ready = {ready}

[hosts.pi-01]
dbid = "DBID-SECRET-2222"
host_uuid = "UUID-SECRET-3333"
ports_id = 1234
ssh_port = 12345
"""

PY_COMPILE = "{{ python }} -m py_compile {{ path | quote }}"


class Site:
    """One local 'host' with its inventory, the old client running."""

    def __init__(
        self,
        root: Path,
        keep: int = 3,
        validate: str = PY_COMPILE,
        where: str = "opt",
        health: str = "",
        ready: str = "",
    ):
        self.root = root
        self.script = root / where / "client.py"
        self.script.parent.mkdir(parents=True)
        self.pidfile = self.script.parent / "client.pid"
        (root / "client.py.j2").write_text(CLIENT_TEMPLATE)
        (root / "deployer.toml").write_text(
            INVENTORY.format(
                script=toml_str(self.script),
                python=toml_str(PYTHON),
                keep=keep,
                validate=toml_str(validate),
                health=toml_str(health),
                ready=toml_str(ready),
                pidfile=toml_str(self.pidfile),
                run=toml_str(PYTHON + " {{ script_path | quote }}"),
            )
        )
        (root / "deployer.toml").chmod(0o600)  # literal credentials: private, or refused
        self.old = client_source("0")
        self.script.write_bytes(self.old)
        start_client(self.script, self.pidfile, root / "old.log")
        self.api = FakeApi(online=lambda: pidfile_alive(self.pidfile))
        self.factory = RemoteFactory()
        self.events = Recorder()
        self.abort = threading.Event()
        self.journal = None

    def inventory(self, **vars: str):
        return load_inventory(self.root / "deployer.toml", overrides=vars)

    def run(self, options: UpgradeOptions | None = None, **vars: str):
        inventory = self.inventory(**vars)
        host = inventory.hosts["pi-01"]
        run_id = "run-" + uuid.uuid4().hex[:8]
        options = options or UpgradeOptions()
        plan = plan_host(inventory, host, run_id, render=options.command != "rollback")
        ctx = RunContext(
            run_id=run_id,
            inventory=inventory,
            api=self.api,
            remote_factory=self.factory,
            options=options,
            events=self.events,
            journal=self.journal,
            owner="tester@box pid 1",
        )
        self.paths = plan.paths
        self.plan = plan
        return HostRun(ctx, plan, abort=self.abort).execute()

    @property
    def base(self) -> Path:
        return self.script.parent / ".client.py.deployer"

    def backups(self) -> list[Path]:
        d = self.base / "backups"
        return sorted(d.iterdir()) if d.exists() else []

    def runs(self) -> list[Path]:
        d = self.base / "runs"
        return list(d.iterdir()) if d.exists() else []

    def steps(self, result) -> list[str]:
        return [s.step for s in result.steps]
