"""How much the sandbox simulator serves on this machine (JSON on stdout).

1. API calls per second: ``client_status`` from several worker processes
   against a running sandbox (its own background process, rate limit off),
   over keep-alive connections and with a new connection per call.
2. Concurrent tunnels: N hosts connected at once, one SSH session open
   through each tunnel at the same time (to the embedded SSH server in the
   same runner process), every session runs a command while all are open;
   plus raw TCP connections through N tunnels reading the SSH banner.

    .venv/bin/python benchmarks/simulator.py [--seconds 5] [--workers 3]
        [--tunnels 200,400] [--raw-tunnels 1000]

Not a test: it asserts nothing, it reports. Target on 2 cores: >= 1000
calls/s and >= 200 concurrent tunnels.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import http.client
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from deployer.inventory import load_inventory
from deployer.sandbox import fleet


def _progress(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _host_params(inventory: Path) -> tuple[str, list[dict[str, str]], list[str]]:
    inv = load_inventory(inventory)
    params = []
    uuids = []
    for host in inv.hosts.values():
        params.append(
            {
                "user_id": inv.provider.user_id.reveal(),
                "dbid": host.dbid.reveal(),
                "host_uuid": host.host_uuid.reveal(),
                "ports_id": str(host.ports_id),
            }
        )
        uuids.append(host.host_uuid.reveal())
    return inv.provider.api_url, params, uuids


def _worker(api_url: str, params: dict, seconds: float, keep_alive: bool, out) -> None:
    url = urllib.parse.urlsplit(api_url.format(call="client_status"))
    path = f"{url.path}?{urllib.parse.urlencode(params)}"
    ok = errors = 0
    conn = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            body = json.loads(response.read())
            if response.status == 200 and body.get("success"):
                ok += 1
            else:
                errors += 1
        except (OSError, http.client.HTTPException, ValueError):
            errors += 1
            conn = None
        if not keep_alive and conn is not None:
            conn.close()
            conn = None
    out.put((ok, errors))


def api_throughput(sb: fleet.SandboxInfo, seconds: float, workers: int, keep_alive: bool):
    api_url, params, _ = _host_params(sb.inventory)
    queue: multiprocessing.Queue = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_worker, args=(api_url, params[i % len(params)], seconds, keep_alive, queue)
        )
        for i in range(workers)
    ]
    _progress(f"API calls, {workers} workers, keep-alive {keep_alive}")
    start = time.monotonic()
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 30) for _ in procs]
    for proc in procs:
        proc.join()
    elapsed = time.monotonic() - start
    ok = sum(r[0] for r in results)
    return {
        "keep_alive": keep_alive,
        "workers": workers,
        "seconds": round(elapsed, 2),
        "calls_ok": ok,
        "errors": sum(r[1] for r in results),
        "calls_per_second": round(ok / elapsed, 1),
    }


async def _ssh_sessions(sb: fleet.SandboxInfo, ports: list[int]) -> dict:
    import asyncssh

    key = asyncssh.read_private_key(str(sb.dir / "id_ed25519"))
    known = str(sb.dir / "known_hosts")
    gate = asyncio.Semaphore(64)  # handshakes in flight, not sessions open

    async def open_one(port: int):
        async with gate:
            return await asyncssh.connect(
                "127.0.0.1",
                port,
                username=getpass.getuser(),
                client_keys=[key],
                known_hosts=known,
                agent_path=None,
            )

    start = time.monotonic()
    conns = await asyncio.gather(*(open_one(p) for p in ports), return_exceptions=True)
    opened = [c for c in conns if not isinstance(c, BaseException)]
    connect_s = time.monotonic() - start
    state = sb.client.state()
    relayed = sum(h["connections"] for h in state["hosts"].values())
    start = time.monotonic()
    results = await asyncio.gather(
        *(c.run("echo ok", check=False) for c in opened), return_exceptions=True
    )
    exec_s = time.monotonic() - start
    ok = sum(1 for r in results if not isinstance(r, BaseException) and r.stdout == "ok\n")
    for conn in opened:
        conn.close()
    errors = sorted({type(c).__name__ for c in conns if isinstance(c, BaseException)})
    return {
        "tunnels": len(ports),
        "ssh_sessions_open_at_once": len(opened),
        "connections_relayed_at_peak": relayed,
        "exec_ok_while_all_open": ok,
        "connect_all_seconds": round(connect_s, 2),
        "exec_all_seconds": round(exec_s, 2),
        "errors": errors,
    }


def _connect_tunnels(sb: fleet.SandboxInfo) -> list[int]:
    api_url, params, uuids = _host_params(sb.inventory)
    sb.client.set_faults(offline_after=3600.0, rate_limit=0)
    for uuid in uuids:
        sb.client.heartbeat(uuid, "bench", 0)  # the benchmark stands in for the clients
    url = urllib.parse.urlsplit(api_url.format(call="connect"))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    for p in params:
        conn.request("GET", f"{url.path}?{urllib.parse.urlencode(p)}")
        reply = json.loads(conn.getresponse().read())
        if reply["error_code"] != 0:
            raise RuntimeError(f"connect failed: {reply}")
    return list(sb.ssh_ports.values())


def tunnels_ssh(root: Path, count: int) -> dict:
    _progress(f"{count} tunnels with an SSH session each")
    sb = fleet.up(root, hosts=count, rate_limit=0, clients=False)
    try:
        ports = _connect_tunnels(sb)
        return asyncio.run(_ssh_sessions(sb, ports))
    finally:
        fleet.down(root)
        _progress("done")


def tunnels_raw(root: Path, count: int) -> dict:
    _progress(f"{count} tunnels with a raw TCP connection each")
    sb = fleet.up(root, hosts=count, rate_limit=0, clients=False)
    socks = []
    try:
        ports = _connect_tunnels(sb)
        start = time.monotonic()
        for port in ports:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        banners = 0
        for sock in socks:
            if sock.recv(64).startswith(b"SSH-2.0-"):
                banners += 1
        elapsed = time.monotonic() - start
        relayed = sum(h["connections"] for h in sb.client.state()["hosts"].values())
        return {
            "tunnels": count,
            "tcp_connections_open_at_once": len(socks),
            "connections_relayed_at_peak": relayed,
            "ssh_banners_read": banners,
            "seconds": round(elapsed, 2),
        }
    finally:
        for sock in socks:
            sock.close()
        fleet.down(root)
        _progress("done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tunnels", default="200,400")
    parser.add_argument("--raw-tunnels", type=int, default=1000)
    parser.add_argument("--keep", metavar="DIR", help="Keep the sandboxes (logs) in DIR.")
    args = parser.parse_args()
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    started = time.monotonic()
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as tmp:
        root = Path(args.keep or tmp).resolve()
        sb = fleet.up(root / "api", hosts=3, rate_limit=0)
        try:
            report["api"] = [
                api_throughput(sb, args.seconds, args.workers, keep_alive=True),
                api_throughput(sb, args.seconds, args.workers, keep_alive=False),
            ]
        finally:
            fleet.down(root / "api")
        report["tunnels_ssh"] = [
            tunnels_ssh(root / f"ssh{n}", int(n)) for n in args.tunnels.split(",") if n
        ]
        if args.raw_tunnels:
            report["tunnels_raw_tcp"] = tunnels_raw(root / "raw", args.raw_tunnels)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
