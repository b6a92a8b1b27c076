"""The fleet layer: run the single-host workflow over many hosts, safely.

A :class:`Rollout` schedules hosts in waves on one bounded thread pool:

* **canary** — the first ``canary`` hosts form wave 0; unless every one of
  them ends ``upgraded``/``unchanged``/``planned``, no other host is touched
  (the first canary that fails stops scheduling, even of the other canaries);
* **batch** — the remaining hosts run in waves of ``batch`` hosts; a wave
  finishes before the next one starts (no batch: one wave of all the rest);
* **parallel** — at most ``parallel`` hosts are in flight at any moment, and
  no host is submitted ahead of a free slot, so a stop takes effect at once;
* **failure budget** — ``max_failures`` counts ``rolled_back``, ``failed``
  and ``unsafe`` hosts over the *whole run* (not per wave); once the count
  exceeds it, no new host starts, in-flight hosts finish, the rest are
  ``skipped``. ``None`` means no budget (like Ansible's default);
* **account-level errors** (SPEC 4) — API code 21 (invalid call: a wrong
  ``api_url`` or a bug) stops the run; code 31 (wrong data) stops the run
  while no host has succeeded yet, because a wrong ``user_id`` fails every
  host with 31 whereas a wrong ``dbid`` fails only its own host; code 32
  (invalid api key, from ``get_client_script`` of ``source = "provider"``)
  stops the run: the key is the account's, so every other fetch would fail
  alike; code 23 (client blocked) is that host's failure only.

Interrupts: the first :meth:`Rollout.interrupt` (Ctrl-C) stops scheduling and
lets in-flight hosts finish their staged upgrade; the second sets every
in-flight :attr:`HostControl.abort`, which the workflow polls to roll back
now. Either way each host ends with its window closed (the workflow's job).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import math
import re
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from deployer.errors import UsageError
from deployer.events import EventSink
from deployer.model import HostConfig
from deployer.result import ErrorInfo, HostResult, Outcome
from deployer.secrets import scrub

log = logging.getLogger(__name__)

#: results that count against the failure budget (``skipped`` does not)
FAILURE_OUTCOMES = frozenset({Outcome.ROLLED_BACK, Outcome.FAILED, Outcome.UNSAFE})
#: results that let a canary wave pass (and prove the account is right)
SUCCESS_OUTCOMES = frozenset({Outcome.UPGRADED, Outcome.UNCHANGED, Outcome.PLANNED})
#: API codes that stop the whole run whatever else happened (SPEC 1: 21 invalid
#: call; SPEC 1b: 32 invalid api key, the account's own key)
RUN_STOPPING_CODES = frozenset({21, 32})
#: API codes that stop the run only while no host has succeeded (31: wrong data)
ACCOUNT_SUSPECT_CODES = frozenset({31})

SKIPPED_ERROR_TYPE = "RolloutStopped"
INTERRUPTED_REASON = "interrupted"
CANARY_FAILED_REASON = "canary failed"

_COUNT_RE = re.compile(r"^\s*(\d+)\s*(%?)\s*$")


def parse_count(spec: str, total: int, what: str, *, minimum: int = 1) -> int:
    """Turn ``"N"`` or ``"P%"`` (of ``total`` hosts) into a host count.

    A percentage rounds up and is at least ``minimum``; ``N`` must be at
    least ``minimum``. A bad spec raises :class:`UsageError` (exit 2).
    """
    match = _COUNT_RE.match(str(spec))
    if not match:
        raise UsageError(f"{what}: {spec!r} is not a count; use a number N or a percentage P%")
    number, percent = int(match.group(1)), bool(match.group(2))
    if percent:
        if number > 100 or number < minimum:
            raise UsageError(f"{what}: {spec!r} is out of range; use a percentage {minimum}..100%")
        return max(minimum, math.ceil(number * total / 100))
    if number < minimum:
        raise UsageError(f"{what}: {spec!r} is too small; use a number >= {minimum}")
    return number


@dataclass(frozen=True)
class RolloutLimits:
    """A :class:`RolloutPolicy` resolved against the number of hosts."""

    parallel: int
    canary: int  # hosts in wave 0 (0: no canary wave)
    batch: int  # hosts per wave after the canary
    max_failures: int | None  # None: no failure budget


@dataclass(frozen=True)
class RolloutPolicy:
    """How a fleet is rolled out; the CLI's ``--parallel/--batch/--canary/--max-failures``."""

    parallel: int = 1
    batch: str | None = None  # "N" or "P%" of all hosts; None: one wave
    canary: int = 0
    max_failures: str | None = None  # "N" or "P%" of all hosts; None: unlimited

    def validate(self, total: int) -> RolloutLimits:
        """Check the policy for ``total`` hosts; raise :class:`UsageError` if it is bad."""
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise UsageError(f"--parallel: {self.parallel!r} is too small; use a number >= 1")
        if not isinstance(self.canary, int) or self.canary < 0:
            raise UsageError(f"--canary: {self.canary!r} is negative; use a number >= 0")
        canary = min(self.canary, total)
        rest = total - canary
        batch = parse_count(self.batch, total, "--batch") if self.batch is not None else rest
        budget = None
        if self.max_failures is not None:
            budget = parse_count(self.max_failures, total, "--max-failures", minimum=0)
        return RolloutLimits(self.parallel, canary, max(batch, 1), budget)

    def waves(self, total: int) -> list[range]:
        """Indexes of the hosts of each wave, in order."""
        limits = self.validate(total)
        waves = [range(0, limits.canary)] if limits.canary else []
        for start in range(limits.canary, total, limits.batch):
            waves.append(range(start, min(start + limits.batch, total)))
        return waves


@dataclass
class HostControl:
    """What one running host sees of the rollout.

    ``abort`` is set on the second interrupt: the workflow polls it and rolls
    the host back now instead of finishing its upgrade.
    """

    host: str
    abort: threading.Event = field(default_factory=threading.Event)


RunHost = Callable[[HostConfig, HostControl], HostResult]
_HostFuture = cf.Future  # of (result, made up by the rollout)


class Rollout:
    """Run ``run_host`` over ``hosts`` under ``policy``; see the module docstring.

    ``events`` gets ``host_finished`` for every host (skipped ones included)
    after the fleet policy has seen the result, and ``host_started`` as each
    host is submitted. With ``host_events=False`` (``run_host`` reports its own
    hosts, as the workflow does) only results that the rollout makes up —
    skipped hosts, a ``run_host`` that raised — are emitted. ``handle_signals``:
    see :meth:`run`.
    """

    def __init__(
        self,
        hosts: Sequence[HostConfig],
        run_host: RunHost,
        policy: RolloutPolicy,
        events: EventSink | None = None,
        *,
        handle_signals: bool = True,
        host_events: bool = True,
    ):
        self.hosts = list(hosts)
        self.handle_signals = handle_signals
        self.host_events = host_events
        self.run_host = run_host
        self.policy = policy
        self.events = events or EventSink()
        self.limits = policy.validate(len(self.hosts))  # UsageError before anything runs
        self._lock = threading.RLock()  # reentrant: interrupt() may run in a signal handler
        self._interrupts = 0
        self._stop_reason: str | None = None
        self._controls: dict[int, HostControl] = {}  # in flight, by host index
        self._results: dict[int, HostResult] = {}
        self._failures = 0
        self._succeeded = 0

    # --- public -------------------------------------------------------------

    @property
    def stop_reason(self) -> str | None:
        """Why scheduling stopped early, or None if every host was started."""
        return self._stop_reason

    @property
    def interrupted(self) -> bool:
        return self._interrupts > 0

    @property
    def interrupts(self) -> int:
        """How many interrupts (Ctrl-C; SIGTERM counts as two) were received."""
        return self._interrupts

    @property
    def failures(self) -> int:
        return self._failures

    def interrupt(self) -> int:
        """First call: start no new host. Second: abort (roll back) in-flight hosts now.

        Thread-safe and safe to call from a signal handler. Returns how many
        interrupts have been received.
        """
        with self._lock:
            self._interrupts += 1
            count = self._interrupts
            self._stop(INTERRUPTED_REASON)
            controls = list(self._controls.values())
        if count >= 2:
            for control in controls:
                control.abort.set()
        return count

    def run(self) -> list[HostResult]:
        """Run every wave; return one result per host, in inventory order.

        Called from the main thread (and unless ``handle_signals=False``), the
        run installs :func:`interrupt_on_signals` for its duration, so Ctrl-C
        never raises ``KeyboardInterrupt`` in the middle of scheduling.
        """
        in_main_thread = threading.current_thread() is threading.main_thread()
        signals = interrupt_on_signals(self) if self.handle_signals and in_main_thread else None
        with (
            signals or contextlib.nullcontext(),
            cf.ThreadPoolExecutor(
                max_workers=max(1, min(self.limits.parallel, len(self.hosts))),
                thread_name_prefix="deployer-host",
            ) as pool,
        ):
            for wave in self.policy.waves(len(self.hosts)):
                if self._stop_reason:
                    break
                self._run_wave(pool, wave)
        self._skip_the_rest()
        return [self._results[i] for i in range(len(self.hosts))]

    # --- scheduling ---------------------------------------------------------

    def _run_wave(self, pool: cf.ThreadPoolExecutor, wave: range) -> None:
        pending = list(wave)
        in_flight: dict[_HostFuture, int] = {}
        while in_flight or (pending and not self._stop_reason):
            while pending and not self._stop_reason and len(in_flight) < self.limits.parallel:
                index = pending.pop(0)
                in_flight[self._submit(pool, index)] = index
            if not in_flight:
                break
            for future in self._wait(in_flight):
                self._finish(in_flight.pop(future), future)

    def _submit(self, pool: cf.ThreadPoolExecutor, index: int) -> _HostFuture:
        host = self.hosts[index]
        control = HostControl(host.name)
        with self._lock:
            self._controls[index] = control
            if self._interrupts >= 2:
                control.abort.set()
        if self.host_events:
            self._emit("host_started", host.name)
        return pool.submit(self._call_run_host, host, control)

    def _wait(self, in_flight: dict[_HostFuture, int]) -> set[_HostFuture]:
        """Wait for at least one host to finish; a Ctrl-C while waiting is an interrupt."""
        while True:
            try:
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                return done
            except KeyboardInterrupt:
                count = self.interrupt()
                log.warning(_interrupt_notice(count))

    def _call_run_host(self, host: HostConfig, control: HostControl) -> tuple[HostResult, bool]:
        """The host's result, and whether the rollout made it up (run_host reported none)."""
        try:
            result = self.run_host(host, control)
        except Exception as exc:  # the workflow catches everything; this is a bug
            return self._unexpected(host, exc), True
        if not isinstance(result, HostResult):
            log.error("%s: the host workflow returned %r, not a result", host.name, type(result))
            error = ErrorInfo(None, "WorkflowError", "the host workflow returned no result")
            return HostResult(host.name, Outcome.UNSAFE, error=error), True
        return result, False

    def _unexpected(self, host: HostConfig, exc: Exception) -> HostResult:
        """A bug: the end state is unknown. Scrub the host's ids (a URL may carry them)."""
        secrets = host.secret_values()
        error = ErrorInfo.from_exception(exc, None)
        error.message = scrub(error.message, secrets)
        log.error(
            "%s: the host workflow raised %s: %s; its end state is unknown",
            host.name,
            error.type,
            error.message,
        )
        log.debug("%s", scrub(traceback.format_exc(), secrets))
        return HostResult(host.name, Outcome.UNSAFE, error=error)

    def _finish(self, index: int, future: _HostFuture) -> None:
        try:
            result, made_up = future.result()
        except BaseException as exc:  # _call_run_host returns; only a cancelled future lands here
            error = ErrorInfo.from_exception(exc, None)
            result, made_up = HostResult(self.hosts[index].name, Outcome.UNSAFE, error=error), True
        with self._lock:
            self._controls.pop(index, None)
            self._results[index] = result
            self._apply_fleet_policy(result)
            if index < self.limits.canary and result.result not in SUCCESS_OUTCOMES:
                self._stop(f"{CANARY_FAILED_REASON} ({result.host}: {result.result.value})")
        if self.host_events or made_up:
            self._emit("host_finished", result)

    # --- fleet policy -------------------------------------------------------

    def _apply_fleet_policy(self, result: HostResult) -> None:
        if result.result in SUCCESS_OUTCOMES:
            self._succeeded += 1
        if result.result in FAILURE_OUTCOMES:
            self._failures += 1
        code = result.error.api_error_code if result.error else None
        if code in RUN_STOPPING_CODES or (code in ACCOUNT_SUSPECT_CODES and not self._succeeded):
            self._stop(_account_reason(result, code))
        budget = self.limits.max_failures
        if budget is not None and self._failures > budget:
            self._stop(f"failure budget exceeded ({self._failures} > {budget})")

    def _stop(self, reason: str) -> None:
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
                if reason != INTERRUPTED_REASON:  # the interrupt has its own notice
                    log.warning("rollout stopped: %s", reason)

    def _skip_the_rest(self) -> None:
        reason = self._stop_reason or "not started"
        for index, host in enumerate(self.hosts):
            if index in self._results:
                continue
            error = ErrorInfo(step=None, type=SKIPPED_ERROR_TYPE, message=reason)
            self._results[index] = HostResult(host.name, Outcome.SKIPPED, error=error)
            self._emit("host_finished", self._results[index])

    def _emit(self, hook: str, *args: object) -> None:
        """Tell the event sink; a broken display must not break the rollout."""
        try:
            getattr(self.events, hook)(*args)
        except Exception:
            log.exception("event sink %s failed", hook)


def _account_reason(result: HostResult, code: int | None) -> str:
    kind = result.error.type if result.error else "error"
    return f"run stopped: account-level error (API code {code} on {result.host}: {kind})"


def _interrupt_notice(count: int) -> str:
    if count == 1:
        return "interrupted: no new host starts; in-flight hosts finish (Ctrl-C again: roll back)"
    return "interrupted again: rolling back in-flight hosts now"


@contextlib.contextmanager
def interrupt_on_signals(rollout: Rollout) -> Iterator[None]:
    """While the block runs, SIGINT calls ``rollout.interrupt()`` and SIGTERM calls it twice.

    SIGTERM (a CI job cancelled, systemd stopping) rolls in-flight hosts back
    at once: there may be no second chance. Only usable from the main thread.
    """

    def on_sigint(signum, frame):
        log.warning(_interrupt_notice(rollout.interrupt()))

    def on_sigterm(signum, frame):
        rollout.interrupt()
        log.warning(_interrupt_notice(rollout.interrupt()))

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
