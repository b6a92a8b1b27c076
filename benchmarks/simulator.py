"""How much the sandbox simulator serves on this machine (JSON on stdout).

1. API calls per second: ``client_status`` from several worker processes
   against a running sandbox (its own background process, rate limit off),
   over keep-alive connections and with a new connection per call.
2. Polls per second: the clients' poll endpoint (``{poll_url}/get_port4.php``,
   SPEC 1b), the same way. A fleet of N clients polling every P seconds
   needs N / P of them (200 hosts on the ``fast`` profile: 400/s).
3. Concurrent tunnels: N hosts connected at once — each tunnel a real client's
   ``ssh -R`` to the forwarding server (the ``real`` profile: clients poll
   every 5 s, so N clients cost little CPU), opened at the client's next poll
   after ``connect`` — one SSH session open through each tunnel at the same
   time (to the hosts' embedded SSH servers, in the runner process), every
   session runs a command while all are open; plus raw TCP connections
   through N tunnels reading the SSH banner.

    .venv/bin/python -m benchmarks.simulator [--seconds 5] [--workers 3]
        [--tunnels 200,400] [--raw-tunnels 500]

Not a test: it asserts nothing, it reports. Target on 2 cores: >= 1000
calls/s and >= 200 concurrent tunnels. Each tunnel costs a client process and
an ssh process (some 15 MB together), hence the smaller raw default.
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


def _host_params(inventory: Path) -> tuple[str, list[dict[str, str]]]:
    inv = load_inventory(inventory)
    params = []
    for host in inv.hosts.values():
        params.append(
            {
                "user_id": inv.provider.user_id.reveal(),
                "dbid": host.dbid.reveal(),
                "host_uuid": host.host_uuid.reveal(),
                "ports_id": str(host.ports_id),
            }
        )
    return inv.provider.api_url, params


def _poll_urls(sb: fleet.SandboxInfo) -> list[str]:
    """One poll URL per host, as its client sends it (without the sha256 extra)."""
    document = json.loads(sb.sandbox_json.read_text())
    urls = []
    for host in document["hosts"].values():
        query = {
            "ports_id": host["ports_id"],
            "key": host["host_uuid"],
            "uid": host["user_id"],
            "dbid": host["dbid"],
            "ver": "bench",
            "upgradable": "False",
        }
        urls.append(f"{document['poll_url']}/get_port4.php?{urllib.parse.urlencode(query)}")
    return urls


def _ok(kind: str, status: int, body: dict) -> bool:
    if kind == "poll":
        return status == 200 and "command" in body
    return status == 200 and bool(body.get("success"))


def _worker(target: str, kind: str, seconds: float, keep_alive: bool, out) -> None:
    url = urllib.parse.urlsplit(target)
    path = f"{url.path}?{url.query}"
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
            if _ok(kind, response.status, body):
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


def api_throughput(
    sb: fleet.SandboxInfo, seconds: float, workers: int, keep_alive: bool, kind: str = "api"
):
    """``client_status`` calls (kind "api") or client polls (kind "poll") per second."""
    if kind == "poll":
        targets = _poll_urls(sb)
    else:
        api_url, params = _host_params(sb.inventory)
        call = api_url.format(call="client_status")
        targets = [f"{call}?{urllib.parse.urlencode(p)}" for p in params]
    queue: multiprocessing.Queue = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_worker, args=(targets[i % len(targets)], kind, seconds, keep_alive, queue)
        )
        for i in range(workers)
    ]
    _progress(f"{kind} requests, {workers} workers, keep-alive {keep_alive}")
    start = time.monotonic()
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 30) for _ in procs]
    for proc in procs:
        proc.join()
    elapsed = time.monotonic() - start
    ok = sum(r[0] for r in results)
    return {
        "kind": kind,
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


def _tunnel_world(root: Path, count: int) -> fleet.SandboxInfo:
    """``count`` hosts with real clients on the ``real`` profile (a poll every 5 s),
    no API latency and no rate limit."""
    return fleet.up(
        root, hosts=count, profile="real", api_latency=0.0, rate_limit=0, wait_timeout=60 + count
    )


def _connect_tunnels(sb: fleet.SandboxInfo) -> tuple[list[int], float]:
    """``connect`` every host, then wait until each client has opened its tunnel
    (at its next poll): the IPORTs, and the seconds from the first connect."""
    api_url, params = _host_params(sb.inventory)
    url = urllib.parse.urlsplit(api_url.format(call="connect"))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    started = time.monotonic()
    for p in params:
        conn.request("GET", f"{url.path}?{urllib.parse.urlencode(p)}")
        reply = json.loads(conn.getresponse().read())
        if reply["error_code"] != 0:
            raise RuntimeError(f"connect failed: {reply}")
    sb.client.wait_tunnel(sb.hosts, timeout=60 + 0.1 * len(params))
    return list(sb.ssh_ports.values()), time.monotonic() - started


def tunnels_ssh(root: Path, count: int) -> dict:
    _progress(f"{count} tunnels with an SSH session each")
    sb = _tunnel_world(root, count)
    try:
        ports, up_seconds = _connect_tunnels(sb)
        return {**asyncio.run(_ssh_sessions(sb, ports)), "tunnels_up_seconds": round(up_seconds, 2)}
    finally:
        fleet.down(root)
        _progress("done")


def tunnels_raw(root: Path, count: int) -> dict:
    _progress(f"{count} tunnels with a raw TCP connection each")
    sb = _tunnel_world(root, count)
    socks = []
    try:
        ports, up_seconds = _connect_tunnels(sb)
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
            "tunnels_up_seconds": round(up_seconds, 2),
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
    parser.add_argument("--raw-tunnels", type=int, default=500)
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
            report["polls"] = [
                api_throughput(sb, args.seconds, args.workers, keep_alive=True, kind="poll"),
                api_throughput(sb, args.seconds, args.workers, keep_alive=False, kind="poll"),
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
