"""The system's OpenSSH server in the sandbox (``--sshd openssh``):
``/usr/sbin/sshd -D`` with a generated config on 127.0.0.1, as each host's own
SSH server (the sandbox host key, deployer's key authorized) and as the
forwarding server (its own host key, the account key authorized, remote
forwarding of the tunnel ports only).

``MaxStartups`` and ``MaxSessions`` are raised so a parallel fleet run through
many tunnels is not refused.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from deployer.sandbox import procnet

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def available() -> bool:
    """True when OpenSSH's sshd is installed."""
    return SSHD.is_file() and os.access(SSHD, os.X_OK)


def _quoted(path: Path) -> str:
    return '"' + str(path).replace('"', '\\"') + '"'


def _common(port: int, host_key: Path, pidfile: Path) -> list[str]:
    return [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        "AddressFamily inet",
        f"HostKey {_quoted(host_key)}",
        f"PidFile {_quoted(pidfile)}",
        "StrictModes no",
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "MaxStartups 500:30:1000",
        "X11Forwarding no",
        "PrintMotd no",
        "LogLevel INFO",
    ]


def write_config(path: Path, *, port: int, host_key: Path, authorized_keys: Path, pidfile: Path):
    """Write the sshd_config of one host's own SSH server (what deployer logs in to)."""
    lines = _common(port, host_key, pidfile) + [
        # the sandbox's key for the current user; a user's own file too, so a
        # test can log in as a non-root user (the sudo hosts of the inventory)
        f"AuthorizedKeysFile {_quoted(authorized_keys)} .ssh/authorized_keys",
        "MaxSessions 100",
        "AllowTcpForwarding no",
        "Subsystem sftp internal-sftp",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_forwarding_config(
    path: Path,
    *,
    port: int,
    host_key: Path,
    authorized_keys: Path,
    pidfile: Path,
    user: str,
    iports: list[int],
    keepalive: int = 15,
) -> None:
    """Write the sshd_config of the forwarding server: ``user`` with the account
    key may forward the tunnel ports ``iports`` to 127.0.0.1, and nothing else."""
    lines = _common(port, host_key, pidfile) + [
        f"AuthorizedKeysFile {_quoted(authorized_keys)}",
        f"AllowUsers {user}",
        "AllowTcpForwarding remote",
        "PermitListen " + " ".join(str(p) for p in iports),
        "PermitOpen none",
        "GatewayPorts no",
        "AllowAgentForwarding no",
        "AllowStreamLocalForwarding no",
        "PermitTunnel no",
        "PermitTTY no",
        "ForceCommand /bin/false",
        f"ClientAliveInterval {keepalive}",
        "ClientAliveCountMax 3",
        "MaxSessions 10",
    ]
    path.write_text("\n".join(lines) + "\n")


class OpenSshServer:
    """``sshd -D -e -f CONFIG`` as a child process, its log in ``log_path``."""

    def __init__(self, config: Path, port: int, log_path: Path):
        self.config = config
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        """Start sshd and wait until it listens; return the port."""
        self.launch()
        self.wait_listening()
        return self.port

    def launch(self) -> None:
        """Start sshd without waiting (start many, then wait for each)."""
        if not available():
            raise RuntimeError(f"{SSHD} not found: install openssh-server or use the embedded sshd")
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}; see {self.log_path}")
            if procnet.listener(procnet.tcp_sockets(), self.port) is not None:
                return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on port {self.port}; see {self.log_path}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
