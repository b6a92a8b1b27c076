"""``deployer sandbox up|down|status`` as a Python API: the SSHReach world of
docs/how-to/sandbox.md on 127.0.0.1, in the background, described by an
inventory in the sandbox directory.

What runs: the runner (:mod:`deployer.sandbox.runner`: the provider
simulator, the forwarding SSH server, one SSH server per host) and, per host,
a real client process (the rendered ``sandbox-client.py.j2``, which is the
production ``client.py.j2`` with rehearsal faults) that polls the simulator
and owns its tunnel process, a detached ``ssh -N -R IPORT:localhost:SSHD_PORT``
to the forwarding server. deployer reaches host NAME as in production: the
forwarding server (127.0.0.1) on NAME's IPORT, through that tunnel, to NAME's
own SSH server.

Layout of DIR::

    deployer.toml            the fleet's inventory (pidfile service, sandbox timings); 0600
    sandbox.json             ids, ports and paths for outside tools (docs/how-to/sandbox.md); 0600
    id_ed25519(.pub)         deployer's key (the hosts' SSH servers authorize it)
    ssh_host_ed25519_key     the host key of every host's SSH server
    known_hosts              that key for [127.0.0.1]:IPORT of every host (deployer side)
    account_key(.pub)        the account key the tunnels log in with (forwarding server)
    forwarding_host_ed25519_key   the forwarding server's host key
    forwarding_known_hosts   that key for [127.0.0.1]:FWD_PORT (client side)
    templates/               client.py.j2 and sandbox-client.py.j2, copied from the package
    hosts/NAME/              a host's "filesystem": client.py, client.pid, client.log
                             (the client's own log), client.py.poll, client.out
    provider/CLIENT_ID.py    what get_client_script answers for each host; 0600
    sshd/                    OpenSSH configs and pidfiles (--sshd openssh)
    config.json              what the runner starts from; 0600
    runner.json, state.json  the runner's pid and ports; pids and ports for down
    logs/                    runner.log; OpenSSH's logs (--sshd openssh)
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import pwd
import secrets
import shlex
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError, LocalInputError
from deployer.sandbox import clients, keys, processes, procnet
from deployer.sandbox.client import SandboxClient, SandboxClientError
from deployer.sandbox.clients import ClientChange
from deployer.sandbox.runner import (
    ACCOUNT_KEY_FILE,
    CLIENT_KEY_FILE,
    CONFIG_FILE,
    FORWARDING_KEY_FILE,
    HOST_KEY_FILE,
    PROVIDER_DIR,
    RUNNER_FILE,
    SSHD_DIR,
)
from deployer.sandbox.simulator import DEFAULT_RATE_LIMIT
from deployer.sandbox.sshd import session_env
from deployer.sandbox.toml_out import toml_table

DEFAULT_DIR = ".sandbox"
SSHD_KINDS = ("embedded", "openssh")
TEMPLATE_NAME = "sandbox-client.py.j2"
PRODUCTION_TEMPLATE = "client.py.j2"
TEMPLATES = (PRODUCTION_TEMPLATE, TEMPLATE_NAME)
INVENTORY_FILE = "deployer.toml"
SANDBOX_FILE = "sandbox.json"
STATE_FILE = "state.json"
KNOWN_HOSTS_FILE = "known_hosts"
FORWARDING_KNOWN_HOSTS_FILE = "forwarding_known_hosts"
GROUP = "sandbox"
MAX_HOSTS = 1000
PROVIDER_RELEASE = "provider-1"  # the release written into get_client_script's scripts
# The pidfile service's run command; the guard starts it as `sh -c "exec " + run`.
RUN_COMMAND = "python3 {{ script_path | quote }}"
# The service's ready probe (docs/explanation/stages.md, first life): the client
# rewrites SCRIPT.poll after every good poll, so a file newer than the guard's
# swap mark proves the new client.
READY_PROBE = (
    'test -n "$(find {{ script_path | quote }}.poll -newer "$DEPLOYER_SWAP_MARK" 2>/dev/null)"'
)
RUNNER_START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class SandboxProfile:
    """The timings of a sandbox: the world's (polls, offline detection, API
    latency) and the ones written into its inventory to match them."""

    name: str
    poll_interval: float
    offline_after: float
    api_latency: float
    online_timeout: float
    stable_for: float  # must exceed offline_after (docs/explanation/stages.md, step 11)
    tunnel_timeout: float
    guard_deadline: float
    api_rate_limit: float = 40.0  # deployer's own limiter, below the simulator's default 50
    api_timeout: float = 5.0


PROFILES = {
    "fast": SandboxProfile(
        "fast",
        poll_interval=0.5,
        offline_after=1.5,
        api_latency=0.0,
        online_timeout=10.0,
        stable_for=2.5,
        tunnel_timeout=10.0,
        guard_deadline=20.0,
    ),
    "real": SandboxProfile(
        "real",
        poll_interval=5.0,
        offline_after=30.0,
        api_latency=0.2,
        online_timeout=60.0,
        stable_for=35.0,
        tunnel_timeout=30.0,
        guard_deadline=155.0,  # online_timeout + stable_for + 60 (docs/explanation/stages.md)
    ),
}
TIMINGS = PROFILES["fast"]


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
    ssh_ports: dict[str, int] = field(default_factory=dict)  # NAME -> IPORT (inventory ssh_port)
    sshd_ports: dict[str, int] = field(default_factory=dict)  # NAME -> the host's own sshd
    forwarding_port: int = 0
    forwarding_user: str = ""
    profile: str = "fast"

    @property
    def iports(self) -> dict[str, int]:
        return self.ssh_ports

    @property
    def poll_url(self) -> str:
        return f"{self.base_url}/poll"

    @property
    def state_url(self) -> str:
        return f"{self.base_url}/sandbox/state"

    @property
    def sandbox_json(self) -> Path:
        return self.dir / SANDBOX_FILE

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


@dataclass(frozen=True)
class _Options:
    hosts: int
    sshd: str
    profile: SandboxProfile
    faults: dict[str, Any]
    ssh_latency: float


# --- up ------------------------------------------------------------------------------------


def up(
    dir: str | Path = DEFAULT_DIR,  # the CLI's --dir
    hosts: int = 3,
    sshd: str = "embedded",
    profile: str = "fast",
    api_latency: float | None = None,
    ssh_latency: float = 0.0,
    rate_limit: float = DEFAULT_RATE_LIMIT,
    fail_rate: float = 0.0,
    garbage_rate: float = 0.0,
    offline_after: float | None = None,
    wait_timeout: float | None = None,
    clients: bool = True,
) -> SandboxInfo:
    """Start a sandbox in ``dir`` with release 1 running on every host; return it
    once every client is online (tunnels closed). Raises SandboxRunning if one
    already runs there. ``api_latency`` and ``offline_after`` default to the
    profile's.

    ``clients=False`` starts the runner only (no client process, every host
    offline until something polls for it): benchmarks."""
    root = Path(dir).expanduser().resolve()
    options = _options(
        hosts, sshd, profile, api_latency, ssh_latency, rate_limit, fail_rate, garbage_rate,
        offline_after,
    )  # fmt: skip
    running = _running_info(root)
    if running is not None:
        raise SandboxRunning(f"a sandbox already runs in {root}", running)
    _check_dir(root)
    if (root / STATE_FILE).exists() or (root / RUNNER_FILE).exists():
        down(root)  # a stale sandbox: clear leftovers first
    if wait_timeout is None:
        wait_timeout = 30.0 + 0.2 * hosts + 2 * options.profile.poll_interval
    try:
        return _start(root, options, wait_timeout if clients else None)
    except BaseException:
        down(root)
        raise


def _options(
    hosts, sshd, profile, api_latency, ssh_latency, rate_limit, fail_rate, garbage_rate,
    offline_after,
) -> _Options:  # fmt: skip
    """Check every option before anything starts (SandboxInputError: exit 2)."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise SandboxInputError(f"--hosts must be between 1 and {MAX_HOSTS} (got {hosts})")
    if profile not in PROFILES:
        raise SandboxInputError(f"--profile must be one of {', '.join(PROFILES)} (got {profile!r})")
    if sshd not in SSHD_KINDS:
        raise SandboxInputError(f"--sshd must be one of {', '.join(SSHD_KINDS)} (got {sshd!r})")
    if sshd == "openssh":
        _check_openssh(ssh_latency)
    chosen = PROFILES[profile]
    latency = chosen.api_latency if api_latency is None else api_latency
    offline = chosen.offline_after if offline_after is None else offline_after
    for name, value in (
        ("--api-latency", latency),
        ("--ssh-latency", ssh_latency),
        ("--rate-limit", rate_limit),
    ):
        if value < 0:
            raise SandboxInputError(f"{name} must be >= 0 (got {value})")
    for name, value in (("--fail-rate", fail_rate), ("garbage rate", garbage_rate)):
        if not 0 <= value <= 1:
            raise SandboxInputError(f"{name} must be between 0 and 1 (got {value})")
    if offline <= 0:
        raise SandboxInputError(f"offline_after must be > 0 (got {offline})")
    if offline != chosen.offline_after:  # the soak must still outlast offline detection
        chosen = dataclasses.replace(
            chosen, offline_after=offline, stable_for=max(chosen.stable_for, offline + 1.0)
        )
    faults = {
        "latency": latency,
        "rate_limit": rate_limit,
        "fail_rate": fail_rate,
        "garbage_rate": garbage_rate,
        "offline_after": offline,
    }
    return _Options(hosts, sshd, chosen, faults, ssh_latency)


def _check_openssh(ssh_latency: float) -> None:
    from deployer.sandbox import openssh

    if not openssh.available():
        raise SandboxInputError(
            f"--sshd openssh needs {openssh.SSHD}: install openssh-server, or use --sshd embedded"
        )
    if ssh_latency > 0:
        raise SandboxInputError(
            "--ssh-latency needs the embedded forwarding server (OpenSSH cannot delay "
            "its forwarded connections); use --sshd embedded, or --ssh-latency 0"
        )


def _check_dir(root: Path) -> None:
    """DIR must be new, empty, or an earlier sandbox's: never overwrite a real inventory."""
    if root.exists() and not root.is_dir():
        raise SandboxInputError(f"--dir {root} is a file; choose a directory")
    ours = (root / CONFIG_FILE).exists() or (root / SANDBOX_FILE).exists()
    if root.is_dir() and any(root.iterdir()) and not ours:
        raise SandboxInputError(
            f"--dir {root} is not empty and holds no sandbox; choose a new or empty directory"
        )


def _host_names(count: int) -> list[str]:
    width = max(2, len(str(count)))
    return [f"sbx-{i:0{width}d}" for i in range(1, count + 1)]


def _new_hosts(count: int) -> list[dict[str, Any]]:
    ports_ids = secrets.SystemRandom().sample(range(1000, 100000), count)
    return [
        {
            "name": name,
            "dbid": secrets.token_hex(4),
            "host_uuid": str(uuid.uuid4()),
            "ports_id": ports_ids[i],
            "client_id": str(uuid.uuid4()),
        }
        for i, name in enumerate(_host_names(count))
    ]


def _user_home() -> tuple[str, str]:
    user = getpass.getuser()
    try:
        home = pwd.getpwnam(user).pw_dir
    except KeyError:
        home = os.path.expanduser("~")
    return user, home


def _start(root: Path, options: _Options, wait_timeout: float | None) -> SandboxInfo:
    shutil.rmtree(root / "hosts", ignore_errors=True)  # a new fleet: no old locks or backups
    shutil.rmtree(root / PROVIDER_DIR, ignore_errors=True)
    for sub in ("hosts", "logs", "templates", PROVIDER_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, comment in (
        (CLIENT_KEY_FILE, "deployer-sandbox"),
        (HOST_KEY_FILE, "deployer-sandbox-host"),
        (ACCOUNT_KEY_FILE, "deployer-sandbox-account"),
        (FORWARDING_KEY_FILE, "deployer-sandbox-forwarding"),
    ):
        keys.generate_keypair(root / name, comment)
    for name in TEMPLATES:
        (root / "templates" / name).write_bytes(_template_source(name))
    user, home = _user_home()
    config: dict[str, Any] = {
        "user_id": "sbx" + secrets.token_hex(6),
        "api_key": secrets.token_hex(16),
        "hosts": _new_hosts(options.hosts),
        "sshd": options.sshd,
        "ssh_latency": options.ssh_latency,
        "user": user,
        "home": home,
        "faults": options.faults,
    }
    _write_private(root / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    runner = _start_runner(root)
    _write_world_files(root, config, runner, options.profile)
    names = [h["name"] for h in config["hosts"]]
    _install_release(root, names)
    info = _info(root, config, runner, options.profile.name)
    if wait_timeout is None:
        return info
    _start_clients(root, names, user, home)
    try:
        info.client.wait_online(names, wait_timeout)
    except SandboxClientError as exc:
        logs = root / "hosts" / "*" / "client.log"
        raise SandboxError(f"sandbox clients did not come online: {exc}; see {logs}") from None
    return info


def _template_source(name: str) -> bytes:
    """A client template as the installed package ships it."""
    return resources.files("deployer.templates").joinpath(name).read_bytes()


def _write_world_files(
    root: Path, config: dict[str, Any], runner: dict[str, Any], profile: SandboxProfile
) -> None:
    """known_hosts on both sides, the inventory, sandbox.json, the provider's
    scripts and state.json: everything that needs the runner's ports."""
    iports = [runner["iports"][h["name"]] for h in config["hosts"]]
    keys.write_known_hosts(root / KNOWN_HOSTS_FILE, root / HOST_KEY_FILE, "127.0.0.1", iports)
    keys.write_known_hosts(
        root / FORWARDING_KNOWN_HOSTS_FILE,
        root / FORWARDING_KEY_FILE,
        "127.0.0.1",
        [runner["forwarding_port"]],
    )
    _write_private(root / INVENTORY_FILE, inventory_text(root, config, runner, profile))
    sandbox = sandbox_document(root, config, runner, profile)
    _write_private(root / SANDBOX_FILE, json.dumps(sandbox, indent=2) + "\n")
    _write_provider_scripts(root, config)
    _write_state(root, config, runner)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


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


def _install_release(root: Path, names: list[str]) -> None:
    """Render release 1 with deployer's own loader and renderer, as an upgrade would."""
    from deployer.inventory import load_inventory
    from deployer.render import render_script

    inv = load_inventory(root / INVENTORY_FILE)
    for name in names:
        host = inv.hosts[name]
        path = Path(host.script_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, render_script(inv, host).text)
        path.chmod(0o700)


def _write_provider_scripts(root: Path, config: dict[str, Any]) -> None:
    """What get_client_script answers: the production template rendered for each
    host (release "provider-1"), as a provider generates it for a user."""
    from deployer.inventory import load_inventory
    from deployer.render import render_script

    inv = load_inventory(root / INVENTORY_FILE)
    template = root / "templates" / PRODUCTION_TEMPLATE
    for host in config["hosts"]:
        spec = inv.hosts[host["name"]]
        spec = dataclasses.replace(spec, vars={**spec.vars, "release": PROVIDER_RELEASE})
        text = render_script(inv, spec, template).text
        _write_private(root / PROVIDER_DIR / f"{host['client_id']}.py", text)


def _start_clients(root: Path, names: list[str], user: str, home: str) -> None:
    """Start each client as the pidfile service does (the guard does the same)."""
    env = session_env(user, home)
    for name in names:
        host_dir = root / "hosts" / name
        processes.start_pidfile_service(
            run=f"exec python3 {shlex.quote(str(host_dir / 'client.py'))}",  # "exec " + RUN_COMMAND
            pidfile=host_dir / "client.pid",
            log_path=host_dir / "client.out",  # the client logs itself to client.log
            cwd=str(host_dir),  # as the guard does: the pidfile's directory
            env=env,
        )


def _info(root: Path, config: dict[str, Any], runner: dict[str, Any], profile: str) -> SandboxInfo:
    names = [h["name"] for h in config["hosts"]]
    return SandboxInfo(
        dir=root,
        inventory=root / INVENTORY_FILE,
        base_url=runner["base_url"],
        api_url=runner["api_url"],
        hosts=tuple(names),
        sshd=config["sshd"],
        runner_pid=runner["pid"],
        ssh_ports={n: runner["iports"][n] for n in names},
        sshd_ports={n: runner["sshd_ports"][n] for n in names},
        forwarding_port=runner["forwarding_port"],
        forwarding_user=config["user"],
        profile=profile,
    )


def _write_state(root: Path, config: dict[str, Any], runner: dict[str, Any]) -> None:
    state = {
        "dir": str(root),
        "runner_pid": runner["pid"],
        "base_url": runner["base_url"],
        "sshd": config["sshd"],
        "ports": _runner_ports(runner),
        "hosts": {
            h["name"]: {"pidfile": str(root / "hosts" / h["name"] / "client.pid")}
            for h in config["hosts"]
        },
    }
    (root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _runner_ports(runner: dict[str, Any]) -> list[int]:
    found = {runner.get("api_port"), runner.get("forwarding_port")}
    found.update((runner.get("iports") or {}).values())
    found.update((runner.get("sshd_ports") or {}).values())
    return sorted(p for p in found if p)


# --- the inventory and sandbox.json --------------------------------------------------------


def inventory_text(
    root: Path, config: dict[str, Any], runner: dict[str, Any], profile: SandboxProfile
) -> str:
    """The sandbox's deployer.toml: production's shape, sandbox timings."""
    t = profile
    provider = {
        "api_url": runner["api_url"],
        "ssh_host": "127.0.0.1",  # the forwarding server; each host's ssh_port is its IPORT
        "user_id": config["user_id"],
        "rate_limit": t.api_rate_limit,
        "timeout": t.api_timeout,
        "offline_detection": t.offline_after,
        "tunnel_timeout": t.tunnel_timeout,
        "api_key": config["api_key"],  # for source = "provider" (get_client_script)
    }
    defaults = {
        "ssh_user": config["user"],
        "ssh_key": str(root / CLIENT_KEY_FILE),
        "known_hosts": str(root / KNOWN_HOSTS_FILE),
        "host_key_policy": "strict",
        "template": f"templates/{TEMPLATE_NAME}",
        "online_timeout": t.online_timeout,
        "stable_for": t.stable_for,
        "keep_backups": 3,
        "validate": "python3 -m py_compile {{ path | quote }}",
        "guard_deadline": t.guard_deadline,
        "vars": {
            "poll_url": runner["poll_url"],
            "forwarding_user": config["user"],
            "forwarding_port": runner["forwarding_port"],
            "key_path": str(root / ACCOUNT_KEY_FILE),
            "forwarding_known_hosts": str(root / FORWARDING_KNOWN_HOSTS_FILE),
            "poll_interval": t.poll_interval,
            "release": "1",
            "sandbox_fail": "",
            "sandbox_die_after": "3",
            "sandbox_slow_stop": "5",
        },
    }
    service = {
        "kind": "pidfile",
        "pidfile": str(root / "hosts") + "/{{ host }}/client.pid",
        "run": RUN_COMMAND,
        "ready": READY_PROBE,
    }
    parts = [
        f"# The sandbox fleet in {root}, written by `deployer sandbox up` (profile {t.name}).\n"
        "# Its credentials are random and only valid for this sandbox's simulator.\n",
        toml_table("provider", provider),
        toml_table("defaults", defaults),
        toml_table("defaults.service", service),
        toml_table(f"groups.{GROUP}", {"vars": {}}),
    ]
    for host in config["hosts"]:
        name = host["name"]
        values = {
            "dbid": host["dbid"],
            "host_uuid": host["host_uuid"],
            "ports_id": host["ports_id"],
            "ssh_port": runner["iports"][name],
            "client_id": host["client_id"],
            "groups": [GROUP],
            "script_path": str(root / "hosts" / name / "client.py"),
            "vars": {
                "sshd_port": runner["sshd_ports"][name],
                "log_file": str(root / "hosts" / name / "client.log"),
            },
        }
        parts.append(toml_table(f"hosts.{name}", values))
    return "\n".join(parts)


def sandbox_document(
    root: Path, config: dict[str, Any], runner: dict[str, Any], profile: SandboxProfile
) -> dict[str, Any]:
    """DIR/sandbox.json: what an outside tool needs to talk to this world."""
    hosts = {}
    for host in config["hosts"]:
        name = host["name"]
        hosts[name] = {
            "iport": runner["iports"][name],
            "sshd_port": runner["sshd_ports"][name],
            "ports_id": host["ports_id"],
            "host_uuid": host["host_uuid"],
            "dbid": host["dbid"],
            "user_id": config["user_id"],
            "client_id": host["client_id"],
            "script_path": str(root / "hosts" / name / "client.py"),
            "pidfile": str(root / "hosts" / name / "client.pid"),
        }
    return {
        "sandbox_url": runner["base_url"],
        "api_url": runner["api_url"],
        "poll_url": runner["poll_url"],
        "forwarding_host": "127.0.0.1",
        "forwarding_port": runner["forwarding_port"],
        "forwarding_user": config["user"],
        "account_key": str(root / ACCOUNT_KEY_FILE),
        "api_key": config["api_key"],
        "profile": profile.name,
        "hosts": hosts,
    }


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
    profile = (_read_json(root / SANDBOX_FILE) or {}).get("profile", "fast")
    return _info(root, config, runner, profile)


def info(dir: str | Path = DEFAULT_DIR) -> SandboxInfo:
    """The running sandbox in ``dir``; SandboxNotRunning if none."""
    root = Path(dir).expanduser().resolve()
    running = _running_info(root)
    if running is None:
        raise SandboxNotRunning(
            f"no sandbox runs in {root} (start one: deployer sandbox up --dir {root})"
        )
    return running


def status(dir: str | Path = DEFAULT_DIR) -> dict[str, Any]:
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


# --- a host's client: stop, start, a schedule of both ---------------------------------------


def stop_client(
    dir: str | Path,
    name: str,
    with_tunnel: bool = False,
    after: float = 0.0,
) -> ClientChange | None:
    """SIGTERM ``name``'s client (its pid only: its tunnel stays, as in production);
    ``with_tunnel``: its tunnel processes too. ``after`` > 0: the runner does it
    that many seconds from now (returns None)."""
    return _change_client(dir, name, "stop", with_tunnel, after)


def start_client(dir: str | Path, name: str, after: float = 0.0) -> ClientChange | None:
    """Start ``name``'s client with the pidfile convention, as ``up`` does."""
    return _change_client(dir, name, "start", False, after)


def flap_client(
    dir: str | Path,
    name: str,
    down: float,
    up: float,
    cycles: int,
    after: float = 0.0,
    with_tunnel: bool = False,
) -> list[dict[str, Any]]:
    """Make ``name``'s client go down for ``down`` s and up for ``up`` s, ``cycles``
    times (run by the runner); returns the scheduled events."""
    running = info(dir)
    _check_host(running, name)
    try:
        events = clients.flap_events(name, down, up, cycles, after, with_tunnel)
    except ValueError as exc:
        raise SandboxInputError(str(exc)) from None
    running.client.schedule_clients(events)
    return events


def _change_client(
    dir: str | Path,
    name: str,
    action: str,
    with_tunnel: bool,
    after: float,
) -> ClientChange | None:
    running = info(dir)
    _check_host(running, name)
    if after < 0:
        raise SandboxInputError(f"--after must be >= 0 (got {after})")
    if after > 0:
        event = {"after": after, "host": name, "action": action, "with_tunnel": with_tunnel}
        running.client.schedule_clients([event])
        return None
    return clients.apply(running.dir, name, action, with_tunnel)


def _check_host(running: SandboxInfo, name: str) -> None:
    if name not in running.hosts:
        shown = ", ".join(running.hosts[:3]) + (" …" if len(running.hosts) > 3 else "")
        raise SandboxInputError(f"no host {name!r} in the sandbox in {running.dir} ({shown})")


def down(dir: str | Path = DEFAULT_DIR) -> DownReport:
    """Stop every process of the sandbox in ``dir`` — clients, their tunnel
    processes, guards, the runner and its SSH servers, sessions left on them —
    and check that no process or port is left."""
    root = Path(dir).expanduser().resolve()
    report = DownReport()
    runner = _read_json(root / RUNNER_FILE) or {}
    state = _read_json(root / STATE_FILE) or {}
    report.was_running = _runner_alive(runner.get("pid"))
    if report.was_running:  # no scheduled client start while the world stops
        with contextlib.suppress(SandboxClientError, KeyError):
            SandboxClient(runner["base_url"]).clear_client_schedule()
    _stop_hosts(root, report)
    _stop_tunnels(root, report)
    _stop_runner(root, runner, report)
    ports = sorted(set(_runner_ports(runner)) | set(state.get("ports", [])))
    _stop_port_holders(ports, report)
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


def _stop_tunnels(root: Path, report: DownReport) -> None:
    """The clients' detached ``ssh -R`` processes (they outlive their clients by design)."""
    tunnels = processes.processes_mentioning(f"{root}/{ACCOUNT_KEY_FILE}")
    processes.terminate(tunnels, 2.0)
    report.stopped.extend(f"tunnel pid {p}" for p in tunnels)


def _stop_runner(root: Path, runner: dict[str, Any], report: DownReport) -> None:
    pid = runner.get("pid")
    if pid is not None and _runner_alive(pid):
        processes.terminate([pid], STOP_TIMEOUT)
        report.stopped.append(f"runner pid {pid}")
    for pidfile in sorted((root / SSHD_DIR).glob("*.pid")):  # sshds of a killed runner
        sshd_pid = processes.read_pidfile(pidfile)
        if sshd_pid and processes.alive(sshd_pid) and "sshd" in processes.cmdline(sshd_pid):
            processes.terminate([sshd_pid], STOP_TIMEOUT)
            report.stopped.append(f"sshd pid {sshd_pid}")
    stray = processes.processes_mentioning(*_markers(root))
    if stray:
        processes.terminate(stray, 2.0)
        report.stopped.extend(f"stray pid {p}" for p in stray)


def _stop_port_holders(ports: list[int], report: DownReport) -> None:
    """OpenSSH's per-session processes outlive their listener: end any sshd that
    still holds one of the sandbox's ports (a session through a tunnel, a forward)."""
    if not ports:
        return
    held = [p for p in procnet.port_owners(ports) if processes.cmdline(p).startswith("sshd")]
    processes.terminate(held, 2.0)
    report.stopped.extend(f"sshd session pid {p}" for p in held)


def _markers(root: Path) -> tuple[str, ...]:
    """Command-line fragments that only the sandbox's own processes carry."""
    return (
        f"{root}/hosts/",
        f"deployer.sandbox.runner {root}",
        f"{root}/{SSHD_DIR}/",
        f"{root}/{ACCOUNT_KEY_FILE}",
    )


def _wait_ports_closed(ports: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    open_ports = [p for p in ports if processes.listening(p)]
    while open_ports and time.monotonic() < deadline:
        time.sleep(0.1)
        open_ports = [p for p in open_ports if processes.listening(p)]
    return open_ports
