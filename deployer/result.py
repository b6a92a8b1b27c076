"""Results are values: a :class:`HostResult` per host, a :class:`RunResult` per run.

``RunResult.to_json()`` is the versioned report contract of docs/reference/report.md; it is
pinned by ``tests/unit/test_result_contract.py``. Rendering for humans
(table, JUnit) lives in ``deployer.report``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from deployer.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OFFLINE,
    EXIT_OK,
    EXIT_UNSAFE,
    ApiError,
)


class Outcome(str, Enum):
    UPGRADED = "upgraded"
    UNCHANGED = "unchanged"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    UNSAFE = "unsafe"
    SKIPPED = "skipped"
    PLANNED = "planned"
    OFFLINE = "offline"  # --wait-offline: the client never came online long enough to trust

    def __str__(self) -> str:
        return self.value


# The groups of results: every module that sorts results by kind imports these, so
# that the report, the exit status, the failure budget and the live view agree.
# Each result is in exactly one of the three (tests/unit/test_result_contract.py).

#: success: the run's ``ok``, exit 0, a canary wave passes, no error recorded;
#: JUnit passes them and ``deployer history`` counts them without naming hosts
SUCCESS_OUTCOMES = frozenset({Outcome.UPGRADED, Outcome.UNCHANGED, Outcome.PLANNED})
#: failure: counted against ``--max-failures``, a JUnit ``<failure>``, red on the live view
FAILURE_OUTCOMES = frozenset({Outcome.ROLLED_BACK, Outcome.FAILED, Outcome.UNSAFE})
#: not run: stopped first (``skipped``) or its client never came back (``offline``);
#: a JUnit ``<skipped>``, not counted against the failure budget
NOT_RUN_OUTCOMES = frozenset({Outcome.SKIPPED, Outcome.OFFLINE})
OUTCOME_ORDER = [o.value for o in Outcome]

#: the JSON report's ``report_version`` (docs/reference/report.md): raised by any change
#: that could break a reader which ignores unknown keys; a new key leaves it as it is
REPORT_VERSION = 1


class StepStatus(str, Enum):
    """How a step ended: the ``status`` of a host's ``steps`` in the report and of a
    step's end in the journal (docs/reference/report.md lists exactly these)."""

    OK = "ok"
    FAILED = "failed"  # it raised; or a rollback, a cleanup or a wait that did not succeed
    SKIPPED = "skipped"  # the ``wait`` step only: the run stopped while the host was parked

    def __str__(self) -> str:
        return self.value


def readable_by(mode: int | str | None) -> str | None:
    """Who besides the owner may read a file of this mode (an int, or an octal
    string like ``"0755"``): ``"group"``, ``"others"``, ``"group and others"``;
    None for an owner-only file or an unknown mode."""
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            return None
    if mode is None:
        return None
    readers = [who for who, bit in (("group", 0o040), ("others", 0o004)) if mode & bit]
    return " and ".join(readers) or None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class StepRecord:
    step: str
    status: StepStatus
    seconds: float

    def __post_init__(self) -> None:
        self.status = StepStatus(self.status)  # "ok" becomes StepStatus.OK; "undone" raises

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "status": self.status.value, "seconds": round(self.seconds, 3)}


@dataclass
class ErrorInfo:
    step: str | None
    type: str
    message: str
    api_error_code: int | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, step: str | None) -> ErrorInfo:
        code = exc.code if isinstance(exc, ApiError) else None
        message = str(exc) or type(exc).__name__
        return cls(
            step=getattr(exc, "step", None) or step,
            type=type(exc).__name__,
            message=message,
            api_error_code=code,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "type": self.type,
            "message": self.message,
            "api_error_code": self.api_error_code,
        }


@dataclass
class HostResult:
    host: str
    result: Outcome
    old_sha256: str | None = None
    new_sha256: str | None = None
    exposure_seconds: float = 0.0
    api_calls: int = 0
    duration_seconds: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    error: ErrorInfo | None = None
    diff: str | None = None  # --dry-run only; not part of the JSON contract
    waiting_seconds: float = 0.0  # --wait-offline: how long it was parked, its client offline
    installed_mode: str | None = None  # "0755": the script found at inspect; None if none

    @property
    def script_readable_by(self) -> str | None:
        """Who besides its owner could read the installed script (it holds credentials)."""
        return readable_by(self.installed_mode)

    @property
    def succeeded(self) -> bool:
        return self.result in SUCCESS_OUTCOMES

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "result": self.result.value,
            "old_sha256": self.old_sha256,
            "new_sha256": self.new_sha256,
            "exposure_seconds": round(self.exposure_seconds, 3),
            "api_calls": self.api_calls,
            "duration_seconds": round(self.duration_seconds, 3),
            "steps": [s.to_json() for s in self.steps],
            "error": self.error.to_json() if self.error else None,
            "waiting_seconds": round(self.waiting_seconds, 3),
            "installed_mode": self.installed_mode,
        }


@dataclass
class RunResult:
    run_id: str
    started: float
    finished: float | None = None
    hosts: list[HostResult] = field(default_factory=list)
    interrupted: bool = False

    def summary(self) -> dict[str, int]:
        counts = {name: 0 for name in OUTCOME_ORDER}
        for h in self.hosts:
            counts[h.result.value] += 1
        return counts

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(h.succeeded for h in self.hosts)

    @property
    def succeeded(self) -> list[HostResult]:
        return [h for h in self.hosts if h.succeeded]

    @property
    def failed(self) -> list[HostResult]:
        return [h for h in self.hosts if not h.succeeded]

    def exit_code(self) -> int:
        if any(h.result is Outcome.UNSAFE for h in self.hosts):
            return EXIT_UNSAFE
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.ok:
            return EXIT_OK
        if all(h.succeeded or h.result is Outcome.OFFLINE for h in self.hosts):
            return EXIT_OFFLINE  # only hosts that never came online are left: re-run later
        return EXIT_FAILED

    def to_json(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "run_id": self.run_id,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "ok": self.ok,
            "hosts": [h.to_json() for h in self.hosts],
            "summary": self.summary(),
        }
