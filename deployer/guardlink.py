"""Deployer's side of the guard protocol: the one home of its words.

:mod:`deployer.guard` is the host's side; this module mirrors it. What the
two share lives here and nowhere else in deployer:

* the guard's **states** (what it writes to ``run_dir/status``, one JSON line
  each) and their groups: final, watching the new client, reverting;
* the **control files** deployer writes into the run directory
  (``go``, ``firstlife``, ``commit``, ``revert``) and its sign of life
  (``alive``);
* the guard's **configuration** and the rendered program (``CONFIG``
  injected as a literal);
* installing and starting it (armed, or ``--revert`` for a run whose guard
  is gone), reading its status, asking whether its process still runs, and
  waiting for a state.

What to do about a state (roll back, go on, regain a lost session) is the
workflow's decision (:mod:`deployer.workflow`); :class:`GuardLink` only asks
the workflow, through ``regain``, whether a lost session may be reached again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from importlib import resources
from typing import TYPE_CHECKING, Any

from deployer.clock import Clock
from deployer.errors import GuardError, SshSessionLost
from deployer.hostfiles import HostPaths
from deployer.remote import CommandResult, Remote, sh

if TYPE_CHECKING:
    import threading

    from deployer.model import Inventory
    from deployer.plan import HostPlan

# -- the guard's states, in the order it writes them ------------------------------------
ARMED = "armed"  # started before the window opens, waits for GO
RUNNING = "running"  # got GO
BACKED_UP = "backed_up"
STOPPING = "stopping"  # the old client is slow to stop: more time
STOPPED = "stopped"
SWAPPED = "swapped"
STARTED = "started"  # the new client runs
READY = "ready"  # its ready probe passed: the NEW client reached the provider
FIRST_LIFE = "first_life"  # deployer said FIRSTLIFE: the deadline tightened
COMMITTED = "committed"
REVERTING = "reverting"
RESTORED = "restored"
REVERTED = "reverted"
ABORTED = "aborted"  # gave up before changing anything (or after a failed rename)
ERROR = "error"  # the guard failed; it no longer reads its control files

FINAL_STATES = frozenset({COMMITTED, REVERTED, ABORTED})
WATCHING_STATES = frozenset({STARTED, READY, FIRST_LIFE})  # the new client runs, watched
REVERTING_STATES = frozenset({REVERTING, RESTORED, REVERTED, ABORTED, ERROR})

# -- the control files deployer writes into the run directory ---------------------------
GO = "go"  # swap now
FIRSTLIFE = "firstlife"  # the window is closed: tighten the deadline to the soak's
COMMIT = "commit"  # keep the new script
REVERT = "revert"  # undo (or, armed, give up)
ALIVE = "alive"  # deployer's sign of life, touched at each read of the status
CONTROLS = (GO, FIRSTLIFE, COMMIT, REVERT)

# -- its configuration ------------------------------------------------------------------
SOAK_MARGIN = 10.0  # seconds the guard waits past stable_for after first life,
# plus two API timeouts: the soak ends with a client_status call that may be retried
GO_DEADLINE = 60.0  # seconds an armed guard waits for the swap's go (window opening)
SILENCE_MIN = 15.0  # + 3 API timeouts: deployer unheard this long before commit is gone
REVERT_EVIDENCE_MIN = 30.0  # a restored client gets at least this long to show it polls
CONFIG_MARKER = "CONFIG = {}  # replaced per run by deployer.guardlink.render_guard"

POLL = 0.05  # seconds between looks at the guard's status while waiting on it


def guard_config(
    plan: HostPlan, inventory: Inventory, backup_path: str, *, tunnel_opened: bool = False
) -> dict[str, Any]:
    """The guard's CONFIG for this run. Holds API credentials: never log it.

    ``tunnel_opened``: deployer called ``connect`` for this run, so a guard that
    finds deployer gone also calls ``disconnect`` once the host is safe."""
    provider = inventory.provider
    return {
        "run_dir": plan.paths.run_dir,
        "script_path": plan.paths.script_path,
        "staged_path": plan.paths.staged,
        "backup_path": backup_path,
        "service": plan.service,
        "deadline": plan.guard_deadline,
        "soak_deadline": plan.stable_for + SOAK_MARGIN + 2 * provider.timeout,
        "go_deadline": go_deadline(plan),
        # deployer may be unheard while it reaches the host again after the swap
        "silence_limit": max(
            SILENCE_MIN + 3 * provider.timeout, SILENCE_MIN + provider.tunnel_timeout
        ),
        "ready": plan.service.get("ready", ""),
        "offline_detection": provider.offline_detection,
        "revert_online_wait": revert_online_wait(provider.offline_detection),
        "tunnel_opened": tunnel_opened,
        "api": {
            "url": provider.api_url,
            "timeout": provider.timeout,
            "params": {
                "user_id": provider.user_id.reveal(),
                "dbid": plan.host.dbid.reveal(),
                "host_uuid": plan.host.host_uuid.reveal(),
                "ports_id": str(plan.host.ports_id),
            },
        },
    }


def go_deadline(plan: HostPlan) -> float:
    """Seconds an armed guard waits for ``go`` before it gives up (and closes the
    window deployer may have opened)."""
    return min(plan.guard_deadline, GO_DEADLINE)


def revert_online_wait(offline_detection: float) -> float:
    """Seconds a reverting guard keeps the window open for the restored client's
    evidence (it must outlast the offline detection, see the guard)."""
    return max(REVERT_EVIDENCE_MIN, 2 * offline_detection + 10.0)


def guard_source() -> str:
    return resources.files("deployer").joinpath("guard.py").read_text(encoding="utf-8")


def render_guard(config: dict[str, Any]) -> bytes:
    """The guard program with ``config`` injected as a Python string literal."""
    source = guard_source()
    if CONFIG_MARKER not in source:
        raise RuntimeError("guard.py lost its CONFIG marker")
    literal = repr(json.dumps(config, sort_keys=True))
    return source.replace(CONFIG_MARKER, f"CONFIG = json.loads({literal})", 1).encode("utf-8")


# -- on the host --------------------------------------------------------------------------


def read_status(remote: Remote, paths: HostPaths) -> list[dict]:
    """The guard's status lines so far (an incomplete last line is ignored).

    Each read also touches ``alive``: the guard reverts early when deployer
    stops reading (it vanished), instead of waiting for its deadline."""
    alive = sh(paths.control(ALIVE))
    res = remote.run(f"touch {alive} 2>/dev/null; cat {sh(paths.status)} 2>/dev/null || true")
    return parse_status(res.stdout)


def parse_status(text: str) -> list[dict]:
    lines = []
    for raw in text.split("\n"):
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def alive_check(pid: int) -> str:
    """A host command that passes while ``pid`` is a running guard: not just
    ``kill -0`` (after a reboot the pid may be another process, and a killed
    guard may linger as a zombie)."""
    stat = f"/proc/{pid}/stat"
    return (
        f's=$(cat {stat} 2>/dev/null) && case "${{s##*) }}" in Z*|X*) exit 1;; esac '
        f"&& grep -qa guard.py /proc/{pid}/cmdline"
    )


class GuardLink:
    """Deployer's link to one run's guard on one host.

    ``remote`` returns the current session (the workflow may replace it);
    ``regain`` is called when a session is lost while talking to the guard: it
    reaches the host again (then the read or signal is tried once more) or
    raises."""

    def __init__(
        self,
        paths: HostPaths,
        python: str,
        remote: Callable[[], Remote | None],
        regain: Callable[[SshSessionLost], None],
        clock: Clock,
        host: str,
    ):
        self.paths, self.python, self.clock, self.host = paths, python, clock, host
        self._remote, self._regain = remote, regain

    @property
    def remote(self) -> Remote:
        return self._remote()

    def _again(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except SshSessionLost as lost:
            self._regain(lost)  # raises when the session may not be regained here
            return action()

    # -- installing and starting ----------------------------------------------------------

    def upload(self, program: bytes) -> None:
        """Put the rendered guard into the run directory (see :meth:`private`)."""
        self.remote.write_file(self.paths.guard, program)

    def private(self) -> str:
        """The host command that makes the uploaded guard owner-only: it holds
        the API credentials."""
        return f"chmod 0700 {sh(self.paths.guard)}"

    def _start(self, *flags: str) -> str:
        return f"cd {sh(self.paths.run_dir)} && {sh(self.python, 'guard.py', '--detach', *flags)}"

    def arm(self) -> int:
        """Start the uploaded guard detached and armed; return its pid."""
        res = self.remote.run(self._start())
        try:
            return int(res.stdout.strip().splitlines()[-1])  # --detach prints the guard's pid
        except (ValueError, IndexError):
            raise GuardError(
                f"the guard did not start: {res.stdout.strip()[:200]}", host=self.host
            ) from None

    def relaunch(self, program: bytes) -> None:
        """The run's guard is gone (host rebooted, killed): a new one only reverts."""
        self.remote.run(f"umask 077 && mkdir -p {sh(self.paths.run_dir)}")
        self.upload(program)
        self.remote.run(f"{self.private()} && {self._start('--revert')}")

    # -- talking to it ----------------------------------------------------------------------

    def signal(self, name: str, *, regain: bool = True) -> CommandResult:
        """Write control file ``name`` (idempotent: a lost session may be regained
        and the word written again)."""
        command = sh("touch", self.paths.control(name))
        if regain:
            return self._again(lambda: self.remote.run(command))
        return self.remote.run(command)

    def lines(self) -> list[dict]:
        return self._again(lambda: read_status(self.remote, self.paths))

    def last(self) -> dict[str, Any]:
        lines = self.lines()
        return lines[-1] if lines else {}

    def state(self, step: str | None = None) -> str:
        """The guard's current state; raises if it is reverting or gave up."""
        last = self.last()
        state = last.get("state", "")
        if state in REVERTING_STATES:
            raise GuardError(
                f"the guard is reverting: {last.get('reason', state)}", host=self.host, step=step
            )
        return state

    def alive(self, pid: Any) -> bool:
        """Is ``pid`` (from the guard's status) still a running guard?"""
        if not isinstance(pid, int):
            return False
        return self.remote.run(alive_check(pid), check=False).ok

    # -- waiting on it -------------------------------------------------------------------------

    def await_final(self, seconds: float, poll: float = POLL) -> str:
        """The guard's state once it is final (committed, reverted, aborted), or
        whatever it is after ``seconds``."""
        end = self.clock.now() + seconds
        state = self.last().get("state", "")
        while state not in FINAL_STATES and self.clock.now() < end:
            self.clock.sleep(poll)
            state = self.last().get("state", "")
        return state

    def await_state(
        self,
        wanted: Collection[str],
        deadline: float,
        step: str | None,
        *,
        poll: float = POLL,
        abort: threading.Event | None = None,
    ) -> bool:
        """Wait until the guard's state is one of ``wanted`` (True), or until the next
        look would pass ``deadline`` (False); raises if the guard reverts."""
        while self.state(step) not in wanted:
            if self.clock.now() + poll > deadline:
                return False
            self.clock.sleep(poll, abort)
        return True

    def await_commit(self, seconds: float) -> str:
        """After ``commit``: ``committed``, a reverting state, or "" after ``seconds``."""
        end = self.clock.now() + seconds
        while self.clock.now() < end:
            state = self.last().get("state", "")
            if state == COMMITTED or state in REVERTING_STATES:
                return state
            self.clock.sleep(POLL)
        return ""
