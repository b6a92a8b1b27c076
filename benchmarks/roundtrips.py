"""Round-trip benchmark (issue 12): what one upgrade costs the host and the link.

Starts a sandbox (default 1 host, profile ``fast``), upgrades each host once
to a new release, one at a time, **in this process** (``HostRun`` directly, as
``deployer upgrade`` runs it, without the CLI's start-up), and prints one
JSON document with, per upgraded host:

* ``round_trips``: remote commands and channels deployer opened on the host
  (each ``Remote.run``, ``write_file`` and ``open_channel`` — each costs one
  SSH round trip, 100-300 ms over the internet through the forwarding
  server), split by kind;
* ``processes``: processes started on the host during the upgrade: every
  fork/clone (not threads) below the sandbox's host SSH server, counted by
  ``strace -f`` attached to the sandbox runner (the server lives there); the
  programs they ran (execve) by name;
* ``guard_cpu_seconds``: user + system CPU of the guard process(es), sampled
  from ``/proc`` every 20 ms by a separate sampler process (the last 20 ms
  before a guard exits may be missed); ``link_cpu_seconds`` the same for the
  link tasks deployer runs on the host (``python3 -c LINK_BOOT …``: inspect,
  stage + the guard's stream, cleanup; none before issue 12);
* ``deployer_cpu_seconds``: this process's CPU (all threads) for the host's
  upgrade, from ``time.process_time()`` (imports and plan excluded);
* ``seconds``: its wall time, and the result.

Targets (issue 12): <= 6 round trips, <= 30 processes, deployer CPU <= 0.05 s.

Usage (from the repository root; strace must be installed, and allowed to
attach: run as root or with ptrace permitted)::

    .venv/bin/python -m benchmarks.roundtrips [--hosts 1] [--profile fast|real]
        [--ssh-latency 0] [--sshd embedded|openssh] [--release 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

TARGETS = {"round_trips": 6, "processes": 30, "deployer_cpu_seconds": 0.05}
SAMPLE_EVERY = 0.02  # seconds between the sampler's looks at /proc
STRACE_SETTLE = 1.0  # seconds for strace to attach to every thread of the runner

# A separate process, so its CPU is not counted as deployer's: it records the
# CPU (utime + stime, clock ticks) of every process whose command line runs a
# guard.py under DIR, until its stdin closes; then prints {pid: seconds}.
SAMPLER = r"""
import json, os, select, sys
root, every = sys.argv[1], float(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
seen = {}
while not select.select([0], [], [], every)[0]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as fh:
                cmd = fh.read()
            if b"guard.py" not in cmd:
                continue
            cwd = os.readlink("/proc/%s/cwd" % entry)
            with open("/proc/%s/stat" % entry) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if not (cwd.startswith(root) or root.encode() in cmd):
            continue
        kind = "link" if b"\0-c\0" in cmd else "guard"  # python3 -c LINK_BOOT …: the link
        key = kind + ":" + entry
        seen[key] = max(seen.get(key, 0), (int(fields[11]) + int(fields[12])) / tick)
print(json.dumps(seen))
"""


class CountingRemote:
    """A Remote that counts what it is asked to do on the host: each command,
    upload and channel is one SSH round trip."""

    def __init__(self, remote: Any, counts: Counter):
        self._remote, self.counts = remote, counts
        self.name = remote.name

    def run(self, command: str, **kwargs: Any) -> Any:
        word = command.split()[0] if command.split() else ""
        self.counts["run"] += 1
        self.counts["run:" + os.path.basename(word)[:20]] += 1
        return self._remote.run(command, **kwargs)

    def write_file(self, path: str, data: bytes) -> None:
        self.counts["write_file"] += 1
        self._remote.write_file(path, data)

    def open_channel(self, command: str, **kwargs: Any) -> Any:
        self.counts["open_channel"] += 1
        return self._remote.open_channel(command, **kwargs)

    def close(self) -> None:
        self._remote.close()


class Strace:
    """``strace -f`` on the sandbox runner: forks, clones and execs below it."""

    def __init__(self, pid: int, out: Path):
        self.out = out
        tasks = [f"-p{tid}" for tid in sorted(os.listdir(f"/proc/{pid}/task"))]  # every thread
        self.proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=process", "-o", str(out), *tasks],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(STRACE_SETTLE)

    def mark(self) -> int:
        """Where the trace is now (the log's size), to count from."""
        return self.out.stat().st_size if self.out.exists() else 0

    def since(self, offset: int) -> dict[str, Any]:
        with open(self.out, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        forks = execs = 0
        programs: Counter = Counter()
        pending: dict[str, Any] = {}  # pid -> its unfinished fork/clone makes a process
        for line in text.splitlines():
            pid, _, call = line.partition(" ")
            call = call.strip()
            started = re.match(r"(vfork|fork|clone3?)\(", call)
            if started:
                process = "CLONE_THREAD" not in call
                if "<unfinished" in call:
                    pending[pid] = process
                elif process and re.search(r"= \d+$", call):
                    forks += 1
            elif re.match(r"<\.\.\. (vfork|fork|clone3?) resumed>", call):
                if pending.pop(pid, False) and re.search(r"= \d+$", call):
                    forks += 1
            elif call.startswith("execve("):
                m = re.match(r'execve\("([^"]*)"', call)
                name = os.path.basename(m.group(1)) if m else "?"
                if "<unfinished" in call:
                    pending["exec" + pid] = name
                elif re.search(r"= 0$", call):
                    execs += 1
                    programs[name] += 1
            elif re.match(r"<\.\.\. execve resumed>", call):
                name = pending.pop("exec" + pid, "?")
                if re.search(r"= 0$", call):
                    execs += 1
                    programs[str(name)] += 1
        return {"processes": forks, "execs": execs, "programs": dict(programs.most_common())}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def upgrade_one(inventory: Any, name: str, run_id: str) -> tuple[Any, Counter, float, float]:
    from deployer.api import ProviderAPI
    from deployer.plan import plan_host
    from deployer.remote import SshRemote
    from deployer.workflow import HostRun, RunContext

    counts: Counter = Counter()

    def factory(host: Any) -> CountingRemote:
        return CountingRemote(SshRemote(inventory.provider, host).open(), counts)

    host = inventory.hosts[name]
    plan = plan_host(inventory, host, run_id)
    ctx = RunContext(
        run_id=run_id,
        inventory=inventory,
        api=ProviderAPI(inventory.provider),
        remote_factory=factory,
    )
    cpu0, wall0 = time.process_time(), time.monotonic()
    result = HostRun(ctx, plan).execute()
    return result, counts, time.process_time() - cpu0, time.monotonic() - wall0


def benchmark(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    from deployer.inventory import load_inventory
    from deployer.sandbox import fleet as sandbox_fleet

    info = sandbox_fleet.up(
        root, hosts=opts.hosts, profile=opts.profile, sshd=opts.sshd, ssh_latency=opts.ssh_latency
    )
    inventory = load_inventory(info.inventory, overrides={"release": opts.release})
    trace = Strace(info.runner_pid, Path(opts.trace) if opts.trace else root.parent / "strace.log")
    import fabric  # noqa: F401
    import paramiko  # noqa: F401 - imported before the first host is timed

    hosts = []
    try:
        for index, name in enumerate(info.hosts):
            sampler = subprocess.Popen(
                [sys.executable, "-c", SAMPLER, str(root), str(SAMPLE_EVERY)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            mark = trace.mark()
            result, counts, cpu, wall = upgrade_one(inventory, name, f"bench-{index}")
            time.sleep(0.5)  # the trace and the sampler catch up
            guards = json.loads(sampler.communicate("", timeout=30)[0] or "{}")
            procs = trace.since(mark)
            hosts.append(
                {
                    "host": name,
                    "result": result.result.value,
                    "error": None if result.error is None else result.error.message,
                    "round_trips": sum(counts[k] for k in ("run", "write_file", "open_channel")),
                    "round_trips_by_kind": {k: v for k, v in sorted(counts.items())},
                    **procs,
                    "guard_cpu_seconds": _cpu(guards, "guard"),
                    "link_cpu_seconds": _cpu(guards, "link"),
                    "deployer_cpu_seconds": round(cpu, 3),
                    "seconds": round(wall, 2),
                    "exposure_seconds": round(result.exposure_seconds, 3),
                }
            )
    finally:
        trace.stop()
    return {"options": vars(opts), "targets": TARGETS, "hosts": hosts, "median": _medians(hosts)}


def _cpu(sampled: dict[str, float], kind: str) -> float:
    return round(sum(v for k, v in sampled.items() if k.startswith(kind + ":")), 3)


def _medians(hosts: list[dict[str, Any]]) -> dict[str, float]:
    keys = (
        "round_trips",
        "processes",
        "guard_cpu_seconds",
        "link_cpu_seconds",
        "deployer_cpu_seconds",
        "seconds",
        "exposure_seconds",
    )
    return {k: statistics.median(h[k] for h in hosts) for k in keys if hosts}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--profile", choices=("fast", "real"), default="fast")
    parser.add_argument("--sshd", choices=("embedded", "openssh"), default="embedded")
    parser.add_argument("--ssh-latency", type=float, default=0.0)
    parser.add_argument("--release", default="2")
    parser.add_argument("--trace", help="keep the strace log in this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from deployer.sandbox import fleet as sandbox_fleet

    opts = parse_args(argv)
    if shutil.which("strace") is None:
        print("strace is not installed", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="roundtrips-"))
    root = tmp / "sandbox"
    try:
        print(json.dumps(benchmark(opts, root), indent=2))
    finally:
        sandbox_fleet.down(root)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
