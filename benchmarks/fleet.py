"""Fleet benchmark (issue 6): one `deployer upgrade all` over a sandbox of N hosts.

Prints one JSON document: the makespan, its lower bound
``max(ceil(N/C) * T_host, N * k / R)`` and their ratio, the simulator's own
exposure p50/p95, API calls per host, the 22s the simulator answered, the
tunnel cuts, the deployer process's peak RSS, and where the time went
(per-step seconds from deployer's JSON report).

    T_host = k * L + poll_interval / 2 + client start-to-first-poll + stable_for
    k      = API calls per upgraded host (as the simulator counted them)
    L      = the simulator's API latency
    poll_interval / 2 = the mean wait for the tunnel after ``connect``: it comes
             up at the client's next poll (SPEC 1b)
    R      = the binding rate limit: min(server's, deployer's limiter)

It also prints ``cpu_floor``: the makespan the machine's CPU allows (the CPU
the upgrade added on top of the idle fleet, over the cores the idle fleet
leaves free) and the makespan's ratio to it, which tells a fleet held back by
the cores (ratio near 1) from one held back by deployer.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.fleet --hosts 200 --parallel 50 [--profile fast|real]
        [--ssh-latency S]

The sandbox is started in a temporary directory and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.sandbox import fleet as sandbox_fleet
from deployer.sandbox.client import SandboxClient

DEPLOYER_TIMEOUT = 1800.0  # seconds for one deployer run, whatever N
RELEASE = "2"
CLIENT_START_RUNS = 10
FAST_API_LATENCY = 0.02  # --latency's default with the fast profile (real: the profile's)
PROVIDER_RATE_RE = re.compile(r"^(rate_limit\s*=\s*).*$", re.MULTILINE)


@dataclass
class DeployerRun:
    """One deployer subprocess, as the benchmark saw it."""

    exit_code: int
    wall_seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    report: dict[str, Any]
    stderr: str


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / tick, sum(fields) / tick


def forks_so_far() -> int:
    """Processes created on the machine since boot (/proc/stat ``processes``)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def idle_utilisation(seconds: float) -> float:
    """Share of all cores busy over ``seconds`` with no deployer running (the fleet's
    polls and whatever else the machine does)."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / max(total1 - total0, 1e-9)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used by ``pid`` so far; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (``share`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def set_client_rate_limit(inventory: Path, rate: float) -> None:
    """Set ``[provider] rate_limit`` (deployer's own limiter) in a sandbox inventory."""
    text = inventory.read_text()
    head, sep, rest = text.partition("[defaults]")
    new_head, count = PROVIDER_RATE_RE.subn(lambda m: f"{m.group(1)}{rate!r}", head, count=1)
    if count != 1:
        raise SystemExit(f"{inventory}: no [provider] rate_limit line to edit")
    inventory.write_text(new_head + sep + rest)


def run_deployer(
    inventory: Path, args: list[str], timeout: float = DEPLOYER_TIMEOUT
) -> DeployerRun:
    """``python -m deployer -i INVENTORY ARGS`` with ``--json``; its own peak RSS via wait4."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployer", "-i", str(inventory), *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    try:
        report = json.loads(stdout)
    except ValueError:
        report = {}
    cpu = usage.ru_utime + usage.ru_stime
    return DeployerRun(proc.returncode, wall, usage.ru_maxrss / 1024, cpu, report, stderr)


def deployer_startup_seconds() -> float:
    """Wall time of ``python -m deployer --version``: the makespan's fixed start cost."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "deployer", "--version"], capture_output=True, check=True)
    return time.monotonic() - started


def runner_warnings(log: Path, keep: int = 10) -> list[str]:
    """The last WARNING/ERROR lines of the sandbox runner's log (simulator, sshd)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "WARNING" in line or "ERROR" in line][-keep:]


def keep_logs(root: Path) -> str:
    """Copy the sandbox's logs (runner, clients) out of the doomed temp dir; return where."""
    target = Path(tempfile.mkdtemp(prefix="bench-fleet-logs-"))
    shutil.copytree(root / "logs", target / "logs", dirs_exist_ok=True)
    for log in (root / "hosts").glob("*/client.log"):
        (target / "hosts" / log.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, target / "hosts" / log.parent.name / "client.log")
    return str(target)


def closed_exposures(state: dict[str, Any], names: list[str]) -> list[float]:
    """Every closed exposure window of ``names``, in seconds, as the simulator timed it."""
    found = []
    for name in names:
        for t_open, t_close in state["hosts"][name]["exposures"]:
            if t_close is not None:
                found.append(t_close - t_open)
    return found


def api_calls_per_host(state: dict[str, Any], names: list[str]) -> list[int]:
    return [sum(state["hosts"][n]["api_calls"].values()) for n in names]


def step_profile(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per step: mean and max seconds over hosts, and its share of all host-seconds."""
    by_step: dict[str, list[float]] = {}
    for host in report.get("hosts", []):
        for step in host.get("steps", []):
            by_step.setdefault(step["step"], []).append(step["seconds"])
    total = sum(sum(v) for v in by_step.values()) or 1.0
    return {
        step: {
            "mean": round(statistics.fmean(values), 3),
            "p95": round(percentile(values, 0.95) or 0.0, 3),
            "max": round(max(values), 3),
            "share": round(sum(values) / total, 3),
        }
        for step, values in by_step.items()
    }


def lower_bound(
    hosts: int,
    parallel: int,
    k: float,
    latency: float,
    tunnel_wait: float,
    client_start: float,
    stable_for: float,
    rate: float,
) -> dict[str, float]:
    """The makespan no deployer can beat on this sandbox, and its two terms."""
    t_host = k * latency + tunnel_wait + client_start + stable_for
    concurrency = math.ceil(hosts / parallel) * t_host
    rate_term = hosts * k / rate if rate > 0 else 0.0
    return {
        "t_host_seconds": round(t_host, 3),
        "tunnel_wait_seconds": round(tunnel_wait, 3),
        "concurrency_term_seconds": round(concurrency, 3),
        "rate_term_seconds": round(rate_term, 3),
        "seconds": round(max(concurrency, rate_term), 3),
    }


def stable_for_of(inventory: Path) -> float:
    match = re.search(r"^stable_for\s*=\s*([0-9.]+)", inventory.read_text(), re.MULTILINE)
    return float(match.group(1)) if match else sandbox_fleet.TIMINGS.stable_for


def benchmark(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    from benchmarks.exposure import client_start_seconds

    started = time.monotonic()
    latency = opts.latency
    if latency is None and opts.profile == "fast":
        latency = FAST_API_LATENCY
    profile = sandbox_fleet.PROFILES[opts.profile]
    info = sandbox_fleet.up(
        root,
        hosts=opts.hosts,
        profile=opts.profile,
        api_latency=latency,
        ssh_latency=opts.ssh_latency,
        rate_limit=opts.server_rate_limit,
        wait_timeout=max(30.0, opts.hosts * 0.3) + 2 * profile.poll_interval,
    )
    up_seconds = time.monotonic() - started
    client = SandboxClient(info.base_url)
    latency = client.faults()["latency"]  # the profile's when --latency was not given
    set_client_rate_limit(info.inventory, opts.client_rate_limit)
    names = list(info.hosts)
    client_start = client_start_seconds(
        info.dir / "hosts" / names[0] / "client.py", opts.client_runs
    )
    client.reset_counters()
    stable_for = opts.stable_for if opts.stable_for is not None else stable_for_of(info.inventory)
    args = [
        "upgrade",
        "all",
        "--parallel",
        str(opts.parallel),
        "--var",
        f"release={RELEASE}",
        "--json",
        "--stable-for",
        str(stable_for),
    ]
    startup = deployer_startup_seconds()
    baseline = idle_utilisation(opts.baseline_seconds)
    forks0 = forks_so_far()
    busy0, total0 = machine_cpu()
    runner0 = process_cpu(info.runner_pid)
    run = run_deployer(info.inventory, args)
    busy1, total1 = machine_cpu()
    runner_cpu = process_cpu(info.runner_pid) - runner0
    forks = forks_so_far() - forks0
    state = client.state()
    if opts.save_report:
        opts.save_report.write_text(json.dumps(run.report, indent=2) + "\n")
    machine_busy = busy1 - busy0
    hosts = run.report.get("hosts", [])
    results: dict[str, int] = {}
    for host in hosts:
        results[host["result"]] = results.get(host["result"], 0) + 1
    upgraded = [h["host"] for h in hosts if h["result"] == "upgraded"]
    durations = [h["duration_seconds"] for h in hosts if h["result"] != "skipped"]
    exposures = closed_exposures(state, upgraded)
    calls = api_calls_per_host(state, upgraded)
    k = statistics.fmean(calls) if calls else 0.0
    rate = min(opts.server_rate_limit or math.inf, opts.client_rate_limit or math.inf)
    rate = 0.0 if math.isinf(rate) else rate
    bound = lower_bound(
        opts.hosts,
        opts.parallel,
        k,
        latency,
        profile.poll_interval / 2,
        statistics.median(client_start),
        stable_for,
        rate,
    )
    ratio = run.wall_seconds / bound["seconds"] if bound["seconds"] else None
    floor = cpu_floor(machine_busy, baseline, run.wall_seconds, len(hosts))
    by_code = state["calls"]["by_code"]
    return {
        "benchmark": "fleet",
        "hosts": opts.hosts,
        "parallel": opts.parallel,
        "profile": opts.profile,
        "api_latency_seconds": latency,
        "ssh_latency_seconds": opts.ssh_latency,
        "server_rate_limit": opts.server_rate_limit,
        "client_rate_limit": opts.client_rate_limit,
        "stable_for_seconds": stable_for,
        "sandbox_up_seconds": round(up_seconds, 2),
        "exit_code": run.exit_code,
        "results": results,
        "makespan_seconds": round(run.wall_seconds, 3),
        "deployer_startup_seconds": round(startup, 3),
        "lower_bound": bound,
        "ratio": rounded(ratio),
        "cpu_floor": floor,
        "ratio_to_cpu_floor": rounded(run.wall_seconds / floor["seconds"])
        if floor["seconds"]
        else None,
        "client_start_to_first_poll_seconds": {
            "median": rounded(statistics.median(client_start)),
            "runs": [round(v, 4) for v in client_start],
        },
        "exposure_seconds": {
            "p50": rounded(percentile(exposures, 0.5)),
            "p95": rounded(percentile(exposures, 0.95)),
            "max": rounded(max(exposures, default=None)),
            "windows": len(exposures),
        },
        "api_calls_per_host": {
            "mean": rounded(k),
            "max": max(calls, default=None),
            "min": min(calls, default=None),
        },
        "api_requests_total": state["calls"]["requests"],
        "polls_total": state["calls"]["polls"],
        "tunnel_cuts": sum(h["tunnel_cuts"] for h in state["hosts"].values()),
        "replies_by_code": by_code,
        "code_22_received": by_code.get("22", 0),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "cpu_seconds": {
            "machine_cores": os.cpu_count(),
            "machine_utilisation": round(machine_busy / (total1 - total0), 3),
            "idle_fleet_utilisation_before": round(baseline, 3),
            "deployer": round(run.cpu_seconds, 1),
            "sandbox_runner": round(runner_cpu, 1),
            "everything_else": round(machine_busy - run.cpu_seconds - runner_cpu, 1),
        },
        "processes_started_during_run": forks,
        "host_duration_seconds": {
            "mean": rounded(statistics.fmean(durations) if durations else None),
            "p95": rounded(percentile(durations, 0.95)),
        },
        "mean_hosts_in_flight": rounded(sum(durations) / run.wall_seconds, 1),
        "api_calls_per_second": rounded(state["calls"]["requests"] / run.wall_seconds, 1),
        "not_upgraded": [
            {"host": h["host"], "result": h["result"], "error": h["error"]}
            for h in hosts
            if h["result"] != "upgraded"
        ],
        "runner_log_warnings": runner_warnings(info.dir / "logs" / "runner.log"),
        "kept_logs": keep_logs(info.dir) if len(upgraded) < len(hosts) or run.exit_code else None,
        "targets": targets(opts, ratio, by_code.get("22", 0), run.peak_rss_mb),
        "step_profile": step_profile(run.report),
        "stderr_tail": run.stderr.strip().splitlines()[-5:] if run.exit_code else [],
    }


def cpu_floor(busy: float, idle_share: float, wall: float, hosts: int) -> dict[str, Any]:
    """The makespan this machine's CPU allows: the CPU the upgrade added on top of
    the idle fleet (its polls go on all along: ``idle_share`` of every core),
    spread over the cores the idle fleet leaves free. Not a bound on deployer's
    scheduling but on the machine: a ratio near 1 means the cores were the limit."""
    cores = os.cpu_count() or 1
    idle_cores = idle_share * cores
    work = busy - idle_cores * wall
    free = cores - idle_cores
    return {
        "idle_cores": round(idle_cores, 3),
        "work_cpu_seconds": round(work, 1),
        "work_cpu_seconds_per_host": rounded(work / hosts) if hosts else None,
        "seconds": round(work / free, 1) if free > 0 and work > 0 else None,
    }


def targets(opts: argparse.Namespace, ratio: float | None, errors_22: int, rss: float) -> dict:
    """The issues' targets, judged (the 22 target applies only below the server's limit;
    issue 12's ratio of 1.2 is for the ``fast`` profile)."""
    checks: dict[str, Any] = {
        "ratio_le_1_5": ratio is not None and ratio <= 1.5,
        "ratio_le_1_2_fast": (ratio is not None and ratio <= 1.2)
        if opts.profile == "fast"
        else "n/a",
        "peak_rss_le_300_mb": rss <= 300,
    }
    below = 0 < opts.client_rate_limit < (opts.server_rate_limit or math.inf)
    checks["zero_22_below_server_limit"] = (errors_22 == 0) if below else "n/a"
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=200, help="N (default 200)")
    parser.add_argument("--parallel", type=int, default=50, help="C, --parallel (default 50)")
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
        help="simulator API latency in seconds (default 0.02 with fast, 0.2 with real)",
    )
    parser.add_argument(
        "--ssh-latency",
        type=float,
        default=0.0,
        help="seconds added to each direction through a tunnel (default 0)",
    )
    parser.add_argument(
        "--server-rate-limit",
        type=float,
        default=50.0,
        help="simulator rate limit, calls/s per account (default 50; 0 = none)",
    )
    parser.add_argument(
        "--client-rate-limit",
        type=float,
        default=40.0,
        help="deployer's limiter, the inventory's provider.rate_limit (default 40)",
    )
    parser.add_argument(
        "--stable-for",
        type=float,
        default=None,
        help="--stable-for of the run (default: the sandbox inventory's)",
    )
    parser.add_argument(
        "--client-runs",
        type=int,
        default=CLIENT_START_RUNS,
        help="client start-to-first-poll samples (default 10)",
    )
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=3.0,
        help="seconds of idle-fleet CPU measured before the run (default 3)",
    )
    parser.add_argument(
        "--save-report", type=Path, default=None, help="also write deployer's JSON report here"
    )
    parser.add_argument("--dir", type=Path, default=None, help="sandbox dir (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        root = opts.dir.resolve() if opts.dir else Path(tmp) / "sandbox"
        try:
            result = benchmark(opts, root)
        finally:
            sandbox_fleet.down(root)
    print(json.dumps(result, indent=2))
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
