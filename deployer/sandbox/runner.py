"""The sandbox's background process: ``python -m deployer.sandbox.runner DIR``.

It reads ``DIR/config.json`` (written by ``deployer sandbox up``) and starts
the world of docs/how-to/sandbox.md that is not the clients: one SSH server per host (what
deployer logs in to), the forwarding SSH server (where the clients' tunnel
processes log in), the provider simulator and the schedule of client stops
and starts (:class:`deployer.sandbox.clients.Schedule`, the flapping fault).
It writes ``DIR/runner.json`` with every port once everything listens, and
runs until SIGTERM or SIGINT.
It ignores SIGHUP, so it outlives the shell that started it.

Embedded (default): all SSH servers are asyncssh in this process. OpenSSH
(``--sshd openssh``): one ``sshd -D`` per host and one for forwarding, all
children of this process, their configs and pidfiles in ``DIR/sshd/``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from deployer.files import UMASK, atomic_write
from deployer.sandbox import ports
from deployer.sandbox.simulator import Faults, HostSpec, Simulator

log = logging.getLogger("deployer.sandbox.runner")

CONFIG_FILE = "config.json"
RUNNER_FILE = "runner.json"
HOST_KEY_FILE = "ssh_host_ed25519_key"  # every host's SSH server
CLIENT_KEY_FILE = "id_ed25519"  # deployer's key
ACCOUNT_KEY_FILE = "account_key"  # the clients' key on the forwarding server
FORWARDING_KEY_FILE = "forwarding_host_ed25519_key"  # the forwarding server's host key
SSHD_DIR = "sshd"  # OpenSSH configs and pidfiles
PROVIDER_DIR = "provider"  # CLIENT_ID.py: what get_client_script answers
FORWARDING = "forwarding"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class World:
    """The SSH servers and the simulator of one sandbox; :meth:`stop` ends all."""

    def __init__(self, root: Path, config: dict[str, Any]):
        self.root = root
        self.config = config
        self.names = [h["name"] for h in config["hosts"]]
        self.openssh = config["sshd"] == "openssh"
        self.host_sshds: list[Any] = []  # one OpenSshServer per host, or one embedded server
        self.sshd_ports: dict[str, int] = {}
        self.iports: dict[str, int] = {}
        self.forwarding: Any = None
        self.simulator: Simulator | None = None
        self.schedule: Any = None  # deployer.sandbox.clients.Schedule

    def start(self) -> None:
        self._start_host_sshds()
        self._start_forwarding()
        hosts = [
            HostSpec(
                name=h["name"],
                dbid=h["dbid"],
                host_uuid=h["host_uuid"],
                ports_id=h["ports_id"],
                iport=self.iports[h["name"]],
                sshd_port=self.sshd_ports[h["name"]],
                client_id=h["client_id"],
            )
            for h in self.config["hosts"]
        ]
        self.simulator = Simulator(
            self.config["user_id"],
            hosts,
            self.forwarding,
            Faults().updated(self.config.get("faults", {})),
            api_key=self.config["api_key"],
            scripts_dir=self.root / PROVIDER_DIR,
        )
        self._start_schedule()
        self.simulator.start()

    def _start_schedule(self) -> None:
        from deployer.sandbox.clients import Schedule

        self.schedule = Schedule(self.root, self.names)
        self.schedule.start()
        assert self.simulator is not None  # made just before, in start()
        self.simulator.clients = self.schedule

    def _start_host_sshds(self) -> None:
        host_key = self.root / HOST_KEY_FILE
        authorized = self.root / f"{CLIENT_KEY_FILE}.pub"
        if not self.openssh:
            from deployer.sandbox.sshd import EmbeddedSshServer

            user, home = self.config["user"], self.config["home"]
            server = EmbeddedSshServer(host_key, authorized, user, home, [0] * len(self.names))
            self.host_sshds.append(server)
            self.sshd_ports = dict(zip(self.names, server.start(), strict=True))
            return
        from deployer.sandbox import openssh

        (self.root / SSHD_DIR).mkdir(exist_ok=True)
        (self.root / "logs" / SSHD_DIR).mkdir(parents=True, exist_ok=True)
        for name, port in zip(self.names, ports.free_ports(len(self.names)), strict=True):
            conf = self.root / SSHD_DIR / f"{name}.conf"
            openssh.write_config(
                conf,
                port=port,
                host_key=host_key,
                authorized_keys=authorized,
                pidfile=self.root / SSHD_DIR / f"{name}.pid",
            )
            log_path = self.root / "logs" / SSHD_DIR / f"{name}.log"
            sshd = openssh.OpenSshServer(conf, port, log_path)
            sshd.launch()
            self.host_sshds.append(sshd)
            self.sshd_ports[name] = port
        for server in self.host_sshds:
            server.wait_listening()

    def _start_forwarding(self) -> None:
        host_key = self.root / FORWARDING_KEY_FILE
        authorized = self.root / f"{ACCOUNT_KEY_FILE}.pub"
        user = self.config["user"]
        if not self.openssh:
            from deployer.sandbox.forwarding import EmbeddedForwardingServer

            held = [ports.reserve_free_port() for _ in self.names]
            self.iports = {name: port for name, (port, _sock) in zip(self.names, held, strict=True)}
            self.forwarding = EmbeddedForwardingServer(
                host_key, authorized, user, dict(held), self.config.get("ssh_latency", 0.0)
            )
            self.forwarding.start()
            return
        from deployer.sandbox import openssh
        from deployer.sandbox.forwarding import OpenSshForwardingServer

        picked = ports.free_ports(len(self.names) + 1)
        port, self.iports = picked[0], dict(zip(self.names, picked[1:], strict=True))
        conf = self.root / SSHD_DIR / f"{FORWARDING}.conf"
        openssh.write_forwarding_config(
            conf,
            port=port,
            host_key=host_key,
            authorized_keys=authorized,
            pidfile=self.root / SSHD_DIR / f"{FORWARDING}.pid",
            user=user,
            iports=list(self.iports.values()),
        )
        server = openssh.OpenSshServer(conf, port, self.root / "logs" / f"{FORWARDING}-sshd.log")
        self.forwarding = OpenSshForwardingServer(server, port, self.iports.values())
        self.forwarding.start()

    def dead_sshd(self) -> str | None:
        """The OpenSSH server that exited (the sandbox cannot go on without it), if any."""
        if not self.openssh:
            return None
        for name, server in zip(self.names, self.host_sshds, strict=False):
            if not server.alive():
                return f"the sshd of {name}"
        if self.forwarding is not None and not self.forwarding.alive():
            return "the forwarding sshd"
        return None

    def info(self) -> dict[str, Any]:
        sim = self.simulator
        assert sim is not None
        return {
            "pid": os.getpid(),
            "base_url": sim.base_url,
            "api_url": sim.api_url,
            "poll_url": sim.poll_url,
            "api_port": sim.port,
            "sshd": self.config["sshd"],
            "forwarding_port": self.forwarding.port,
            "iports": self.iports,
            "sshd_ports": self.sshd_ports,
            "sshd_pids": [s.pid for s in self.host_sshds if self.openssh],
        }

    def stop(self) -> None:
        if self.schedule is not None:
            self.schedule.stop()  # first: no client starts while the world stops
        if self.simulator is not None:
            self.simulator.stop()
        if self.forwarding is not None:
            self.forwarding.stop()
        for server in self.host_sshds:
            server.stop()


def run(root: Path) -> int:
    config = json.loads((root / CONFIG_FILE).read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _raise_fd_limit()
    world = World(root, config)
    try:
        world.start()
        info = world.info()
        atomic_write(root / RUNNER_FILE, json.dumps(info, indent=2) + "\n", mode=UMASK)
        log.info(
            "simulator on %s, %s forwarding server on port %s, %d host SSH servers",
            info["base_url"],
            config["sshd"],
            info["forwarding_port"],
            len(world.names),
        )
        return _serve(world, stop)
    finally:
        log.info("stopping")
        world.stop()


def _serve(world: World, stop: threading.Event) -> int:
    """Run until asked to stop (0), or until an OpenSSH server dies (1)."""
    while not stop.wait(0.5):
        dead = world.dead_sshd()
        if dead:
            log.error("%s exited; stopping the sandbox", dead)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m deployer.sandbox.runner DIR", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return run(Path(args[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
