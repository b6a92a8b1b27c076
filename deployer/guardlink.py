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
import posixpath
from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from deployer.clock import Clock
from deployer.errors import (
    GuardError,
    RemoteCommandError,
    SshConnectError,
    SshSessionLost,
    VerifyError,
)
from deployer.guard import CLEANUP_WORD  # + the cleanup's arguments, on the stream
from deployer.hostfiles import HostPaths, LockInfo
from deployer.remote import Channel, Remote, sh, sha256_hex

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
        "soak_deadline": soak_deadline(plan, provider.timeout),
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


def soak_deadline(plan: HostPlan, api_timeout: float) -> float:
    """Seconds the guard waits for ``commit`` once deployer said ``firstlife``."""
    return plan.stable_for + SOAK_MARGIN + 2 * api_timeout


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


# -- the link: one SSH channel per task -----------------------------------------------------

# The command line of every link task: read guard.py's source (its size is
# argv[1]) from stdin, run it as a module (not as the guard: no CONFIG, no
# main) and hand the task (argv[2:]) to its ``link_main``.
LINK_BOOT = (
    "import os,sys\n"
    "n=int(sys.argv[1]);b=b''\n"
    "while len(b)<n:\n"
    " c=os.read(0,n-len(b))\n"
    " if not c:sys.exit(70)\n"
    " b+=c\n"
    "g={'__name__':'guardlink'}\n"
    "exec(compile(b,'guard.py','exec'),g)\n"
    "sys.exit(g['link_main'](sys.argv[2:]))\n"
)
# The link tasks and the guard need the standard library only: without ``site``
# (its .pth files, site-packages) each start costs the host 10-40 ms less CPU,
# which a small host's client needs (guard.py starts its guard the same way).
NO_SITE = "-S"
ANSWER_WAIT = 60.0  # seconds for a link task's answer (lock, inspect, cleanup)
STAGE_WAIT = 120.0  # seconds for the staged files to be written, checked and validated
OUTPUT_TAIL = 300  # characters of a failing command's output shown (after masking)
ARM_WAIT = 30.0  # seconds for the guard to start armed
# seconds between deployer's signs of life on the guard's stream: the guard's
# silence_limit is 15 s at the least, so a beat every 5 s leaves it three; each
# beat is a write, a packet and a ``touch`` on the host (a 35 s soak made 35)
BEAT = 5.0
LOOK = 0.25  # longest blocking read of the stream (deadlines and aborts are checked between)
RESEND = (GO, FIRSTLIFE)  # the swap's words, written again on a stream regained during it


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


@dataclass(frozen=True)
class Inspection:
    """What the ``inspect`` task found: the lock (taken, held, or not asked for)
    and the installed script."""

    lock: str | None  # "taken" | "held" | "error" | None (not asked for)
    held_by: LockInfo | None = None
    error: str = ""
    sha256: str | None = None
    mode: str | None = None


class GuardLink:
    """Deployer's link to one run's guard on one host, over as few SSH round trips
    as the stages allow: one channel for lock + inspect, one that stages the
    files, starts the guard armed and then stays open as the guard's **stream**
    (its status lines come as they are written; deployer's words go back on
    it), one for cleanup.

    ``remote`` returns the current session (the workflow may replace it);
    ``regain`` is called when a session is lost while talking to the guard: it
    reaches the host again (then the read or word is tried once more on a new
    stream) or raises."""

    def __init__(
        self,
        paths: HostPaths,
        python: str,
        remote: Callable[[], Remote | None],
        regain: Callable[[SshSessionLost], None],
        clock: Clock,
        host: str,
        mask: Callable[[str], str] = str,
    ):
        self.paths, self.python, self.clock, self.host = paths, python, clock, host
        self._remote, self._regain = remote, regain
        self._mask = mask  # credentials out of command output, before it is cut
        self.stream: Channel | None = None
        self._stream_remote: Remote | None = None
        self.seen: list[dict] = []  # the status lines read on the current stream
        self.sent: list[str] = []  # the words written so far
        self._beat_at: float | None = None
        # on a test's clock, waits sleep on it; on the real one, they read the stream
        self._blocking = type(clock).sleep is Clock.sleep and type(clock).now is Clock.now

    @property
    def remote(self) -> Remote:
        remote = self._remote()
        if remote is None:
            raise SshConnectError("SSH session is not open", host=self.host)
        return remote

    def _again(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except SshSessionLost as lost:
            self._regain(lost)  # raises when the session may not be regained here
            return action()

    # -- link tasks ---------------------------------------------------------------------------

    def _open(self, task: str, args: dict[str, Any], data: bytes = b"") -> Channel:
        source = guard_source().encode("utf-8")
        command = sh(self.python, NO_SITE, "-c", LINK_BOOT, len(source), task, self.paths.run_dir)
        channel = self.remote.open_channel(command)
        try:
            channel.write(source + json.dumps(args).encode("utf-8") + b"\n" + data)
        except BaseException:
            channel.close()
            raise
        return channel

    def _answer(self, channel: Channel, task: str, wait: float) -> dict[str, Any]:
        line = channel.readline(wait)
        if line is None:
            raise RemoteCommandError(
                f"no answer from the host's {task} task within {wait:g}s", host=self.host
            )
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RemoteCommandError(
                f"unexpected answer from the host's {task} task: {line[:200]!r}", host=self.host
            )
        return answer

    def call(self, task: str, args: dict[str, Any]) -> dict[str, Any]:
        """One link task that answers one line: one round trip."""
        channel = self._open(task, args)
        try:
            answer = self._answer(channel, task, ANSWER_WAIT)
        finally:
            channel.close()
        if answer.get("error"):
            raise RemoteCommandError(
                f"the host's {task} task failed: {answer.get('output', answer['error'])}",
                host=self.host,
            )
        return answer

    def inspect(self, *, owner: str | None = None, break_lock: bool = False) -> Inspection:
        """The installed script's sha256 and mode; with ``owner``, take the host
        lock first (``mkdir``, the owner inside) in the same round trip."""
        p = self.paths
        lock = p.lock if owner is not None else None
        args = {"base": p.base, "lock": lock, "owner": owner, "break_lock": break_lock}
        answer = self.call("inspect", {**args, "script": p.script_path})
        if answer.get("lock") == "held":
            return Inspection("held", held_by=LockInfo.from_json(answer.get("owner")))
        if answer.get("lock") == "error":
            return Inspection("error", error=str(answer.get("error", "")))
        mode = answer.get("mode")
        return Inspection(answer.get("lock"), sha256=answer.get("sha256"), mode=mode)

    def stage(
        self, script: bytes, program: bytes, *, mode: str, validate: str, owner_of: str | None
    ) -> int:
        """Send the new script and the rendered guard on one channel: the host
        writes them beside the script, sets their modes, checks both sha256, runs
        ``validate``, starts the guard armed and answers its pid. The channel then
        stays open as the guard's stream. Returns the guard's pid."""
        p = self.paths
        self.close_stream()
        args = {
            "run_dir": p.run_dir,
            "backups": p.backups,
            "staged": p.staged,
            "guard": p.guard,
            "mode": mode,
            "owner_of": owner_of,
            "validate": validate,
            "sizes": [len(script), len(program)],
            "sha256": [sha256_hex(script), sha256_hex(program)],
        }
        channel = self._open("stage", args, script + program)
        try:
            self._staged(self._answer(channel, "stage", STAGE_WAIT))
            armed = self._answer(channel, "stage", ARM_WAIT)
            if not isinstance(armed.get("armed"), int):
                raise GuardError(
                    f"the guard did not start: {str(armed.get('output', armed))[:200]}",
                    host=self.host,
                )
        except BaseException:
            channel.close()
            raise
        self._adopt(channel)
        return armed["armed"]

    def _staged(self, answer: dict[str, Any]) -> None:
        error = answer.get("error")
        if error == "sha256":
            raise VerifyError(
                f"staged files on {self.host} do not match what was sent "
                "(sha256 differs); the upload was damaged",
                host=self.host,
            )
        if error == "validate":
            # masked whole, then cut: a cut first could leave part of a credential
            output = self._mask(str(answer.get("output", "")))[-OUTPUT_TAIL:]
            raise VerifyError(
                f"validate command failed (exit {answer.get('exit')}) on the staged script: "
                f"{output}",
                host=self.host,
            )
        if error or not answer.get("staged"):
            raise RemoteCommandError(
                f"staging failed on the host: {answer.get('output', answer)}", host=self.host
            )

    def clean(self, *, keep: int | None, remove_run: bool, release_lock: bool) -> list[str]:
        """One round trip: prune backups to ``keep`` (None: leave them) and make
        them owner-only, remove the run directory, release the lock if it is this
        run's. Asked on the guard's stream when it is open (its follower does it,
        answers and ends: no channel, no program start), else as a link task.
        Idempotent: a cleanup whose answer was lost may be asked again."""
        p = self.paths
        args = {
            "backups": p.backups,
            "prefix": posixpath.basename(p.script_path) + ".",
            "keep": keep,
            "run_dir": p.run_dir if remove_run else None,
            "lock": p.lock if release_lock else None,
            "run_id": p.run_id,
        }
        answer = self._clean_on_stream(args)
        if answer is None:
            self.close_stream()
            answer = self.call("cleanup", args)
        elif answer.get("error"):
            raise RemoteCommandError(
                f"the host's cleanup task failed: {answer.get('output', answer['error'])}",
                host=self.host,
            )
        return list(answer.get("pruned", []))

    def _clean_on_stream(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """The cleanup's answer from the open stream; None when there is no stream
        on this session or it failed without an answer (then: a link task, which
        also tells a channel that ended from a session that is lost)."""
        stream = self.stream
        if stream is None or self._stream_remote is not self.remote:
            return None
        try:
            stream.write(CLEANUP_WORD.encode() + json.dumps(args).encode("utf-8") + b"\n")
            while True:
                answer = self._answer(stream, "cleanup", ANSWER_WAIT)
                if "state" in answer or "reset" in answer or "synced" in answer:
                    continue  # the guard's status, sent before the answer
                return answer
        except (SshSessionLost, RemoteCommandError):
            return None  # the follower had ended (its run dir was gone, say), or more
        finally:
            self.close_stream()

    # -- installing and starting (a run whose guard is gone) ------------------------------------

    def upload(self, program: bytes) -> None:
        """Put the rendered guard into the run directory (see :meth:`private`)."""
        self.remote.write_file(self.paths.guard, program)

    def private(self) -> str:
        """The host command that makes the uploaded guard owner-only: it holds
        the API credentials."""
        return f"chmod 0700 {sh(self.paths.guard)}"

    def _start(self, *flags: str) -> str:
        start = sh(self.python, NO_SITE, "guard.py", "--detach", *flags)
        return f"cd {sh(self.paths.run_dir)} && {start}"

    def relaunch(self, program: bytes) -> None:
        """The run's guard is gone (host rebooted, killed): a new one only reverts."""
        self.remote.run(f"umask 077 && mkdir -p {sh(self.paths.run_dir)}")
        self.upload(program)
        self.remote.run(f"{self.private()} && {self._start('--revert')}")

    # -- the stream ---------------------------------------------------------------------------

    def _adopt(self, channel: Channel) -> None:
        self.stream, self._stream_remote = channel, self.remote
        self.seen, self._beat_at = [], None

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream = self._stream_remote = None

    def _ensure_stream(self) -> Channel:
        if self.stream is not None and self._stream_remote is self.remote:
            return self.stream
        self.close_stream()
        self._adopt(self._open("follow", {"run_dir": self.paths.run_dir}))
        again = [w for w in dict.fromkeys(self.sent) if w in RESEND]
        if again:  # regained during the swap: the words may not have reached the host
            self._write("".join(w + "\n" for w in again).encode())
        assert self.stream is not None  # just adopted
        return self.stream

    def _write(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            raise SshSessionLost("the guard's stream is closed", host=self.host)
        try:
            stream.write(data)
        except (SshSessionLost, RemoteCommandError):
            self.close_stream()
            raise

    def _beat(self) -> None:
        """Deployer's sign of life: any line it writes makes the host touch ``alive``."""
        now = self.clock.now()
        if self._beat_at is None or now - self._beat_at >= BEAT:
            self._write(b"alive\n")
            self._beat_at = now

    def _pump(self, wait: float, sync: bool = False) -> bool:
        """Read what the stream has, waiting up to ``wait`` s for a first line;
        with ``sync``, until the host confirmed that every status line written
        so far was sent. True if a status line came."""
        new = self.stream is None or self._stream_remote is not self.remote
        stream = self._ensure_stream()
        if sync or new:  # a new stream replays the status: read it all first
            sync = True
            self._write(b"sync\n")  # a line: a sign of life too
            self._beat_at = self.clock.now()
            wait = ANSWER_WAIT
        else:
            self._beat()
        came = False
        try:
            line = stream.readline(wait)
            while line is not None:
                for item in parse_status(line):
                    if item.get("reset"):
                        self.seen = []
                    elif item.get("synced"):
                        sync = False
                    elif "state" in item:
                        self.seen.append(item)
                        came = True
                line = stream.readline(ANSWER_WAIT if sync else 0.0)
        except (SshSessionLost, RemoteCommandError):
            self.close_stream()
            raise
        if sync:
            self.close_stream()
            raise RemoteCommandError(
                f"the guard's stream did not answer within {ANSWER_WAIT:g}s", host=self.host
            )
        return came

    def _idle(self, seconds: float, abort: threading.Event | None = None) -> None:
        """Wait up to ``seconds`` for the guard's next line (a line ends it at once)."""
        if self._blocking and not (abort is not None and abort.is_set()):
            self._again(lambda: self._pump(max(seconds, 0.0)))
        else:
            self.clock.sleep(seconds, abort)

    def idle_heard(self, seconds: float) -> None:
        """Spend ``seconds`` heard by the guard: read its stream (each read beats)
        while one is open on the current session, else sleep. For waits that are
        not about the guard (an API retry's back-off inside the window): never
        shorter, never a regained session, never an error raised; on any trouble
        with the stream, the rest is slept."""
        end = self.clock.now() + max(seconds, 0.0)
        while (left := end - self.clock.now()) > 0:
            current = self._remote()
            if not self._blocking or self.stream is None or self._stream_remote is not current:
                self.clock.sleep(left)
                return
            try:
                self._pump(min(left, BEAT))
            except (SshConnectError, RemoteCommandError):
                self.clock.sleep(max(end - self.clock.now(), 0.0))
                return

    # -- talking to the guard -----------------------------------------------------------------

    def signal(self, name: str, *, regain: bool = True) -> None:
        """Write the word ``name``; the host turns it into the control file
        (idempotent: after a regained session the swap's words are written again)."""
        self.sent.append(name)

        def send() -> None:
            self._ensure_stream()
            self._write(f"{name}\n".encode())

        if regain:
            self._again(send)
        else:
            send()

    def lines(self, fresh: bool = True) -> list[dict]:
        """The guard's status lines: ``fresh``, every line written by now (the
        host confirms it: a round trip on the stream); else those that came."""
        self._again(lambda: self._pump(0.0, sync=fresh))
        return list(self.seen)

    def last(self, fresh: bool = True) -> dict[str, Any]:
        lines = self.lines(fresh)
        return lines[-1] if lines else {}

    def state(self, step: str | None = None, fresh: bool = True) -> str:
        """The guard's current state; raises if it is reverting or gave up."""
        lines = self.lines(fresh)
        state = lines[-1].get("state", "") if lines else ""
        if state in REVERTING_STATES:
            # the reason is on the line that began the revert, not on the last one
            reason = next((ln["reason"] for ln in reversed(lines) if ln.get("reason")), state)
            doing = "reverted" if state in FINAL_STATES else "is reverting"
            raise GuardError(f"the guard {doing}: {reason}", host=self.host, step=step)
        return state

    def alive(self, pid: Any) -> bool:
        """Is ``pid`` (from the guard's status) still a running guard?"""
        if not isinstance(pid, int):
            return False
        return self.remote.run(alive_check(pid), check=False).ok

    # -- waiting on it -------------------------------------------------------------------------

    def follow(self, seconds: float, abort: threading.Event | None = None) -> None:
        """Wait up to ``seconds`` on the guard's stream: a status line ends the
        wait at once (no polling: on the real clock nothing wakes in between)."""
        self._idle(seconds, abort)

    def _look(self, poll: float, end: float, abort: threading.Event | None = None) -> None:
        self._idle(min(LOOK if self._blocking else poll, end - self.clock.now()), abort)

    def await_final(self, seconds: float, poll: float = POLL) -> str:
        """The guard's state once it is final (committed, reverted, aborted), or
        whatever it is after ``seconds``."""
        end = self.clock.now() + seconds
        state = self.last().get("state", "")
        while state not in FINAL_STATES and self.clock.now() < end:
            self._look(poll, end)
            state = self.last(fresh=False).get("state", "")
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
        """Wait until the guard's state is one of ``wanted`` (True), or until
        ``deadline`` (False); raises if the guard reverts."""
        fresh = True
        while self.state(step, fresh) not in wanted:
            if self.clock.now() + (0.0 if self._blocking else poll) >= deadline:
                return False
            self._look(poll, deadline, abort)
            fresh = False
        return True

    def await_commit(self, seconds: float) -> str:
        """After ``commit``: ``committed``, a reverting state, or "" after ``seconds``."""
        end = self.clock.now() + seconds
        fresh = True
        while self.clock.now() < end:
            state = self.last(fresh).get("state", "")
            if state == COMMITTED or state in REVERTING_STATES:
                return state
            self._look(POLL, end)
            fresh = False
        return ""
