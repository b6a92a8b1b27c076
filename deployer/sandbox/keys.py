"""The sandbox's SSH keys: a client key for deployer, a host key for the SSH
server, and a known_hosts file that already trusts that host key on every
tunnel port (so the inventory can use ``host_key_policy = "strict"``)."""

from __future__ import annotations

import os
from pathlib import Path

KEY_TYPE = "ssh-ed25519"


def generate_keypair(path: Path, comment: str) -> str:
    """Write an OpenSSH-format private key (0600) and ``path``.pub; return the public line."""
    import asyncssh

    key = asyncssh.generate_private_key(KEY_TYPE, comment=comment)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.export_private_key())
    public = key.export_public_key().decode().strip()
    Path(f"{path}.pub").write_text(public + "\n")
    return public


def public_key_line(path: Path) -> str:
    """The public key of a private key file, as ``TYPE BASE64`` (no comment)."""
    text = Path(f"{path}.pub").read_text().split()
    return f"{text[0]} {text[1]}"


def write_known_hosts(path: Path, host_key: Path, host: str, ports: list[int]) -> None:
    """Trust ``host_key`` for ``[host]:port`` of every port."""
    key = public_key_line(host_key)
    lines = [f"[{host}]:{port} {key}\n" for port in ports]
    path.write_text("".join(lines))
