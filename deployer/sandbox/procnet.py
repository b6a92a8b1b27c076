"""Who owns which TCP socket on this machine, read from /proc (Linux only).

The sandbox uses it to name the processes behind a tunnel: the forwarding
server knows the peer address of a client's SSH session (127.0.0.1:PEERPORT),
the kernel's socket table (/proc/net/tcp) turns the client side of that
connection into a socket inode, and the file descriptors under /proc/PID/fd
turn the inode into the pid that holds it. With OpenSSH as the forwarding
server the same tables name the per-session sshd that listens on a tunnel
port and the client at the other end of its connection.

Reading /proc/*/fd is the costly part (every fd of every process), so
:func:`socket_owners` resolves a whole batch of inodes in one pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
LISTEN = "0A"
ESTABLISHED = "01"


@dataclass(frozen=True)
class TcpSocket:
    """One row of /proc/net/tcp: ports, state (hex, e.g. ``0A`` listen) and inode."""

    local_port: int
    remote_port: int
    state: str
    inode: int
    local_loopback: bool

    @property
    def listening(self) -> bool:
        return self.state == LISTEN

    @property
    def established(self) -> bool:
        return self.state == ESTABLISHED


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    if len(host) == 8:  # IPv4, little-endian hex: 127.x.x.x ends with 7F
        return host.endswith("7F")
    return host in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def tcp_sockets(tables: Iterable[str] = TCP_TABLES) -> list[TcpSocket]:
    """Every TCP socket the kernel lists (both address families)."""
    found = []
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            found.append(
                TcpSocket(
                    local_port=_port(fields[1]),
                    remote_port=_port(fields[2]),
                    state=fields[3],
                    inode=int(fields[9]),
                    local_loopback=_loopback(fields[1]),
                )
            )
    return found


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes among the open files of ``pid`` (empty if it is gone)."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        inode = _socket_inode(f"/proc/{pid}/fd/{name}")
        if inode is not None:
            inodes.add(inode)
    return inodes


def _socket_inode(path: str) -> int | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    if target.startswith("socket:[") and target.endswith("]"):
        return int(target[8:-1])
    return None


def socket_owners(inodes: Iterable[int]) -> dict[int, list[int]]:
    """inode -> the pids holding it open, for every inode asked (one /proc pass)."""
    wanted = {i for i in inodes if i}
    owners: dict[int, list[int]] = {i: [] for i in wanted}
    if not wanted:
        return owners
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        for inode in socket_inodes(pid) & wanted:
            owners[inode].append(pid)
    return owners


def client_side(sockets: list[TcpSocket], peer_port: int, server_port: int) -> TcpSocket | None:
    """The client's end of a loopback connection from ``peer_port`` to ``server_port``."""
    for sock in sockets:
        if sock.local_port == peer_port and sock.remote_port == server_port and sock.established:
            return sock
    return None


def listener(sockets: list[TcpSocket], port: int) -> TcpSocket | None:
    """The socket listening on loopback ``port``, if any."""
    for sock in sockets:
        if sock.local_port == port and sock.listening and sock.local_loopback:
            return sock
    return None


def established_to(sockets: list[TcpSocket], port: int) -> int:
    """How many connections were accepted on local ``port`` and are still open."""
    return sum(1 for s in sockets if s.local_port == port and s.established)


def ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def port_owners(ports: Iterable[int]) -> list[int]:
    """Pids holding any socket whose local port is one of ``ports`` (listening or not)."""
    wanted = set(ports)
    inodes = [s.inode for s in tcp_sockets() if s.local_port in wanted and s.inode]
    owners = socket_owners(inodes)
    return sorted({pid for pids in owners.values() for pid in pids})
