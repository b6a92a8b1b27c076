"""``deployer sandbox up|down|status`` as a Python API: a local SSHReach
simulator, an SSH server and N client processes, all in the background on
127.0.0.1, described by an inventory in the sandbox directory.

Layout of DIR::

    deployer.toml            the fleet's inventory (pidfile service, sandbox timings)
    id_ed25519(.pub)         deployer's client key (the SSH server's only authorized key)
    ssh_host_ed25519_key     the SSH server's host key
    known_hosts              that host key for [127.0.0.1]:PORT of every tunnel port
    templates/               sandbox-client.py.j2, copied from the installed package
    hosts/NAME/              a host's "filesystem": client.py, client.pid, client.log
    sandbox.json             what the runner serves (ids, ports, faults); 0600
    runner.json              the runner's pid and ports, once it listens
    state.json               pids and ports of the whole sandbox, for status and down
    logs/                    runner.log (simulator + embedded sshd), sshd.log (OpenSSH)
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import secrets
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError, LocalInputError
from deployer.sandbox import keys, processes
from deployer.sandbox.client import SandboxClient, SandboxClientError
from deployer.sandbox.runner import (
    CLIENT_KEY_FILE,
    CONFIG_FILE,
    HOST_KEY_FILE,
    RUNNER_FILE,
    SSHD_PID_FILE,
)
from deployer.sandbox.simulator import DEFAULT_OFFLINE_AFTER, DEFAULT_RATE_LIMIT
from deployer.sandbox.sshd import session_env

DEFAULT_DIR = ".sandbox"
SSHD_KINDS = ("embedded", "openssh")
TEMPLATE_NAME = "sandbox-client.py.j2"
INVENTORY_FILE = "deployer.toml"
STATE_FILE = "state.json"
GROUP = "sandbox"
MAX_HOSTS = 1000
# The pidfile service's run command; the guard starts it as `sh -c "exec " + run`.
RUN_COMMAND = "python3 {{ script_path | quote }}"
RUNNER_START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class SandboxTimings:
    """The sandbox-sized timings written into the inventory (SPEC 7)."""

    heartbeat_interval: float = 0.5
    offline_after: float = DEFAULT_OFFLINE_AFTER
    online_timeout: float = 10.0
    stable_for: float = 2.5  # must exceed offline_after (SPEC 4, step 11)
    guard_deadline: float = 20.0
    api_rate_limit: float = 40.0  # deployer's own limiter, below the simulator's default 50
    api_timeout: float = 5.0


TIMINGS = SandboxTimings()


class SandboxError(DeployerError):
    """The sandbox could not be started, stopped or read."""


class SandboxInputError(LocalInputError):
    """A bad sandbox option (exit 2, nothing started)."""


class SandboxNotRunning(SandboxError):
    """No sandbox runs in that directory."""


class SandboxRunning(SandboxError):
    """``up`` on a directory whose sandbox already runs."""

    def __init__(self, message: str, info: SandboxInfo):
        super().__init__(message)
        self.info = info


@dataclass(frozen=True)
class SandboxInfo:
    """A running sandbox: where it is and how to reach it."""

    dir: Path
    inventory: Path
    base_url: str  # the simulator, e.g. http://127.0.0.1:PORT
    api_url: str  # base_url + /api/{call}
    hosts: tuple[str, ...]
    sshd: str
    runner_pid: int
    ssh_ports: dict[str, int] = field(default_factory=dict)

    @property
    def state_url(self) -> str:
        return f"{self.base_url}/sandbox/state"

    @property
    def client(self) -> SandboxClient:
        return SandboxClient(self.base_url)


@dataclass
class DownReport:
    """What ``down`` stopped and what (if anything) it could not."""

    stopped: list[str] = field(default_factory=list)
    leftover_pids: list[int] = field(default_factory=list)
    open_ports: list[int] = field(default_factory=list)
    was_running: bool = False

    @property
    def clean(self) -> bool:
        return not self.leftover_pids and not self.open_ports


# --- up ------------------------------------------------------------------------------------


def up(
    dir: str | Path = DEFAULT_DIR,  # noqa: A002 - the CLI's --dir
    hosts: int = 3,
    sshd: str = "embedded",
    api_latency: float = 0.0,
    rate_limit: float = DEFAULT_RATE_LIMIT,
    fail_rate: float = 0.0,
    garbage_rate: float = 0.0,
    offline_after: float = DEFAULT_OFFLINE_AFTER,
    wait_timeout: float = 30.0,
    clients: bool = True,
) -> SandboxInfo:
    """Start a sandbox in ``dir`` with release 1 running on every host; return it
    once every client is online. Raises SandboxRunning if one already runs there.

    ``clients=False`` starts the simulator and SSH server only (no client
    process, every host offline until something heartbeats for it): benchmarks."""
    root = Path(dir).expanduser().resolve()
    _check_options(hosts, sshd, api_latency, rate_limit, fail_rate, garbage_rate, offline_after)
    running = _running_info(root)
    if running is not None:
        raise SandboxRunning(f"a sandbox already runs in {root}", running)
    _check_dir(root)
    if (root / STATE_FILE).exists() or (root / RUNNER_FILE).exists():
        down(root)  # a stale sandbox: clear leftovers first
    faults = {
        "latency": api_latency,
        "rate_limit": rate_limit,
        "fail_rate": fail_rate,
        "garbage_rate": garbage_rate,
        "offline_after": offline_after,
    }
    try:
        return _start(root, hosts, sshd, faults, wait_timeout if clients else None)
    except BaseException:
        down(root)
        raise


def _check_options(hosts, sshd, latency, rate_limit, fail_rate, garbage_rate, offline_after):
    if not 1 <= hosts <= MAX_HOSTS:
        raise SandboxInputError(f"--hosts must be between 1 and {MAX_HOSTS} (got {hosts})")
    if sshd not in SSHD_KINDS:
        raise SandboxInputError(f"--sshd must be one of {', '.join(SSHD_KINDS)} (got {sshd!r})")
    if sshd == "openssh":
        from deployer.sandbox import openssh

        if not openssh.available():
            raise SandboxInputError(
                f"--sshd openssh needs {openssh.SSHD}: install openssh-server, "
                "or use --sshd embedded"
            )
    for name, value in (("--api-latency", latency), ("--rate-limit", rate_limit)):
        if value < 0:
            raise SandboxInputError(f"{name} must be >= 0 (got {value})")
    for name, value in (("--fail-rate", fail_rate), ("garbage rate", garbage_rate)):
        if not 0 <= value <= 1:
            raise SandboxInputError(f"{name} must be between 0 and 1 (got {value})")
    if offline_after <= 0:
        raise SandboxInputError(f"offline_after must be > 0 (got {offline_after})")


def _check_dir(root: Path) -> None:
    """DIR must be new, empty, or an earlier sandbox's: never overwrite a real inventory."""
    if root.exists() and not root.is_dir():
        raise SandboxInputError(f"--dir {root} is a file; choose a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / CONFIG_FILE).exists():
        raise SandboxInputError(
            f"--dir {root} is not empty and holds no sandbox; choose a new or empty directory"
        )


def _host_names(count: int) -> list[str]:
    width = max(2, len(str(count)))
    return [f"sbx-{i:0{width}d}" for i in range(1, count + 1)]


def _new_hosts(count: int) -> list[dict[str, Any]]:
    names = _host_names(count)
    ports_ids = secrets.SystemRandom().sample(range(1000, 100000), count)
    return [
        {
            "name": name,
            "dbid": secrets.token_hex(4),
            "host_uuid": str(uuid.uuid4()),
            "ports_id": ports_ids[i],
            "ssh_port": 0,  # the runner picks and holds one
        }
        for i, name in enumerate(names)
    ]


def _user_home() -> tuple[str, str]:
    user = getpass.getuser()
    try:
        home = pwd.getpwnam(user).pw_dir
    except KeyError:
        home = os.path.expanduser("~")
    return user, home


def _start(
    root: Path, count: int, sshd: str, faults: dict[str, Any], wait_timeout: float | None
) -> SandboxInfo:
    shutil.rmtree(root / "hosts", ignore_errors=True)  # a new fleet: no old locks or backups
    for sub in ("hosts", "logs", "templates"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    keys.generate_keypair(root / CLIENT_KEY_FILE, "deployer-sandbox-client")
    keys.generate_keypair(root / HOST_KEY_FILE, "deployer-sandbox-host")
    template = resources.files("deployer.templates").joinpath(TEMPLATE_NAME)
    (root / "templates" / TEMPLATE_NAME).write_bytes(template.read_bytes())
    user, home = _user_home()
    config = {
        "user_id": "sbx" + secrets.token_hex(6),
        "hosts": _new_hosts(count),
        "sshd": sshd,
        "sshd_port": 0,  # the runner picks it
        "api_port": 0,
        "user": user,
        "home": home,
        "faults": faults,
    }
    _write_private(root / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    runner = _start_runner(root)
    for host in config["hosts"]:
        host["ssh_port"] = runner["ssh_ports"][host["name"]]
    _write_private(root / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    ports = [h["ssh_port"] for h in config["hosts"]]
    keys.write_known_hosts(root / "known_hosts", root / HOST_KEY_FILE, "127.0.0.1", ports)
    inventory = root / INVENTORY_FILE
    _write_private(inventory, inventory_text(root, config, runner["base_url"]))
    names = [h["name"] for h in config["hosts"]]
    _install_release(root, inventory, names)
    info = _info(root, config, runner)
    _write_state(root, config, runner)
    if wait_timeout is None:
        return info
    _start_clients(root, names, user, home)
    try:
        info.client.wait_online(names, wait_timeout)
    except SandboxClientError as exc:
        logs = root / "hosts" / "*" / "client.log"
        raise SandboxError(f"sandbox clients did not come online: {exc}; see {logs}") from None
    return info


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _start_runner(root: Path) -> dict[str, Any]:
    (root / RUNNER_FILE).unlink(missing_ok=True)
    log_path = root / "logs" / "runner.log"
    pid = processes.spawn_detached(
        [sys.executable, "-m", "deployer.sandbox.runner", str(root)], log_path, root
    )
    deadline = time.monotonic() + RUNNER_START_TIMEOUT
    while time.monotonic() < deadline:
        runner = _read_json(root / RUNNER_FILE)
        if runner and runner.get("pid") == pid:
            return runner
        if not processes.alive(pid):
            break
        time.sleep(0.05)
    tail = _tail(log_path)
    raise SandboxError(f"the sandbox runner did not start; {log_path} ends with:\n{tail}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _install_release(root: Path, inventory: Path, names: list[str]) -> None:
    """Render release 1 with deployer's own loader and renderer, as an upgrade would."""
    from deployer.inventory import load_inventory
    from deployer.render import render_script

    inv = load_inventory(inventory)
    for name in names:
        host = inv.hosts[name]
        rendered = render_script(inv, host)
        path = Path(host.script_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rendered.text.encode("utf-8"))
        path.chmod(0o755)


def _start_clients(root: Path, names: list[str], user: str, home: str) -> None:
    env = session_env(user, home)
    for name in names:
        host_dir = root / "hosts" / name
        processes.start_pidfile_service(
            run=f"exec python3 {_q(host_dir / 'client.py')}",  # = "exec " + RUN_COMMAND
            pidfile=host_dir / "client.pid",
            log_path=host_dir / "client.log",
            cwd=str(host_dir),  # as the guard does: the pidfile's directory
            env=env,
        )


def _q(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def _info(root: Path, config: dict[str, Any], runner: dict[str, Any]) -> SandboxInfo:
    return SandboxInfo(
        dir=root,
        inventory=root / INVENTORY_FILE,
        base_url=runner["base_url"],
        api_url=runner["api_url"],
        hosts=tuple(h["name"] for h in config["hosts"]),
        sshd=config["sshd"],
        runner_pid=runner["pid"],
        ssh_ports={h["name"]: h["ssh_port"] for h in config["hosts"]},
    )


def _write_state(root: Path, config: dict[str, Any], runner: dict[str, Any]) -> None:
    state = {
        "dir": str(root),
        "runner_pid": runner["pid"],
        "base_url": runner["base_url"],
        "api_url": runner["api_url"],
        "sshd": config["sshd"],
        "sshd_port": runner["sshd_port"],
        "sshd_pid": runner.get("sshd_pid"),
        "hosts": {
            h["name"]: {
                "ssh_port": h["ssh_port"],
                "pidfile": str(root / "hosts" / h["name"] / "client.pid"),
            }
            for h in config["hosts"]
        },
    }
    (root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


# --- the inventory ----------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def _table(name: str, values: dict[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{key} = {_toml(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def inventory_text(root: Path, config: dict[str, Any], base_url: str) -> str:
    """The sandbox's deployer.toml (SPEC 2 format)."""
    t = TIMINGS
    provider = {
        "api_url": f"{base_url}/api/{{call}}",
        "ssh_host": "127.0.0.1",
        "user_id": config["user_id"],
        "rate_limit": t.api_rate_limit,
        "timeout": t.api_timeout,
        # the simulator's offline detection: stable_for must exceed it (SPEC 4)
        "offline_detection": float(config.get("faults", {}).get("offline_after", 1.5)),
    }
    defaults = {
        "ssh_user": config["user"],
        "ssh_key": str(root / CLIENT_KEY_FILE),
        "known_hosts": str(root / "known_hosts"),
        "host_key_policy": "strict",
        "template": f"templates/{TEMPLATE_NAME}",
        "online_timeout": t.online_timeout,
        "stable_for": t.stable_for,
        "keep_backups": 3,
        "validate": "python3 -m py_compile {{ path | quote }}",
        "guard_deadline": t.guard_deadline,
        "vars": {
            "release": "1",
            "sandbox_fail": "",
            "sandbox_die_after": "3",
            "sandbox_url": base_url,
            "heartbeat_interval": str(t.heartbeat_interval),
        },
    }
    service = {
        "kind": "pidfile",
        "pidfile": str(root / "hosts") + "/{{ host }}/client.pid",
        "run": RUN_COMMAND,
    }
    parts = [
        f"# The sandbox fleet in {root}, written by `deployer sandbox up`.\n"
        "# Its credentials are random and only valid for this sandbox's simulator.\n",
        _table("provider", provider),
        _table("defaults", defaults),
        _table("defaults.service", service),
        _table(f"groups.{GROUP}", {"vars": {}}),
    ]
    for host in config["hosts"]:
        values = {
            "dbid": host["dbid"],
            "host_uuid": host["host_uuid"],
            "ports_id": host["ports_id"],
            "ssh_port": host["ssh_port"],
            "groups": [GROUP],
            "script_path": str(root / "hosts" / host["name"] / "client.py"),
        }
        parts.append(_table(f"hosts.{host['name']}", values))
    return "\n".join(parts)


# --- status and down -------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _runner_alive(pid: int | None) -> bool:
    if not pid or not processes.alive(pid):
        return False
    return "deployer.sandbox.runner" in processes.cmdline(pid)


def _running_info(root: Path) -> SandboxInfo | None:
    runner = _read_json(root / RUNNER_FILE)
    config = _read_json(root / CONFIG_FILE)
    if not runner or not config or not _runner_alive(runner.get("pid")):
        return None
    return _info(root, config, runner)


def info(dir: str | Path = DEFAULT_DIR) -> SandboxInfo:  # noqa: A002
    """The running sandbox in ``dir``; SandboxNotRunning if none."""
    root = Path(dir).expanduser().resolve()
    running = _running_info(root)
    if running is None:
        raise SandboxNotRunning(
            f"no sandbox runs in {root} (start one: deployer sandbox up --dir {root})"
        )
    return running


def status(dir: str | Path = DEFAULT_DIR) -> dict[str, Any]:  # noqa: A002
    """The ``/sandbox/state`` document of the sandbox in ``dir``."""
    running = info(dir)
    try:
        return running.client.state()
    except SandboxClientError:
        time.sleep(0.2)
        if _runner_alive(running.runner_pid):
            raise
        gone = f"the sandbox in {running.dir} stopped (its runner is gone)"
        raise SandboxNotRunning(gone) from None


def down(dir: str | Path = DEFAULT_DIR) -> DownReport:  # noqa: A002
    """Stop every process of the sandbox in ``dir`` and check no process or port is left."""
    root = Path(dir).expanduser().resolve()
    report = DownReport()
    runner = _read_json(root / RUNNER_FILE) or {}
    state = _read_json(root / STATE_FILE) or {}
    config = _read_json(root / CONFIG_FILE) or {}
    report.was_running = _runner_alive(runner.get("pid"))
    _stop_hosts(root, report)
    _stop_runner(root, runner, report)
    ports = _sandbox_ports(runner, state, config)
    report.open_ports = _wait_ports_closed(ports, STOP_TIMEOUT)
    report.leftover_pids = processes.processes_mentioning(*_markers(root))
    for name in (RUNNER_FILE, STATE_FILE):
        (root / name).unlink(missing_ok=True)
    return report


def _stop_hosts(root: Path, report: DownReport) -> None:
    """Clients (SIGTERM as the pidfile convention), then anything else running from
    a host directory (guards mid-upgrade) frozen and killed so none restarts a client."""
    hosts_dir = root / "hosts"
    if not hosts_dir.is_dir():
        return
    pids = []
    for pidfile in sorted(hosts_dir.glob("*/client.pid")):
        pid = processes.read_pidfile(pidfile)
        if pid and str(hosts_dir) in processes.cmdline(pid):
            pids.append(pid)
    others = [p for p in processes.processes_mentioning(f"{hosts_dir}/") if p not in pids]
    processes.kill_now(others)
    processes.terminate(pids, STOP_TIMEOUT)
    for _ in range(3):  # anything a dying guard managed to start
        stray = processes.processes_mentioning(f"{hosts_dir}/")
        if not stray:
            break
        processes.kill_now(stray)
    report.stopped.extend(f"client pid {p}" for p in pids)
    report.stopped.extend(f"host process pid {p}" for p in others)


def _stop_runner(root: Path, runner: dict[str, Any], report: DownReport) -> None:
    pid = runner.get("pid")
    if _runner_alive(pid):
        processes.terminate([pid], STOP_TIMEOUT)
        report.stopped.append(f"runner pid {pid}")
    sshd_pid = processes.read_pidfile(root / SSHD_PID_FILE) or runner.get("sshd_pid")
    if sshd_pid and processes.alive(sshd_pid) and "sshd" in processes.cmdline(sshd_pid):
        processes.terminate([sshd_pid], STOP_TIMEOUT)
        report.stopped.append(f"sshd pid {sshd_pid}")
    stray = processes.processes_mentioning(*_markers(root))
    if stray:
        processes.terminate(stray, 2.0)
        report.stopped.extend(f"stray pid {p}" for p in stray)


def _markers(root: Path) -> tuple[str, ...]:
    """Command-line fragments that only the sandbox's own processes carry."""
    return (f"{root}/hosts/", f"deployer.sandbox.runner {root}", f"{root}/sshd_config")


def _sandbox_ports(runner: dict[str, Any], state: dict[str, Any], config: dict[str, Any]):
    ports = {runner.get("api_port"), runner.get("sshd_port"), config.get("sshd_port")}
    ports.update(h.get("ssh_port") for h in config.get("hosts", []))
    ports.update((runner.get("ssh_ports") or {}).values())
    ports.update(h.get("ssh_port") for h in state.get("hosts", {}).values())
    return sorted(p for p in ports if p)


def _wait_ports_closed(ports: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    open_ports = [p for p in ports if processes.listening(p)]
    while open_ports and time.monotonic() < deadline:
        time.sleep(0.1)
        open_ports = [p for p in open_ports if processes.listening(p)]
    return open_ports
