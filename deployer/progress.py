"""Progress of a fleet run, as an :class:`~deployer.events.EventSink`.

On a terminal, :class:`LiveProgress` keeps a live display (rich) on stderr:
hosts done of total, how many in-flight hosts are at each stage, failures and
an ETA, the hosts parked by ``--wait-offline`` (their ``wait`` step) and the
time left to wait, with one line printed above it per finished host. Off a terminal (CI),
:class:`PlainProgress` writes one plain line per host event, so a job log
reads top to bottom. Both are thread-safe: the workflow calls them from the
rollout's worker threads.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from deployer.clock import Clock
from deployer.events import EventSink
from deployer.parking import WAIT_STEP
from deployer.result import FAILURE_OUTCOMES, NOT_RUN_OUTCOMES, HostResult, Outcome, StepStatus
from deployer.secrets import scrub

if TYPE_CHECKING:  # rich is imported when the display starts, not at import
    from rich.console import Group, RenderableType
    from rich.live import Live

STARTING_STAGE = "starting"
LIVE_REFRESH_PER_SECOND = 4
BAR_WIDTH = 30
WAITING_NAMES = 3  # parked hosts named on the live display; the rest are counted
WARNING_PREFIX = "warning:"  # a message that starts so stands out on a terminal


def make_progress(
    stream: IO[str],
    total: int,
    *,
    tty: bool | None = None,
    quiet: bool = False,
    clock: Clock | None = None,
    secrets: Iterable[str] = (),
) -> EventSink:
    """The right progress sink for ``stream``: live on a TTY, plain lines off one.

    ``quiet`` gives a sink that shows nothing (the summary table still comes
    from the CLI). ``secrets`` are raw credential values scrubbed from every
    line as a second line of defence.
    """
    if quiet:
        return EventSink()
    if tty is None:
        tty = _isatty(stream)
    if tty:
        try:
            return LiveProgress(stream, total, clock=clock, secrets=secrets)
        except ImportError:  # rich missing: fall back to plain lines
            pass
    return PlainProgress(stream, total, clock=clock, secrets=secrets)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def host_line(result: HostResult) -> str:
    """``sbx-03 upgraded in 4.2s (exposure 0.31s)`` and the like, for one finished host."""
    name, outcome = result.host, result.result.value
    waited = f" after waiting {format_seconds(result.waiting_seconds)}"
    if not result.waiting_seconds:
        waited = ""
    if result.result is Outcome.SKIPPED:
        reason = result.error.message if result.error else "not started"
        return f"{name} skipped{waited}: {reason}"
    if result.result is Outcome.OFFLINE:
        return f"{name} offline: {result.error.message if result.error else 'never online'}"
    line = f"{name} {outcome} in {result.duration_seconds:.1f}s{waited}"
    if result.exposure_seconds:
        line += f" (exposure {result.exposure_seconds:.2f}s)"
    if result.error:
        error = result.error
        where = f" at {error.step}" if error.step else ""
        message = error.message.strip().splitlines()[0] if error.message.strip() else ""
        line += f": {error.type}{where}: {message}"
    return line


def parked_line(host: str, state: ProgressState) -> str:
    """``sbx-03 offline: waiting for its client (29m58s left)``."""
    left = state.wait_left()
    return f"{host} offline: waiting for its client" + (
        f" ({format_seconds(left)} left)" if left is not None else ""
    )


def back_line(host: str, waited: float) -> str:
    return f"{host} back online after waiting {format_seconds(waited)}: upgrading"


class ProgressState:
    """What both displays know: done/total, stage of each in-flight host, failures, ETA."""

    def __init__(self, total: int, clock: Clock):
        self.total = total
        self.clock = clock
        self.started_at: float | None = None
        self.stages: dict[str, str] = {}  # in-flight host -> current stage
        self.waiting: dict[str, float | None] = {}  # parked host -> wait deadline (epoch)
        self.finished: set[str] = set()
        self.results: dict[str, HostResult] = {}
        self.counts: Counter[str] = Counter()
        self.failures = 0

    @property
    def done(self) -> int:
        return len(self.finished)

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = self.clock.now()

    def host_started(self, host: str) -> bool:
        """Record a start; False if the host was already known (a duplicate event)."""
        self.start()
        if host in self.stages or host in self.finished:
            return False
        self.stages[host] = STARTING_STAGE
        return True

    def stage(self, host: str, step: str, facts: dict[str, Any] | None = None) -> None:
        self.start()
        if step == WAIT_STEP:  # parked (again): not in flight, nothing runs for it
            self._unfinish(host)
            self.waiting[host] = (facts or {}).get("wait_deadline")
            self.stages.pop(host, None)
        elif host not in self.finished:
            self.stages[host] = step

    def _unfinish(self, host: str) -> None:
        """A host parked again after a result (its client vanished before its
        upgrade changed anything): it is not done; its last result is not counted."""
        result = self.results.pop(host, None)
        if result is None:
            return
        self.finished.discard(host)
        self.counts[result.result.value] -= 1
        self.failures -= result.result in FAILURE_OUTCOMES

    def step_done(self, host: str, step: str) -> None:
        if step == WAIT_STEP:
            self.waiting.pop(host, None)

    def wait_left(self) -> float | None:
        """Seconds until the wait of the parked hosts ends (None: nobody waits)."""
        deadlines = [d for d in self.waiting.values() if isinstance(d, int | float)]
        if not deadlines:
            return None
        return max(0.0, max(deadlines) - self.clock.wall())

    def host_finished(self, result: HostResult) -> bool:
        self.stages.pop(result.host, None)
        self.waiting.pop(result.host, None)
        if result.host in self.finished:
            return False
        self.finished.add(result.host)
        self.results[result.host] = result
        self.counts[result.result.value] += 1
        self.failures += result.result in FAILURE_OUTCOMES
        return True

    def per_stage(self) -> list[tuple[str, int]]:
        """In-flight hosts per stage, in the order the stages were first seen."""
        return list(Counter(self.stages.values()).items())

    def eta(self) -> float | None:
        """Seconds left at the throughput so far, or None before the first host finished."""
        if not self.done or self.started_at is None or self.done >= self.total:
            return None
        elapsed = self.clock.now() - self.started_at
        return elapsed / self.done * (self.total - self.done)

    def status_line(self) -> str:
        parts = [f"{self.done}/{self.total} done", f"{self.failures} failed"]
        if self.waiting:
            parts.append(self.waiting_summary())
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        return " · ".join(parts)

    def waiting_summary(self) -> str:
        """``2 waiting for their client, 29m10s left``."""
        text = f"{len(self.waiting)} waiting for their client"
        left = self.wait_left()
        return text if left is None else f"{text}, {format_seconds(left)} left"

    def waiting_line(self) -> str:
        """``waiting: sbx-03, sbx-07, sbx-09 +2`` (empty if nobody waits)."""
        if not self.waiting:
            return ""
        names = sorted(self.waiting)
        more = len(names) - WAITING_NAMES
        return "waiting: " + ", ".join(names[:WAITING_NAMES]) + (f" +{more}" if more > 0 else "")

    def stages_line(self) -> str:
        stages = self.per_stage()
        if not stages:
            return ""
        return "in flight: " + ", ".join(f"{step} {n}" for step, n in stages)


class PlainProgress(EventSink):
    """One line per host event, with a UTC time stamp: for CI logs and pipes."""

    def __init__(
        self,
        stream: IO[str],
        total: int,
        *,
        clock: Clock | None = None,
        secrets: Iterable[str] = (),
    ):
        self.stream = stream
        self.clock = clock or Clock()
        self.state = ProgressState(total, self.clock)
        self.secrets = [s for s in secrets if s]
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        stamp = dt.datetime.fromtimestamp(self.clock.wall(), tz=dt.timezone.utc)
        line = f"[{stamp:%H:%M:%S}] {scrub(text, self.secrets)}\n"
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the run
            pass

    def run_started(self, run_id: str, hosts: list[str]) -> None:
        with self._lock:
            self.state.start()
            self._write(f"run {run_id}: {len(hosts)} host{'s' if len(hosts) != 1 else ''}")

    def host_started(self, host: str) -> None:
        with self._lock:
            if self.state.host_started(host):
                self._write(f"{host} started")

    def step_started(self, host: str, step: str, facts: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.state.stage(host, step, facts)
            if step == WAIT_STEP:
                self._write(parked_line(host, self.state))

    def step_finished(self, host, step, status, seconds, facts=None) -> None:
        with self._lock:
            self.state.step_done(host, step)
            if step != WAIT_STEP:
                self._write(f"{host} {step} {status} {seconds:.2f}s")
            elif status == StepStatus.OK:
                self._write(back_line(host, seconds))

    def host_finished(self, result: HostResult) -> None:
        with self._lock:
            if self.state.host_finished(result):
                self._write(f"{host_line(result)} [{self.state.done}/{self.state.total}]")

    def message(self, host: str | None, text: str) -> None:
        with self._lock:
            self._write(f"{host} {text}" if host else text)

    def close(self) -> None:
        pass


class LiveProgress(EventSink):
    """A rich live display on a terminal; finished hosts are printed above it."""

    def __init__(
        self,
        stream: IO[str],
        total: int,
        *,
        clock: Clock | None = None,
        secrets: Iterable[str] = (),
    ):
        from rich.console import Console  # lazy: rich is heavy

        self.console = Console(file=stream, force_terminal=True, highlight=False)
        self.state = ProgressState(total, clock or Clock())
        self.secrets = [s for s in secrets if s]
        self._lock = threading.Lock()  # guards state only
        self._start_lock = threading.Lock()
        self._live: Live | None = None
        self._closed = False

    # --- the display ---------------------------------------------------------

    def render(self) -> Group:
        """The renderable shown by the live display (read under the lock)."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            state = self.state
            grid = Table.grid(padding=(0, 1))
            bar = ProgressBar(total=max(state.total, 1), completed=state.done, width=BAR_WIDTH)
            style = "bold red" if state.failures else "bold"
            grid.add_row(bar, Text(state.status_line(), style=style))
            lines: list[RenderableType] = [grid]
            if state.stages_line():
                lines.append(Text(state.stages_line(), style="dim"))
            if state.waiting_line():
                lines.append(Text(state.waiting_line(), style="yellow"))
            return Group(*lines)

    def _ensure_live(self) -> None:
        # Lock order: _start_lock -> rich's Live lock -> _lock. Never hold _lock
        # while calling into rich (its refresh thread holds its lock and calls render).
        with self._start_lock:
            if self._live is None and not self._closed:
                from rich.live import Live

                live = Live(
                    console=self.console,
                    get_renderable=self.render,
                    refresh_per_second=LIVE_REFRESH_PER_SECOND,
                    transient=True,
                    redirect_stdout=False,  # stdout carries --json; never divert it
                    redirect_stderr=False,
                )
                live.start()
                self._live = live

    def _refresh(self) -> None:
        """Redraw now, so the line printed next sits above an up-to-date display."""
        self._ensure_live()
        with self._start_lock:
            live = self._live
        if live is not None:
            live.refresh()

    def _print(self, text: str, style: str | None = None) -> None:
        from rich.text import Text

        # "" is rich's own "no style" default
        self.console.print(Text(scrub(text, self.secrets), style=style or ""))

    # --- events ----------------------------------------------------------------

    def run_started(self, run_id: str, hosts: list[str]) -> None:
        with self._lock:
            self.state.start()
        self._ensure_live()

    def host_started(self, host: str) -> None:
        with self._lock:
            self.state.host_started(host)
        self._ensure_live()

    def step_started(self, host: str, step: str, facts: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.state.stage(host, step, facts)
            line = parked_line(host, self.state) if step == WAIT_STEP else None
        self._ensure_live()
        if line:
            self._print(line, "yellow")

    def step_finished(self, host, step, status, seconds, facts=None) -> None:
        with self._lock:
            self.state.step_done(host, step)
        if step == WAIT_STEP and status == StepStatus.OK:
            self._print(back_line(host, seconds), "dim")

    def host_finished(self, result: HostResult) -> None:
        with self._lock:
            if not self.state.host_finished(result):
                return
        self._refresh()
        failed = result.result in FAILURE_OUTCOMES
        not_run = result.result in NOT_RUN_OUTCOMES
        style = "red" if failed else ("yellow" if not_run else None)
        self._print(host_line(result), style)

    def message(self, host: str | None, text: str) -> None:
        style = "yellow" if text.startswith(WARNING_PREFIX) else "dim"
        self._print(f"{host} {text}" if host else text, style)

    def run_finished(self, run_id: str) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display and print its last state; idempotent."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = self._live, None
        if live is not None:
            live.stop()
            self.console.print(self.render())
