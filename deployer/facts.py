"""A host's facts in a run: what the journal knows of it, one name per fact.

The workflow writes a fact *before* the action it describes (the tunnel, the
lock, the staged files, the window, the swap, the commit), the rollout writes
a ``--wait-offline`` wait's, and the host's result adds its totals. The
journal merges them per (run, host), latest first, into one JSON object whose
keys are the field names of :class:`HostFacts`; ``deployer recover`` reads
them back as a :class:`HostFacts` to know what a vanished run may have left.

Writers say which facts they write with :func:`known` (mypy checks the names
and the types against :class:`HostFacts`); only what they name is stored, and
merged over what was there. Readers get every field, with its default where
nothing was written. docs/reference/journal.md lists the facts (a unit test
holds that list to the fields).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NewType, ParamSpec

P = ParamSpec("P")

#: some facts, named by :func:`known`: a JSON object to merge into the journal
Facts = NewType("Facts", dict[str, Any])


@dataclass(frozen=True, kw_only=True)
class HostFacts:
    """What the journal knows of one host in one run (docs/reference/journal.md)."""

    # where the run's files are on the host (written before the tunnel opens)
    script_path: str | None = None
    run_dir: str | None = None
    lock_path: str | None = None
    # what the run may have left on the host or with the provider
    tunnel_opened: bool = False
    lock_maybe_held: bool = False
    old_sha256: str | None = None
    new_sha256: str | None = None
    staged: bool = False
    backup_path: str | None = None
    guard_armed: bool = False
    window_maybe_open: bool = False
    swap_started: bool = False
    commit_requested: bool = False
    committed: bool = False
    # a --wait-offline wait
    waiting: bool = False
    wait_deadline: float | None = None
    looks: int | None = None
    queued_seconds: float | None = None
    picked_up_by: str | None = None
    # the host's result
    exposure_seconds: float | None = None
    api_calls: int | None = None
    duration_seconds: float | None = None
    waiting_seconds: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HostFacts:
        """The facts in a journal's JSON object (anything else in it is ignored)."""
        return cls(**{name: data[name] for name in FACT_NAMES if name in data})

    def left_on_host(self) -> bool:
        """May the run have left something on the host (or a tunnel to it)?"""
        return any(
            (
                self.tunnel_opened,
                self.lock_maybe_held,
                self.staged,
                self.guard_armed,
                self.window_maybe_open,
                self.swap_started,
                self.committed,
            )
        )


FACT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(HostFacts))


def _signature_of(
    record: Callable[P, object],
) -> Callable[[Callable[..., Facts]], Callable[P, Facts]]:
    """Give a ``**kwargs`` function the keyword parameters of ``record``, for mypy."""

    def typed(function: Callable[..., Facts]) -> Callable[P, Facts]:
        return function

    return typed


@_signature_of(HostFacts)
def known(**facts: Any) -> Facts:
    """The facts named, to merge into the journal: ``known(swap_started=True)``.

    The names and types are :class:`HostFacts`'s fields (a name that is not one
    is a TypeError here too); a fact not named is left as the journal has it.
    """
    HostFacts(**facts)
    return Facts(dict(facts))
