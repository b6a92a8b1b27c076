"""Ports for the sandbox's tunnels: picked below the kernel's ephemeral range
(so no outgoing connection ever takes one) and held from the moment they are
picked by a bound socket without SO_REUSEADDR, so two sandboxes started at
the same time never share a port."""

from __future__ import annotations

import random
import socket
from pathlib import Path

PORT_FLOOR = 20000  # tunnel ports are picked from here up to the ephemeral range
ATTEMPTS = 500


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_pool() -> range:
    low, _high = ephemeral_range()
    return range(PORT_FLOOR, low) if low - PORT_FLOOR >= 1000 else range(10000, 65535)


def bind_exclusive(port: int) -> socket.socket | None:
    """A socket bound to 127.0.0.1:``port`` that keeps every other bind off it; None if busy."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def reserve_free_port(rng: random.Random | None = None) -> tuple[int, socket.socket]:
    """Pick a free port from :func:`port_pool` and hold it; OSError if none is found."""
    rng = rng or random.Random()
    pool = port_pool()
    for _ in range(ATTEMPTS):
        port = rng.choice(pool)
        held = bind_exclusive(port)
        if held is not None:
            return port, held
    raise OSError(f"no free port on 127.0.0.1 in {pool.start}-{pool.stop - 1}")


def free_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """``count`` distinct ports that are free now (not held: for the caller to bind soon)."""
    held = [reserve_free_port(rng) for _ in range(count)]
    for _port, sock in held:
        sock.close()
    return [port for port, _sock in held]
