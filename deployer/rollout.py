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
* **account-level errors** (docs/explanation/stages.md) — API code 21 (invalid call: a wrong
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

**Waiting for offline hosts** (``--wait-offline``, an :class:`OfflineWait`):
before a host's upgrade the rollout looks at its ``client_status`` itself;
offline, the host is **parked** (:mod:`deployer.parking`) instead of failed,
and a watcher thread looks at it at a low share of the API rate until it is
trusted; then it is upgraded in the next free slot, before any host not
started yet. The workflow's preflight takes the rollout's fresh look as its
own (:attr:`HostControl.seen_online`). The rules around it:

* nothing is in flight for a parked host: a stop (Ctrl-C, the budget, a
  canary) ends every parked host at once as ``skipped`` with the reason;
* at the deadline every host still parked ends ``offline`` (a host first
  reached after the deadline and found offline, too); trusted hosts and
  hosts in flight go on;
* ``offline`` is not a failure: it does not count against the budget;
* a host whose client vanished between the look and its upgrade — the
  workflow failed it before anything changed, for want of a client
  (:data:`CLIENT_GONE`: offline at preflight, ``connect`` answering 24 or 11,
  no tunnel within ``tunnel_timeout``) — is parked again instead of counted
  failed, up to :attr:`WaitPolicy.attempts` upgrades in all;
* a wave is done once each of its hosts is finished **or parked**; a parked
  host of an earlier wave that returns runs beside the later waves (within
  ``parallel``), ahead of them;
* except the canary wave: a parked canary holds it (it has not passed), so
  no other host starts before it is back and upgraded; still offline at the
  deadline, it ends ``offline`` and the canary fails (``canary failed
  (pi-01: offline)``).
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

from deployer.clock import Clock
from deployer.errors import UsageError
from deployer.events import EventSink
from deployer.facts import known
from deployer.model import HostConfig
from deployer.parking import WAIT_STEP, ParkedHost, Parking, WaitPolicy, Watcher
from deployer.progress import format_seconds
from deployer.result import (
    FAILURE_OUTCOMES,
    SUCCESS_OUTCOMES,
    ErrorInfo,
    HostResult,
    Outcome,
    StepRecord,
    StepStatus,
)
from deployer.secrets import scrub

log = logging.getLogger(__name__)

#: API codes that stop the whole run whatever else happened (docs/reference/api-codes.md: 21 invalid
#: call; 32 invalid api key, the account's own key)
RUN_STOPPING_CODES = frozenset({21, 32})
#: API codes that stop the run only while no host has succeeded (31: wrong data)
ACCOUNT_SUSPECT_CODES = frozenset({31})

SKIPPED_ERROR_TYPE = "RolloutStopped"
#: (step, error type) of a ``failed`` host whose client went away before its
#: upgrade changed anything: with ``--wait-offline`` it waits again
CLIENT_GONE = frozenset(
    {
        ("preflight", "ClientOffline"),
        ("tunnel", "ClientInactive"),
        ("tunnel", "NotConnected"),
        ("ssh", "TunnelNotUp"),
    }
)
OFFLINE_ERROR_TYPE = "ClientOffline"
WAKE_TICK = 0.25  # seconds: how soon the scheduler sees a host the watcher trusted
INTERRUPTED_REASON = "interrupted"
CANARY_FAILED_REASON = "canary failed"

_COUNT_RE = re.compile(r"^\s*(\d+)\s*(%?)\s*$")
#: units of a duration (``--wait-offline``): ``90s``, ``30m``, ``24h``, ``2d``, ``1h30m``
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 30 * 86400  # a month: longer is almost surely a typo
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


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


def parse_duration(spec: str, what: str = "--wait-offline") -> float:
    """Turn ``"90s"``, ``"30m"``, ``"24h"``, ``"2d"`` or ``"1h30m"`` into seconds.

    Every number needs its unit (a bare ``30`` could mean seconds or minutes);
    the total must be above 0 and at most :data:`MAX_DURATION`. A bad spec
    raises :class:`UsageError` (exit 2).
    """
    text = str(spec).strip().lower()
    parts = _DURATION_PART_RE.findall(text)
    usage = "use a number with a unit: 90s, 30m, 24h, 2d or 1h30m"
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"{what}: {spec!r} is not a duration; {usage}")
    units = [u for _, u in parts]
    if len(set(units)) != len(units):
        raise UsageError(f"{what}: {spec!r} repeats a unit; {usage}")
    seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"{what}: {spec!r} is zero; {usage}")
    if seconds > MAX_DURATION:
        raise UsageError(f"{what}: {spec!r} is longer than {MAX_DURATION // 86400}d")
    return seconds


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
    #: the rollout saw the client online a moment ago (``--wait-offline``): the
    #: workflow's preflight may take that look as its own instead of asking again
    seen_online: bool = False


@dataclass
class OfflineWait:
    """``--wait-offline``: park hosts whose client is offline, until ``deadline``.

    ``look`` is ``client_status`` at the rollout's own priority (the look
    before an upgrade); ``watch`` is the same at the watching share of the
    rate. Both may raise :class:`~deployer.errors.ApiError`. ``deadline`` is on
    ``clock``; ``wall_deadline`` (epoch seconds) goes to the journal and the
    live view.
    """

    deadline: float
    look: Callable[[HostConfig], bool]
    watch: Callable[[HostConfig], bool]
    offline_detection: float
    policy: WaitPolicy = field(default_factory=WaitPolicy)
    clock: Clock = field(default_factory=Clock)
    wall_deadline: float | None = None

    def __post_init__(self) -> None:
        if self.wall_deadline is None:
            self.wall_deadline = self.clock.wall() + (self.deadline - self.clock.now())

    def left(self) -> float:
        """Seconds until the deadline (negative once it passed)."""
        return self.deadline - self.clock.now()


RunHost = Callable[[HostConfig, HostControl], HostResult]
_HostFuture = cf.Future  # of (result or None if parked, made up by the rollout)


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
        wait: OfflineWait | None = None,
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
        self.wait = wait
        self._in_flight: dict[_HostFuture, int] = {}
        self._parking = Parking(wait.offline_detection, wait.policy) if wait else None
        self._wait_open: set[int] = set()  # parked hosts whose wait step began, not ended
        self._waited: dict[int, float] = {}  # seconds each host back from parking waited
        self._attempts: dict[int, int] = {}  # upgrades run per host (--wait-offline)
        self._wake = threading.Event()  # the watcher trusted a host, or a stop
        self._halt = threading.Event()  # the watcher ends

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
        self._wake.set()
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
        watcher = self._watcher()
        with (
            signals or contextlib.nullcontext(),
            cf.ThreadPoolExecutor(
                max_workers=max(1, min(self.limits.parallel, len(self.hosts))),
                thread_name_prefix="deployer-host",
            ) as pool,
        ):
            if watcher is not None:
                watcher.start()
            try:
                for number, wave in enumerate(self.policy.waves(len(self.hosts))):
                    if self._stop_reason:
                        break
                    self._run_wave(pool, wave, holds_parked=number == 0 and self.limits.canary > 0)
                self._run_wave(pool, range(0), holds_parked=True)  # in flight, parked: the rest
            finally:
                if watcher is not None:
                    watcher.stop()
        self._end_parked()
        self._skip_the_rest()
        return [self._results[i] for i in range(len(self.hosts))]

    # --- scheduling ---------------------------------------------------------

    def _run_wave(self, pool: cf.ThreadPoolExecutor, wave: range, *, holds_parked: bool) -> None:
        """Run ``wave`` until each of its hosts finished or is parked; with
        ``holds_parked`` (the canary wave; the last call), until none is parked."""
        pending = list(wave)
        members = set(wave) if len(wave) else None  # None: every host of the run
        while True:
            self._wake.clear()
            self._expire_at_deadline()
            self._fill(pool, pending)
            if self._wave_done(pending, members, holds_parked):
                return
            self._wait_for_progress()

    def _wave_done(self, pending: list[int], members: set[int] | None, holds_parked: bool) -> bool:
        def ours(indexes) -> bool:
            return any(members is None or i in members for i in indexes)

        if pending and not self._stop_reason:
            return False
        if ours(self._in_flight.values()):
            return False
        parked = self._parking.indexes() if self._parking is not None else set()
        return not (holds_parked and not self._stop_reason and ours(parked))

    def _fill(self, pool: cf.ThreadPoolExecutor, pending: list[int]) -> None:
        """Hand hosts to free slots: parked hosts that came back first, then ``pending``."""
        while not self._stop_reason and len(self._in_flight) < self.limits.parallel:
            entry = self._parking.take_ready() if self._parking is not None else None
            if entry is not None:
                self._in_flight[self._submit(pool, entry.index, entry)] = entry.index
            elif pending:
                index = pending.pop(0)
                self._in_flight[self._submit(pool, index)] = index
            else:
                return

    def _wait_for_progress(self) -> None:
        """Until a host finishes, the watcher trusts a host, a stop, or a tick."""
        tick = self._tick()
        if self._in_flight:
            for future in self._wait(self._in_flight, tick):
                self._finish(self._in_flight.pop(future), future)
        else:
            try:
                self._wake.wait(tick)
            except KeyboardInterrupt:
                log.warning(_interrupt_notice(self.interrupt()))

    def _tick(self) -> float | None:
        """How long to block at most: None (until a host finishes) without parked hosts."""
        if self.wait is None or self._parking is None or not len(self._parking):
            return None
        left = self.wait.left()
        return min(WAKE_TICK, left) if left > 0 else WAKE_TICK

    def _submit(
        self, pool: cf.ThreadPoolExecutor, index: int, parked: ParkedHost | None = None
    ) -> _HostFuture:
        host = self.hosts[index]
        control = HostControl(host.name)
        with self._lock:
            self._controls[index] = control
            if self._interrupts >= 2:
                control.abort.set()
        if self.host_events and self.wait is None:
            self._emit("host_started", host.name)
        if parked is not None and self.wait is not None:
            control.seen_online = parked.fresh(self.wait.clock.now(), self.wait.policy)
        return pool.submit(self._call_run_host, host, control, index)

    def _wait(self, in_flight: dict[_HostFuture, int], timeout: float | None = None):
        """Wait for at least one host to finish (or ``timeout``); a Ctrl-C while
        waiting is an interrupt."""
        while True:
            try:
                done, _ = cf.wait(in_flight, timeout=timeout, return_when=cf.FIRST_COMPLETED)
                return done
            except KeyboardInterrupt:
                count = self.interrupt()
                log.warning(_interrupt_notice(count))

    def _call_run_host(
        self, host: HostConfig, control: HostControl, index: int | None = None
    ) -> tuple[HostResult | None, bool]:
        """The host's result (None: parked), and whether the rollout made it up."""
        if self.wait is not None and index is not None and not self._look_first(index, control):
            return None, False
        try:
            result = self.run_host(host, control)
        except Exception as exc:  # noqa: BLE001 - the workflow catches everything; this is a bug
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
        except BaseException as exc:  # noqa: BLE001 - _call_run_host returns; a cancel lands here
            error = ErrorInfo.from_exception(exc, None)
            result, made_up = HostResult(self.hosts[index].name, Outcome.UNSAFE, error=error), True
        with self._lock:
            self._controls.pop(index, None)
        if result is None:
            self._park(index)
            return
        if self._client_gone(index, result):
            log.warning(
                "%s: its client went away before the upgrade changed anything (%s at %s): "
                "waiting for it again",
                result.host,
                result.error.type,
                result.error.step,
            )
            self._park(index)
            return
        self._with_wait(index, result)
        self._record_result(index, result)
        if self.host_events or made_up:
            self._emit("host_finished", result)

    def _record_result(self, index: int, result: HostResult) -> None:
        with self._lock:
            self._results[index] = result
            self._apply_fleet_policy(result)
            if index < self.limits.canary and result.result not in SUCCESS_OUTCOMES:
                self._stop(f"{CANARY_FAILED_REASON} ({result.host}: {result.result.value})")

    # --- waiting for offline hosts ------------------------------------------

    def _watcher(self) -> Watcher | None:
        if self.wait is None or self._parking is None:
            return None
        wait = self.wait

        def look(index: int) -> bool | None:
            return wait.watch(self.hosts[index])

        return Watcher(self._parking, look, wait.clock, self._wake.set, self._halt)

    def _waiting(self) -> tuple[OfflineWait, Parking]:
        """The wait and its parking, on the paths that only run with ``--wait-offline``."""
        # both are set in __init__ or neither is; a host is only looked at, parked or
        # ended waiting when there is a wait, so None here is a bug
        assert self.wait is not None and self._parking is not None
        return self.wait, self._parking

    def _look_first(self, index: int, control: HostControl) -> bool:
        """The look before an upgrade (in a worker): False if the client is offline.

        A host back from parking that was seen online a moment ago is not
        looked at again. A look that raises tells nothing: the workflow's own
        preflight asks again and reports the error.
        """
        host, (wait, _) = self.hosts[index], self._waiting()
        if not control.seen_online:
            try:
                online = bool(wait.look(host))
            except Exception as exc:  # noqa: BLE001 - reported by the workflow's preflight
                log.debug("%s: client_status before the upgrade failed: %s", host.name, exc)
                online = None
            if online is False:
                return False
            control.seen_online = online is True
        if index in self._wait_open:
            self._leave_parking(index)
        self._attempts[index] = self._attempts.get(index, 0) + 1
        if self.host_events:
            self._emit("host_started", host.name)
        return True

    def _client_gone(self, index: int, result: HostResult) -> bool:
        """A failure for want of a client, worth another wait (see the module docstring)."""
        if self.wait is None or result.result is not Outcome.FAILED or result.error is None:
            return False
        attempts = self._attempts.get(index, 0)
        return (
            (result.error.step, result.error.type) in CLIENT_GONE
            and attempts < self.wait.policy.attempts
            and not self._stop_reason
            and self.wait.left() > 0
        )

    def _park(self, index: int) -> None:
        """Park a host whose client was offline, or end it if the wait is over."""
        name, (wait, parking) = self.hosts[index].name, self._waiting()
        entry = parking.park(index, name, wait.clock.now())
        entry.looks += 1  # the look that found it offline
        if self._stop_reason or wait.left() <= 0:
            self._end_waiting(parking.take(index))
            return
        if index not in self._wait_open:
            self._wait_open.add(index)
            assert wait.wall_deadline is not None  # OfflineWait.__post_init__ sets it
            facts = known(waiting=True, wait_deadline=round(wait.wall_deadline, 3))
            self._emit("step_started", name, WAIT_STEP, facts)
        self._wake.set()

    def _leave_parking(self, index: int) -> None:
        """A parked host is back and about to be upgraded: its wait step ends."""
        wait, parking = self._waiting()
        entry = parking.record_of(index)
        # only hosts in _wait_open get here, and they were parked in this run
        assert entry is not None
        self._wait_open.discard(index)
        now = wait.clock.now()
        waited = now - entry.since
        self._waited[index] = waited
        facts = known(waiting=False, looks=entry.looks)
        if entry.trusted_at is not None:  # trusted, then it waited this long for a slot
            facts = known(**facts, queued_seconds=round(now - entry.trusted_at, 3))
        self._emit("step_finished", entry.name, WAIT_STEP, StepStatus.OK, waited, facts)

    def _with_wait(self, index: int, result: HostResult) -> None:
        """Add the host's wait (if it was parked) to its result."""
        waited = self._waited.get(index)
        if waited is None or result.waiting_seconds:
            return
        result.waiting_seconds = max(waited, 0.0)
        result.steps.insert(0, StepRecord(WAIT_STEP, StepStatus.OK, result.waiting_seconds))

    def _expire_at_deadline(self) -> None:
        """At the deadline, every host still waiting ends ``offline``."""
        if self.wait is None or self._parking is None:
            return
        if self.wait.left() > 0 or self._stop_reason:
            return
        for entry in self._parking.take_waiting():
            self._end_waiting(entry)

    def _end_parked(self) -> None:
        """After the run: hosts still parked end ``skipped`` (a stop) or ``offline``."""
        if self._parking is not None:
            for entry in self._parking.take_all():
                self._end_waiting(entry)

    def _end_waiting(self, entry: ParkedHost) -> None:
        wait, _ = self._waiting()
        waited = max(wait.clock.now() - entry.since, 0.0)
        if self._stop_reason:
            result = HostResult(
                entry.name,
                Outcome.SKIPPED,
                error=ErrorInfo(step=None, type=SKIPPED_ERROR_TYPE, message=self._stop_reason),
            )
            status, facts = StepStatus.SKIPPED, known(waiting=True, looks=entry.looks)
        else:
            waited_for = format_seconds(waited)
            message = f"client not seen online long enough to trust in {waited_for} of waiting"
            result = HostResult(
                entry.name,
                Outcome.OFFLINE,
                error=ErrorInfo(step=WAIT_STEP, type=OFFLINE_ERROR_TYPE, message=message),
            )
            status, facts = StepStatus.FAILED, known(waiting=False, looks=entry.looks)
        result.waiting_seconds = waited
        result.steps.append(StepRecord(WAIT_STEP, status, waited))
        if entry.index in self._wait_open:
            self._wait_open.discard(entry.index)
            self._emit("step_finished", entry.name, WAIT_STEP, status, waited, facts)
        self._record_result(entry.index, result)
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
        self._halt.set()  # no host starts any more: watching is pointless
        self._wake.set()

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
        except Exception:  # noqa: BLE001 - a broken display must not break the rollout
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
