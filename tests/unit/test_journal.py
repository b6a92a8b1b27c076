"""The state journal: schema, facts, dangling hosts, concurrency, secrets, migrations."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deployer.clock import FakeClock
from deployer.errors import ClientOffline, JournalError
from deployer.events import Fanout
from deployer.facts import HostFacts
from deployer.journal import (
    MIGRATIONS,
    SCHEMA_VERSION,
    STEP_STARTED,
    Journal,
    JournalSink,
    journal_path,
    migrate,
)
from deployer.pids import machine_name, process_is_live, process_start_token
from deployer.result import ErrorInfo, HostResult, Outcome, StepRecord

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-user-id-9f8e7d6c5b4a"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def journal(tmp_path, clock):
    with Journal(tmp_path / "state", clock=clock) as j:
        yield j


def _raw(conn_path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(conn_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the file ---------------------------------------------------------------------


def test_creates_private_state_dir_and_journal_file(tmp_path):
    state = tmp_path / "a" / "state"
    Journal(state).close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(journal_path(state).stat().st_mode) == 0o600


def test_every_journal_file_is_private_whatever_the_umask(tmp_path, open_umask, clock):
    state = tmp_path / "state"
    with Journal(state, clock=clock) as journal:
        journal.start_run("r1", "upgrade", "/inv/deployer.toml", ["pi-01"], {})
        files = sorted(p.name for p in state.iterdir())
        assert files == ["journal.sqlite3", "journal.sqlite3-shm", "journal.sqlite3-wal"]
        for path in state.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_loose_state_dir_and_journal_are_tightened_and_logged(tmp_path, caplog, clock):
    state = tmp_path / "state"
    with Journal(state, clock=clock) as journal:
        journal.start_run("r1", "upgrade", "/inv/deployer.toml", ["pi-01"], {})
    state.chmod(0o755)
    journal_path(state).chmod(0o644)
    caplog.set_level("WARNING", logger="deployer.journal")
    with Journal(state, clock=clock) as journal:
        assert [run.run_id for run in journal.runs()] == ["r1"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(journal_path(state).stat().st_mode) == 0o600
    messages = [r.getMessage() for r in caplog.records if r.name == "deployer.journal"]
    assert messages == [
        f"state dir {state} was mode 0755: made it 0700 (the journal maps your fleet)",
        f"journal file {journal_path(state)} was mode 0644: made it 0600",
    ]


def test_a_shared_state_dir_is_not_changed_only_reported(tmp_path, caplog, clock):
    """--state-dir . (or any directory that holds more than the journal) is the
    user's: deployer does not chmod it, it says so."""
    shared = tmp_path / "project"
    shared.mkdir()
    (shared / "deployer.toml").write_text("")
    shared.chmod(0o755)
    caplog.set_level("WARNING", logger="deployer.journal")
    Journal(shared, clock=clock).close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE(journal_path(shared).stat().st_mode) == 0o600
    [message] = [r.getMessage() for r in caplog.records if r.name == "deployer.journal"]
    assert message.startswith(f"state dir {shared} is mode 0755 and holds more than the journal")


def test_a_private_state_dir_logs_nothing(tmp_path, caplog, clock):
    caplog.set_level("DEBUG", logger="deployer.journal")
    Journal(tmp_path / "state", clock=clock).close()
    Journal(tmp_path / "state", clock=clock).close()
    assert [r for r in caplog.records if r.name == "deployer.journal"] == []


def test_schema_is_versioned_and_in_wal_mode(journal):
    assert _raw(journal.path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert _raw(journal.path, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in _raw(journal.path, "SELECT name FROM sqlite_master")}
    assert {"runs", "hosts", "steps"} <= tables


def test_records_survive_reopening(tmp_path, clock):
    with Journal(tmp_path, clock=clock) as j:
        j.start_run("r1", "upgrade", "/inv/deployer.toml", ["pi-01"], {"force": True})
        j.step_begin("r1", "pi-01", "preflight")
    with Journal(tmp_path, clock=clock) as j:
        (run,) = j.runs()
        assert (run.run_id, run.command, run.hosts, run.options) == (
            "r1",
            "upgrade",
            ["pi-01"],
            {"force": True},
        )
        assert run.pid == os.getpid() and run.machine == machine_name()
        assert run.started == clock.wall() and run.finished is None and run.ok is None


def test_finish_run_records_ok_and_interrupted(journal):
    journal.start_run("r1", "upgrade", "inv", [], {})
    journal.finish_run("r1", ok=False, interrupted=True)
    (run,) = journal.runs()
    assert (run.ok, run.interrupted, run.finished) == (False, True, journal._clock.wall())


def test_unopenable_state_dir_is_a_journal_error_naming_path_and_fix(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state dir should be")
    with pytest.raises(JournalError) as info:
        Journal(blocker)
    assert str(blocker) in str(info.value) and "--state-dir" in str(info.value)


def test_using_a_closed_journal_is_a_journal_error(journal):
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.step_begin("r1", "pi-01", "preflight")


# --- facts and steps -------------------------------------------------------------------


def test_update_host_merges_facts_latest_wins(journal, clock):
    journal.update_host("r1", "pi-01", tunnel_opened=True, script_path="/opt/c.py")
    clock.advance(5)
    journal.update_host("r1", "pi-01", window_maybe_open=True, tunnel_opened=False)
    state = journal.host_state("r1", "pi-01")
    assert state["tunnel_opened"] is False
    assert state["window_maybe_open"] is True
    assert state["script_path"] == "/opt/c.py"
    assert state["result"] is None
    assert state["started"] == clock.wall() - 5


def test_step_and_finish_facts_merge_into_host_state(journal):
    journal.step_begin("r1", "pi-01", "stage", {"guard_dir": "/opt/.g"})
    journal.step_end("r1", "pi-01", "stage", "ok", 0.5, {"lock_path": "/opt/.lock"})
    journal.finish_host(
        "r1",
        "pi-01",
        "rolled_back",
        error={"step": "first_life", "type": "ClientOffline", "message": "m"},
        facts={"committed": False},
    )
    state = journal.host_state("r1", "pi-01")
    assert state["guard_dir"] == "/opt/.g" and state["lock_path"] == "/opt/.lock"
    assert state["committed"] is False
    assert state["result"] == "rolled_back"
    assert state["error"]["type"] == "ClientOffline"


def test_host_state_of_unknown_host_is_empty(journal):
    assert journal.host_state("nope", "pi-01") == {}


def test_steps_pair_begin_and_end_and_show_unended_steps(journal):
    journal.step_begin("r1", "pi-01", "preflight")
    journal.step_end("r1", "pi-01", "preflight", "ok", 0.02)
    journal.step_begin("r1", "pi-01", "swap")
    journal.step_begin("r1", "pi-02", "preflight")
    steps = journal.steps("r1", "pi-01")
    assert [(s["step"], s["status"], s["seconds"]) for s in steps] == [
        ("preflight", "ok", 0.02),
        ("swap", STEP_STARTED, None),
    ]


def test_host_results_lists_every_started_host(journal, clock):
    journal.step_begin("r1", "pi-01", "preflight")
    clock.advance(1)
    journal.finish_host("r1", "pi-02", "skipped")
    results = journal.host_results("r1")
    assert [(r["host"], r["result"]) for r in results] == [("pi-01", None), ("pi-02", "skipped")]


# --- dangling --------------------------------------------------------------------------


def test_host_of_a_live_run_is_not_dangling_unless_asked(journal):
    journal.start_run("r1", "upgrade", "inv", ["pi-01"], {})
    journal.step_begin("r1", "pi-01", "swap", {"window_maybe_open": True})
    assert journal.dangling() == []
    (d,) = journal.dangling(exclude_live=False)
    assert (d.run_id, d.host, d.last_step, d.last_status) == ("r1", "pi-01", "swap", STEP_STARTED)
    assert d.facts == HostFacts(window_maybe_open=True)


def test_hosts_of_a_dead_process_are_dangling_until_finished(tmp_path):
    state = tmp_path / "state"
    script = (
        "import sys\nfrom deployer.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "j.start_run('r1', 'upgrade', 'inv', ['pi-01', 'pi-02', 'pi-03'], {})\n"
        "j.step_begin('r1', 'pi-01', 'first_life', {'window_maybe_open': True})\n"
        "j.step_begin('r1', 'pi-02', 'stage')\n"
        "j.step_end('r1', 'pi-02', 'stage', 'failed', 0.3)\n"
        "j.finish_host('r1', 'pi-03', 'upgraded')\n"
        "import os; os._exit(9)\n"  # no close, no finish_run: a crash
    )
    child = subprocess.run([sys.executable, "-c", script, str(state)], check=False)
    assert child.returncode == 9
    with Journal(state) as j:
        dangling = {d.host: d for d in j.dangling()}
        assert sorted(dangling) == ["pi-01", "pi-02"]
        assert (dangling["pi-01"].last_step, dangling["pi-01"].last_status) == (
            "first_life",
            STEP_STARTED,
        )
        assert dangling["pi-01"].facts == HostFacts(window_maybe_open=True)
        assert dangling["pi-02"].last_status == "failed"
        assert dangling["pi-01"].pid == j.runs()[0].pid != os.getpid()

        j.finish_host("r1", "pi-01", "rolled_back")
        assert [d.host for d in j.dangling()] == ["pi-02"]


def test_liveness_needs_same_machine_same_process():
    me = os.getpid()
    assert process_is_live(machine_name(), me, process_start_token(me))
    assert not process_is_live(machine_name(), _exited_pid())
    assert not process_is_live("some-other-machine", me)
    assert not process_is_live(machine_name(), me, "not-my-start-time")  # pid reused


def test_hosts_without_a_run_record_are_dangling(journal):
    journal.step_begin("orphan", "pi-01", "swap")
    assert [d.run_id for d in journal.dangling()] == ["orphan"]


# --- concurrency -------------------------------------------------------------------------

THREADS = 8
WRITES_PER_THREAD = 10


def _hammer(state_dir: str, proc: int, start) -> None:
    """8 threads of one process writing the same journal through one Journal."""
    with Journal(Path(state_dir)) as j:
        together = threading.Barrier(THREADS)

        def work(thread: int) -> None:
            together.wait()
            for i in range(WRITES_PER_THREAD):
                host = f"h{thread}"
                j.step_begin("run", host, f"p{proc}-s{i}")
                j.step_end("run", host, f"p{proc}-s{i}", "ok", 0.01)
                j.update_host("run", "shared", **{f"p{proc}-t{thread}-i{i}": True})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        start.wait(timeout=30)  # both processes start writing at the same moment
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def test_two_processes_of_eight_threads_lose_no_write(tmp_path):
    state = str(tmp_path / "state")
    Journal(Path(state)).close()  # both children find the schema in place
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_hammer, args=(state, p, start)) for p in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    with Journal(Path(state)) as j:
        facts = j.host_state("run", "shared")
        expected = {
            f"p{p}-t{t}-i{i}"
            for p in range(2)
            for t in range(THREADS)
            for i in range(WRITES_PER_THREAD)
        }
        assert expected <= set(facts)
        for t in range(THREADS):
            steps = j.steps("run", f"h{t}")
            assert len(steps) == 2 * WRITES_PER_THREAD
            assert all(s["status"] == "ok" for s in steps)
    assert _raw(journal_path(Path(state)), "PRAGMA integrity_check") == [("ok",)]


def test_two_processes_creating_a_new_journal_at_once(tmp_path):
    state = str(tmp_path / "fresh")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_hammer, args=(state, p, start)) for p in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _raw(journal_path(Path(state)), "PRAGMA user_version") == [(SCHEMA_VERSION,)]


# --- secrets -------------------------------------------------------------------------------


def _files_bytes(state: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(state.iterdir()) if p.is_file())


def test_secrets_never_reach_the_file_wal_included(tmp_path):
    """Callers never pass a credential; an error message that quotes one anyway
    is masked (free text is where one can appear)."""
    state = tmp_path / "state"
    j = Journal(state, secrets=[SECRET])
    j.start_run("r1", "upgrade", "inv", ["pi-01"], {"force": False})
    j.step_begin("r1", "pi-01", "preflight", {"window_maybe_open": False})
    j.finish_host(
        "r1", "pi-01", "failed", error={"type": "WrongData", "message": f"bad id {SECRET}"}
    )
    assert (state / "journal.sqlite3-wal").exists()
    raw = _files_bytes(state)
    assert SECRET.encode() not in raw
    assert b"9f8e7d6c5b4a" not in raw  # not even a long tail of it
    assert SECRET[-4:].encode() in raw  # the mask is what was stored
    j.close()
    assert SECRET.encode() not in _files_bytes(state)
    with Journal(state) as reader:
        assert reader.host_state("r1", "pi-01")["error"]["message"] == "bad id …" + SECRET[-4:]


def test_a_short_dbid_inside_run_ids_hashes_and_paths_is_stored_as_it_is(tmp_path):
    """Identifiers are stored and compared unmasked: recover looks up the run dir
    and the lock by them. Only free text (an error message) is masked."""
    dbid = "0556"
    run_id = f"20250101T000000Z-{dbid}ab"
    sha = "ab" + dbid + "c" * 58
    run_dir = f"/opt/x/.client.py.deployer/runs/{run_id}"
    with Journal(tmp_path / "state", secrets=[dbid]) as j:
        j.start_run(run_id, "upgrade", "inv", ["pi-01"], {})
        j.step_begin(run_id, "pi-01", "stage", {"run_dir": run_dir, "old_sha256": sha})
        j.finish_host(
            run_id, "pi-01", "failed", error={"type": "WrongData", "message": f"dbid {dbid}"}
        )
        assert [r.run_id for r in j.runs()] == [run_id]
        state = j.host_state(run_id, "pi-01")
        assert (state["run_dir"], state["old_sha256"]) == (run_dir, sha)
        assert state["error"]["message"] == "dbid ****"
        assert [s["step"] for s in j.steps(run_id, "pi-01")] == ["stage"]


# --- migrations ------------------------------------------------------------------------------


def test_migration_upgrades_an_older_journal_and_keeps_its_data(tmp_path):
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db, isolation_level=None)
    assert migrate(conn) == 0
    conn.execute(
        "INSERT INTO runs (run_id, command, inventory, hosts, options, pid, machine, started)"
        " VALUES ('r1', 'upgrade', 'inv', '[]', '{}', 1, 'm', 1.0)"
    )
    v2 = (*MIGRATIONS, "ALTER TABLE runs ADD COLUMN note TEXT;")
    assert migrate(conn, v2) == SCHEMA_VERSION
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
    assert conn.execute("SELECT run_id, note FROM runs").fetchall() == [("r1", None)]
    assert migrate(conn, v2) == SCHEMA_VERSION + 1  # idempotent
    conn.close()


def test_journal_from_a_newer_deployer_is_refused(tmp_path):
    Journal(tmp_path).close()
    conn = sqlite3.connect(journal_path(tmp_path))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError, match="upgrade deployer"):
        Journal(tmp_path)


# --- the event sink ------------------------------------------------------------------------


def test_journal_sink_records_the_workflow_events(journal):
    journal.start_run("r1", "upgrade", "inv", ["pi-01"], {})
    sink = Fanout(JournalSink(journal, "r1"))
    sink.run_started("r1", ["pi-01"])
    sink.host_started("pi-01")
    assert [d.host for d in journal.dangling(exclude_live=False)] == ["pi-01"]
    sink.step_started("pi-01", "first_life", {"window_maybe_open": True})
    sink.step_finished("pi-01", "first_life", "failed", 2.5)
    error = ErrorInfo.from_exception(ClientOffline("never came online"), "first_life")
    sink.host_finished(
        HostResult(
            host="pi-01",
            result=Outcome.ROLLED_BACK,
            old_sha256="a" * 64,
            new_sha256="b" * 64,
            steps=[StepRecord("first_life", "failed", 2.5)],
            error=error,
        )
    )
    sink.run_finished("r1")
    state = journal.host_state("r1", "pi-01")
    assert state["result"] == "rolled_back"
    assert (state["old_sha256"], state["new_sha256"]) == ("a" * 64, "b" * 64)
    assert state["error"] == {
        "step": "first_life",
        "type": "ClientOffline",
        "message": "never came online",
        "api_error_code": None,
    }
    assert journal.steps("r1", "pi-01")[0]["status"] == "failed"
    assert journal.dangling(exclude_live=False) == []
