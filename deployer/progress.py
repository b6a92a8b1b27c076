"""Progress of a fleet run, as an :class:`~deployer.events.EventSink`.

On a terminal, :class:`LiveProgress` keeps a live display (rich) on stderr:
hosts done of total, how many in-flight hosts are at each stage, failures and
an ETA, with one line printed above it per finished host. Off a terminal (CI),
:class:`PlainProgress` writes one plain line per host event, so a job log
reads top to bottom. Both are thread-safe: the workflow calls them from the
rollout's worker threads.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Iterable
from typing import IO, Any

from deployer.clock import Clock
from deployer.events import EventSink
from deployer.result import HostResult, Outcome
from deployer.secrets import scrub

FAILURE_OUTCOMES = frozenset({Outcome.ROLLED_BACK, Outcome.FAILED, Outcome.UNSAFE})
STARTING_STAGE = "starting"
LIVE_REFRESH_PER_SECOND = 4
BAR_WIDTH = 30
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
    if result.result is Outcome.SKIPPED:
        return f"{name} skipped: {result.error.message if result.error else 'not started'}"
    line = f"{name} {outcome} in {result.duration_seconds:.1f}s"
    if result.exposure_seconds:
        line += f" (exposure {result.exposure_seconds:.2f}s)"
    if result.error:
        error = result.error
        where = f" at {error.step}" if error.step else ""
        message = error.message.strip().splitlines()[0] if error.message.strip() else ""
        line += f": {error.type}{where}: {message}"
    return line


class ProgressState:
    """What both displays know: done/total, stage of each in-flight host, failures, ETA."""

    def __init__(self, total: int, clock: Clock):
        self.total = total
        self.clock = clock
        self.started_at: float | None = None
        self.stages: dict[str, str] = {}  # in-flight host -> current stage
        self.finished: set[str] = set()
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

    def stage(self, host: str, step: str) -> None:
        self.start()
        if host not in self.finished:
            self.stages[host] = step

    def host_finished(self, result: HostResult) -> bool:
        self.stages.pop(result.host, None)
        if result.host in self.finished:
            return False
        self.finished.add(result.host)
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
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        return " · ".join(parts)

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
            self.state.stage(host, step)

    def step_finished(self, host, step, status, seconds, facts=None) -> None:
        with self._lock:
            self._write(f"{host} {step} {status} {seconds:.2f}s")

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
        self._live = None
        self._closed = False

    # --- the display ---------------------------------------------------------

    def render(self):
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
            lines = [grid]
            if state.stages_line():
                lines.append(Text(state.stages_line(), style="dim"))
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

        self.console.print(Text(scrub(text, self.secrets), style=style))

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
            self.state.stage(host, step)
        self._ensure_live()

    def host_finished(self, result: HostResult) -> None:
        with self._lock:
            if not self.state.host_finished(result):
                return
        self._refresh()
        failed = result.result in FAILURE_OUTCOMES
        style = "red" if failed else ("yellow" if result.result is Outcome.SKIPPED else None)
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
