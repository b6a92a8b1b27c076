"""Host events: how the workflow tells the world what it is doing.

The workflow calls an :class:`EventSink` synchronously; sinks are the
progress display, the plain CI log and the journal (which must have
written a step's ``begin`` before the step acts). :class:`Fanout` sends one
event to several sinks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployer.result import HostResult, StepStatus


class EventSink:
    """Base sink: every hook is a no-op; override what you need."""

    def run_started(self, run_id: str, hosts: list[str]) -> None:
        pass

    def host_started(self, host: str) -> None:
        pass

    def step_started(self, host: str, step: str, facts: dict[str, Any] | None = None) -> None:
        """Called before ``step`` acts. ``facts`` never hold credentials."""

    def step_finished(
        self,
        host: str,
        step: str,
        status: StepStatus,
        seconds: float,
        facts: dict[str, Any] | None = None,
    ) -> None:
        """Called after ``step`` ends, with how it ended."""

    def host_finished(self, result: HostResult) -> None:
        pass

    def run_finished(self, run_id: str) -> None:
        pass

    def message(self, host: str | None, text: str) -> None:
        """A free-form notice (a retry, a back-off, a lock wait)."""


class Fanout(EventSink):
    """One event to every sink given; a None sink (one that is not there, such
    as the journal of a dry run) is left out."""

    def __init__(self, *sinks: EventSink | None):
        self.sinks = [s for s in sinks if s is not None]

    def run_started(self, run_id, hosts):
        for s in self.sinks:
            s.run_started(run_id, hosts)

    def host_started(self, host):
        for s in self.sinks:
            s.host_started(host)

    def step_started(self, host, step, facts=None):
        for s in self.sinks:
            s.step_started(host, step, facts)

    def step_finished(self, host, step, status, seconds, facts=None):
        for s in self.sinks:
            s.step_finished(host, step, status, seconds, facts)

    def host_finished(self, result):
        for s in self.sinks:
            s.host_finished(result)

    def run_finished(self, run_id):
        for s in self.sinks:
            s.run_finished(run_id)

    def message(self, host, text):
        for s in self.sinks:
            s.message(host, text)
