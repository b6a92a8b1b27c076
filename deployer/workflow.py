"""The staged upgrade of one host (docs/explanation/stages.md), as named steps.

:class:`HostRun` walks the stages in order. Each stage is a method named
after it; what must be undone is kept as plain facts on the run (tunnel
opened, lock held, window maybe open, swap started, committed) and written
to the journal *before* the action, so both :meth:`HostRun._unwind` here and
``deployer recover`` after a crash know what is dangling.

Unwinding, in one place:

* before the swap: close the window if it may be open, remove the staged
  files -> ``failed`` (nothing changed);
* after the swap started, before commit: the guard reverts (deployer asks
  it, or it decides itself), deployer waits for the old client online, closes
  the window and checks the old script is back -> ``rolled_back``;
* whatever cannot be verified -> ``unsafe`` (the lock stays, for recover).
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployer.clock import Clock
from deployer.errors import (
    ApiError,
    ClientOffline,
    DeployerError,
    GuardError,
    Interrupted,
    RemoteCommandError,
    RemoteError,
    SshConnectError,
    SshSessionLost,
    TunnelNotUp,
    VerifyError,
)
from deployer.events import EventSink
from deployer.facts import Facts, HostFacts, known
from deployer.guard import SLOW_STOP_WAIT, STOP_WAIT
from deployer.guardlink import (
    ABORTED,
    COMMIT,
    COMMITTED,
    ERROR,
    FINAL_STATES,
    FIRSTLIFE,
    GO,
    READY,
    REVERT,
    REVERTED,
    REVERTING_STATES,
    WATCHING_STATES,
    GuardLink,
    Inspection,
    go_deadline,
    guard_config,
    render_guard,
    revert_online_wait,
    soak_deadline,
)
from deployer.hostfiles import (
    list_backups,
    lock_held,
    lock_owner,
    loose_mode_warning,
    read_file,
    read_lock,
    remote_sha256,
)
from deployer.model import HostConfig, Inventory
from deployer.plan import HostPlan
from deployer.remote import CommandResult, Remote, sh, sha256_hex
from deployer.result import (
    SUCCESS_OUTCOMES,
    ErrorInfo,
    HostResult,
    Outcome,
    StepRecord,
    StepStatus,
)
from deployer.retry import HARD_RETRY
from deployer.secrets import scrub

log = logging.getLogger("deployer.workflow")

EVIDENCE_POLL = 0.25  # seconds between looks at the guard while waiting out offline detection
SSH_RETRY = (0.25, 1.5, 0.5)  # reaching a host while its tunnel comes up: first delay, factor, cap
# (a try that is refused costs one connect(), so the cap is low: a tunnel that
# comes up is used within 0.5 s)
OPEN_MARGIN = 2.0  # seconds opening the window ends before the armed guard's go deadline
# (the guard starts after deployer notes armed_at: this only covers its own look interval)
# the guard's stop of the old client: SIGTERM wait, SIGKILL wait, the slow-stop wait, margin
SWAP_WAIT = STOP_WAIT + 3.0 + SLOW_STOP_WAIT + 10.0
STATUS_BACKOFF = (0.2, 1.5, 1.0)  # client_status polling: first delay, factor, cap
SOAK_LOOK = 1.0  # longest wait on the guard's stream in the soak (a line wakes deployer at once)
COMMIT_WAIT = 15.0  # seconds for the guard to confirm a commit
COMMIT_MARGIN = 3.0  # seconds left of the guard's soak deadline for the commit's round trip
REVERT_WAIT = 60.0  # seconds for the guard to stop, restore and restart, past its evidence wait
DISARM_WAIT = 10.0  # seconds for an armed guard to give up when asked
CLEANUP_REATTACH = 30.0  # seconds cleanup tries to reach a host again to release its lock
REATTACH_EVERY = 2.0  # seconds between attempts to reach a host again
REATTACH_MARGIN = 60.0  # past the guard's deadline, give up reaching the host

# Where a lost session is expected and is regained to go on (the old client's stop
# may end the tunnel it rode on). Later, with the window closed, a lost session
# means the new client's tunnel was cut: that rolls back.
SWAP_STEPS = {"swap", "first_life", "close_window"}


@dataclass(frozen=True)
class UpgradeOptions:
    command: str = "upgrade"  # upgrade | rollback
    force: bool = False
    dry_run: bool = False
    break_lock: bool = False


@dataclass
class RunContext:
    """What every host of a run shares. Passed down explicitly; no globals."""

    run_id: str
    inventory: Inventory
    api: Any  # deployer.api.ProviderAPI (or a fake with the same methods)
    remote_factory: Callable[[HostConfig], Remote]
    options: UpgradeOptions = field(default_factory=UpgradeOptions)
    events: EventSink = field(default_factory=EventSink)
    journal: Any = None  # deployer.journal.Journal | None
    clock: Clock = field(default_factory=Clock)
    owner: str = "deployer"


class HostRun:
    """One host through the stages; :meth:`execute` never raises."""

    def __init__(self, ctx: RunContext, plan: HostPlan, abort: threading.Event | None = None):
        self.ctx, self.plan, self.host = ctx, plan, plan.host
        self.api, self.clock, self.paths = ctx.api, ctx.clock, plan.paths
        self.abort = abort or threading.Event()
        self.steps: list[StepRecord] = []
        self.step_name: str | None = None
        self.remote: Remote | None = None
        self.script, self.new_sha256 = plan.script, plan.sha256
        self.old_sha256: str | None = None
        self.installed_mode: str | None = None  # of the script found at inspect, "0755"
        self.diff: str | None = None
        self.tunnel_opened = self.locked = self.swap_started = self.committed = False
        self.window_open_since: float | None = None
        self.firstlife_at: float | None = None  # monotonic: deployer said firstlife
        self.exposure = 0.0
        self.swap_at = 0.0
        self.guard_armed = False
        self.keep_lock = False  # an undisarmed guard: the lock stays, recover finishes
        self.unwinding = False  # rolling back or cleaning up: an abort no longer cuts waits short
        self.armed_at: float | None = None  # when the guard was started armed (deployer's clock)
        self.guard_pid: int | None = None  # as staging answered it
        self.commit_requested = False  # `commit` was written: a revert must not race it
        self.tunnel_ours = False  # we held the host lock: no other run can ride on the tunnel
        self.journal_failed = False  # a journal or event sink write failed while unwinding
        self.backup_path: str | None = None
        self.inspected: Inspection | None = None  # what the lock stage found on the host
        self.guard = GuardLink(
            self.paths,
            self.host.python,
            remote=lambda: self.remote,
            regain=self._regain_for_guard,
            clock=self.clock,
            host=self.host.name,
            mask=lambda text: scrub(text, self.ctx.inventory.secret_values()),
        )

    # -- the run ------------------------------------------------------------------

    def execute(self) -> HostResult:
        return self._run(self._forward)

    def resume(self, facts: HostFacts) -> HostResult:
        """``deployer recover``: finish a host that a vanished deployer left behind,
        from the facts it journalled before each action."""
        self.swap_started = facts.swap_started
        self.committed = facts.committed
        self.commit_requested = facts.commit_requested
        self.tunnel_opened = facts.tunnel_opened
        # a lock that may be held is the run's: recover holds it in the run's name
        self.locked = self.tunnel_ours = facts.lock_maybe_held
        self.guard_armed = facts.guard_armed
        self.old_sha256 = facts.old_sha256
        self.new_sha256 = facts.new_sha256
        self.backup_path = facts.backup_path
        self.swap_at = self.clock.now()  # unknown: allow the guard its whole deadline
        if facts.window_maybe_open:
            self.window_open_since = self.clock.now()
        return self._run(lambda: self._step("recover", self._recover))

    def _run(self, body: Callable[[], Outcome]) -> HostResult:
        started = self.clock.now()
        error = None
        try:
            self._event("host_started", self.host.name)
            outcome = body()
        except BaseException as exc:  # noqa: BLE001 - Ctrl-C too: unwind, then report
            error = ErrorInfo.from_exception(exc, self.step_name)
            error.message = scrub(error.message, self.ctx.inventory.secret_values())
            if not isinstance(exc, DeployerError):
                log.debug("%s: unexpected error", self.host.name, exc_info=True)
            outcome = self._unwind()
        outcome = self._cleanup(outcome)
        result = HostResult(
            host=self.host.name,
            result=outcome,
            old_sha256=self.old_sha256,
            new_sha256=self.new_sha256,
            exposure_seconds=self.exposure,
            api_calls=self.api.calls_for(self.host.name),
            duration_seconds=self.clock.now() - started,
            steps=self.steps,
            error=None if outcome in SUCCESS_OUTCOMES else error,
            diff=self.diff,
            installed_mode=self.installed_mode,
        )
        self._event("host_finished", result)
        return result

    def _forward(self) -> Outcome:
        dry = self.ctx.options.dry_run
        self._step("preflight", self._preflight)
        self._step("tunnel", self._open_tunnel)
        self._step("ssh", self._open_ssh)
        if not dry:
            self._step("lock", self._lock)
        if not self._step("inspect", self._inspect):
            return Outcome.UNCHANGED
        if dry:
            return Outcome.PLANNED
        self._step("stage", self._stage)
        self._step("open_window", self._open_window)
        self._step("swap", self._swap)
        self._step("first_life", self._first_life)
        self._step("close_window", self._close_window)
        self._step("soak", self._soak)
        self._step("commit", self._commit)
        return Outcome.UPGRADED

    def _step(self, name: str, action: Callable[[], Any]) -> Any:
        if self.abort.is_set():
            raise Interrupted("interrupted: rolling back", host=self.host.name, step=name)
        self.step_name = name
        self._event("step_started", self.host.name, name)
        t0 = self.clock.now()
        try:
            value = action()
        except BaseException:
            self._record(name, StepStatus.FAILED, t0)
            raise
        self._record(name, StepStatus.OK, t0)
        return value

    def _record(self, name: str, status: StepStatus, t0: float) -> None:
        seconds = self.clock.now() - t0
        self.steps.append(StepRecord(name, status, seconds))
        self._event("step_finished", self.host.name, name, status, seconds)

    def _note(self, facts: Facts) -> None:
        """Journal what a later recover must know, before the action it describes.

        Going forward, a journal that cannot write stops the run before the
        action (which is then unwound). While unwinding, it must not stop the
        undo: the host's safety never depends on the journal."""
        if self.ctx.journal is None:
            return
        try:
            self.ctx.journal.update_host(self.ctx.run_id, self.host.name, **facts)
        except Exception as exc:  # noqa: BLE001 - disk full, read-only, locked: all alike
            if not self.unwinding:
                raise
            self._journal_lost(exc)

    def _event(self, name: str, *args: Any) -> None:
        """Tell the event sinks (live view, journal); while unwinding, a sink that
        fails is reported and the undo goes on."""
        try:
            getattr(self.ctx.events, name)(*args)
        except Exception as exc:  # noqa: BLE001 - a broken sink must not stop the undo
            if not self.unwinding:
                raise
            if name != "message":
                self._journal_lost(exc)

    def _journal_lost(self, exc: Exception) -> None:
        if self.journal_failed:
            return
        self.journal_failed = True
        log.warning("%s: journal/events failed while unwinding: %s", self.host.name, exc)
        self._message(
            f"the journal could not record the end of this host ({type(exc).__name__}); "
            "its facts may be stale: `deployer recover` may revisit it"
        )

    def _check_abort(self) -> None:
        if self.abort.is_set():
            raise Interrupted("interrupted: rolling back", host=self.host.name, step=self.step_name)

    # -- forward stages ---------------------------------------------------------------

    def _preflight(self) -> None:
        if not self.api.client_status(self.host):
            raise ClientOffline(
                f"client is offline: no tunnel can reach {self.host.name}; "
                "bring its client online first",
                host=self.host.name,
                step="preflight",
            )

    def _open_tunnel(self) -> None:
        self._note(
            known(
                tunnel_opened=True,
                script_path=self.paths.script_path,
                run_dir=self.paths.run_dir,
                lock_path=self.paths.lock,
            )
        )
        self.tunnel_opened = True
        self.api.connect(self.host)

    def _open_ssh(self) -> None:
        self.remote = self._reach(self.ctx.inventory.provider.tunnel_timeout)
        self._warn_kill_mode()

    def _warn_kill_mode(self) -> None:
        """systemd's default KillMode ends every process of the unit on stop, the
        client's detached tunnel too, and with it this session (docs/how-to/services.md)."""
        svc = self.host.service
        if svc.kind != "systemd":
            return
        show = sh("systemctl", "show", "-p", "KillMode", "--value", svc.unit)
        res = self._session().run(show, check=False)
        mode = res.stdout.strip()
        if res.ok and mode in ("control-group", "mixed"):
            self._message(
                f"unit {svc.unit} has KillMode={mode}: its stop also ends the client's "
                "tunnel and this SSH session; deployer will reach the host again through "
                "the new client's tunnel. Set KillMode=process to keep the tunnel"
            )

    def _reach(self, within: float) -> Remote:
        """SSH to the host through its tunnel, retrying while the tunnel comes up.

        ``connect`` takes effect at the client's next poll: the client then starts
        its ``ssh -R``, so for a poll interval plus a handshake nothing answers at
        the tunnel's port (refused, reset). Other SSH errors are not retried."""
        end = self.clock.now() + within
        first, factor, cap = SSH_RETRY
        delay = first
        while True:
            try:
                return self.ctx.remote_factory(self.host)
            except TunnelNotUp as exc:
                if self.clock.now() + delay > end:
                    raise TunnelNotUp(
                        f"{exc}; no tunnel within tunnel_timeout ({within:g}s): is the client "
                        "polling the provider, and can it reach the forwarding server?",
                        host=self.host.name,
                        step=self.step_name,
                    ) from None
            if self.unwinding:  # Ctrl-C must not cut short reaching a host to undo it
                self.clock.sleep(delay)
            else:
                self.clock.sleep(delay, self.abort)
                self._check_abort()
            delay = min(delay * factor, cap)

    def _session(self) -> Remote:
        """The open SSH session; SshConnectError if there is none (never reached,
        or closed after a loss that was not regained)."""
        if self.remote is None:
            raise SshConnectError("SSH session is not open", host=self.host.name)
        return self.remote

    def _regain(self) -> None:
        """The session died after the swap: the old client's stop ended the tunnel
        process it rode on (systemd's default KillMode kills the whole cgroup).
        The new client opens a tunnel at its first poll: reach the host through it."""
        if self.remote is not None:
            self.remote.close()
        self.remote = None
        self._message("SSH session lost at the swap; reaching the host through the new tunnel")
        self.remote = self._reach(self.ctx.inventory.provider.tunnel_timeout)

    def _on_host(self, command: str, **kwargs: Any) -> CommandResult:
        """Run an idempotent command; during the swap, reach the host again once
        if the session was lost under it."""
        try:
            return self._session().run(command, **kwargs)
        except SshSessionLost:
            if self.step_name not in SWAP_STEPS:
                raise
            self._regain()
            return self._session().run(command, **kwargs)

    def _lock(self) -> None:
        """Take the host lock and, in the same round trip, look at the installed
        script (for the inspect stage)."""
        self._note(known(lock_maybe_held=True))
        now = self.clock.wall()
        found = self.guard.inspect(
            owner=lock_owner(self.paths, self.ctx.owner, now),
            break_lock=self.ctx.options.break_lock,
        )
        if found.lock == "held":
            self._leave_tunnel_to_the_lock_holder()
            raise lock_held(self.paths, found.held_by, now, self.host.name)
        if found.lock == "error":
            raise RemoteCommandError(
                f"cannot create the host lock {self.paths.lock}: {found.error[:200]}",
                host=self.host.name,
            )
        self.locked = self.tunnel_ours = True
        self.inspected = found

    def _inspect(self) -> bool:
        """True if there is something to install. Warns (without failing the host)
        when group or others can read the installed script: it holds credentials."""
        path = self.paths.script_path
        found = self.inspected or self.guard.inspect()  # the lock stage looked already
        self.old_sha256, self.installed_mode = found.sha256, found.mode
        warning = loose_mode_warning(path, self.installed_mode, self.host.mode)
        if warning:
            self._message(warning)
        if self.ctx.options.command == "rollback":
            self._pick_backup()
        self._note(known(old_sha256=self.old_sha256, new_sha256=self.new_sha256))
        if self.ctx.options.dry_run:
            if read_lock(self._session(), self.paths) is not None:
                self._leave_tunnel_to_the_lock_holder()  # a run is in progress there
            else:
                self.tunnel_ours = True  # no run holds the host: nobody else rides on it
            self.diff = self._diff()
            return self.old_sha256 != self.new_sha256 or self.ctx.options.force
        return self.old_sha256 != self.new_sha256 or self.ctx.options.force

    def _pick_backup(self) -> None:
        """rollback: the newest backup that differs from the installed script."""
        for path in reversed(list_backups(self._session(), self.paths)):
            data = read_file(self._session(), path)
            if sha256_hex(data) != self.old_sha256:
                self.script, self.new_sha256 = data, sha256_hex(data)
                return
        raise VerifyError(
            f"no backup of {self.paths.script_path} differs from the installed "
            "script: nothing to roll back to",
            host=self.host.name,
            step="inspect",
        )

    def _diff(self) -> str:
        old = b"" if self.old_sha256 is None else read_file(self._session(), self.paths.script_path)
        old_text = old.decode("utf-8", "replace") if old else ""
        new_text = (self.script or b"").decode("utf-8", "replace")
        lines = difflib.unified_diff(
            old_text.splitlines(keepends=True),
            new_text.splitlines(keepends=True),
            fromfile=f"{self.host.name}:{self.paths.script_path} (installed)",
            tofile=f"{self.host.name}:{self.paths.script_path} (new)",
        )
        return scrub("".join(lines), self.ctx.inventory.secret_values())

    def _stage(self) -> None:
        """One round trip: the new script and the guard go on one channel's stdin;
        the host writes them, sets their modes, checks both sha256, runs
        ``validate`` and starts the guard armed; the channel stays open as the
        guard's stream."""
        p = self.paths
        self.backup_path = backup = p.backup_for(self.old_sha256, self.clock.wall())
        guard = self._guard_program(backup)
        # the same channel may start the guard: journal it as armed before it opens
        self._note(known(staged=True, backup_path=backup, guard_armed=True))
        self.guard_armed = True
        self.armed_at = self.clock.now()  # before the guard starts its go deadline
        assert self.script is not None  # rendered at plan, or the backup picked at inspect
        self.guard_pid = self.guard.stage(
            self.script,
            guard,
            mode=self.host.mode,
            validate=self.plan.validate,
            # with sudo the host writes as root: give the staged file the script's owner
            owner_of=p.script_path if self.host.sudo else None,
        )

    def _guard_program(self, backup: str) -> bytes:
        """This run's guard, rendered with its config (which holds credentials)."""
        config = guard_config(
            self.plan, self.ctx.inventory, backup, tunnel_opened=self.tunnel_opened
        )
        return render_guard(config)

    def _open_window(self) -> None:
        """Open the window; while an armed guard waits for ``go``, the call must be
        over (no slot, retry or request left that could land later) before that
        guard gives up, or a window could open that nothing on the host closes."""
        within = None
        if self.armed_at is not None and not self.swap_started:
            within = self.armed_at + go_deadline(self.plan) - OPEN_MARGIN - self.clock.now()
        self._note(known(window_maybe_open=True))
        self.window_open_since = self.clock.now()
        self.api.set_allow_clientless(self.host, True, within=within)

    def _swap(self) -> None:
        self._note(known(swap_started=True))
        self.swap_started = True
        self.swap_at = self.clock.now()
        self.guard.signal(GO)

    def _first_life(self) -> None:
        """Wait for evidence that the NEW client reached the provider after the swap.

        ``client_status`` alone proves nothing at first: it still reports the old
        client's last poll. Evidence is the service's ``ready`` probe, which the
        guard runs and reports as ``ready``; without a probe, ``client_status``
        online once ``offline_detection`` has passed since the guard started the
        new client (so the old client's polls have aged out). Until then the
        window stays open: a new client that never reaches the provider must not
        have its tunnel cut."""
        self._await_started()
        if self.plan.service.get("ready"):
            self._await_ready()
        else:
            self._await_fresh_online()

    def _await_started(self) -> None:
        """The guard stops the old client (a slow stop gets more time), swaps and
        starts the new one; online_timeout counts from that start."""
        deadline = self.clock.now() + SWAP_WAIT
        if not self.guard.await_state(WATCHING_STATES, deadline, self.step_name, abort=self.abort):
            self._timed_out("started by the guard", SWAP_WAIT)

    def _await_ready(self) -> None:
        deadline = self.clock.now() + self.plan.online_timeout
        if not self.guard.await_state({READY}, deadline, self.step_name, abort=self.abort):
            self._timed_out("ready (the service's ready probe never passed)")

    def _await_fresh_online(self) -> None:
        deadline = self.clock.now() + self.plan.online_timeout
        aged = self.clock.now() + self.ctx.inventory.provider.offline_detection
        deadline = max(deadline, aged + self.plan.online_timeout)
        first, factor, cap = STATUS_BACKOFF
        delay = first
        while True:
            if self.clock.now() < aged:
                self.guard.state(self.step_name, fresh=False)  # a new client that dies is reverted
                self._wait(deadline, min(EVIDENCE_POLL, aged - self.clock.now()), "online")
                continue
            if self.api.client_status(self.host):
                return
            self.guard.state(self.step_name, fresh=False)
            self._wait(deadline, delay, "online")
            delay = min(delay * factor, cap)

    def _wait(self, deadline: float, delay: float, what: str, limit: float | None = None) -> None:
        if self.clock.now() + delay > deadline:
            self._timed_out(what, limit)
        self.clock.sleep(delay, self.abort)

    def _timed_out(self, what: str, limit: float | None = None) -> None:
        within = f"{limit:g}s" if limit else f"online_timeout ({self.plan.online_timeout:g}s)"
        raise ClientOffline(
            f"new client not {what} within {within}", host=self.host.name, step=self.step_name
        )

    def _close_window(self) -> None:
        self._shut_window()
        self.firstlife_at = self.clock.now()  # the guard's soak deadline counts from here
        self.guard.signal(FIRSTLIFE)

    def _shut_window(self) -> None:
        # retried hard through an outage: heard by the guard meanwhile, or after its
        # silence limit it takes deployer for gone and cuts the tunnel under it
        self.api.set_allow_clientless(
            self.host, False, retry=HARD_RETRY, idle=self.guard.idle_heard
        )
        if self.window_open_since is not None:
            self.exposure += self.clock.now() - self.window_open_since
        self.window_open_since = None
        self._note(known(window_maybe_open=False))

    def _soak(self) -> None:
        end = self.clock.now() + self.plan.stable_for
        while (left := end - self.clock.now()) > 0:
            self._check_abort()
            state = self.guard.state(self.step_name, fresh=False)
            if state not in WATCHING_STATES:
                raise GuardError(
                    f"the guard stopped watching (state {state!r})", host=self.host.name
                )
            self.guard.follow(min(SOAK_LOOK, left), self.abort)
        self._check_abort()
        if self.plan.health:
            res = self._on_host(self.plan.health, check=False)
            if not res.ok:  # masked before it is cut: a cut must not leave part of an id
                tail = scrub(res.stderr or res.stdout, self.ctx.inventory.secret_values())
                raise VerifyError(
                    f"health command failed (exit {res.exit_status}): {tail.strip()[-300:]}",
                    host=self.host.name,
                    step="soak",
                )
        self.guard.state(self.step_name)
        if not self.api.client_status(
            self.host, retry=HARD_RETRY, within=self._soak_left(), idle=self.guard.idle_heard
        ):
            raise ClientOffline(
                f"new client went offline during the soak ({self.plan.stable_for:g}s)",
                host=self.host.name,
                step="soak",
            )

    def _soak_left(self) -> float:
        """Seconds the soak's last client_status may take, retries and all: an
        API outage is waited out while the guard still waits for the commit
        (its soak deadline), less the commit's own round trip."""
        started = self.firstlife_at if self.firstlife_at is not None else self.clock.now()
        end = started + soak_deadline(self.plan, self.ctx.inventory.provider.timeout)
        return max(end - COMMIT_MARGIN - self.clock.now(), self.ctx.inventory.provider.timeout)

    def _commit(self) -> None:
        self._note(known(commit_requested=True))
        self.commit_requested = True
        self.guard.signal(COMMIT)
        state = self.guard.await_commit(COMMIT_WAIT)
        if state == COMMITTED:
            self.committed = True
            self._note(known(committed=True))
            return
        if state in REVERTING_STATES:
            raise GuardError(
                f"the guard reverted before it saw the commit ({state})", host=self.host.name
            )
        raise GuardError("the guard did not confirm the commit", host=self.host.name)

    def _regain_for_guard(self, lost: SshSessionLost) -> None:
        """A session lost while talking to the guard: during the swap it is
        regained (the caller then tries once more); anywhere else it stands."""
        if self.unwinding or self.step_name not in SWAP_STEPS:
            raise lost
        self._regain()

    # -- unwinding ----------------------------------------------------------------------

    def _unwind(self) -> Outcome:
        self.unwinding = True
        if self.committed:
            return Outcome.UPGRADED
        if not self.swap_started:
            return self._undo_before_swap()
        t0 = self.clock.now()
        self._event("step_started", self.host.name, "rollback")
        outcome = self._revert()
        ok = outcome is Outcome.ROLLED_BACK
        self._record("rollback", StepStatus.OK if ok else StepStatus.FAILED, t0)
        return outcome

    def _undo_before_swap(self) -> Outcome:
        outcome = Outcome.FAILED
        if self.guard_armed:
            try:
                self._disarm_reaching_again()
            except DeployerError as exc:
                self.keep_lock = True
                self._message(f"could not disarm the guard (it gives up by itself): {exc}")
        if self.window_open_since is not None:
            try:
                self._shut_window()
            except DeployerError as exc:
                self._message(f"could not close the allow-clientless window: {exc}")
                outcome = Outcome.UNSAFE
        return outcome

    def _disarm_reaching_again(self) -> None:
        """Disarm; if the session was lost (cut mid-stage: the guard may or may not
        have been started), reach the host again first rather than leave the lock."""
        try:
            self._disarm()
        except SshConnectError:
            self._reattach(within=CLEANUP_REATTACH)
            self._disarm()

    def _leave_tunnel(self) -> None:
        """We connected, but never held the host lock: another run may be using
        this tunnel right now (its connect came first), so it is not ours to close."""
        self.tunnel_opened = False
        self._note(known(tunnel_opened=False))
        self._message(
            "left the tunnel open: deployer did not hold the host lock, so another run "
            f"may be using it; if none is, close it with `deployer api disconnect {self.host.name}`"
        )

    def _leave_tunnel_to_the_lock_holder(self) -> None:
        """Another deployer works on this host through the same tunnel: never close it."""
        self.tunnel_opened = False
        self.locked = False
        self._note(known(tunnel_opened=False, lock_maybe_held=False))

    def _disarm(self) -> None:
        """Stop an armed guard before the lock goes: it must not act on a later run."""
        if self.remote is None:  # the host was not reached (again): nothing to ask it
            raise SshConnectError("host not reachable to disarm the guard", host=self.host.name)
        lines = self.guard.lines()
        if lines and lines[-1].get("state") in FINAL_STATES:
            return
        # no line yet: started a moment ago (staging answered its pid), not written yet
        pid = lines[0].get("pid") if lines else self.guard_pid
        if not self.guard.alive(pid):
            return  # it never ran, or is gone: nothing left that could act
        self.guard.signal(REVERT, regain=False)
        if self.guard.await_final(DISARM_WAIT) not in FINAL_STATES:
            raise GuardError("the guard did not confirm it was disarmed", host=self.host.name)

    def _revert(self) -> Outcome:
        if self.committed:
            return Outcome.UPGRADED  # the guard has let go: the new script stays
        try:
            if not self._ssh_alive():
                self._shut_window_quietly()
                self._reattach()
            lines = self.guard.lines()
            state = lines[-1].get("state", "") if lines else ""
            if self.commit_requested and state in WATCHING_STATES:
                state = self.guard.await_final(COMMIT_WAIT)  # never race a commit
            if state == COMMITTED:
                return self._committed_after_all()
            if not lines and self._installed() == self.old_sha256:
                return Outcome.FAILED  # the guard never ran: nothing changed
            if state not in (REVERTED, ABORTED):
                # a guard that hit an error no longer reads its control files
                alive = bool(lines) and state != ERROR and self.guard.alive(lines[0].get("pid"))
                if not alive and state != ERROR:
                    # it may have finished (and exited) since we read its status: a
                    # second, relaunched revert would restart the old client again
                    # after the window closed
                    state = self.guard.last().get("state", state)
                if state not in FINAL_STATES:
                    state = self._ask_guard_to_revert(relaunch=not alive)
            if state == COMMITTED:  # our commit reached the guard before the revert
                return self._committed_after_all()
            self._shut_window()
            last = self.guard.last()
            self._verify_old_client()  # also when nothing changed: the old client runs?
            if state == ABORTED and not last.get("changed", True):
                return Outcome.FAILED
            return Outcome.ROLLED_BACK
        except Exception as exc:  # noqa: BLE001 - whatever happened, end state unknown
            self._message(f"rollback could not be verified: {type(exc).__name__}: {exc}")
            self._shut_window_quietly()
            return Outcome.UNSAFE

    def _committed_after_all(self) -> Outcome:
        """The guard took the commit: the new script stays, whatever failed after."""
        self.committed = True
        self._note(known(committed=True))
        if self.window_open_since is not None:
            self._shut_window()
        return Outcome.UPGRADED

    def _recover(self) -> Outcome:
        if self.window_open_since is not None:
            self._shut_window()  # first of all: no window left open
        if self.committed:
            self._reattach()  # to release the lock and clean up; the upgrade stands
            return Outcome.UPGRADED
        if self.swap_started:
            return self._revert()  # reads the guard: committed, reverted, or revert now
        if self.guard_armed or self.locked:
            self._reattach()  # to disarm the guard, release the lock, remove staged files
            if self.guard_armed:
                self._disarm()
        return Outcome.FAILED

    def _installed(self) -> str | None:
        return remote_sha256(self._session(), self.paths.script_path)

    def _ask_guard_to_revert(self, relaunch: bool = False) -> str:
        if self.window_open_since is None:
            self._open_window()  # the old client's restart must not cut the tunnel
        if relaunch:  # the run's guard is gone (host rebooted, killed): a new one undoes
            backup = self.backup_path or self.paths.backup_for(self.old_sha256, self.clock.wall())
            self.guard.relaunch(self._guard_program(backup))
        else:
            self.guard.signal(REVERT, regain=False)
        evidence = revert_online_wait(self.ctx.inventory.provider.offline_detection)
        state = self.guard.await_final(REVERT_WAIT + evidence, poll=0.2)
        if state in FINAL_STATES:
            return state
        raise GuardError("the guard did not finish its revert", host=self.host.name)

    def _verify_old_client(self) -> None:
        end = self.clock.now() + self.plan.online_timeout
        while not self.api.client_status(self.host):
            if self.clock.now() > end:
                raise ClientOffline("old client not online after the revert", host=self.host.name)
            self.clock.sleep(0.5)
        if self._installed() != self.old_sha256:
            raise VerifyError(
                "after the revert the installed script is not the old one", host=self.host.name
            )

    def _reattach(self, within: float | None = None) -> None:
        """The SSH session is gone (a cut tunnel): reach the host again."""
        if self.remote is not None:
            self.remote.close()
        self.remote = None
        end = self.swap_at + self.plan.guard_deadline + REATTACH_MARGIN
        if within is not None:
            end = self.clock.now() + within
        while self.clock.now() < end:
            try:
                if self.api.client_status(self.host):
                    self.api.connect(self.host)
                    self.tunnel_opened = True
                    self.remote = self.ctx.remote_factory(self.host)
                    return
            except (ApiError, RemoteError) as exc:
                self._message(f"host not reachable yet: {exc}")
            self.clock.sleep(REATTACH_EVERY)
        raise SshConnectError(
            "could not reach the host again after the SSH session was lost", host=self.host.name
        )

    def _ssh_alive(self) -> bool:
        if self.remote is None:
            return False
        try:
            self.remote.run("true", timeout=15)
            return True
        except (RemoteError, OSError):
            return False

    def _shut_window_quietly(self) -> None:
        if self.window_open_since is None:
            return
        try:
            self._shut_window()
        except DeployerError as exc:
            self._message(f"could not close the allow-clientless window: {exc}")

    # -- cleanup -------------------------------------------------------------------------------

    def _cleanup(self, outcome: Outcome) -> Outcome:
        self.unwinding = True
        t0 = self.clock.now()
        self._event("step_started", self.host.name, "cleanup")
        status = StepStatus.OK
        if self.window_open_since is not None:  # never leave it open, whatever happened
            try:
                self._shut_window()
            except DeployerError:
                outcome, status = Outcome.UNSAFE, StepStatus.FAILED
        if self.locked and outcome is not Outcome.UNSAFE and self.remote is None:
            status = self._reach_to_clean(status)
        if self.remote is not None and outcome is not Outcome.UNSAFE:
            try:
                self._clean_host(outcome)
            except SshSessionLost as exc:
                if self.locked:  # reach the host again to release its lock
                    status = self._reach_to_clean(status)
                    status = self._clean_again(outcome, status)
                else:
                    status = StepStatus.FAILED
                    self._message(f"cleanup on the host failed: {exc}")
            except (RemoteError, OSError) as exc:
                status = StepStatus.FAILED
                self._message(f"cleanup on the host failed: {exc}")
        self.guard.close_stream()
        if self.remote is not None:
            self.remote.close()
        if self.tunnel_opened and not self.tunnel_ours:
            self._leave_tunnel()
        if self.tunnel_opened:
            try:
                self.api.disconnect(self.host)
                self._note(known(tunnel_opened=False))
            except ApiError as exc:
                status = StepStatus.FAILED
                self._message(f"disconnect failed, the tunnel may stay open: {exc}")
        self._record("cleanup", status, t0)
        return outcome

    def _reach_to_clean(self, status: StepStatus) -> StepStatus:
        """The session was lost: reach the host again to release its lock."""
        try:
            self._reattach(within=CLEANUP_REATTACH)
        except DeployerError as exc:
            self._message(f"the host lock stays until `deployer recover`: {exc}")
            return StepStatus.FAILED
        return status

    def _clean_again(self, outcome: Outcome, status: StepStatus) -> StepStatus:
        if self.remote is None:
            return StepStatus.FAILED
        try:
            self._clean_host(outcome)
        except (RemoteError, OSError) as exc:
            self._message(f"cleanup on the host failed: {exc}")
            return StepStatus.FAILED
        return status

    def _clean_host(self, outcome: Outcome) -> None:
        """One round trip: prune, remove the run's files, release the lock."""
        keep = None
        if outcome is Outcome.UPGRADED or outcome is Outcome.ROLLED_BACK:
            keep = self.host.keep_backups
        if self.keep_lock:
            if keep is not None:
                self.guard.clean(keep=keep, remove_run=False, release_lock=False)
            self._message(
                "kept the host lock and run files: the guard could not be disarmed; "
                "run `deployer recover` to finish this host"
            )
            return
        self.guard.clean(keep=keep, remove_run=True, release_lock=self.locked)
        if self.locked:
            self._note(known(lock_maybe_held=False))

    def _message(self, text: str) -> None:
        self._event("message", self.host.name, scrub(text, self.ctx.inventory.secret_values()))
