"""Chaos benchmark (the crash-safety issue): SIGKILL ``deployer upgrade`` at
randomized points and count how many hosts end unsafe, and how long until safe.

Each kill point: a random stage (tunnel … cleanup) and a random delay inside
it; deployer runs as a subprocess, the stage is found from the journal's
``begin`` record, the kill is SIGKILL to deployer alone (the guard runs
detached on the "host" and must survive). Then, judged from outside (the
simulator's ``/sandbox/state`` and the host's files, see :mod:`tests.chaos.harness`):

- **without recover**: watched until *settled* — window closed, every
  exposure closed, a client online whose file and last poll are the old or
  the new release (and whose pid, in the good-poll file, is the pidfile's),
  and no guard left running — or until the guard's
  deadline plus a margin (then it counts as **unsafe**). Hosts run in
  parallel batches, one point per host; ``deployer recover`` tidies up
  (locks, tunnels) after each batch, outside the measurement.
- **with recover**: ``deployer recover`` right after the kill, one point at
  a time; unsafe if the host is not safe within a few seconds of recover's
  return (the polls' lag), or recover exits 3, or ``history`` shows no
  final result for the run.

Each point also counts the tunnel cuts the forwarding server made meanwhile
(the offline rule: a client silent while allow-clientless is false); they are
reported, not judged: the host stays safe, but deployer's session was cut.

A host lock left after recover (SPEC 6: recover releases locks) is counted
as ``lock_left_after_recover`` and then removed, so the host stays usable.

"Time until safe" is from the kill to the first look at which the host was
(settled) safe. Prints one JSON document.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.chaos --runs 100 --hosts 6
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from deployer.sandbox import fleet as sandbox_fleet
from deployer.sandbox.fleet import TIMINGS
from tests.chaos.harness import (
    FINAL_RESULTS,
    KILL_STAGES,
    FleetHandle,
    KillOutcome,
    host_dir,
    kill_point,
    lock_held,
    random_kill,
    recover,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="kill points per mode (>= 100)")
    parser.add_argument("--hosts", type=int, default=6, help="hosts = parallel points (no recover)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument(
        "--mode", choices=("both", "with", "without"), default="both", help="which modes to run"
    )
    parser.add_argument("--dir", type=Path, default=None, help="sandbox dir (default: temp)")
    parser.add_argument("--details", type=Path, default=None, help="write every point here")
    return parser.parse_args(argv)


class Releases:
    """A fresh release name per kill point, so every upgrade has something to do."""

    def __init__(self) -> None:
        self.n = 100

    def next(self) -> str:
        self.n += 1
        return str(self.n)


def without_recover(
    handle: FleetHandle, hosts: list[str], runs: int, rng: random.Random, releases: Releases
) -> list[KillOutcome]:
    out: list[KillOutcome] = []
    while sum(o.killed for o in out) < runs:
        points = [(h, *random_kill(rng, TIMINGS.stable_for), releases.next()) for h in hosts]
        with cf.ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            futures = [
                pool.submit(
                    kill_point,
                    handle,
                    host,
                    stage,
                    release,
                    delay=delay,
                    with_recover=False,
                    guard_deadline=TIMINGS.guard_deadline,
                )
                for host, stage, delay, release in points
            ]
            out += [f.result() for f in futures]
        recover(handle.inventory)  # tidy up: locks, tunnels (not measured)
        for o in out[-len(hosts) :]:
            o.lock_left = _clear_lock(handle, o.host)
        _progress("without recover", out, runs)
    return out


def with_recover(
    handle: FleetHandle, hosts: list[str], runs: int, rng: random.Random, releases: Releases
) -> list[KillOutcome]:
    out: list[KillOutcome] = []
    i = 0
    while sum(o.killed for o in out) < runs:
        stage, delay = random_kill(rng, TIMINGS.stable_for)
        host = hosts[i % len(hosts)]
        i += 1
        out.append(kill_point(handle, host, stage, releases.next(), delay=delay))
        _clear_lock(handle, host)
        if i % 10 == 0:
            _progress("with recover", out, runs)
    return out


def _clear_lock(handle: FleetHandle, host: str) -> bool:
    """A lock that recover left behind would refuse every later point on the host:
    count it, then remove it as an operator would (``--break-lock``)."""
    if not lock_held(handle.dir, host):
        return False
    shutil.rmtree(host_dir(handle.dir, host) / ".client.py.deployer" / "lock")
    return True


def _progress(mode: str, out: list[KillOutcome], runs: int) -> None:
    killed = [o for o in out if o.killed]
    bad = sum(not _ok(o) for o in killed)
    print(f"{mode}: {len(killed)}/{runs} kill points, {bad} unsafe", file=sys.stderr, flush=True)


def _ok(o: KillOutcome) -> bool:
    """Safe by the measure of its mode."""
    if not o.with_recover:
        return o.safe
    return o.safe and o.recover_code == 0 and o.history_result in FINAL_RESULTS


def _seconds(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"max": None, "p50": None, "p95": None}
    ordered = sorted(values)
    return {
        "max": round(ordered[-1], 2),
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
    }


def summarize(points: list[KillOutcome]) -> dict[str, Any]:
    killed = [o for o in points if o.killed]
    unsafe = [o for o in killed if not _ok(o)]
    per_stage: dict[str, dict[str, Any]] = defaultdict(lambda: {"runs": 0, "unsafe": 0})
    for o in killed:
        entry = per_stage[o.killed_in or "?"]
        entry["runs"] += 1
        entry["unsafe"] += not _ok(o)
        if o.settled_after is not None:
            entry["time_to_safe_max"] = round(
                max(entry.get("time_to_safe_max", 0.0), o.settled_after), 2
            )
    order = {s: i for i, s in enumerate(("preflight", *KILL_STAGES))}
    summary: dict[str, Any] = {
        "runs": len(killed),
        "not_killed": len(points) - len(killed),  # the run ended before the kill came
        "unsafe": len(unsafe),
        "time_to_safe_seconds": _seconds([o.settled_after for o in killed if o.settled_after]),
        "per_stage": dict(sorted(per_stage.items(), key=lambda kv: order.get(kv[0], 99))),
        "unsafe_points": [
            {k: o.to_json()[k] for k in ("host", "killed_in", "delay", "run_id", "problems")}
            for o in unsafe
        ],
    }
    summary["lock_left_after_recover"] = sum(o.lock_left for o in killed)
    summary["tunnel_cuts"] = sum(o.tunnel_cuts for o in killed)
    summary["tunnel_open_at_end"] = sum(o.tunnel_open_at_end for o in killed)
    summary["points_with_a_cut"] = [
        {"host": o.host, "killed_in": o.killed_in, "cuts": o.tunnel_cuts}
        for o in killed
        if o.tunnel_cuts
    ]
    if killed and not killed[0].with_recover:
        summary["unsafe_for_seconds"] = _seconds([o.unsafe_for for o in killed])
    else:
        summary["recover_exit_codes"] = dict(Counter(str(o.recover_code) for o in killed))
        summary["recover_results"] = dict(Counter(str(o.recover_result) for o in killed))
        summary["safe_at_recover_return"] = sum(bool(o.safe_at_return) for o in killed)
        summary["history_final_result"] = sum(o.history_result in FINAL_RESULTS for o in killed)
    return summary


def benchmark(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    seed = opts.seed if opts.seed is not None else int(time.time())
    rng = random.Random(seed)
    info = sandbox_fleet.up(root, hosts=opts.hosts)
    handle = FleetHandle(info.dir, info.client)
    hosts = list(info.hosts)
    releases = Releases()
    started = time.monotonic()
    result: dict[str, Any] = {
        "seed": seed,
        "hosts": opts.hosts,
        "timings": {
            "stable_for": TIMINGS.stable_for,
            "guard_deadline": TIMINGS.guard_deadline,
            "offline_after": TIMINGS.offline_after,
        },
    }
    details: list[KillOutcome] = []
    if opts.mode in ("both", "without"):
        points = without_recover(handle, hosts, opts.runs, rng, releases)
        result["without_recover"] = summarize(points)
        details += points
    if opts.mode in ("both", "with"):
        points = with_recover(handle, hosts, opts.runs, rng, releases)
        result["with_recover"] = summarize(points)
        details += points
    result["runs"] = sum(o.killed for o in details)
    result["unsafe"] = sum(o.killed and not _ok(o) for o in details)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    if opts.details:
        opts.details.write_text(json.dumps([o.to_json() for o in details], indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        root = opts.dir.resolve() if opts.dir else Path(tmp) / "sandbox"
        try:
            result = benchmark(opts, root)
        finally:
            sandbox_fleet.down(root)
    print(json.dumps(result, indent=2))
    return 0 if result["unsafe"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
