"""``deployer recover``: finish every run that a vanished deployer left behind.

For each (run, host) the journal holds without a final result (and whose
deployer process is gone), a :class:`~deployer.workflow.HostRun` is resumed
from the facts journalled before each action: the window is closed first,
an uncommitted guard is asked to revert (or one is started to revert, if the
run's guard is gone), the old client is verified online, the lock and the
staged files are removed, the tunnel closed, and the final result written
to the journal. Idempotent: with nothing dangling it does nothing.

What must stay true:

* **Only the recovered run's host, and only under the host lock.** A host
  that the run may have touched is reached first, and recover acts on it only
  while it holds the host lock (``mkdir`` beside the script, see
  ``deployer.hostfiles``): a lock that is absent is taken, a lock the
  recovered run holds is taken over, and recover holds it — in that run's
  name, with its own process beside it (``recover`` in the owner file) — until
  the host is finished. A lock held by any other run leaves the host alone
  (reported ``skipped``, still pending in the journal). Taking a lock over is
  atomic: ``mkdir lock/taken-HOLDER`` succeeds for one recover only, so two
  recovers never both act on a host, and the journal gets one final result
  (re-read once the lock is held). A recover that meets another one at work
  on the host acts on nothing there: on this machine it waits for that
  recover's result in the journal and reports it; one on another machine
  leaves the host alone.
* **A run dir that is gone means the run had cleaned up** the host (it is
  removed at cleanup, before the lock is released): nothing there is undone —
  no guard relaunched, no backup restored over what a later run installed.
  Only the window is closed if the journal says it may be open, the tunnel is
  closed, and the host marked.
* **A run recorded on another machine is not presumed dead** without
  evidence: its liveness cannot be checked from here (CI jobs get a new
  hostname each), so it is left alone until no record was written for that
  host for :func:`presumed_dead_after` (its guard deadline plus the waits of
  a rollback), or ``--force``. The same holds for a lock held by a recover on
  another machine.
* **Each host is recovered on its own**: one that cannot be reached, or whose
  recovery fails in any way, is reported ``unsafe`` and the others go on; a
  host that cannot be reached stays pending in the journal for the next
  ``recover``. The hosts of one run go in parallel; the runs of one host one
  after the other, newest first.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.clock import Clock
from deployer.errors import ApiError, RemoteError, SshConnectError, SshSessionLost
from deployer.events import EventSink, Fanout
from deployer.facts import HostFacts, known
from deployer.hostfiles import HostPaths, release_lock, remote_sha256
from deployer.journal import DanglingHost
from deployer.model import HostConfig, Inventory
from deployer.pids import machine_name, process_is_live, process_start_token
from deployer.plan import HostPlan, plan_host, revert_online_wait
from deployer.remote import Remote, sh
from deployer.result import ErrorInfo, HostResult, Outcome, RunResult, StepRecord, StepStatus
from deployer.retry import HARD_RETRY
from deployer.secrets import scrub
from deployer.upgrade import new_run_id, owner_label, ssh_factory
from deployer.workflow import (
    CLEANUP_REATTACH,
    REATTACH_EVERY,
    REATTACH_MARGIN,
    REVERT_WAIT,
    HostRun,
    RunContext,
    UpgradeOptions,
)

log = logging.getLogger("deployer.recover")

RECOVER_PARALLEL = 8  # hosts recovered at once (each may wait for a guard's deadline)
RECOVER_STEP = "recover"
OWNER_GRACE = 1.0  # seconds: a lock without its owner file yet may be a run writing it now
AWAIT_POLL = 0.5  # seconds between looks at the journal while another recover finishes a host
TAKEN = "taken-"  # lock/taken-HOLDER: the one recover that took HOLDER's lock over
CLAIMED = "claimed"  # what the host prints once the lock is claimed and its owner written
UNDONE = "undone"  # ... once it made the lock but could not claim it, and took it back
SESSION_CUTS = 2  # sessions lost under recover on one host before it gives up

#: makes the progress sink once the number of hosts to recover is known
ProgressFactory = Callable[[int], EventSink]


def run_recover(
    inventory: Inventory,
    state_dir: Path,
    progress: ProgressFactory | None = None,
    *,
    force: bool = False,
    remote_factory=None,
    api=None,
    clock: Clock | None = None,
) -> RunResult:
    """Recover every dangling (run, host) of the journal in ``state_dir``.

    ``force``: presume runs (and recovers) recorded on another machine dead
    without waiting for their deadline."""
    from deployer.api import ProviderAPI
    from deployer.journal import Journal

    journal = Journal(state_dir, secrets=inventory.secret_values())
    result = RunResult(run_id=new_run_id(), started=time.time())
    own_api = api is None
    if own_api:
        from deployer.ratelimit import RateLimiter

        api = ProviderAPI(inventory.provider, limiter=RateLimiter(inventory.provider.rate_limit))
    try:
        dangling = journal.dangling()
        rec = _Recovery(
            inventory=inventory,
            journal=journal,
            api=api,
            remote_factory=remote_factory or ssh_factory(inventory),
            progress=progress(len(dangling)) if progress and dangling else EventSink(),
            clock=clock or Clock(),
            recover_id=result.run_id,
            force=force,
        )
        result.hosts = rec.run(dangling)
        for run_id in {item.run_id for item in dangling}:
            record = journal.run(run_id)
            if record is not None and record.finished is None and _all_final(journal, run_id):
                journal.finish_run(run_id, ok=False, interrupted=True)
    finally:
        result.finished = time.time()
        journal.close()
        if own_api:
            api.close()
    return result


def presumed_dead_after(plan: HostPlan, inventory: Inventory) -> float:
    """Seconds without a journal record for a host after which the run working on
    it (on another machine) is presumed dead. A live run writes at least this
    often: its guard's deadline covers first life and the soak; past it come
    reaching the host again, the guard's revert and its evidence, the old
    client's online wait and cleanup's reattach."""
    evidence = revert_online_wait(inventory.provider.offline_detection)
    waits = REATTACH_MARGIN + REVERT_WAIT + evidence + CLEANUP_REATTACH
    return plan.guard_deadline + plan.online_timeout + waits


def _all_final(journal: Any, run_id: str) -> bool:
    return all(h["result"] is not None for h in journal.host_results(run_id))


@dataclass(frozen=True)
class _Holder:
    """The host lock's owner file as recover reads it (``recover``: who holds it
    on the run's behalf: ``run_id``, ``machine``, ``pid``, ``pid_start``)."""

    owner: str
    run_id: str
    since: float
    recover: dict[str, Any] | None

    def describe(self, now: float) -> str:
        return f"held by {self.owner} (run {self.run_id}) for {max(0.0, now - self.since):.0f}s"


@dataclass(frozen=True)
class _Busy:
    """Why recover leaves a host alone; ``recover``: the recover at work on it."""

    why: str
    recover: _Holder | None = None


@dataclass
class _Recovery:
    """One ``deployer recover``: what every host's recovery shares."""

    inventory: Inventory
    journal: Any  # deployer.journal.Journal
    api: Any
    remote_factory: Any
    progress: EventSink
    clock: Clock
    recover_id: str
    force: bool

    def run(self, dangling: list[DanglingHost]) -> list[HostResult]:
        by_host: dict[str, list[DanglingHost]] = defaultdict(list)
        for item in dangling:
            by_host[item.host].append(item)
        results: dict[tuple[str, str], HostResult] = {}
        with cf.ThreadPoolExecutor(max_workers=RECOVER_PARALLEL) as pool:
            futures = [pool.submit(self._host, items) for items in by_host.values()]
            for future in futures:
                results.update(future.result())
        return [results[(item.run_id, item.host)] for item in dangling]

    def _host(self, items: list[DanglingHost]) -> dict[tuple[str, str], HostResult]:
        """The runs left on one host, one after the other, newest first: a newer
        run's lock is released before an older run's recovery needs it."""
        done = {}
        for item in sorted(items, key=lambda i: i.started, reverse=True):
            done[(item.run_id, item.host)] = self._isolated(item)
        return done

    def _isolated(self, item: DanglingHost) -> HostResult:
        """One (run, host): whatever goes wrong is this host's ``unsafe`` result."""
        try:
            return self._recover(self._context(item.run_id), item)
        except Exception as exc:  # noqa: BLE001 - one host's failure must not lose the others
            log.debug("%s: recover failed", item.host, exc_info=True)
            message = (
                f"recover failed: {type(exc).__name__}: {exc}; the host stays pending in the "
                "journal: check it (`deployer status`, `deployer history HOST`) and run "
                "`deployer recover` again"
            )
            return self._report(self.progress, item.host, Outcome.UNSAFE, "RecoverError", message)

    def _context(self, run_id: str) -> RunContext:
        from deployer.journal import JournalSink

        sinks = (self.progress, JournalSink(self.journal, run_id))
        return RunContext(
            run_id=run_id,
            inventory=self.inventory,
            api=self.api,
            remote_factory=self.remote_factory,
            options=UpgradeOptions(command="recover"),
            events=_Unfinished(self.journal, run_id, *sinks),
            journal=self.journal,
            owner=owner_label(),
            clock=self.clock,
        )

    # -- one (run, host) -------------------------------------------------------------

    def _recover(self, ctx: RunContext, item: DanglingHost) -> HostResult:
        host = self.inventory.hosts.get(item.host)
        if host is None:
            message = (
                f"host {item.host} of run {item.run_id} is not in this inventory; run "
                "recover with the inventory that run used (see `deployer history`)"
            )
            return self._report(
                ctx.events, item.host, Outcome.UNSAFE, "HostNotInInventory", message
            )
        plan = self._plan(host, item)
        alive = self._maybe_alive(item, plan)
        if alive:
            return self._left_alone(item.host, alive)
        if not item.facts.left_on_host():
            return HostRun(ctx, plan).resume(item.facts)  # nothing on the host: no need to go
        for attempt in range(1, SESSION_CUTS + 2):
            try:
                remote = self._reach(plan)
            except SshConnectError as exc:
                return self._unreachable(ctx, plan, item, exc)
            try:
                done = self._recover_on(ctx, plan, item, remote)
                if done is not None:
                    return done
                break
            except SshSessionLost:
                # Another deployer closed the tunnel this session rode on (a recover
                # that finished the same run disconnects): reach the host again; the
                # lock, if taken, is taken whole (see _hold) and ours to find again.
                if attempt > SESSION_CUTS:
                    raise
            finally:
                remote.close()
        return HostRun(ctx, plan).resume(dataclasses.replace(item.facts, lock_maybe_held=True))

    def _recover_on(
        self, ctx: RunContext, plan: HostPlan, item: DanglingHost, remote: Remote
    ) -> HostResult | None:
        """Hold the lock and finish what needs no undo; None: the run is to be
        resumed (rolled back or committed) under the lock now held."""
        busy = self._hold(remote, plan, item)
        if busy is not None and busy.recover is not None:
            done = self._await_other_recover(item, busy.recover, plan)
            if done is not None:
                return done
            busy = self._hold(remote, plan, item)  # it is gone without finishing
        state = self.journal.host_state(item.run_id, item.host)
        if _finished(state):  # another recover finished it meanwhile
            if busy is None:
                release_lock(remote, plan.paths)  # ours, taken for nothing
            return self._recorded(item, state)
        if busy is not None:
            return self._left_alone(item.host, busy.why)
        self.journal.update_host(item.run_id, item.host, **known(lock_maybe_held=True))
        if not remote.run(sh("test", "-d", plan.paths.run_dir), check=False).ok:
            return self._cleaned_up(ctx, plan, item, remote)
        changed = self._changed_since(remote, plan, item)
        if changed:
            return self._leave_later_script(ctx, plan, item, remote, changed)
        return None

    def _plan(self, host: HostConfig, item: DanglingHost) -> HostPlan:
        record = self.journal.run(item.run_id)
        options = record.options if record is not None else {}
        plan = plan_host(
            self.inventory,
            host,
            item.run_id,
            render=False,
            online_timeout=_seconds(options.get("online_timeout")),
            stable_for=_seconds(options.get("stable_for")),
        )
        script_path = item.facts.script_path or host.script_path
        return dataclasses.replace(plan, paths=HostPaths(script_path, item.run_id))

    def _maybe_alive(self, item: DanglingHost, plan: HostPlan) -> str | None:
        """Why a run recorded on another machine may still be at work, or None."""
        if item.machine is None or item.machine == machine_name() or self.force:
            return None
        last = item.last_record or item.started
        wait = presumed_dead_after(plan, self.inventory)
        age = self.clock.wall() - last
        if age > wait:
            return None
        return (
            f"run {item.run_id} was recorded on machine {item.machine}, whose processes "
            f"this recover cannot see, and wrote its last record for {item.host} "
            f"{max(age, 0.0):.0f}s ago: it may still be at work there; left alone until "
            f"{wait:.0f}s after that record (its guard deadline and the waits of a "
            "rollback), or pass --force once you know it is gone"
        )

    def _reach(self, plan: HostPlan) -> Remote:
        """An SSH session to the host through its tunnel, trying for as long as the
        run's guard may still be at work (a reverting guard restarts the old client:
        offline for a while). SshConnectError if it never answers."""
        within = plan.guard_deadline + REATTACH_MARGIN
        end = self.clock.now() + within
        why = "the client is offline"
        while True:
            try:
                if self.api.client_status(plan.host):
                    self.api.connect(plan.host)
                    return self.remote_factory(plan.host)
                why = "the client is offline"
            except (ApiError, RemoteError) as exc:
                why = str(exc)
            if self.clock.now() + REATTACH_EVERY > end:
                raise SshConnectError(
                    f"could not reach {plan.name} within {within:g}s: {why}", host=plan.name
                )
            self.clock.sleep(REATTACH_EVERY)

    # -- the host lock --------------------------------------------------------------------

    def _hold(self, remote: Remote, plan: HostPlan, item: DanglingHost) -> _Busy | None:
        """Take the host lock for the recovery of ``item``'s run: None once held,
        else why the host is left alone (and the recover at work on it, if one is)."""
        p = plan.paths
        # An absent lock is made, claimed and given its owner file by one command:
        # a session cut mid-way (the host finishes the command) cannot leave a lock
        # without an owner, which would refuse every later run; nor can a claim or
        # owner file the host fails to write (a full disk): what this command made
        # is taken back.
        key = item.run_id
        took = remote.run(
            f"mkdir -p {sh(p.base)} && if mkdir {sh(p.lock)} 2>/dev/null; then "
            f"{{ {self._claim(p, key, item.run_id)}; }} || "
            f"{{ {self._unclaim(p, key)}; echo {UNDONE}; }}; else echo exists; fi",
            check=False,
        )
        if took.ok and took.stdout.strip() == CLAIMED:
            return None
        if took.stdout.strip().endswith(UNDONE):
            said = scrub(took.stderr.strip(), self.inventory.secret_values())[-200:]
            why = f" ({said})" if said else ""
            return _Busy(
                f"cannot take the host lock {p.lock}: the host could not write it{why}; "
                "nothing was changed (is its disk full?)"
            )
        holder = self._read_holder(remote, p)
        if holder is None:
            self.clock.sleep(OWNER_GRACE)  # a run may be writing its owner file right now
            holder = self._read_holder(remote, p)
            if holder is None and not item.facts.lock_maybe_held:
                return _Busy(f"the host lock {p.lock} has no owner file; this run never took it")
        if holder is not None and (holder.recover or {}).get("run_id") == self.recover_id:
            return None  # ours: taken before a session cut, found again
        if holder is not None and holder.run_id != item.run_id:
            return _Busy(
                f"the host lock is {holder.describe(self.clock.wall())}: another run holds "
                f"it, not run {item.run_id}; left alone (see `deployer history {item.host}`)"
            )
        if holder is not None and holder.recover:
            if self._holder_alive(holder, plan):
                why = f"another deployer recover ({holder.owner}) is finishing this host"
                return _Busy(why, holder)
            key = str(holder.recover.get("run_id"))
        claim = remote.run(self._claim(p, key, item.run_id), check=False)
        if not (claim.ok and claim.stdout.strip() == CLAIMED):  # another recover was first
            self.clock.sleep(OWNER_GRACE)  # let it write its owner file
            holder = self._read_holder(remote, p)
            winner = holder if holder is not None and holder.recover else None
            return _Busy("another deployer recover is taking this host over", winner)
        return None

    def _await_other_recover(
        self, item: DanglingHost, holder: _Holder, plan: HostPlan
    ) -> HostResult | None:
        """Another recover on this machine finishes the host: wait for its result in
        the journal and report it (acting on nothing). None if that recover ended
        without one, or took too long, or runs on another machine."""
        if (holder.recover or {}).get("machine") != machine_name():
            return None
        end = self.clock.now() + presumed_dead_after(plan, self.inventory)
        while self.clock.now() < end:
            state = self.journal.host_state(item.run_id, item.host)
            if _finished(state):
                return self._recorded(item, state)
            if not self._holder_alive(holder, plan):
                return None
            self.clock.sleep(AWAIT_POLL)
        return None

    def _recorded(self, item: DanglingHost, state: dict[str, Any]) -> HostResult:
        """The final result another recover recorded, told (not journalled again)."""
        error, facts = state.get("error") or None, HostFacts.from_json(state)
        result = HostResult(
            host=item.host,
            result=Outcome(state["result"]),
            old_sha256=facts.old_sha256,
            new_sha256=facts.new_sha256,
            error=None
            if error is None
            else ErrorInfo(
                step=error.get("step"),
                type=str(error.get("type")),
                message=str(error.get("message")),
                api_error_code=error.get("api_error_code"),
            ),
        )
        self.progress.host_finished(result)
        return result

    def _read_holder(self, remote: Remote, paths: HostPaths) -> _Holder | None:
        res = remote.run(sh("cat", f"{paths.lock}/owner"), check=False)
        try:
            data = json.loads(res.stdout) if res.ok else None
            if not isinstance(data, dict):
                return None
            recover = data.get("recover")
            return _Holder(
                owner=str(data["owner"]),
                run_id=str(data["run_id"]),
                since=float(data["since"]),
                recover=recover if isinstance(recover, dict) else None,
            )
        except (ValueError, KeyError, TypeError):
            return None

    def _claim(self, paths: HostPaths, key: str, run_id: str) -> str:
        """A host command: claim the lock (``mkdir lock/taken-KEY``: one recover
        only) and write the owner file, then print CLAIMED."""
        return (
            f"{sh('mkdir', f'{paths.lock}/{TAKEN}{key}')} && "
            f"{self._owner_command(paths, run_id)} && echo {CLAIMED}"
        )

    def _unclaim(self, paths: HostPaths, key: str) -> str:
        """A host command that removes what a failed ``_claim`` of a lock it just made
        left: the owner's temporary file, the claim, the lock dir, each only if it is
        there (``rmdir``: never a lock that holds anything else)."""
        return (
            f"rm -f {sh(self._owner_tmp(paths))}; "
            f"rmdir {sh(f'{paths.lock}/{TAKEN}{key}')} {sh(paths.lock)} 2>/dev/null"
        )

    def _owner_tmp(self, paths: HostPaths) -> str:
        return f"{paths.lock}/.owner.{self.recover_id}"

    def _owner_command(self, paths: HostPaths, run_id: str) -> str:
        """A host command that writes the owner file, replaced at once (a reader
        never sees half of it): the recovered run's id, so its cleanup releases the
        lock, and this process."""
        pid = os.getpid()
        owner = {
            "owner": f"deployer recover {self.recover_id} ({owner_label()})",
            "run_id": run_id,
            "since": self.clock.wall(),
            "recover": {
                "run_id": self.recover_id,
                "machine": machine_name(),
                "pid": pid,
                "pid_start": process_start_token(pid),
            },
        }
        tmp = self._owner_tmp(paths)
        return (
            f"printf %s {sh(json.dumps(owner))} > {sh(tmp)} && mv -f {sh(tmp)} "
            f"{sh(paths.lock + '/owner')}"
        )

    def _holder_alive(self, holder: _Holder, plan: HostPlan) -> bool:
        """Is the recover that holds the lock still at work? On this machine: its
        process; on another: not past its deadline (unless --force)."""
        info = holder.recover or {}
        if info.get("machine") == machine_name():
            pid = info.get("pid")
            return isinstance(pid, int) and process_is_live(
                machine_name(), pid, info.get("pid_start")
            )
        if self.force:
            return False
        return self.clock.wall() <= holder.since + presumed_dead_after(plan, self.inventory)

    # -- the ends ----------------------------------------------------------------------------

    def _cleaned_up(
        self, ctx: RunContext, plan: HostPlan, item: DanglingHost, remote: Remote
    ) -> HostResult:
        """The run dir is gone: the run had cleaned up the host before it died.
        Nothing there is undone; close what the journal says may be open, release
        the lock recover took, and mark the host by what is installed."""
        host, facts = plan.host, item.facts
        installed = remote_sha256(remote, plan.paths.script_path)
        outcome = _cleaned_up_outcome(facts, installed)
        problems = []

        def act() -> None:
            if facts.window_maybe_open:
                try:
                    self.api.set_allow_clientless(host, False, retry=HARD_RETRY)
                    self.journal.update_host(
                        item.run_id, host.name, **known(window_maybe_open=False)
                    )
                except ApiError as exc:
                    problems.append(f"could not close the allow-clientless window: {exc}")
            release_lock(remote, plan.paths)
            self.journal.update_host(item.run_id, host.name, **known(lock_maybe_held=False))
            try:  # recover reached the host through it: no other run rides on it (the lock)
                self.api.disconnect(host)
                self.journal.update_host(item.run_id, host.name, **known(tunnel_opened=False))
            except ApiError as exc:
                problems.append(f"disconnect failed, the tunnel may stay open: {exc}")

        steps = self._step(ctx, host.name, act)
        if problems and facts.window_maybe_open and "window" in problems[0]:
            outcome = Outcome.UNSAFE
        message = (
            f"run {item.run_id} had cleaned up the host before it was stopped (its run dir "
            "is gone): nothing to undo; " + ("; ".join(problems) or "closed its tunnel")
        )
        return self._finish(ctx, plan, item, outcome, steps, message, installed)

    def _changed_since(self, remote: Remote, plan: HostPlan, item: DanglingHost) -> str | None:
        """The installed script's sha256 if a later run replaced this run's scripts
        (neither its old nor its new one, before commit); undoing would downgrade it."""
        facts = item.facts
        if not facts.swap_started or facts.committed:
            return None
        installed = remote_sha256(remote, plan.paths.script_path)
        if installed in (facts.old_sha256, facts.new_sha256):
            return None
        return installed or "none"

    def _leave_later_script(
        self, ctx: RunContext, plan: HostPlan, item: DanglingHost, remote: Remote, installed: str
    ) -> HostResult:
        def act() -> None:
            release_lock(remote, plan.paths)
            self.journal.update_host(item.run_id, plan.name, **known(lock_maybe_held=False))

        steps = self._step(ctx, plan.name, act)
        message = (
            f"the installed script (sha256 {installed[:12]}) is neither run {item.run_id}'s "
            "old nor its new one: a later run replaced it; undoing this run would downgrade "
            "it, so nothing was undone; its run files stay in "
            f"{plan.paths.run_dir}: check the host (`deployer history {plan.name}`)"
        )
        return self._finish(ctx, plan, item, Outcome.UNSAFE, steps, message, installed)

    def _step(self, ctx: RunContext, host: str, act) -> list[StepRecord]:
        ctx.events.host_started(host)
        ctx.events.step_started(host, RECOVER_STEP)
        t0 = self.clock.now()
        status = StepStatus.FAILED
        try:
            act()
            status = StepStatus.OK
        finally:
            seconds = self.clock.now() - t0
            ctx.events.step_finished(host, RECOVER_STEP, status, seconds)
        return [StepRecord(RECOVER_STEP, status, seconds)]

    def _finish(
        self,
        ctx: RunContext,
        plan: HostPlan,
        item: DanglingHost,
        outcome: Outcome,
        steps: list[StepRecord],
        message: str,
        installed: str | None,
    ) -> HostResult:
        ctx.events.message(plan.name, scrub(message, self.inventory.secret_values()))
        result = HostResult(
            host=plan.name,
            result=outcome,
            old_sha256=item.facts.old_sha256,
            new_sha256=item.facts.new_sha256,
            api_calls=self.api.calls_for(plan.name),
            steps=steps,
            error=None
            if outcome is Outcome.UPGRADED
            else ErrorInfo(
                step=RECOVER_STEP,
                type="Interrupted",
                message=scrub(message, self.inventory.secret_values()),
            ),
        )
        ctx.events.host_finished(result)
        return result

    def _unreachable(
        self, ctx: RunContext, plan: HostPlan, item: DanglingHost, exc: SshConnectError
    ) -> HostResult:
        """Close the window the run may have left open (the API needs no host)
        unless another run may be at work on the host, and leave the host pending
        in the journal: nothing on it could be checked."""
        host = plan.host
        window = ""
        if item.facts.window_maybe_open:
            other = self._other_run_at_work(item, plan)
            if other:
                window = f"left the window to run {other}, which may be at work on the host; "
            else:
                window = self._close_window(item, host)

        def act() -> None:
            raise exc

        try:
            self._step(ctx, host.name, act)
        except SshConnectError:
            pass
        message = (
            f"{exc}; {window}the host stays pending: its guard reverts or gives up by itself, "
            "and the lock, staged files and tunnel are left; run `deployer recover` again "
            "once the host is online"
        )
        return self._report(self.progress, host.name, Outcome.UNSAFE, type(exc).__name__, message)

    def _close_window(self, item: DanglingHost, host: HostConfig) -> str:
        try:
            self.api.set_allow_clientless(host, False, retry=HARD_RETRY)
        except ApiError as err:
            return f"could not close the allow-clientless window ({err}); "
        self.journal.update_host(item.run_id, host.name, **known(window_maybe_open=False))
        return "closed the allow-clientless window; "

    def _other_run_at_work(self, item: DanglingHost, plan: HostPlan) -> str | None:
        """Another run of the journal that may be at work on this host right now."""
        for other in self.journal.dangling(exclude_live=False):
            if other.host != item.host or other.run_id == item.run_id:
                continue
            record = self.journal.run(other.run_id)
            if record is not None and record.is_live():
                return other.run_id
            if self._maybe_alive(other, plan):
                return other.run_id
        return None

    def _left_alone(self, host: str, why: str) -> HostResult:
        """Not recovered now, still pending in the journal: told, not journalled."""
        return self._report(self.progress, host, Outcome.SKIPPED, "LeftAlone", why)

    def _report(
        self, sink: EventSink, host: str, outcome: Outcome, kind: str, message: str
    ) -> HostResult:
        """A result told to ``sink`` (the journal only if it is in it)."""
        message = scrub(message, self.inventory.secret_values())
        result = HostResult(
            host=host,
            result=outcome,
            error=ErrorInfo(step=RECOVER_STEP, type=kind, message=message),
        )
        sink.host_finished(result)
        return result


def _finished(state: dict[str, Any]) -> bool:
    """The journal has a final result for the host and no lock left to release."""
    return state.get("result") is not None and not HostFacts.from_json(state).lock_maybe_held


def _cleaned_up_outcome(facts: HostFacts, installed: str | None) -> Outcome:
    """What a run that cleaned up had come to, from its facts and the installed script."""
    new, old = facts.new_sha256, facts.old_sha256
    if facts.committed or (facts.swap_started and installed == new != old):
        return Outcome.UPGRADED
    return Outcome.ROLLED_BACK if facts.swap_started else Outcome.FAILED


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class _Unfinished(Fanout):
    """The run's sinks; a host result that leaves the host lock behind (the
    journal still says it may be held: the host was lost again, a guard could
    not be disarmed) is not finished, whatever the workflow concluded: it is
    reported ``unsafe``, so that ``recover`` does not exit 0 with work left."""

    def __init__(self, journal: Any, run_id: str, *sinks: EventSink):
        super().__init__(*sinks)
        self.journal, self.run_id = journal, run_id

    def host_finished(self, result: HostResult) -> None:
        state = self.journal.host_state(self.run_id, result.host)
        if HostFacts.from_json(state).lock_maybe_held and result.result is not Outcome.UNSAFE:
            note = "the host lock and run files stay; run `deployer recover` again"
            error = result.error or ErrorInfo(step=RECOVER_STEP, type="Unfinished", message="")
            error.message = f"{error.message}; {note}" if error.message else note
            result.error, result.result = error, Outcome.UNSAFE
        super().host_finished(result)
