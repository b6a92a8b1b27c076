"""The state journal: a SQLite file that says what every run did, step by step.

docs/reference/journal.md: a step's ``begin`` record is durable (committed, fsynced) **before**
the step acts, and its ``end`` record is written after it ends, so
``deployer recover`` can tell after a crash or ``kill -9`` what may be left
dangling: an open window, an uncommitted guard, a held lock, a tunnel that
deployer opened.

The file is ``STATE_DIR/journal.sqlite3`` in WAL mode with
``synchronous=FULL``; every write is its own ``BEGIN IMMEDIATE`` transaction,
so several processes and several threads can write at once. Within one
process the threads share one connection behind a lock; between processes
SQLite's file locks and ``busy_timeout`` serialize the writers.

The state dir is created 0700 and the journal files are 0600 (SQLite gives its
``-wal`` and ``-shm`` files the database file's mode): the journal holds no
credential, but it maps the fleet. A state dir or journal file found with a
looser mode is tightened, with a log line; a state dir that holds anything but
the journal (``--state-dir .``, a shared directory) is only reported.

A host parked by ``--wait-offline`` (facts ``waiting: true``, a ``wait``
step begun) has nothing in flight: it is not dangling, and ``recover`` leaves
it alone. A later run of the same command on the same targets finds it with
:meth:`Journal.pending_wait` and takes the wait over
(:meth:`Journal.hand_over_wait`).

Nothing secret is ever stored: callers pass host names, remote paths, step
names, statuses, times, sha256s, booleans and already-masked error messages.
Identifiers (run ids, host names, paths, sha256s, facts) are stored as they
are, never scrubbed: ``recover`` finds a run dir and a lock by them, and a
short credential such as ``dbid = "0556"`` turns up inside them by chance.
Only free text, an error's ``message``, is masked once more of the secrets
the journal was given (defence in depth, by ``secrets.scrub``'s rule).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.clock import Clock
from deployer.errors import JournalError
from deployer.events import EventSink
from deployer.facts import FACT_NAMES, HostFacts, known
from deployer.pids import machine_name, process_is_live, process_start_token
from deployer.result import HostResult
from deployer.secrets import scrub

log = logging.getLogger("deployer.journal")

JOURNAL_FILENAME = "journal.sqlite3"
# what a state dir of deployer's own holds: the database and SQLite's side files
JOURNAL_FILES = frozenset(JOURNAL_FILENAME + end for end in ("", "-wal", "-shm", "-journal"))
STATE_DIR_MODE = 0o700
JOURNAL_FILE_MODE = 0o600
OTHERS_BITS = 0o077  # any access for group or others: tightened
BUSY_TIMEOUT_MS = 10_000
OPEN_RETRY_DELAY = 0.01  # first wait when opening meets another process's lock
OPEN_RETRY_DELAY_CAP = 0.5
STEP_STARTED = "started"  # last_status of a step whose ``begin`` has no ``end``

_SCHEMA_V1 = """
CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    command     TEXT NOT NULL,
    inventory   TEXT NOT NULL,
    hosts       TEXT NOT NULL,            -- JSON list of targeted host names
    options     TEXT NOT NULL,            -- JSON object
    pid         INTEGER NOT NULL,
    pid_start   TEXT,                     -- process start token (detects pid reuse)
    machine     TEXT NOT NULL,            -- hostname of the machine that ran it
    started     REAL NOT NULL,
    finished    REAL,
    ok          INTEGER,
    interrupted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE hosts (
    run_id   TEXT NOT NULL,
    host     TEXT NOT NULL,
    started  REAL NOT NULL,
    updated  REAL NOT NULL,
    facts    TEXT NOT NULL DEFAULT '{}',  -- JSON object, merged by update_host
    result   TEXT,                        -- NULL until finish_host: dangling
    error    TEXT,                        -- JSON object or NULL
    finished REAL,
    PRIMARY KEY (run_id, host)
);
CREATE INDEX hosts_unfinished ON hosts (run_id) WHERE result IS NULL;
CREATE INDEX hosts_by_host ON hosts (host, run_id);
CREATE TABLE steps (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT NOT NULL,
    host    TEXT NOT NULL,
    step    TEXT NOT NULL,
    phase   TEXT NOT NULL CHECK (phase IN ('begin', 'end')),
    status  TEXT,                         -- NULL for begin
    seconds REAL,                         -- NULL for begin
    facts   TEXT,                         -- JSON object or NULL
    at      REAL NOT NULL
);
CREATE INDEX steps_by_run_host ON steps (run_id, host, id);
"""

# MIGRATIONS[n] takes a journal from schema version n to n + 1.
MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1,)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    command: str
    inventory: str
    hosts: list[str]
    options: dict[str, Any]
    pid: int
    machine: str
    started: float
    finished: float | None
    ok: bool | None
    interrupted: bool
    pid_start: str | None = None

    def is_live(self) -> bool:
        """True while the process that wrote this run still runs on this machine."""
        return process_is_live(self.machine, self.pid, self.pid_start)


@dataclass(frozen=True)
class PendingWait:
    """An earlier run's wait that a new run of the same targets picks up."""

    run_id: str
    hosts: list[str]  # parked when that run ended (or died), never upgraded
    deadline: float | None  # epoch seconds: when that run's wait was to end
    finished: bool  # False: the run died without finishing


@dataclass(frozen=True)
class DanglingHost:
    """A (run, host) that started and has no final result."""

    run_id: str
    host: str
    facts: HostFacts
    last_step: str | None
    last_status: str | None  # a step status, or STEP_STARTED if it never ended
    started: float  # when the host's first record in that run was written
    command: str | None = None
    machine: str | None = None
    pid: int | None = None
    last_record: float | None = None  # when anything was last written for it (facts, steps)


def journal_path(state_dir: Path) -> Path:
    return Path(state_dir) / JOURNAL_FILENAME


def _fact_path(name: str) -> str:
    """The JSON path of fact ``name`` (a :class:`~deployer.facts.HostFacts` field), for SQL."""
    if name not in FACT_NAMES:
        raise ValueError(f"{name!r} is not a host fact")
    return f"$.{name}"


_WAITING, _LOCK_MAYBE_HELD = _fact_path("waiting"), _fact_path("lock_maybe_held")


def migrate(conn: sqlite3.Connection, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Bring the schema to ``len(migrations)``; return the version found before.

    Runs inside one ``BEGIN IMMEDIATE`` so two processes opening a new journal
    at once do not both create the tables.
    """
    target = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > target:
            raise _NewerSchema(found, target)
        for version in range(found, target):
            for statement in _statements(migrations[version]):
                conn.execute(statement)
        if found != target:
            conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements (``executescript`` would COMMIT)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line.split("--", 1)[0].rstrip() + "\n"
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()


class _NewerSchema(Exception):
    def __init__(self, found: int, supported: int):
        super().__init__(f"schema version {found}, this deployer knows up to {supported}")
        self.found = found
        self.supported = supported


class Journal:
    """The state journal of one state dir. Thread-safe; several processes may share it."""

    def __init__(
        self,
        state_dir: Path,
        secrets: Iterable[str] = (),
        clock: Clock | None = None,
    ):
        self.state_dir = Path(state_dir).expanduser()
        self.path = journal_path(self.state_dir)
        self._secrets = frozenset(s for s in secrets if s)
        self._clock = clock or Clock()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._conn = self._open()

    # --- opening ----------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self._make_state_dir()
            conn = sqlite3.connect(
                str(self.path),
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # autocommit; every write is an explicit transaction
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._error("cannot open", exc) from exc
        try:
            self._prepare(conn)
        except _NewerSchema as exc:
            conn.close()
            raise JournalError(
                f"journal {self.path} has {exc}; upgrade deployer, "
                "or pass --state-dir DIR to use another journal"
            ) from None
        except sqlite3.Error as exc:
            conn.close()
            raise self._error("cannot open", exc) from exc
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """WAL, durable commits and the schema.

        Two processes switching a new file to WAL at once can get "locked" at
        once, without the busy handler (SQLite avoids a deadlock): retry that
        for up to the busy timeout.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = OPEN_RETRY_DELAY
        while True:
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is required")
                conn.execute("PRAGMA synchronous = FULL")
                migrate(conn)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, OPEN_RETRY_DELAY_CAP)

    def _make_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, mode=STATE_DIR_MODE)
        except FileExistsError:
            self._tighten_state_dir()  # ours from before, the user's, or another process's
        else:
            os.chmod(self.state_dir, STATE_DIR_MODE)  # mkdir's mode is cut by the umask
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, JOURNAL_FILE_MODE)
            os.close(fd)
        self._tighten_journal_files()

    def _tighten_state_dir(self) -> None:
        """Make an existing state dir 0700 if it is deployer's own (yours, not a
        shared sticky directory, nothing in it but the journal); else only say so."""
        info = self.state_dir.stat()
        mode = stat.S_IMODE(info.st_mode)
        if not mode & OTHERS_BITS:
            return
        names = set(os.listdir(self.state_dir))
        if info.st_uid != os.geteuid() or mode & stat.S_ISVTX or not names <= JOURNAL_FILES:
            log.warning(
                "state dir %s is mode %04o and holds more than the journal: left as it is; "
                "pass --state-dir DIR to keep the journal in a directory of its own",
                self.state_dir,
                mode,
            )
            return
        os.chmod(self.state_dir, STATE_DIR_MODE)
        log.warning(
            "state dir %s was mode %04o: made it %04o (the journal maps your fleet)",
            self.state_dir,
            mode,
            STATE_DIR_MODE,
        )

    def _tighten_journal_files(self) -> None:
        for name in sorted(JOURNAL_FILES):
            path = self.state_dir / name
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(info.st_mode)
            if not stat.S_ISREG(info.st_mode) or not mode & OTHERS_BITS:
                continue
            if info.st_uid != os.geteuid():
                log.warning("journal file %s is mode %04o and not yours: left as it is", path, mode)
                continue
            os.chmod(path, JOURNAL_FILE_MODE)
            log.warning(
                "journal file %s was mode %04o: made it %04o", path, mode, JOURNAL_FILE_MODE
            )

    def _error(self, what: str, exc: BaseException) -> JournalError:
        reason = scrub(str(exc) or type(exc).__name__, self._secrets)
        if "locked" in reason:
            fix = f"another process kept it locked for over {BUSY_TIMEOUT_MS // 1000} s; retry"
        else:
            fix = f"check that {self.state_dir} is writable by you and on a local filesystem"
        return JournalError(
            f"{what} the journal {self.path}: {reason}; {fix}, "
            "or pass --state-dir DIR to use another one"
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- low level --------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction (committed and fsynced on exit)."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error("cannot write", exc) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error("cannot write", exc) from exc
                raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._connection()
            try:
                cursor = conn.execute(sql, params)
                cursor.row_factory = sqlite3.Row
                return cursor.fetchall()
            except sqlite3.Error as exc:
                raise self._error("cannot read", exc) from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"the journal {self.path} is closed")
        return self._conn

    def _text(self, value: str) -> str:
        """An identifier as it is stored (never scrubbed: see the module docstring)."""
        return str(value)

    def _json(self, value: Any) -> str:
        return json.dumps(value, default=str)  # a Secret in it prints masked

    def _error_json(self, error: dict[str, Any]) -> str:
        """An error record; its free-text ``message`` is masked (defence in depth)."""
        message = error.get("message")
        if isinstance(message, str):
            error = {**error, "message": scrub(message, self._secrets)}
        return self._json(error)

    def _now(self) -> float:
        return self._clock.wall()

    # --- runs ---------------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        command: str,
        inventory: str,
        hosts: list[str],
        options: dict[str, Any],
    ) -> None:
        """Record a new run with this process's pid, the machine and the start time."""
        pid = os.getpid()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, command, inventory, hosts, options, pid,"
                " pid_start, machine, started) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._text(run_id),
                    self._text(command),
                    self._text(inventory),
                    self._json(list(hosts)),
                    self._json(dict(options)),
                    pid,
                    process_start_token(pid),
                    self._text(machine_name()),
                    self._now(),
                ),
            )

    def finish_run(self, run_id: str, ok: bool, interrupted: bool = False) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET finished = ?, ok = ?, interrupted = ? WHERE run_id = ?",
                (self._now(), int(ok), int(interrupted), self._text(run_id)),
            )

    # --- hosts and steps ------------------------------------------------------------

    def step_begin(
        self, run_id: str, host: str, step: str, facts: dict[str, Any] | None = None
    ) -> None:
        """Durably record that ``step`` is about to act (call it *before* it acts)."""
        self._step(run_id, host, step, "begin", None, None, facts)

    def step_end(
        self,
        run_id: str,
        host: str,
        step: str,
        status: str,
        seconds: float,
        facts: dict[str, Any] | None = None,
    ) -> None:
        self._step(run_id, host, step, "end", status, seconds, facts)

    def _step(
        self,
        run_id: str,
        host: str,
        step: str,
        phase: str,
        status: str | None,
        seconds: float | None,
        facts: dict[str, Any] | None,
    ) -> None:
        now = self._now()
        run_id, host = self._text(run_id), self._text(host)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO steps (run_id, host, step, phase, status, seconds, facts, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    host,
                    self._text(step),
                    phase,
                    None if status is None else self._text(status),
                    seconds,
                    None if facts is None else self._json(facts),
                    now,
                ),
            )
            self._merge_facts(conn, run_id, host, facts or {}, now)

    def update_host(self, run_id: str, host: str, **facts: Any) -> None:
        """Merge ``facts`` into the latest known facts of (run, host); creates the row."""
        now = self._now()
        with self._write() as conn:
            self._merge_facts(conn, self._text(run_id), self._text(host), facts, now)

    def finish_host(
        self,
        run_id: str,
        host: str,
        result: str,
        error: dict[str, Any] | None = None,
        facts: dict[str, Any] | None = None,
    ) -> None:
        """Record the final result of ``host`` in ``run_id``; it is no longer dangling."""
        now = self._now()
        run_id, host = self._text(run_id), self._text(host)
        with self._write() as conn:
            self._merge_facts(conn, run_id, host, facts or {}, now)
            conn.execute(
                "UPDATE hosts SET result = ?, error = ?, finished = ?"
                " WHERE run_id = ? AND host = ?",
                (
                    self._text(result),
                    None if error is None else self._error_json(error),
                    now,
                    run_id,
                    host,
                ),
            )

    def _merge_facts(
        self,
        conn: sqlite3.Connection,
        run_id: str,
        host: str,
        facts: dict[str, Any],
        now: float,
    ) -> None:
        """Read-merge-write inside the caller's ``BEGIN IMMEDIATE``: no lost updates."""
        row = conn.execute(
            "SELECT facts FROM hosts WHERE run_id = ? AND host = ?", (run_id, host)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO hosts (run_id, host, started, updated, facts) VALUES (?, ?, ?, ?, ?)",
                (run_id, host, now, now, self._json(facts)),
            )
            return
        if not facts:
            return
        merged = {**json.loads(row[0]), **json.loads(self._json(facts))}
        conn.execute(
            "UPDATE hosts SET facts = ?, updated = ? WHERE run_id = ? AND host = ?",
            (self._json(merged), now, run_id, host),
        )

    # --- reading ----------------------------------------------------------------------

    def host_state(self, run_id: str, host: str) -> dict[str, Any]:
        """The merged facts of (run, host) plus ``result``, ``error``, ``started``,
        ``finished``; an empty dict if the host never started in that run."""
        rows = self._read(
            "SELECT facts, result, error, started, finished FROM hosts"
            " WHERE run_id = ? AND host = ?",
            (run_id, host),
        )
        if not rows:
            return {}
        row = rows[0]
        return {
            **json.loads(row["facts"]),
            "result": row["result"],
            "error": _loads(row["error"]),
            "started": row["started"],
            "finished": row["finished"],
        }

    def dangling(self, exclude_live: bool = True) -> list[DanglingHost]:
        """Every (run, host) that started and has no final result, oldest first,
        and every host whose cleanup could not release its lock (``lock_maybe_held``).

        With ``exclude_live``, runs whose process still runs on this machine are
        skipped: they are in progress, not dangling. Runs recorded on another
        machine cannot be checked and are always included (``recover`` presumes
        them dead only on evidence: ``last_record`` older than their deadline).
        """
        rows = self._read(
            "SELECT h.run_id, h.host, h.facts, h.started, r.command, r.machine, r.pid,"
            " r.pid_start, h.updated,"
            " (SELECT MAX(s.at) FROM steps s WHERE s.run_id = h.run_id AND s.host = h.host)"
            "   AS last_step_at,"
            " (SELECT s.step FROM steps s WHERE s.run_id = h.run_id AND s.host = h.host"
            "   ORDER BY s.id DESC LIMIT 1) AS last_step,"
            " (SELECT CASE s.phase WHEN 'begin' THEN ? ELSE s.status END FROM steps s"
            "   WHERE s.run_id = h.run_id AND s.host = h.host"
            "   ORDER BY s.id DESC LIMIT 1) AS last_status"
            " FROM hosts h LEFT JOIN runs r ON r.run_id = h.run_id"
            # parked by --wait-offline: nothing in flight, nothing to recover
            " WHERE (h.result IS NULL AND COALESCE(json_extract(h.facts, ?), 0) = 0)"
            # a final result whose cleanup could not release the host lock
            "    OR json_extract(h.facts, ?) = 1"
            " ORDER BY h.started, h.run_id, h.host",
            (STEP_STARTED, _WAITING, _LOCK_MAYBE_HELD),
        )
        found = []
        for row in rows:
            known = row["pid"] is not None
            if (
                exclude_live
                and known
                and process_is_live(row["machine"], row["pid"], row["pid_start"])
            ):
                continue
            found.append(
                DanglingHost(
                    run_id=row["run_id"],
                    host=row["host"],
                    facts=HostFacts.from_json(json.loads(row["facts"])),
                    last_step=row["last_step"],
                    last_status=row["last_status"],
                    started=row["started"],
                    command=row["command"],
                    machine=row["machine"],
                    pid=row["pid"],
                    last_record=max(row["updated"], row["last_step_at"] or 0.0),
                )
            )
        return found

    def pending_wait(self, command: str, inventory: str, hosts: list[str]) -> PendingWait | None:
        """The wait left by the newest earlier run of ``command`` on exactly these
        ``hosts`` (same inventory): its hosts still parked when it was interrupted
        or died. None if that run left none, or still runs."""
        rows = self._read(
            "SELECT * FROM runs WHERE command = ? AND inventory = ? AND hosts = ?"
            " ORDER BY started DESC, rowid DESC LIMIT 1",
            (self._text(command), self._text(inventory), self._json(list(hosts))),
        )
        if not rows:
            return None
        run = _run_record(rows[0])
        if run.finished is None and run.is_live():
            return None
        parked = self._read(
            "SELECT host FROM hosts WHERE run_id = ? AND json_extract(facts, ?) = 1 ORDER BY host",
            (run.run_id, _WAITING),
        )
        if not parked:
            return None
        deadline = run.options.get("wait_deadline")
        return PendingWait(
            run_id=run.run_id,
            hosts=[row["host"] for row in parked],
            deadline=float(deadline) if isinstance(deadline, int | float) else None,
            finished=run.finished is not None,
        )

    def hand_over_wait(self, pending: PendingWait, new_run_id: str) -> None:
        """The earlier run's parked hosts are the new run's now: they stop waiting
        there (a host it left without a result ends ``skipped``), and a run that
        died is marked finished (interrupted), so neither is picked up again."""
        message = f"its wait was picked up by run {new_run_id}"
        error = {"step": None, "type": "RolloutStopped", "message": message, "api_error_code": None}
        for host in pending.hosts:
            self.update_host(pending.run_id, host, **known(waiting=False, picked_up_by=new_run_id))
            if self.host_state(pending.run_id, host).get("result") in (None, "failed"):
                self.finish_host(pending.run_id, host, "skipped", error=error)
        if not pending.finished:
            self.finish_run(pending.run_id, ok=False, interrupted=True)

    def runs(self, host: str | None = None, limit: int = 20) -> list[RunRecord]:
        """Past runs, newest first; with ``host``, only the runs that touched it."""
        where = ""
        params: tuple[str, ...] = ()
        if host is not None:
            where = "WHERE EXISTS (SELECT 1 FROM hosts h WHERE h.run_id = r.run_id AND h.host = ?)"
            params = (host,)
        rows = self._read(
            f"SELECT * FROM runs r {where} ORDER BY r.started DESC, r.rowid DESC LIMIT ?",  # noqa: S608
            (*params, int(limit)),
        )
        return [_run_record(row) for row in rows]

    def run(self, run_id: str) -> RunRecord | None:
        rows = self._read("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return _run_record(rows[0]) if rows else None

    def host_results(self, run_id: str) -> list[dict[str, Any]]:
        """One dict per host of the run: host, result (None if unfinished), error,
        started, finished and the merged facts; in the order the hosts started."""
        rows = self._read(
            "SELECT host, facts, result, error, started, finished FROM hosts"
            " WHERE run_id = ? ORDER BY started, host",
            (run_id,),
        )
        return [
            {
                "host": row["host"],
                "result": row["result"],
                "error": _loads(row["error"]),
                "started": row["started"],
                "finished": row["finished"],
                "facts": json.loads(row["facts"]),
            }
            for row in rows
        ]

    def steps(self, run_id: str, host: str) -> list[dict[str, Any]]:
        """The step log of (run, host), one dict per step in the order they began:
        step, status (STEP_STARTED if it never ended), seconds, began, ended."""
        rows = self._read(
            "SELECT step, phase, status, seconds, at FROM steps"
            " WHERE run_id = ? AND host = ? ORDER BY id",
            (run_id, host),
        )
        out: list[dict[str, Any]] = []
        open_by_step: dict[str, dict[str, Any]] = {}
        entry: dict[str, Any] | None
        for row in rows:
            if row["phase"] == "begin":
                entry = {
                    "step": row["step"],
                    "status": STEP_STARTED,
                    "seconds": None,
                    "began": row["at"],
                    "ended": None,
                }
                out.append(entry)
                open_by_step[row["step"]] = entry
                continue
            entry = open_by_step.pop(row["step"], None)
            if entry is None:  # an end without a begin: keep it anyway
                entry = {"step": row["step"], "began": None}
                out.append(entry)
            entry.update(status=row["status"], seconds=row["seconds"], ended=row["at"])
        return out


class JournalSink(EventSink):
    """Feeds the workflow's events into a :class:`Journal` for one run.

    ``start_run``/``finish_run`` need what only the caller knows (command,
    options, ok), so the caller makes those two calls itself.
    """

    def __init__(self, journal: Journal, run_id: str):
        self.journal = journal
        self.run_id = run_id

    def host_started(self, host: str) -> None:
        self.journal.update_host(self.run_id, host)

    def step_started(self, host: str, step: str, facts: dict[str, Any] | None = None) -> None:
        self.journal.step_begin(self.run_id, host, step, facts)

    def step_finished(
        self,
        host: str,
        step: str,
        status: str,
        seconds: float,
        facts: dict[str, Any] | None = None,
    ) -> None:
        self.journal.step_end(self.run_id, host, step, status, seconds, facts)

    def host_finished(self, result: HostResult) -> None:
        self.journal.finish_host(
            self.run_id,
            result.host,
            result.result.value,
            error=result.error.to_json() if result.error else None,
            facts=known(
                old_sha256=result.old_sha256,
                new_sha256=result.new_sha256,
                exposure_seconds=round(result.exposure_seconds, 3),
                api_calls=result.api_calls,
                duration_seconds=round(result.duration_seconds, 3),
                waiting_seconds=round(result.waiting_seconds, 3),
            ),
        )


def _loads(raw: str | None) -> Any:
    return None if raw is None else json.loads(raw)


def _run_record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        command=row["command"],
        inventory=row["inventory"],
        hosts=json.loads(row["hosts"]),
        options=json.loads(row["options"]),
        pid=row["pid"],
        machine=row["machine"],
        started=row["started"],
        finished=row["finished"],
        ok=None if row["ok"] is None else bool(row["ok"]),
        interrupted=bool(row["interrupted"]),
        pid_start=row["pid_start"],
    )
