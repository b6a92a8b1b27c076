"""Offline-fleet benchmark (issue 15): a rollout that finishes on a fleet that is
never all online at once.

A sandbox of ``--hosts`` hosts (default 50, profile ``real``: clients poll
every 5 s, offline detection 30 s, API latency 0.2 s) in which ``--offline``
clients (default 20) are stopped before the run, so the provider sees them
offline. While ``deployer upgrade all --wait-offline …`` runs, the sandbox's
runner starts each of them again at a random time within ``--window`` seconds
(default 120); ``--flapping`` of them (default 5) first come back for a few
seconds only — a blip, one or two polls — go down again, and come back for
good later, still within the window.

Prints one JSON document:

* ``return_to_trusted_seconds`` / ``return_to_upgrade_start_seconds`` /
  ``return_to_upgraded_seconds``: per returning host, from its (last) return
  — when the runner started its client — to the watcher trusting it (the
  journal: its ``wait`` step's end less ``queued_seconds``, the wait for a
  free slot), to its window opening (the simulator's clock) and to its final
  result (the journal): median, mean, worst;
* ``watch_calls_per_parked_host_per_minute``: ``client_status`` looks per
  parked host per minute of its wait (the journal's ``looks`` of its ``wait``
  step, over its ``waiting_seconds``): median, mean, worst;
* ``hosts_lost``: returning hosts that did not end ``upgraded`` (target 0),
  and ``blips_upgraded``: flapping hosts whose window opened during a blip
  (target 0);
* the run's exposure figures (every window the simulator recorded), tunnel
  cuts, results, exit code and wall time.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.offline_fleet [--hosts 50] [--offline 20] \\
        [--window 120] [--flapping 5] [--parallel 10] [--profile real] [--seed 15]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BLIP_SECONDS = 3.0  # a flapping client's short stay: less than offline detection + a poll
EXIT_OFFLINE = 4


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "mean": None, "worst": None, "n": 0}
    return {
        "median": rounded(statistics.median(values)),
        "mean": rounded(statistics.fmean(values)),
        "worst": rounded(max(values)),
        "n": len(values),
    }


def comeback_plan(
    names: list[str], window: float, flapping: int, rng: random.Random
) -> tuple[list[dict[str, Any]], dict[str, list[tuple[float, float]]]]:
    """The runner's events: each host starts again at a random time in the window;
    the first ``flapping`` of them blip first. Returns (events, blips per host as
    (start, stop) offsets)."""
    events, blips = [], {}
    for i, name in enumerate(names):
        if i < flapping:
            blip = rng.uniform(5.0, window * 0.4)
            back = rng.uniform(blip + BLIP_SECONDS + 45.0, max(window, blip + BLIP_SECONDS + 46))
            events += [
                {"after": blip, "host": name, "action": "start"},
                {"after": blip + BLIP_SECONDS, "host": name, "action": "stop"},
            ]
            blips[name] = [(blip, blip + BLIP_SECONDS)]
        else:
            back = rng.uniform(5.0, window)
        events.append({"after": back, "host": name, "action": "start"})
    return events, blips


def run_deployer(inventory: Path, args: list[str], timeout: float) -> tuple[int, dict, str, float]:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "deployer", "-q", "-i", str(inventory), *args, "--json"],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    try:
        report = json.loads(stdout)
    except ValueError:
        report = {}
    return proc.returncode, report, stderr, wall


def benchmark(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    from deployer.journal import Journal
    from deployer.parking import WaitPolicy
    from deployer.sandbox import fleet

    rng = random.Random(opts.seed)
    info = fleet.up(root, hosts=opts.hosts, profile=opts.profile)
    names = list(info.hosts)
    parked = sorted(rng.sample(names, opts.offline))
    for name in parked:
        fleet.stop_client(root, name)
    offline_after = info.client.faults()["offline_after"]
    info.client.wait_offline(parked, timeout=offline_after + 30)
    info.client.reset_counters()

    events, blips = comeback_plan(parked, opts.window, opts.flapping, rng)
    args = ["upgrade", "all", "--var", "release=bench", "--parallel", str(opts.parallel)]
    args += ["--wait-offline", opts.wait]
    scheduled_at = time.time()
    info.client.schedule_clients(events)
    code, report, stderr, wall = run_deployer(info.inventory, args, opts.timeout)
    state = info.client.state()
    done = info.client.client_schedule()["done"]

    results = {h["host"]: h for h in report.get("hosts", [])}
    returned = {}
    for event in done:
        if event["action"] == "start" and event["host"] in parked:
            returned[event["host"]] = max(returned.get(event["host"], 0.0), event["done"])
    finished, looks, trusted = {}, {}, {}
    with Journal(root / ".deployer") as journal:
        run_id = report.get("run_id", "")
        for entry in journal.host_results(run_id):
            name = entry["host"]
            finished[name] = entry["finished"]
            looks[name] = entry["facts"].get("looks")
            waits = [s for s in journal.steps(run_id, name) if s["step"] == "wait"]
            queued = entry["facts"].get("queued_seconds")
            if waits and waits[-1]["ended"] and queued is not None:
                trusted[name] = waits[-1]["ended"] - queued  # when the watcher trusted it

    to_trust, to_start, to_done, lost, blips_upgraded, watch_rates = [], [], [], [], [], []
    for name in parked:
        host = results.get(name, {})
        exposures = state["hosts"][name]["exposures"]
        if host.get("result") != "upgraded" or not exposures or name not in returned:
            lost.append({"host": name, "result": host.get("result"), "error": host.get("error")})
            continue
        opened = exposures[0][0]
        to_start.append(opened - returned[name])
        if name in trusted:
            to_trust.append(trusted[name] - returned[name])
        if finished.get(name):
            to_done.append(finished[name] - returned[name])
        for blip_start, blip_stop in blips.get(name, []):
            if scheduled_at + blip_start <= opened <= scheduled_at + blip_stop + offline_after:
                blips_upgraded.append(name)
    for name in parked:
        waited = results.get(name, {}).get("waiting_seconds") or 0.0
        if looks.get(name) and waited >= 60:
            watch_rates.append(looks[name] / (waited / 60.0))

    windows = [c - o for h in state["hosts"].values() for o, c in h["exposures"] if c is not None]
    policy = WaitPolicy()
    limit = state["faults"]["rate_limit"]
    inventory_rate = 40.0  # the sandbox inventory's [provider] rate_limit (deployer's own)
    return {
        "profile": opts.profile,
        "hosts": opts.hosts,
        "offline_at_start": opts.offline,
        "flapping": opts.flapping,
        "window_seconds": opts.window,
        "parallel": opts.parallel,
        "wait_offline": opts.wait,
        "seed": opts.seed,
        "exit_code": code,
        "run_seconds": rounded(wall, 1),
        "summary": report.get("summary"),
        "return_to_trusted_seconds": spread(to_trust),
        "return_to_upgrade_start_seconds": spread(to_start),
        "return_to_upgraded_seconds": spread(to_done),
        "last_return_to_run_end_seconds": rounded(
            scheduled_at + wall - max(returned.values()) if returned else None, 1
        ),
        "watch_calls_per_parked_host_per_minute": spread(watch_rates),
        "watch_policy": {
            "share_of_rate": policy.share,
            "look_every_seconds": policy.look_interval(offline_after),
            "trust_gap_seconds": policy.trust_gap(offline_after),
            "rate_limit_deployer": inventory_rate,
            "rate_limit_simulator": limit,
        },
        "hosts_lost": len(lost),
        "lost": lost,
        "blips_upgraded": blips_upgraded,
        "exposure_seconds": {
            "median": rounded(statistics.median(windows)) if windows else None,
            "p95": rounded(sorted(windows)[int(0.95 * (len(windows) - 1))]) if windows else None,
            "max": rounded(max(windows)) if windows else None,
            "windows": len(windows),
            "left_open": sum(1 for h in state["hosts"].values() if h["allow_clientless"]),
        },
        "tunnel_cuts": sum(h["tunnel_cuts"] for h in state["hosts"].values()),
        "api_calls_total": sum(sum(h["api_calls"].values()) for h in state["hosts"].values()),
        "targets": {"hosts_lost_0": not lost, "no_blip_upgraded": not blips_upgraded},
        "stderr_tail": stderr[-2000:] if code not in (0, EXIT_OFFLINE) else "",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--offline", type=int, default=20)
    parser.add_argument("--window", type=float, default=120.0)
    parser.add_argument("--flapping", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--profile", choices=("fast", "real"), default="real")
    parser.add_argument("--wait", default="8m", help="deployer's --wait-offline")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory")
    opts = parser.parse_args(argv)
    if not 0 <= opts.flapping <= opts.offline <= opts.hosts:
        parser.error("need 0 <= --flapping <= --offline <= --hosts")
    return opts


def main(argv: list[str] | None = None) -> int:
    from deployer.sandbox import fleet

    opts = parse_args(argv)
    os.umask(0o077)
    root = Path(tempfile.mkdtemp(prefix="bench-offline-"))
    cpu0 = os.times()
    try:
        result = benchmark(opts, root)
    finally:
        report = fleet.down(root)
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    cpu1 = os.times()
    result["benchmark_cpu_seconds"] = rounded(
        (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1
    )
    result["sandbox_down_clean"] = report.clean
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
