"""Kill points: run ``deployer upgrade`` as a subprocess, SIGKILL it when the
journal says a chosen stage has begun, and judge the host's end state from
outside — the simulator's ``/sandbox/state`` and the host's files — never
from deployer's own word.

Shared by ``tests/chaos/test_kill_points.py``, ``tests/e2e/test_recover.py``
and ``benchmarks/chaos.py``. Stdlib and deployer only (no pytest here).

*Safe* (SPEC 4, "a deployer that vanishes mid-run leaves neither an open
window nor a host without a client") means, for one host:

- the simulator shows allow-clientless false and every exposure closed;
- it shows the client online, its last poll reporting the sha256 of a
  *complete* script: the old release's or the new one's;
- the installed file ``hosts/NAME/client.py`` hashes to that same sha256,
  and the pid that polled last (the client's good-poll file,
  ``hosts/NAME/client.py.poll``) is the one in ``client.pid``, alive.

*Settled*: safe, and no guard process of the host is left that could still
change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.guardlink import SILENCE_MIN
from deployer.sandbox import processes
from deployer.sandbox.client import SandboxClient
from deployer.sandbox.fleet import TIMINGS
from tests.spec import SPEC_STEPS

# The stages of SPEC 4 that a kill can land in (preflight acts on nothing).
KILL_STAGES = SPEC_STEPS[1:]
JOURNAL_POLL = 0.002  # seconds between looks at the journal while waiting for a stage
STATE_POLL = 0.1  # seconds between looks at the simulator while waiting for safety
SETTLE_MARGIN = 15.0  # seconds past the guard's deadline for its revert to finish
# A guard that reverted at its deadline waits out deployer's silence before it
# disconnects the tunnel deployer opened (and exits): the sandbox's silence limit,
# as deployer.guardlink.guard_config computes it
SANDBOX_SILENCE = SILENCE_MIN + max(3 * TIMINGS.api_timeout, TIMINGS.tunnel_timeout)
RECOVER_GRACE = 3.0  # seconds for the polls to catch up once recover returned (fast: 0.5 s)
CLI_TIMEOUT = 180.0
SHORT_STAGE = 0.3  # seconds: most stages take less on the sandbox
FINAL_RESULTS = {"upgraded", "unchanged", "rolled_back", "failed", "unsafe", "skipped"}
FINAL_GUARD_STATES = {"committed", "reverted", "aborted", "error"}


# --- releases -------------------------------------------------------------------------


def sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def release_sha(inventory: Path, host: str, release: str) -> str:
    """sha256 of the script deployer renders for ``host`` with ``--var release=RELEASE``."""
    from deployer.inventory import load_inventory
    from deployer.render import render_script

    inv = load_inventory(Path(inventory), overrides={"release": release})
    return render_script(inv, inv.hosts[host]).sha256


# --- the deployer subprocess and the journal ---------------------------------------------


def deployer_argv(inventory: Path, *args: str, state_dir: Path | None = None) -> list[str]:
    """``python -m deployer -i INVENTORY [--state-dir DIR] ARGS…``."""
    where = ("--state-dir", str(state_dir)) if state_dir is not None else ()
    return [sys.executable, "-m", "deployer", "-i", str(inventory), *where, *args]


def run_deployer(
    inventory: Path, *args: str, timeout: float = CLI_TIMEOUT, state_dir: Path | None = None
) -> tuple[int, str, str]:
    proc = subprocess.run(
        deployer_argv(inventory, *args, state_dir=state_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout, proc.stderr


class JournalProbe:
    """Read-only looks at the journal another process writes (WAL)."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "journal.sqlite3"

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # the schema is being created right now
            return []
        finally:
            conn.close()

    def last_run(self) -> int:
        """The rowid of the newest run so far (0: none): a mark that neither a
        clock step nor a reused pid can fool, unlike a start time."""
        rows = self._query("SELECT max(rowid) FROM runs", ())
        return rows[0][0] or 0 if rows else 0

    def run_of(self, pid: int, after: int) -> str | None:
        """The run that process ``pid`` started after the run with rowid ``after``."""
        rows = self._query(
            "SELECT run_id FROM runs WHERE pid = ? AND rowid > ? ORDER BY rowid DESC",
            (pid, after),
        )
        return rows[0][0] if rows else None

    def steps(self, run_id: str, host: str) -> list[tuple[str, str]]:
        """(step, phase) records of (run, host), in order."""
        return self._query(
            "SELECT step, phase FROM steps WHERE run_id = ? AND host = ? ORDER BY id",
            (run_id, host),
        )

    def facts(self, run_id: str, host: str) -> dict[str, Any]:
        """The journalled facts of (run, host), as deployer wrote them before acting."""
        rows = self._query("SELECT facts FROM hosts WHERE run_id = ? AND host = ?", (run_id, host))
        return json.loads(rows[0][0]) if rows else {}

    def current_step(self, run_id: str, host: str) -> str | None:
        """The step that has begun last (it may have ended since)."""
        begun = [step for step, phase in self.steps(run_id, host) if phase == "begin"]
        return begun[-1] if begun else None


@dataclass
class UpgradeProcess:
    """One ``deployer upgrade HOST`` subprocess, to be killed at a stage."""

    inventory: Path
    host: str
    args: tuple[str, ...]
    state_dir: Path | None = None  # --state-dir (default: the inventory's .deployer)
    proc: subprocess.Popen = field(init=False)
    launched: float = field(init=False)  # monotonic
    run_id: str | None = None
    killed_at: float | None = None  # wall time of the SIGKILL
    killed_in: str | None = None  # the step that had begun last when it died

    def __post_init__(self) -> None:
        self.probe = JournalProbe(self.state_dir or Path(self.inventory).parent / ".deployer")
        self.after = self.probe.last_run()
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(
            deployer_argv(
                self.inventory, "upgrade", self.host, "--json", *self.args, state_dir=self.state_dir
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait_for_step(self, step: str, timeout: float = 60.0) -> bool:
        """Block until ``step`` of this run has begun for the host (True), or the
        process ended without reaching it (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.run_id is None:
                self.run_id = self.probe.run_of(self.proc.pid, self.after)
            if self.run_id is not None:
                if (step, "begin") in self.probe.steps(self.run_id, self.host):
                    return True
            if self.proc.poll() is not None:
                return False
            time.sleep(JOURNAL_POLL)
        raise TimeoutError(f"{self.host}: step {step!r} not begun within {timeout:g} s")

    def wait_for_fact(self, name: str, timeout: float = 60.0) -> bool:
        """Block until deployer journalled fact ``name`` as true (True), or the
        process ended first (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.run_id is None:
                self.run_id = self.probe.run_of(self.proc.pid, self.after)
            if self.run_id is not None and self.probe.facts(self.run_id, self.host).get(name):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(JOURNAL_POLL)
        raise TimeoutError(f"{self.host}: fact {name!r} not journalled within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL the deployer process itself (not the guard: it runs on the host)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.killed_at = time.time()
        self.proc.communicate(timeout=30)
        if self.run_id is None:
            self.run_id = self.probe.run_of(self.proc.pid, self.after)
        if self.run_id is not None:
            self.killed_in = self.probe.current_step(self.run_id, self.host)

    def finish(self, timeout: float = CLI_TIMEOUT) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()


def kill_at(
    inventory: Path,
    host: str,
    step: str,
    args: tuple[str, ...],
    delay: float = 0.0,
) -> UpgradeProcess:
    """Start an upgrade and SIGKILL it ``delay`` seconds after ``step`` began.

    If the run ends before reaching ``step`` (or before the delay is over),
    nothing is killed: ``killed_at`` stays None.
    """
    up = UpgradeProcess(inventory, host, args)
    if up.wait_for_step(step) and _sleep_unless_exited(up.proc, delay):
        up.kill()
    else:
        up.finish()
    return up


def _sleep_unless_exited(proc: subprocess.Popen, delay: float) -> bool:
    end = time.monotonic() + delay
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        time.sleep(min(JOURNAL_POLL * 5, max(0.0, end - time.monotonic())))
    return proc.poll() is None


# --- the host's end state, from outside -------------------------------------------------------


@dataclass(frozen=True)
class HostView:
    """What the simulator and the host's files say about one host, at one moment."""

    sim: dict[str, Any]
    file_sha: str | None
    pidfile_pid: int | None
    guards_alive: tuple[int, ...]
    poll_pid: int | None = None  # the pid in the good-poll file: the client that polled last

    def problems(self, complete: set[str]) -> list[str]:
        """Why the host is not safe (empty: safe)."""
        s, out = self.sim, []
        if s["allow_clientless"]:
            out.append("allow-clientless is true")
        if any(t_close is None for _, t_close in s["exposures"]):
            out.append("an exposure is still open")
        if not s["online"]:
            out.append("no client online")
        if s["script_sha256"] not in complete:
            out.append(f"the client runs sha256 {str(s['script_sha256'])[:12]}: not a release")
        if self.file_sha != s["script_sha256"]:
            out.append(f"the installed file is {str(self.file_sha)[:12]}, not what runs")
        pid = self.pidfile_pid
        if pid is None or self.poll_pid != pid or not processes.alive(pid):
            out.append(f"client.pid {pid} is not the polling pid {self.poll_pid} alive")
        return out

    def safe(self, complete: set[str]) -> bool:
        return not self.problems(complete)

    def settled(self, complete: set[str]) -> bool:
        return self.safe(complete) and not self.guards_alive


def host_dir(sandbox_dir: Path, host: str) -> Path:
    return Path(sandbox_dir) / "hosts" / host


def poll_pid(sandbox_dir: Path, host: str) -> int | None:
    """The pid in the host's good-poll file (``client.py.poll``, rewritten by the
    client after every good poll): the process that reached the provider last."""
    try:
        pid = json.loads((host_dir(sandbox_dir, host) / "client.py.poll").read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) else None


def live_guards(sandbox_dir: Path, host: str) -> tuple[int, ...]:
    """Pids of the host's guards (any run) that are still running."""
    runs = host_dir(sandbox_dir, host) / ".client.py.deployer" / "runs"
    pids = set()
    for status in runs.glob("*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                pid = json.loads(line).get("pid")
            except ValueError:
                continue
            if isinstance(pid, int) and processes.alive(pid):
                pids.add(pid)
    return tuple(sorted(pids))


def view(client: SandboxClient, sandbox_dir: Path, host: str) -> HostView:
    hdir = host_dir(sandbox_dir, host)
    return HostView(
        sim=client.host(host),
        file_sha=sha256_file(hdir / "client.py"),
        pidfile_pid=processes.read_pidfile(hdir / "client.pid"),
        guards_alive=live_guards(sandbox_dir, host),
        poll_pid=poll_pid(sandbox_dir, host),
    )


def lock_held(sandbox_dir: Path, host: str) -> bool:
    return (host_dir(sandbox_dir, host) / ".client.py.deployer" / "lock").exists()


# --- the client's own log: when each client started and first reached the provider -----------

# "2026-11-29 08:33:40,123 sshreach-client sbx-01 4242: message" (the client's log format);
# the pid is the first " digits: " after the host name (a message may hold another one)
_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) sshreach-client .*? (\d+): (.*)$"
)
_RELEASE_LINE = re.compile(r"^release (.*), sha256 ([0-9a-f]{12}): polling every")
_GOOD_POLL_LINE = re.compile(r'^the provider says "[01]"')


@dataclass
class ClientRun:
    """One client process as its log tells it (times: epoch seconds, to the ms)."""

    pid: int
    release: str
    sha12: str  # the first 12 hex digits of the sha256 of the file it started from
    started: float  # its first log line: the logger is up, it is about to poll
    first_good_poll: float | None = None  # its first poll the provider answered


def client_runs(sandbox_dir: Path, host: str) -> list[ClientRun]:
    """Every client that logged to ``hosts/NAME/client.log``, oldest first. Each
    client logs ``release R, sha256 S: polling every …`` when it starts and
    ``the provider says "1"|"0"`` at its first good poll (and on each change)."""
    try:
        text = (host_dir(sandbox_dir, host) / "client.log").read_text(errors="replace")
    except OSError:
        return []
    runs: dict[int, ClientRun] = {}
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if not match:
            continue
        stamp, millis, pid, message = match.groups()
        when = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
        started = _RELEASE_LINE.match(message)
        if started:
            runs[int(pid)] = ClientRun(int(pid), started.group(1), started.group(2), when)
        elif _GOOD_POLL_LINE.match(message):
            run = runs.get(int(pid))
            if run is not None and run.first_good_poll is None:
                run.first_good_poll = when
    return sorted(runs.values(), key=lambda r: r.started)


@dataclass(frozen=True)
class Watch:
    """How a host fared after a kill, watched until it settled or the horizon."""

    settled: bool
    unsafe_for: float  # seconds from the kill to the last unsafe look (0: never unsafe)
    settled_after: float | None  # seconds from the kill until settled
    last: HostView
    problems: tuple[str, ...]


def watch_until_settled(
    client: SandboxClient,
    sandbox_dir: Path,
    host: str,
    complete: set[str],
    since: float,
    horizon: float,
    until: Callable[[HostView], bool] | None = None,
) -> Watch:
    """Poll the host until it is settled (or ``until`` holds), at most ``horizon``
    seconds after ``since`` (wall time, the kill)."""
    done = until or (lambda v: v.settled(complete))
    last_unsafe = None
    while True:
        current = view(client, sandbox_dir, host)
        now = time.time()
        if not current.safe(complete):
            last_unsafe = now
        if done(current):
            return Watch(
                True,
                _age(last_unsafe, since),
                now - since,
                current,
                tuple(current.problems(complete)),
            )
        if now - since > horizon:
            problems = current.problems(complete) or [f"guard(s) {current.guards_alive} still run"]
            return Watch(False, _age(last_unsafe, since), None, current, tuple(problems))
        time.sleep(STATE_POLL)


def _age(moment: float | None, since: float) -> float:
    return 0.0 if moment is None else max(0.0, moment - since)


# --- recover and history ---------------------------------------------------------------------


def recover(inventory: Path, state_dir: Path | None = None) -> tuple[int, dict[str, Any], str]:
    """``deployer recover --json`` -> (exit code, its report, stderr)."""
    code, out, err = run_deployer(inventory, "recover", "--json", state_dir=state_dir)
    return code, (json.loads(out) if out.strip() else {}), err


def history_result(inventory: Path, host: str, run_id: str) -> str | None:
    """The host's result in ``run_id`` as ``deployer history HOST --json`` shows it."""
    code, out, err = run_deployer(inventory, "history", host, "--json", "--limit", "1000")
    if code != 0:
        raise RuntimeError(f"deployer history failed ({code}): {err}")
    for run in json.loads(out):
        if run["run_id"] == run_id:
            return next((h["result"] for h in run["hosts"] if h["host"] == host), None)
    return None


# --- one kill point, end to end ------------------------------------------------------------------


@dataclass
class KillOutcome:
    host: str
    stage: str  # the stage aimed at
    delay: float
    with_recover: bool
    killed: bool
    killed_in: str | None
    run_id: str | None
    safe: bool
    unsafe_for: float
    settled_after: float | None
    problems: tuple[str, ...]
    recover_code: int | None = None
    recover_result: str | None = None
    history_result: str | None = None
    lock_left: bool = False
    safe_at_return: bool | None = None  # with recover: safe at the first look after it
    tunnel_cuts: int = 0  # tunnels the forwarding server cut by the offline rule meanwhile
    tunnel_open_at_end: bool = False  # a tunnel still forwards when the watch ended

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, problems=list(self.problems))


@dataclass(frozen=True)
class FleetHandle:
    """Where a sandbox is: its directory (inventory inside) and its simulator."""

    dir: Path
    client: SandboxClient

    @property
    def inventory(self) -> Path:
        return self.dir / "deployer.toml"


def kill_point(
    fleet: FleetHandle,
    host: str,
    stage: str,
    release: str,
    *,
    delay: float = 0.0,
    with_recover: bool = True,
    stable_for: float | None = None,
    guard_deadline: float = 20.0,
) -> KillOutcome:
    """Upgrade ``host`` to ``release``, kill deployer in ``stage``, then judge.

    With recover: run ``deployer recover`` at once; the host must be safe when
    it returns (after :data:`RECOVER_GRACE` for the polls to catch up).
    Without: watch until settled, up to the guard's deadline plus a margin.
    """
    old_sha = sha256_file(host_dir(fleet.dir, host) / "client.py")
    complete = {old_sha, release_sha(fleet.inventory, host, release)}
    cuts_before = fleet.client.host(host)["tunnel_cuts"]
    args = ("--var", f"release={release}")
    if stable_for is not None:
        args += ("--stable-for", f"{stable_for:g}")
    up = kill_at(fleet.inventory, host, stage, args, delay)
    since = up.killed_at or time.time()
    out = KillOutcome(
        host,
        stage,
        delay,
        with_recover,
        up.killed_at is not None,
        up.killed_in,
        up.run_id,
        False,
        0.0,
        None,
        (),
    )
    if with_recover:
        out.recover_code, report, _ = recover(fleet.inventory)
        mine = [h for h in report.get("hosts", []) if h["host"] == host]
        out.recover_result = mine[0]["result"] if mine else None
        out.safe_at_return = view(fleet.client, fleet.dir, host).safe(complete)
        watch = watch_until_settled(
            fleet.client,
            fleet.dir,
            host,
            complete,
            since,
            horizon=time.time() - since + RECOVER_GRACE,
            until=lambda v: v.safe(complete),
        )
    else:
        watch = watch_until_settled(
            fleet.client,
            fleet.dir,
            host,
            complete,
            since,
            max(guard_deadline, SANDBOX_SILENCE) + SETTLE_MARGIN,
        )
    out.safe, out.unsafe_for, out.settled_after = (
        watch.settled,
        watch.unsafe_for,
        watch.settled_after,
    )
    out.problems = watch.problems
    if up.run_id is not None and with_recover:
        out.history_result = history_result(fleet.inventory, host, up.run_id)
    out.lock_left = lock_held(fleet.dir, host)
    end = fleet.client.host(host)
    out.tunnel_cuts = end["tunnel_cuts"] - cuts_before
    out.tunnel_open_at_end = end["tunnel_open"]
    return out


def random_kill(rng: random.Random, stable_for: float) -> tuple[str, float]:
    """A random stage and a random delay inside it: up to ``stable_for`` in the
    soak, up to :data:`SHORT_STAGE` elsewhere (a kill that outlasts its stage
    lands in a later one; ``killed_in`` says where)."""
    stage = rng.choice(KILL_STAGES)
    longest = stable_for if stage == "soak" else SHORT_STAGE
    return stage, rng.uniform(0.0, longest)
