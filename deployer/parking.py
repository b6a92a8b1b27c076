"""Parked hosts (``--wait-offline``): whose client is offline, when to look at it
next, and when it has been online long enough to trust.

A host whose client is offline when the rollout reaches it is **parked**
instead of failed. Nothing is in flight for a parked host: no tunnel, no SSH,
no lock, no window; only its ``client_status`` is looked at now and then, by
a :class:`Watcher` on one background thread, at a low share of the API rate
(:meth:`deployer.ratelimit.RateLimiter.background`).

**The trust rule.** A parked host is trusted — handed back to the rollout to
be upgraded — once two looks at ``client_status`` said online, the second
more than ``offline_detection`` after the first (:meth:`WaitPolicy.trust_gap`),
with no offline look between them. The provider calls a client online for
``offline_detection`` seconds after its last poll, so one poll — a client that
started, polled once and died, a blip — can never pass two looks further
apart than that: the client polled again in between, so it has been up for
a while. A look that fails (a network error) tells nothing and changes no
streak; an offline look ends the streak.

**The schedule.** An untrusted host is looked at every
:meth:`WaitPolicy.look_interval` seconds (or less often: every look waits for
its background slot, so with many parked hosts the share of the rate is what
bounds the looks, and hosts take turns by due time). After a first online
look, the confirming look is due ``trust_gap`` later, and confirming looks go
before first looks.

Everything here is pure bookkeeping with an explicit ``now`` (the caller's
clock), thread-safe, and tested without threads; :class:`Watcher` is the
only part that calls out, through the ``look`` it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from deployer.clock import Clock

log = logging.getLogger("deployer.parking")

WAIT_STEP = "wait"  # the step name of a parked host's wait (journal, report, live view)


@dataclass(frozen=True)
class WaitPolicy:
    """How parked hosts are watched and trusted (data, not code)."""

    share: float = 0.1  # at most this share of the API rate goes to watching
    look_every: float | None = None  # seconds between looks at one host; None: below
    look_fraction: float = 1 / 3  # ... offline_detection × this,
    min_look_every: float = 1.0  # ... but not more often than this
    trust_factor: float = 1.1  # the confirming look: offline_detection × this later,
    trust_margin: float = 0.5  # ... and at least offline_detection + this
    fresh: float = 2.0  # an online look this recent stands for the preflight's own
    attempts: int = 3  # upgrades of one host whose client vanished before anything changed
    idle: float = 0.5  # seconds the watcher sleeps at most when nothing is due

    def trust_gap(self, offline_detection: float) -> float:
        """Seconds between the two online looks that make a host trusted."""
        return max(offline_detection * self.trust_factor, offline_detection + self.trust_margin)

    def look_interval(self, offline_detection: float) -> float:
        """Seconds between looks at one untrusted host."""
        if self.look_every is not None:
            return self.look_every
        return max(self.min_look_every, offline_detection * self.look_fraction)


@dataclass
class ParkedHost:
    """One parked host's watch record (times on the caller's clock)."""

    index: int  # the host's position in the rollout
    name: str
    since: float  # when it was first parked in this run
    next_look: float
    online_since: float | None = None  # the first online look of the current streak
    last_online: float | None = None  # the newest online look
    looks: int = 0  # looks made while parked (the watcher's and the rollout's)
    trusted: bool = False
    trusted_at: float | None = None  # when it became ready (then it waits for a slot)

    def fresh(self, now: float, policy: WaitPolicy) -> bool:
        """Was it seen online recently enough to skip a look before the upgrade?"""
        return self.last_online is not None and now - self.last_online <= policy.fresh


class Parking:
    """The parked hosts of one rollout and the trust rule; thread-safe."""

    def __init__(self, offline_detection: float, policy: WaitPolicy | None = None):
        self.policy = policy or WaitPolicy()
        self.offline_detection = offline_detection
        self.gap = self.policy.trust_gap(offline_detection)
        self.interval = self.policy.look_interval(offline_detection)
        self._lock = threading.Lock()
        self._parked: dict[int, ParkedHost] = {}
        self._left: dict[int, ParkedHost] = {}  # taken out; a re-park continues its record

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    def __contains__(self, index: object) -> bool:
        with self._lock:
            return index in self._parked

    def park(self, index: int, name: str, now: float) -> ParkedHost:
        """Park a host (again: its record goes on, its online streak starts over)."""
        with self._lock:
            entry = self._left.pop(index, None) or ParkedHost(index, name, since=now, next_look=now)
            entry.trusted = False
            entry.trusted_at = None
            entry.online_since = None
            entry.next_look = now + self.interval
            self._parked[index] = entry
            return entry

    def due(self, now: float) -> ParkedHost | None:
        """The untrusted host to look at now, or None: confirming looks first,
        then the one that has waited longest for its look."""
        with self._lock:
            waiting = [e for e in self._parked.values() if not e.trusted and e.next_look <= now]
        if not waiting:
            return None
        return min(waiting, key=lambda e: (e.online_since is None, e.next_look, e.index))

    def next_due(self) -> float | None:
        """When the next look is due (None: nothing to look at)."""
        with self._lock:
            times = [e.next_look for e in self._parked.values() if not e.trusted]
        return min(times) if times else None

    def record(self, index: int, online: bool | None, now: float) -> bool:
        """Record a look (None: no answer); True if the host is trusted now."""
        with self._lock:
            entry = self._parked.get(index)
            if entry is None or entry.trusted:
                return False
            entry.looks += 1
            if online is None:
                entry.next_look = now + self.interval
            elif not online:
                entry.online_since = None
                entry.next_look = now + self.interval
            else:
                entry.last_online = now
                if entry.online_since is None:
                    entry.online_since = now
                if now - entry.online_since >= self.gap:
                    entry.trusted = True
                    entry.trusted_at = now
                else:
                    entry.next_look = entry.online_since + self.gap
            return entry.trusted

    def hand_over(self, index: int) -> None:
        """Make a host ready without trust (its look failed in a way only the
        upgrade can report, e.g. the client is blocked): the rollout looks again."""
        with self._lock:
            entry = self._parked.get(index)
            if entry is not None:
                entry.trusted = True
                entry.trusted_at = None
                entry.last_online = None

    def take_ready(self) -> ParkedHost | None:
        """Take out the trusted host that comes first in the rollout, if any."""
        with self._lock:
            ready = [e for e in self._parked.values() if e.trusted]
            if not ready:
                return None
            entry = min(ready, key=lambda e: e.index)
            self._left[entry.index] = self._parked.pop(entry.index)
            return entry

    def take(self, index: int) -> ParkedHost:
        """Take out one parked host (KeyError if it is not parked)."""
        with self._lock:
            entry = self._parked.pop(index)
            self._left[index] = entry
            return entry

    def take_waiting(self) -> list[ParkedHost]:
        """Take out every host not trusted yet (the wait is over for them)."""
        with self._lock:
            out = sorted((e for e in self._parked.values() if not e.trusted), key=lambda e: e.index)
            for entry in out:
                self._left[entry.index] = self._parked.pop(entry.index)
            return out

    def take_all(self) -> list[ParkedHost]:
        """Take out every parked host (the rollout stopped)."""
        with self._lock:
            out = sorted(self._parked.values(), key=lambda e: e.index)
            self._left.update(self._parked)
            self._parked.clear()
            return out

    def indexes(self) -> set[int]:
        with self._lock:
            return set(self._parked)

    def record_of(self, index: int) -> ParkedHost | None:
        """The watch record of a host parked now or earlier in this run."""
        with self._lock:
            return self._parked.get(index) or self._left.get(index)


Look = Callable[[int], "bool | None"]  # a host's client_status by index; None: no answer


class Watcher:
    """Looks at due parked hosts, one at a time, until ``halt`` is set.

    ``look(index)`` answers True/False, None when it could not tell (a
    transient error), or raises for an error that only the host's upgrade can
    report (the host is then handed over). ``on_ready`` is called whenever a
    host becomes ready.
    """

    def __init__(
        self,
        parking: Parking,
        look: Look,
        clock: Clock,
        on_ready: Callable[[], None],
        halt: threading.Event,
    ):
        self.parking = parking
        self.look = look
        self.clock = clock
        self.on_ready = on_ready
        self.halt = halt
        self.looks = 0
        self._thread: threading.Thread | None = None

    def step(self) -> float:
        """Make the look that is due, if any; return seconds until the next one."""
        entry = self.parking.due(self.clock.now())
        if entry is not None:
            self._look_at(entry)
        due = self.parking.next_due()
        if due is None:
            return self.parking.policy.idle
        return min(max(due - self.clock.now(), 0.0), self.parking.policy.idle)

    def _look_at(self, entry: ParkedHost) -> None:
        self.looks += 1
        try:
            online = self.look(entry.index)
        except Exception as exc:  # noqa: BLE001 - the upgrade reports it properly
            log.info("%s: client_status failed while parked (%s): handing it over", entry.name, exc)
            self.parking.hand_over(entry.index)
            self.on_ready()
            return
        if self.parking.record(entry.index, online, self.clock.now()):
            log.info("%s: client online long enough to trust", entry.name)
            self.on_ready()

    def run(self) -> None:
        while not self.halt.is_set():
            wait = self.step()
            if wait > 0 and self.clock.sleep(wait, self.halt):
                break

    def start(self) -> None:
        """Run in a daemon thread: a look in flight never holds the process up."""
        self._thread = threading.Thread(target=self.run, name="deployer-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self.halt.set()
        if self._thread is not None:
            self._thread.join(timeout)
