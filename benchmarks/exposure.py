"""Exposure benchmark (issue 4): how long allow-clientless stays true per upgrade.

Upgrades every host of a sandbox (default 20 hosts, one at a time, 20 ms API
latency) and prints one JSON document:

* each exposure window as the simulator recorded it (``set_allow_clientless``
  true -> false, its own clock), their median and p95;
* the new client's own start-to-first-heartbeat time, measured independently:
  the sandbox's rendered client script started ``--client-runs`` times
  (``sh -c 'exec python3 client.py'``, as the pidfile service starts it)
  against a tiny local heartbeat server, timed from spawn to its first
  heartbeat;
* median exposure minus that median (target <= 0.3 s: what the window costs
  beyond the restart itself) and API calls per upgraded host (target <= 8);
* the mean seconds of the steps inside the window, from deployer's report.

Usage (from the repository root)::

    .venv/bin/python benchmarks/exposure.py [--hosts 20] [--latency 0.02]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

WINDOW_STEPS = ("open_window", "swap", "first_life", "close_window")
EXPOSURE_TARGET = 0.3  # seconds beyond the client's own start
CALLS_TARGET = 8
HEARTBEAT_WAIT = 15.0
SANDBOX_URL_RE = re.compile(r"^SANDBOX_URL = .*$", re.MULTILINE)


class _Heartbeats(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HeartbeatHandler)
        self.first_seen: float | None = None
        self.seen = threading.Event()


class _HeartbeatHandler(BaseHTTPRequestHandler):
    server: _Heartbeats

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        arrived = time.monotonic()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.first_seen is None:
            self.server.first_seen = arrived
            self.server.seen.set()
        body = b'{"ok": true}\n'
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the benchmark stops the client as soon as its heartbeat arrives
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def client_start_seconds(script: Path, runs: int) -> list[float]:
    """Spawn-to-first-heartbeat of a copy of the rendered client ``script``, ``runs`` times.

    The copy heartbeats to a local server instead of the simulator (only the
    ``SANDBOX_URL`` line changes), so the sandbox's state is not disturbed.
    """
    text = script.read_text()
    samples = []
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        for _ in range(runs):
            server = _Heartbeats()
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
            thread.start()
            url = f"http://127.0.0.1:{server.server_address[1]}"
            copy = Path(tmp) / "client.py"
            copy.write_text(SANDBOX_URL_RE.sub(f"SANDBOX_URL = {json.dumps(url)}", text, count=1))
            started = time.monotonic()
            proc = subprocess.Popen(
                ["/bin/sh", "-c", f"exec python3 {copy}"],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                if not server.seen.wait(HEARTBEAT_WAIT):
                    raise SystemExit(f"the client copy of {script} sent no heartbeat")
                samples.append(server.first_seen - started)
            finally:
                proc.terminate()
                proc.wait(5)
                server.shutdown()
                server.server_close()
                thread.join()
    return samples


def benchmark(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    from fleet import api_calls_per_host, closed_exposures, percentile, rounded, run_deployer

    from deployer.sandbox import fleet as sandbox_fleet

    info = sandbox_fleet.up(root, hosts=opts.hosts, api_latency=opts.latency)
    names = list(info.hosts)
    starts = client_start_seconds(info.dir / "hosts" / names[0] / "client.py", opts.client_runs)
    client = info.client
    client.reset_counters()
    args = ["upgrade", "all", "--parallel", str(opts.parallel), "--var", "release=2", "--json"]
    run = run_deployer(info.inventory, args)
    state = client.state()
    hosts = run.report.get("hosts", [])
    upgraded = [h["host"] for h in hosts if h["result"] == "upgraded"]
    exposures = closed_exposures(state, upgraded)
    calls = api_calls_per_host(state, upgraded)
    median = statistics.median(exposures) if exposures else None
    start = statistics.median(starts)
    beyond = None if median is None else median - start
    mean_calls = statistics.fmean(calls) if calls else None
    window_steps = {
        step: rounded(
            statistics.fmean(
                s["seconds"] for h in hosts for s in h.get("steps", []) if s["step"] == step
            )
        )
        for step in WINDOW_STEPS
        if any(s["step"] == step for h in hosts for s in h.get("steps", []))
    }
    return {
        "benchmark": "exposure",
        "hosts": opts.hosts,
        "parallel": opts.parallel,
        "api_latency_seconds": opts.latency,
        "exit_code": run.exit_code,
        "upgraded": len(upgraded),
        "exposures_seconds": [round(e, 4) for e in exposures],
        "exposure_median_seconds": rounded(median),
        "exposure_p95_seconds": rounded(percentile(exposures, 0.95)),
        "deployer_reported_exposure_median_seconds": rounded(
            statistics.median([h["exposure_seconds"] for h in hosts if h["host"] in upgraded])
            if upgraded
            else None
        ),
        "client_start_to_heartbeat_seconds": {
            "median": rounded(start),
            "runs": [round(s, 4) for s in starts],
        },
        "exposure_beyond_client_start_seconds": rounded(beyond),
        "api_calls_per_host": {"mean": rounded(mean_calls), "each": calls},
        "window_steps_mean_seconds": window_steps,
        "targets": {
            "exposure_beyond_client_start_le_0_3_s": beyond is not None
            and beyond <= EXPOSURE_TARGET,
            "api_calls_per_host_le_8": bool(calls) and max(calls) <= CALLS_TARGET,
        },
        "stderr_tail": run.stderr.strip().splitlines()[-5:] if run.exit_code else [],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=20, help="upgrades (hosts), default 20")
    parser.add_argument("--parallel", type=int, default=1, help="--parallel (default 1)")
    parser.add_argument(
        "--latency", type=float, default=0.02, help="API latency in seconds (default 0.02)"
    )
    parser.add_argument(
        "--client-runs", type=int, default=20, help="client start samples (default 20)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from deployer.sandbox import fleet as sandbox_fleet

    opts = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-exposure-"))
    root = tmp / "sandbox"
    try:
        result = benchmark(opts, root)
    finally:
        sandbox_fleet.down(root)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
