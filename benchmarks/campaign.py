"""Chaos campaign (issue 11): randomized ``deployer upgrade`` runs on the
sandbox, each with a kill point (or none) and a fault, under changing provider
weather; every run judged from outside.

One sandbox (profile ``fast``), one worker per host; each worker runs one
scenario after another on its host:

- **a kill point** (75 %): SIGKILL deployer a random delay after a random
  stage began (:func:`tests.chaos.harness.random_kill`), or none (the run ends
  by itself);
- **a host fault**, one of :data:`FAULTS`: ``none``; ``ssh_cut`` (the host's
  ``ssh -R`` is killed mid-run); ``slow_stop`` (the *old* client, installed
  first with the sandbox's ``slow-stop`` rehearsal fault, goes on 1–12 s
  after SIGTERM); ``crash`` / ``silent`` / ``die_after`` (the new client);
  ``disk_full`` (deployer's state dir is a small tmpfs filled up to a random
  headroom: the journal fails at a random point; the disk is freed after the
  run, as an operator would, before ``recover``); ``second_deployer`` (a
  second ``deployer upgrade`` of the same host starts mid-run);
  ``concurrent_recover`` (``deployer recover`` runs mid-run);
- **an end**: ``recover`` right after the run (50 %), repeated as an operator
  would while it reports the host unsafe or left alone; or **without**:
  watched until settled, then a tidy ``recover`` (not measured).

Meanwhile a weather thread moves the simulator through episodes,
:data:`WEATHER`: 5xx storms (HTTP 502 and HTML bodies), 22 storms (a low
rate limit), API outages (every API call 502, 2–40 s) and, only when asked
for (``--weather`` with ``clock_step``: it steps this machine's wall clock,
so nothing else should run), host clock steps of ±30 s to ±1 h that are
stepped back after a while. Each run records the episodes that overlapped
it.

Each run is judged at its end, from the simulator's ``/sandbox/state`` and
the host's files (:class:`tests.chaos.harness.HostView`):

- **unsafe end**: the host is not safe (window closed, every exposure closed,
  a client online running a healthy release, installed file = what runs, its
  pidfile's pid is the one polling) when the run is over. Healthy: any script
  the campaign rendered for the host without a rehearsal fault (or with only
  ``slow-stop``), not just the run's old and new: a run that ended ``unsafe``
  leaves its guard to restore *its* old client, which a later run may meet;
- **window open at the end**: allow-clientless true or an exposure open then;
- **lock left**: the host's lock is still there after the last ``recover``;
- **lie**: a deployer that ended by itself (no kill, no second deployer)
  reported a result the host contradicts (``upgraded`` without the new
  release running; ``rolled_back``/``failed``/``unchanged`` without the old),
  or an exit status that does not match its report;
- **time until safe**: from the kill (or deployer's exit) to the first look at
  which the host was safe (with ``recover``) or settled (without; only runs
  that no ``recover`` overlapped count toward the "without" figure).

Usage (from the repository root; root is needed for ``disk_full``'s tmpfs,
the fault is skipped without it)::

    .venv/bin/python -m benchmarks.campaign --runs 1000 --hosts 12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployer.inventory import load_inventory
from deployer.render import render_script
from deployer.sandbox import fleet as sandbox_fleet
from deployer.sandbox.fleet import TIMINGS
from tests.chaos.harness import (
    SETTLE_MARGIN,
    HostView,
    UpgradeProcess,
    host_dir,
    lock_held,
    random_kill,
    recover,
    sha256_file,
    view,
)

FAULTS = (
    "none",
    "ssh_cut",
    "slow_stop",
    "crash",
    "silent",
    "die_after",
    "disk_full",
    "second_deployer",
    "concurrent_recover",
)
WEATHER = ("api_5xx", "api_22", "api_outage", "clock_step")
DEFAULT_WEATHER = ("api_5xx", "api_22", "api_outage")
KILL_SHARE = 0.75
RECOVER_SHARE = 0.5
GUARD_CLOSE_RETRY = 90.0  # the guard retries closing the window this long (guard.py)
RECOVER_HORIZON = 240.0  # seconds an operator goes on re-running recover after a run
LOOK = 0.25  # seconds between looks at a host (each reads the whole state)
STATE_FS_SIZE = 512 * 1024  # bytes of the disk_full tmpfs
RESULTS_OLD = {"rolled_back", "failed", "unchanged", "skipped", "offline"}


# --- the record of one run --------------------------------------------------------------------


@dataclass
class Run:
    n: int
    host: str
    fault: str
    kill_stage: str | None
    kill_delay: float
    with_recover: bool
    release: str
    started: float = 0.0  # monotonic
    ended: float = 0.0  # monotonic: deployer killed or exited
    killed: bool = False
    killed_in: str | None = None
    exit_code: int | None = None
    result: str | None = None
    error: str | None = None
    unsafe_end: bool = False
    window_open_at_end: bool = False
    lock_left: bool = False
    lie: str | None = None
    time_until_safe: float | None = None
    problems: list[str] = field(default_factory=list)
    recover_codes: list[int] = field(default_factory=list)
    harness_error: str | None = None
    recover_overlap: bool = False
    weather: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    judged: float = 0.0  # monotonic

    @property
    def bad(self) -> bool:
        return (
            self.unsafe_end
            or self.window_open_at_end
            or self.lock_left
            or bool(self.lie)
            or bool(self.harness_error)
        )


# --- the weather -------------------------------------------------------------------------------


@dataclass
class Episode:
    kind: str
    start: float  # monotonic
    end: float | None
    detail: dict[str, Any]


class Weather(threading.Thread):
    """Moves the simulator (and, if asked, the wall clock) through episodes."""

    def __init__(self, client: Any, kinds: tuple[str, ...], rng: random.Random):
        super().__init__(daemon=True)
        self.client, self.kinds, self.rng = client, kinds, rng
        self.base = {k: client.faults()[k] for k in ("fail_rate", "garbage_rate", "rate_limit")}
        self.episodes: list[Episode] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(5.0, 20.0)) and self.kinds:
            kind = self.rng.choice(self.kinds)
            undo, duration, detail = self._begin(kind)
            episode = Episode(kind, time.monotonic(), None, detail)
            with self.lock:
                self.episodes.append(episode)
            self.stopping.wait(duration)
            undo()
            episode.end = time.monotonic()

    def _begin(self, kind: str) -> tuple[Any, float, dict[str, Any]]:
        rng = self.rng
        if kind == "api_5xx":
            rate = round(rng.uniform(0.2, 0.6), 2)
            self.client.set_faults(fail_rate=rate, garbage_rate=round(rate / 2, 2))
            return self._restore, rng.uniform(3.0, 15.0), {"fail_rate": rate}
        if kind == "api_22":
            limit = round(rng.uniform(1.0, 4.0), 1)
            self.client.set_faults(rate_limit=limit)
            return self._restore, rng.uniform(5.0, 20.0), {"rate_limit": limit}
        if kind == "api_outage":
            self.client.set_faults(fail_rate=1.0)
            return self._restore, rng.uniform(2.0, 40.0), {"fail_rate": 1.0}
        step = rng.choice((-1, 1)) * rng.uniform(30.0, 3600.0)
        time.clock_settime(time.CLOCK_REALTIME, time.time() + step)

        def back() -> None:
            time.clock_settime(time.CLOCK_REALTIME, time.time() - step)

        return back, rng.uniform(3.0, 20.0), {"step_seconds": round(step, 1)}

    def _restore(self) -> None:
        self.client.set_faults(**self.base)

    def overlapping(self, start: float, end: float) -> list[str]:
        with self.lock:
            return [
                e.kind
                for e in self.episodes
                if e.start <= end and (e.end or time.monotonic()) >= start
            ]

    def busy(self) -> bool:
        """An API episode is on (recover cannot finish its work before it ends)."""
        with self.lock:
            return any(e.end is None and e.kind.startswith("api") for e in self.episodes)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


# --- the campaign ------------------------------------------------------------------------------


class Campaign:
    def __init__(self, opts: argparse.Namespace, root: Path):
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else int(time.time())
        self.rng = random.Random(self.seed)
        self.root = root
        self.info = sandbox_fleet.up(root / "sandbox", hosts=opts.hosts)
        self.dir: Path = self.info.dir
        self.client = self.info.client
        self.inventory = self.dir / "deployer.toml"
        self.faults = tuple(f for f in opts.faults if f != "disk_full" or _can_mount())
        self.weather = Weather(self.client, tuple(opts.weather), random.Random(self.seed + 1))
        self.lock = threading.Lock()
        self.runs: list[Run] = []
        self.next_n = 0
        self.release_n = 100
        # per host, every healthy script this campaign may have installed there:
        # a host that ends running any of them (the file and the client agreeing)
        # ends safe — a run's "old" may be older than the one it found, when an
        # earlier run ended unsafe and its guard restored that run's old client later
        self.healthy: dict[str, set[str]] = {
            h: {s for s in (sha256_file(host_dir(self.dir, h) / "client.py"),) if s}
            for h in self.info.hosts
        }
        self.recovers: list[tuple[float, float]] = []  # every recover's (start, end), monotonic
        self.deadline = time.monotonic() + opts.max_minutes * 60

    # -- bookkeeping --

    def take(self) -> int | None:
        with self.lock:
            if self.next_n >= self.opts.runs or time.monotonic() > self.deadline:
                return None
            self.next_n += 1
            return self.next_n

    def release(self) -> str:
        with self.lock:
            self.release_n += 1
            return str(self.release_n)

    def record(self, run: Run) -> None:
        with self.lock:
            self.runs.append(run)
            done, bad = len(self.runs), sum(r.bad for r in self.runs)
            if self.opts.details:  # as the runs end, so a long campaign can be read meanwhile
                with open(self.opts.details.with_suffix(".jsonl"), "a") as fh:
                    fh.write(json.dumps(_brief(run)) + "\n")
        if done % 25 == 0 or run.bad:
            flag = f"  BAD: {json.dumps(_brief(run))}" if run.bad else ""
            print(f"{done}/{self.opts.runs} runs, {bad} bad{flag}", file=sys.stderr, flush=True)

    def recover(self, state_dir: Path | None = None) -> tuple[int, dict[str, Any]]:
        start = time.monotonic()
        try:
            code, report, _ = recover(self.inventory, state_dir)
        finally:
            with self.lock:
                self.recovers.append((start, time.monotonic()))
        return code, report

    def recover_overlaps(self, start: float, end: float) -> bool:
        with self.lock:
            return any(a <= end and b >= start for a, b in self.recovers)

    # -- one run --

    def draw(self, n: int, host: str, rng: random.Random) -> Run:
        fault = rng.choice(self.faults)
        stage, delay = random_kill(rng, TIMINGS.stable_for)
        killed = rng.random() < KILL_SHARE
        return Run(
            n,
            host,
            fault,
            stage if killed else None,
            round(delay, 3) if killed else 0.0,
            rng.random() < RECOVER_SHARE,
            self.release(),
        )

    def worker(self, host: str, rng: random.Random) -> None:
        while (n := self.take()) is not None:
            run = self.draw(n, host, rng)
            try:
                self.one(run, rng)
            except Exception as exc:  # noqa: BLE001 - a harness error is a result too
                run.harness_error = f"{type(exc).__name__}: {exc}"
            self.record(run)
            if run.bad:
                self.repair(host, run)

    def one(self, run: Run, rng: random.Random) -> None:
        host = run.host
        if run.fault == "slow_stop":
            self.install_slow_stop(host, rng, run)
        complete = self.healthy[host]
        vars_ = {"release": run.release}
        if run.fault == "crash":
            vars_["sandbox_fail"] = "crash"
        elif run.fault == "silent":
            vars_["sandbox_fail"] = "silent"
        elif run.fault == "die_after":
            vars_["sandbox_fail"] = "die-after"
            vars_["sandbox_die_after"] = f"{rng.uniform(0.3, 0.8 * TIMINGS.stable_for):.2f}"
        new_sha = self.sha(host, vars_)
        state_dir = self.fill_disk(run, rng) if run.fault == "disk_full" else None
        args = tuple(a for k, v in vars_.items() for a in ("--var", f"{k}={v}"))
        run.started = time.monotonic()
        up = UpgradeProcess(self.inventory, host, args, state_dir=state_dir)
        side = self.side_fault(run, rng, complete)
        if run.kill_stage is not None:
            if up.wait_for_step(run.kill_stage, timeout=120) and _sleep_unless_exited(
                up.proc, run.kill_delay
            ):
                up.kill()
        if up.killed_at is not None:
            run.killed, run.killed_in = True, up.killed_in
        else:
            code, out, err = up.finish()
            run.exit_code = code
            run.result, run.error = _report_host(out, host)
            if run.error is None and run.result is None:
                run.error = err.strip().splitlines()[-1][:300] if err.strip() else None
        run.ended = time.monotonic()
        if side is not None:
            side.join(timeout=200)
        if state_dir is not None:
            self.free_disk(state_dir)
        if not run.killed and run.fault != "second_deployer":
            run.lie = self.lie(run, view(self.client, self.dir, host), complete, new_sha)
        if run.with_recover:
            self.end_with_recover(run, complete, state_dir)
        else:
            self.end_without_recover(run, complete, state_dir)
        if state_dir is not None:
            self.unmount(state_dir)
        run.weather = sorted(set(self.weather.overlapping(run.started, run.judged)))

    def side_fault(self, run: Run, rng: random.Random, complete: set[str]):
        """Start the run's mid-run fault in a thread (None: the fault has none)."""
        host = run.host
        delay = rng.uniform(0.0, 4.0)
        if run.fault == "ssh_cut":

            def cut() -> None:
                time.sleep(delay)
                pids = self.client.host(host)["tunnel_pids"]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                run.notes.append(f"cut {len(pids)} tunnel process(es) at {delay:.2f} s")

            target = cut
        elif run.fault == "second_deployer":
            second = self.release()
            self.sha(host, {"release": second})

            def again() -> None:
                time.sleep(delay)
                code, out, _ = UpgradeProcess(
                    self.inventory, host, ("--var", f"release={second}")
                ).finish()
                result, error = _report_host(out, host)
                run.notes.append(
                    f"second deployer at {delay:.2f} s: exit {code}, {result}, {error}"
                )

            target = again
        elif run.fault == "concurrent_recover":

            def meddle() -> None:
                time.sleep(delay)
                code, report = self.recover()
                mine = [h for h in report.get("hosts", []) if h.get("host") == host]
                run.notes.append(f"concurrent recover at {delay:.2f} s: exit {code}, {mine}")

            target = meddle
        else:
            return None
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    def end_with_recover(self, run: Run, complete: set[str], state_dir: Path | None):
        """recover at once, and again as an operator would while it says the host
        is unsafe or was left alone (after an API episode, after a second deployer)."""
        horizon = run.ended + RECOVER_HORIZON
        while True:
            code, report = self.recover(state_dir)
            run.recover_codes.append(code)
            mine = [h for h in report.get("hosts", []) if h.get("host") == run.host]
            settled = code == 0 or (mine and mine[0].get("result") not in ("unsafe", "skipped"))
            seen = self.wait_safe(run.host, complete, time.monotonic() + 3.0, settled=False)
            if seen is not None and (settled or not mine):
                run.time_until_safe = round(seen - run.ended, 2)
                break
            if time.monotonic() > horizon:
                break
            while self.weather.busy() and time.monotonic() < horizon:
                time.sleep(1.0)
            time.sleep(2.0)
        self.judge(run, complete)

    def end_without_recover(self, run: Run, complete: set[str], state_dir: Path | None):
        # the guard's deadline, its revert, and its retries to close the window
        # through an API episode
        horizon = TIMINGS.guard_deadline + SETTLE_MARGIN + GUARD_CLOSE_RETRY
        seen = self.wait_safe(run.host, complete, run.ended + horizon, settled=True)
        if seen is not None:
            run.time_until_safe = round(seen - run.ended, 2)
            run.recover_overlap = self.recover_overlaps(run.ended, seen)
        self.judge(run, complete)
        code, _ = self.recover(state_dir)  # tidy up (locks, the journal), not measured
        run.recover_codes.append(code)
        run.lock_left = self.lock_left(run.host)

    def wait_safe(self, host: str, complete: set[str], until: float, settled: bool) -> float | None:
        while True:
            current = view(self.client, self.dir, host)
            if current.settled(complete) if settled else current.safe(complete):
                return time.monotonic()
            if time.monotonic() > until:
                return None
            time.sleep(LOOK)

    def judge(self, run: Run, complete: set[str]) -> None:
        current = view(self.client, self.dir, run.host)
        run.judged = time.monotonic()
        run.problems = current.problems(complete)
        run.unsafe_end = bool(run.problems)
        sim = current.sim
        run.window_open_at_end = bool(sim["allow_clientless"]) or any(
            close is None for _, close in sim["exposures"]
        )
        if run.with_recover:
            run.lock_left = self.lock_left(run.host)

    def lock_left(self, host: str) -> bool:
        """The host's lock is there and no deployer that could hold it runs (an
        upgrade of this host, or any recover: recover takes a lock to act)."""
        end = time.monotonic() + 120.0
        while lock_held(self.dir, host):
            if not self.deployer_running(host) or time.monotonic() > end:
                return True
            time.sleep(0.5)
        return False

    def lie(self, run: Run, current: HostView, complete: set[str], new_sha: str) -> str | None:
        """What the finished run's own word says that the host contradicts."""
        running = current.sim["script_sha256"]
        if run.exit_code == 3 and run.result != "unsafe":
            return f"exit 3 but result {run.result}"
        if run.result == "unsafe":
            return None if run.exit_code == 3 else f"result unsafe but exit {run.exit_code}"
        if run.result == "upgraded":
            ok = self.wait_for(
                lambda: view(self.client, self.dir, run.host).sim["script_sha256"] == new_sha
            )
            return None if ok else f"upgraded, but sha {str(running)[:12]} runs"
        if run.result in RESULTS_OLD and running == new_sha and run.fault in ("crash", "silent"):
            return f"{run.result}, but the broken new release runs"
        return None

    def wait_for(self, condition, timeout: float = 3.0) -> bool:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                return False
            time.sleep(LOOK)
        return True

    def deployer_running(self, host: str) -> bool:
        """An ``upgrade`` of ``host`` or any ``recover`` of this sandbox runs."""
        mark = f"-m\0deployer\0-i\0{self.inventory}\0".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes()
                if mark in argv:
                    words = argv.split(b"\0")
                    if b"recover" in words or (b"upgrade" in words and host.encode() in words):
                        return True
        return False

    # -- fault helpers --

    def sha(self, host: str, vars_: dict[str, str]) -> str:
        """The sha256 of the script for ``host`` with ``vars_``; a healthy one (no
        rehearsal fault, or only a slow stop) joins the host's safe ends."""
        inv = load_inventory(self.inventory, overrides=vars_)
        sha = render_script(inv, inv.hosts[host]).sha256
        if vars_.get("sandbox_fail", "") in ("", "slow-stop"):
            self.healthy[host].add(sha)
        return sha

    def install_slow_stop(self, host: str, rng: random.Random, run: Run) -> None:
        """Make the running client one that is slow to stop (an upgrade of its own)."""
        seconds = f"{rng.uniform(1.0, 12.0):.1f}"
        vars_ = {
            "release": self.release(),
            "sandbox_fail": "slow-stop",
            "sandbox_slow_stop": seconds,
        }
        self.sha(host, vars_)
        up = UpgradeProcess(
            self.inventory, host, tuple(a for k, v in vars_.items() for a in ("--var", f"{k}={v}"))
        )
        code, out, _ = up.finish()
        result, _ = _report_host(out, host)
        run.notes.append(f"slow-stop client ({seconds} s) installed: exit {code}, {result}")

    def fill_disk(self, run: Run, rng: random.Random) -> Path:
        state_dir = self.root / f"state-{run.host}-{run.n}"
        state_dir.mkdir(parents=True)
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={STATE_FS_SIZE},mode=0700",
                "tmpfs",
                str(state_dir),
            ],
            check=True,
        )
        headroom = rng.randrange(0, 192) * 1024
        with contextlib.suppress(OSError):
            with open(state_dir / "filler", "wb") as f:
                f.write(b"\0" * max(0, STATE_FS_SIZE - headroom))
        run.notes.append(
            f"state dir on a {STATE_FS_SIZE // 1024} KiB tmpfs, {headroom // 1024} KiB free"
        )
        return state_dir

    def free_disk(self, state_dir: Path) -> None:
        with contextlib.suppress(OSError):
            (state_dir / "filler").unlink()

    def unmount(self, state_dir: Path) -> None:
        subprocess.run(["umount", "-l", str(state_dir)], check=False)
        shutil.rmtree(state_dir, ignore_errors=True)

    def repair(self, host: str, run: Run) -> None:
        """Put a bad host right for the next run, as an operator would."""
        if lock_held(self.dir, host) and not self.deployer_running(host):
            shutil.rmtree(
                host_dir(self.dir, host) / ".client.py.deployer" / "lock", ignore_errors=True
            )
        if not view(self.client, self.dir, host).sim["online"]:
            with contextlib.suppress(Exception):
                sandbox_fleet.start_client(self.dir, host)
        run.notes.append("repaired for the next run")

    # -- the whole campaign --

    def go(self) -> dict[str, Any]:
        started = time.monotonic()
        self.weather.start()
        workers = [
            threading.Thread(
                target=self.worker, args=(h, random.Random(self.rng.random())), daemon=True
            )
            for h in self.info.hosts
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.weather.stop()
        final = self.recover()
        return self.summary(time.monotonic() - started, final)

    def summary(self, wall: float, final: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        runs = sorted(self.runs, key=lambda r: r.n)
        bad = [r for r in runs if r.bad]
        by = _group
        with_r = [
            r.time_until_safe for r in runs if r.with_recover and r.time_until_safe is not None
        ]
        without = [
            r.time_until_safe
            for r in runs
            if not r.with_recover and r.time_until_safe is not None and not r.recover_overlap
        ]
        locks_final = [h for h in self.info.hosts if lock_held(self.dir, h)]
        return {
            "seed": self.seed,
            "hosts": self.opts.hosts,
            "profile": "fast",
            "timings": {
                "stable_for": TIMINGS.stable_for,
                "guard_deadline": TIMINGS.guard_deadline,
                "offline_after": TIMINGS.offline_after,
            },
            "faults": list(self.faults),
            "weather_kinds": list(self.weather.kinds),
            "runs": len(runs),
            "killed": sum(r.killed for r in runs),
            "unsafe_ends": sum(r.unsafe_end for r in runs),
            "windows_open_at_end": sum(r.window_open_at_end for r in runs),
            "locks_left": sum(r.lock_left for r in runs),
            "lies": sum(bool(r.lie) for r in runs),
            "harness_errors": sum(bool(r.harness_error) for r in runs),
            "after_the_final_recover": {
                "exit": final[0],
                "locks_left": locks_final,
                "windows_open": [
                    h
                    for h, s in self.client.state()["hosts"].items()
                    if s["allow_clientless"] or any(c is None for _, c in s["exposures"])
                ],
            },
            "time_until_safe_seconds": {
                "with_recover": _seconds(with_r),
                # killed runs only: a run that ended by itself is safe at its end
                "with_recover_killed": _seconds(
                    [
                        r.time_until_safe
                        for r in runs
                        if r.with_recover and r.killed and r.time_until_safe is not None
                    ]
                ),
                "without_recover": _seconds(without),
                "without_recover_killed": _seconds(
                    [
                        r.time_until_safe
                        for r in runs
                        if not r.with_recover and r.killed and r.time_until_safe is not None
                    ]
                ),
                # another worker's recover may have finished the host meanwhile
                "without_recover_runs_overlapped_by_a_recover": sum(
                    1 for r in runs if not r.with_recover and r.recover_overlap
                ),
            },
            "per_fault": by(runs, lambda r: r.fault),
            "per_kill_stage": by(
                runs, lambda r: r.killed_in or ("not killed" if not r.killed else "?")
            ),
            "per_weather": _group_pairs([(w, r) for r in runs for w in (r.weather or ["calm"])]),
            "results_of_runs_that_ended_by_themselves": dict(
                Counter(str(r.result) for r in runs if not r.killed)
            ),
            "exit_codes": dict(Counter(str(r.exit_code) for r in runs if not r.killed)),
            "recover_exit_codes": dict(Counter(str(c) for r in runs for c in r.recover_codes)),
            "weather_episodes": dict(Counter(e.kind for e in self.weather.episodes)),
            "bad_runs": [_brief(r) for r in bad],
            "wall_seconds": round(wall, 1),
        }


def _group(runs: list[Run], key: Callable[[Run], str]) -> dict[str, dict[str, int]]:
    return _group_pairs([(key(r), r) for r in runs])


def _group_pairs(pairs: list[tuple[str, Run]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"runs": 0, "bad": 0})
    for name, r in pairs:
        out[name]["runs"] += 1
        out[name]["bad"] += r.bad
    return dict(sorted(out.items()))


def _brief(r: Run) -> dict[str, Any]:
    data = asdict(r)
    for k in ("started", "ended", "judged"):
        data.pop(k)
    return data


def _seconds(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "max": None, "p50": None, "p95": None}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "max": round(ordered[-1], 2),
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
    }


def _report_host(out: str, host: str) -> tuple[str | None, str | None]:
    try:
        report = json.loads(out)
    except ValueError:
        return None, None
    for h in report.get("hosts", []):
        if h.get("host") == host:
            return h.get("result"), h.get("error")
    return None, None


def _sleep_unless_exited(proc: subprocess.Popen, delay: float) -> bool:
    end = time.monotonic() + delay
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return proc.poll() is None


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in all")
    parser.add_argument("--hosts", type=int, default=12, help="hosts = runs at once")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument(
        "--faults", type=lambda s: s.split(","), default=list(FAULTS), help="comma-separated"
    )
    parser.add_argument(
        "--weather",
        type=lambda s: [w for w in s.split(",") if w],
        default=list(DEFAULT_WEATHER),
        help=f"comma-separated, of {','.join(WEATHER)} ('' for calm)",
    )
    parser.add_argument("--max-minutes", type=float, default=600.0, help="stop starting runs after")
    parser.add_argument("--details", type=Path, default=None, help="write every run here")
    opts = parser.parse_args(argv)
    for name, allowed in (("faults", FAULTS), ("weather", WEATHER)):
        unknown = set(getattr(opts, name)) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)} (known: {', '.join(allowed)})")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp:
        root = Path(tmp)
        campaign = None
        try:
            campaign = Campaign(opts, root)
            result = campaign.go()
            if opts.details:
                opts.details.write_text(
                    json.dumps(
                        [_brief(r) for r in sorted(campaign.runs, key=lambda r: r.n)], indent=1
                    )
                )
        finally:
            if campaign is not None:
                campaign.weather.stop()
            for mount in root.glob("state-*"):
                subprocess.run(["umount", "-l", str(mount)], check=False)
            sandbox_fleet.down(root / "sandbox")
    print(json.dumps(result, indent=2))
    return 0 if not result["bad_runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
