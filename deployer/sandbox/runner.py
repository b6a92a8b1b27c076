"""The sandbox's background process: ``python -m deployer.sandbox.runner DIR``.

It reads ``DIR/sandbox.json`` (written by ``deployer sandbox up``), starts the
SSH server (embedded in this process, or OpenSSH's sshd as a child) and the
provider simulator relaying tunnels to it, writes ``DIR/runner.json`` with its
ports once everything listens, and runs until SIGTERM or SIGINT. It ignores
SIGHUP, so it outlives the shell that started it.
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

from deployer.sandbox.simulator import Faults, HostSpec, Simulator

log = logging.getLogger("deployer.sandbox.runner")

CONFIG_FILE = "sandbox.json"
RUNNER_FILE = "runner.json"
HOST_KEY_FILE = "ssh_host_ed25519_key"
CLIENT_KEY_FILE = "id_ed25519"
SSHD_CONFIG_FILE = "sshd_config"
SSHD_PID_FILE = "sshd.pid"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _start_sshd(root: Path, config: dict[str, Any]):
    """Start the configured SSH server; return (server, port, pid or None)."""
    host_key = root / HOST_KEY_FILE
    authorized = root / f"{CLIENT_KEY_FILE}.pub"
    if config["sshd"] == "openssh":
        from deployer.sandbox import openssh
        from deployer.sandbox.ports import free_ports

        config["sshd_port"] = config.get("sshd_port") or free_ports(1)[0]
        sshd_config = root / SSHD_CONFIG_FILE
        openssh.write_config(
            sshd_config,
            port=config["sshd_port"],
            host_key=host_key,
            authorized_keys=authorized,
            pidfile=root / SSHD_PID_FILE,
        )
        server = openssh.OpenSshServer(sshd_config, config["sshd_port"], root / "logs" / "sshd.log")
        port = server.start()
        return server, port, server.pid
    from deployer.sandbox.sshd import EmbeddedSshServer

    server = EmbeddedSshServer(
        host_key, authorized, config["user"], config["home"], config.get("sshd_port", 0)
    )
    return server, server.start(), None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run(root: Path) -> int:
    config = json.loads((root / CONFIG_FILE).read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _raise_fd_limit()
    sshd, sshd_port, sshd_pid = _start_sshd(root, config)
    sim = None
    try:
        hosts = [HostSpec(**h) for h in config["hosts"]]
        faults = Faults().updated(config.get("faults", {}))
        sim = Simulator(
            config["user_id"], hosts, ("127.0.0.1", sshd_port), faults, config["api_port"]
        )
        sim.start()
        _write_json(root / RUNNER_FILE, _runner_info(sim, config, sshd_port, sshd_pid))
        log.info("simulator on %s, %s sshd on port %s", sim.base_url, config["sshd"], sshd_port)
        return _serve(sshd, stop)
    finally:
        log.info("stopping")
        if sim is not None:
            sim.stop()
        sshd.stop()


def _runner_info(sim: Simulator, config: dict[str, Any], sshd_port: int, sshd_pid) -> dict:
    return {
        "pid": os.getpid(),
        "base_url": sim.base_url,
        "api_url": sim.api_url,
        "api_port": sim.port,
        "sshd": config["sshd"],
        "sshd_port": sshd_port,
        "sshd_pid": sshd_pid,
        "ssh_ports": sim.ssh_ports,
    }


def _serve(sshd: Any, stop: threading.Event) -> int:
    """Run until asked to stop (0), or until OpenSSH's sshd dies (1)."""
    while not stop.wait(0.5):
        if hasattr(sshd, "alive") and not sshd.alive():
            log.error("sshd exited; stopping the sandbox")
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
