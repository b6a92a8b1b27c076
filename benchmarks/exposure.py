"""Exposure benchmark (issue 4): how long allow-clientless stays true per upgrade.

Upgrades every host of a sandbox (default 20 hosts, one at a time, profile
``fast`` with 20 ms API latency) and prints one JSON document:

* each exposure window as the simulator recorded it (``set_allow_clientless``
  true -> false, its own clock), their median and p95;
* the new client's own start-to-first-good-poll, in that very run: from the
  guard's ``started`` status line (it has just started the new client) to the
  client's first poll that the provider answered (the client's own log,
  ``hosts/NAME/client.log``), and the guard's ``started`` -> ``ready`` (the
  ready probe passed: what the window waits for);
* median exposure minus the median start-to-first-good-poll (target <= 0.3 s:
  what the window costs beyond the client's own restart) and API calls per
  upgraded host (target <= 8);
* the mean seconds of the steps inside the window, from deployer's report;
* for reference, the rendered client's start-to-first-poll measured apart: a
  copy started ``--client-runs`` times (``sh -c 'exec python3 client.py'``, as
  the pidfile service starts it) against a local poll server;
* ``--silent N`` more upgrades (default 1) to a release that runs but never
  polls (``sandbox_fail=silent``): the result, the window's length (it stays
  open until the guard has restored the old client and seen it poll: about
  ``online_timeout`` plus a restart) and the tunnel cuts (0: the tunnel of a
  client that never polls is never cut).

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.exposure [--hosts 20] [--profile fast|real]
        [--latency 0.02] [--ssh-latency 0] [--silent 1]
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

from tests.chaos.harness import client_runs

WINDOW_STEPS = ("open_window", "swap", "first_life", "close_window")
EXPOSURE_TARGET = 0.3  # seconds beyond the client's own start
CALLS_TARGET = 8
FIRST_POLL_WAIT = 15.0
FAST_API_LATENCY = 0.02  # --latency's default with the fast profile (real: the profile's 0.2)
STATUS_WATCH = 0.02  # seconds between copies of the guards' status files
SETTLE_WAIT = 60.0  # seconds for the old client to poll again after a silent release
# Lines of the rendered client that the copy changes: where it polls, where it
# writes, and the identity of its tunnel (so a "0" never ends a real host's tunnel).
COPY_SETTINGS = ("POLL_URL", "GOOD_POLL_FILE", "LOG_FILE", "SSHD_PORT", "FORWARDING_USER")
POLL_REPLY = (
    b'{"command": "0", "iport": "0", "forwarding_server": "127.0.0.1", '
    b'"disconnect_ssl_when_server_unreachable": "F", "upgrade": "F"}'
)


# --- the client's start, measured apart ---------------------------------------------------


class _PollServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PollHandler)
        self.first_seen: float | None = None
        self.seen = threading.Event()


class _PollHandler(BaseHTTPRequestHandler):
    server: _PollServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        arrived = time.monotonic()
        if self.server.first_seen is None:
            self.server.first_seen = arrived
            self.server.seen.set()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(POLL_REPLY)))
            self.end_headers()
            self.wfile.write(POLL_REPLY)
        except OSError:  # the benchmark stops the client as soon as its poll arrives
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def _client_copy(text: str, poll_url: str, workdir: Path) -> str:
    """The rendered client, polling ``poll_url`` and writing only into ``workdir``."""
    values = {
        "POLL_URL": json.dumps(poll_url),
        "GOOD_POLL_FILE": json.dumps(str(workdir / "client.py.poll")),
        "LOG_FILE": '""',
        "SSHD_PORT": "int(1)",
        "FORWARDING_USER": '"bench-copy"',
    }
    for name in COPY_SETTINGS:
        text, count = re.subn(
            rf"^{name} = .*$", f"{name} = {values[name]}", text, count=1, flags=re.M
        )
        if count != 1:
            raise SystemExit(f"the rendered client has no {name} = … line")
    return text


def client_start_seconds(script: Path, runs: int) -> list[float]:
    """Spawn-to-first-poll of a copy of the rendered client ``script``, ``runs`` times.

    The copy polls a local server instead of the simulator (answering "0"), so
    the sandbox's state is not disturbed."""
    text = script.read_text()
    samples = []
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        for _ in range(runs):
            server = _PollServer()
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
            thread.start()
            url = f"http://127.0.0.1:{server.server_address[1]}/poll"
            copy = Path(tmp) / "client.py"
            copy.write_text(_client_copy(text, url, Path(tmp)))
            started = time.monotonic()
            proc = subprocess.Popen(
                ["/bin/sh", "-c", f"exec python3 {copy}"],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                if not server.seen.wait(FIRST_POLL_WAIT):
                    raise SystemExit(f"the client copy of {script} never polled")
                samples.append(server.first_seen - started)
            finally:
                proc.terminate()
                proc.wait(5)
                server.shutdown()
                server.server_close()
                thread.join()
    return samples


# --- the guards' status lines, copied while the run goes on --------------------------------


class GuardWatch:
    """Copies every guard's status file (``hosts/NAME/.client.py.deployer/runs/RUN/status``)
    while deployer runs: cleanup removes them when a host is done."""

    def __init__(self, sandbox_dir: Path):
        self.pattern = "hosts/*/.client.py.deployer/runs/*/status"
        self.root = sandbox_dir
        self.texts: dict[Path, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GuardWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(STATUS_WATCH):
            for path in self.root.glob(self.pattern):
                try:
                    self.texts[path] = path.read_text()
                except OSError:
                    pass

    def lines(self, host: str) -> list[dict[str, Any]]:
        """Every status line of ``host``'s guards, in time order."""
        found = []
        for path, text in self.texts.items():
            if path.relative_to(self.root).parts[1] != host:
                continue
            for line in text.splitlines():
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return sorted(found, key=lambda d: d.get("t", 0.0))


def client_timings(info: Any, watch: GuardWatch, host: str, new_sha: str) -> dict[str, Any]:
    """The new client's start on ``host``: guard ``started`` -> its first good poll (its
    log), and guard ``started`` -> ``ready`` (seconds; None where not seen)."""
    lines = watch.lines(host)
    started = next((d["t"] for d in lines if d.get("state") == "started"), None)
    ready = next((d for d in lines if d.get("state") == "ready"), None)
    runs = [r for r in client_runs(info.dir, host) if new_sha.startswith(r.sha12)]
    first_poll = runs[-1].first_good_poll if runs else None
    return {
        "started_to_first_good_poll": (
            first_poll - started if None not in (first_poll, started) else None
        ),
        "started_to_ready": ready["t"] - started if ready and started else None,
        "log_start_to_first_good_poll": (
            first_poll - runs[-1].started if first_poll is not None else None
        ),
    }


# --- the silent release ---------------------------------------------------------------------


def silent_upgrade(info: Any, host: str) -> dict[str, Any]:
    """Upgrade ``host`` to a release that never polls; what the simulator saw."""
    from benchmarks.fleet import run_deployer

    client = info.client
    before = client.host(host)
    args = ["upgrade", host, "--json", "--var", "release=silent", "--var", "sandbox_fail=silent"]
    run = run_deployer(info.inventory, args)
    after = client.wait_for(
        [host],
        lambda h: h["online"] and h["script_sha256"] == before["script_sha256"],
        SETTLE_WAIT,
        "running the old script again",
    )[host]
    windows = after["exposures"][len(before["exposures"]) :]
    hosts = run.report.get("hosts", [{}])
    restored = [
        r
        for r in client_runs(info.dir, host)
        if before["script_sha256"].startswith(r.sha12) and windows and r.started > windows[0][0]
    ]
    closed = windows[-1][1] if windows else None
    first_poll = restored[0].first_good_poll if restored else None
    return {
        "host": host,
        "exit_code": run.exit_code,
        "result": hosts[0].get("result"),
        "error": hosts[0].get("error"),
        "windows": len(windows),
        "window_seconds": [round(c - o, 3) if c else None for o, c in windows],
        "closed_after_the_old_client_polled_again": bool(
            closed and first_poll is not None and first_poll < closed
        ),
        "tunnel_cuts": after["tunnel_cuts"] - before["tunnel_cuts"],
        "deployer_seconds": round(run.wall_seconds, 2),
    }


# --- the benchmark --------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _median_of(timings: dict[str, dict[str, Any]], key: str) -> float | None:
    return _median([t[key] for t in timings.values()])


def window_steps(hosts: list[dict[str, Any]]) -> dict[str, float | None]:
    from benchmarks.fleet import rounded

    steps = [s for h in hosts for s in h.get("steps", [])]
    return {
        step: rounded(statistics.fmean(s["seconds"] for s in steps if s["step"] == step))
        for step in WINDOW_STEPS
        if any(s["step"] == step for s in steps)
    }


def start_sandbox(opts: argparse.Namespace, root: Path) -> Any:
    from deployer.sandbox import fleet as sandbox_fleet

    latency = opts.latency
    if latency is None and opts.profile == "fast":
        latency = FAST_API_LATENCY
    return sandbox_fleet.up(
        root,
        hosts=opts.hosts,
        profile=opts.profile,
        api_latency=latency,
        ssh_latency=opts.ssh_latency,
    )


def benchmark(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    from benchmarks.fleet import (
        api_calls_per_host,
        closed_exposures,
        percentile,
        rounded,
        run_deployer,
    )

    info = start_sandbox(opts, root)
    names = list(info.hosts)
    copy_starts = client_start_seconds(
        info.dir / "hosts" / names[0] / "client.py", opts.client_runs
    )
    client = info.client
    client.reset_counters()
    args = ["upgrade", "all", "--parallel", str(opts.parallel), "--var", "release=2", "--json"]
    with GuardWatch(info.dir) as watch:
        run = run_deployer(info.inventory, args)
    state = client.state()
    hosts = run.report.get("hosts", [])
    upgraded = [h for h in hosts if h["result"] == "upgraded"]
    names_up = [h["host"] for h in upgraded]
    exposures = closed_exposures(state, names_up)
    calls = api_calls_per_host(state, names_up)
    timings = {h["host"]: client_timings(info, watch, h["host"], h["new_sha256"]) for h in upgraded}
    median = statistics.median(exposures) if exposures else None
    start = _median_of(timings, "started_to_first_good_poll")
    beyond = None if median is None or start is None else median - start
    silent = [silent_upgrade(info, host) for host in names[: opts.silent]]
    return {
        "benchmark": "exposure",
        "hosts": opts.hosts,
        "parallel": opts.parallel,
        "profile": opts.profile,
        "api_latency_seconds": state["faults"]["latency"],
        "ssh_latency_seconds": opts.ssh_latency,
        "exit_code": run.exit_code,
        "upgraded": len(upgraded),
        "exposures_seconds": [round(e, 4) for e in exposures],
        "exposure_median_seconds": rounded(median),
        "exposure_p95_seconds": rounded(percentile(exposures, 0.95)),
        "deployer_reported_exposure_median_seconds": rounded(
            _median([h["exposure_seconds"] for h in upgraded])
        ),
        "client_start_to_first_good_poll_seconds": {
            "median": rounded(start),
            "each": {n: rounded(t["started_to_first_good_poll"]) for n, t in timings.items()},
        },
        "guard_started_to_ready_seconds": {
            "median": rounded(_median([t["started_to_ready"] for t in timings.values()])),
        },
        "client_log_start_to_first_good_poll_seconds": {
            "median": rounded(
                _median([t["log_start_to_first_good_poll"] for t in timings.values()])
            ),
        },
        "client_copy_start_to_first_poll_seconds": {
            "median": rounded(statistics.median(copy_starts)),
            "runs": [round(s, 4) for s in copy_starts],
        },
        "exposure_beyond_client_start_seconds": rounded(beyond),
        "api_calls_per_host": {
            "mean": rounded(statistics.fmean(calls) if calls else None),
            "each": calls,
        },
        "window_steps_mean_seconds": window_steps(hosts),
        "tunnel_cuts": sum(state["hosts"][n]["tunnel_cuts"] for n in names_up),
        "silent_release": silent,
        "targets": {
            "exposure_beyond_client_start_le_0_3_s": beyond is not None
            and beyond <= EXPOSURE_TARGET,
            "api_calls_per_host_le_8": bool(calls) and max(calls) <= CALLS_TARGET,
            "silent_release_never_cut": all(s["tunnel_cuts"] == 0 for s in silent),
        },
        "stderr_tail": run.stderr.strip().splitlines()[-5:] if run.exit_code else [],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=20, help="upgrades (hosts), default 20")
    parser.add_argument("--parallel", type=int, default=1, help="--parallel (default 1)")
    parser.add_argument(
        "--profile",
        choices=("fast", "real"),
        default="fast",
        help="the sandbox's timings (default fast; real: 5 s polls, 30 s offline detection)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=None,
        help="API latency in seconds (default 0.02 with fast, the profile's 0.2 with real)",
    )
    parser.add_argument(
        "--ssh-latency",
        type=float,
        default=0.0,
        help="seconds added to each direction through a tunnel (default 0)",
    )
    parser.add_argument(
        "--client-runs", type=int, default=20, help="client copy start samples (default 20)"
    )
    parser.add_argument(
        "--silent", type=int, default=1, help="upgrades to a release that never polls (default 1)"
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
    sys.exit(main())
