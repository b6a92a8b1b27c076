"""Deployer's side of the guard protocol (deployer/guardlink.py) against the
host's side (deployer/guard.py): one vocabulary, and the link tasks (inspect,
stage and the guard's stream, cleanup) run for real as local processes through
LocalRemote's channels."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from deployer import guardlink
from deployer.clock import Clock
from deployer.errors import GuardError, RemoteCommandError, VerifyError
from deployer.guardlink import (
    ARMED,
    CONTROLS,
    FINAL_STATES,
    GO,
    REVERTED,
    REVERTING,
    REVERTING_STATES,
    RUNNING,
    WATCHING_STATES,
    GuardLink,
    guard_source,
)
from deployer.hostfiles import HostPaths
from deployer.remote import sh
from tests.doubles import PYTHON, LocalRemote, ProcessReaper, wait_for

pytestmark = pytest.mark.unit


def _guard_calls(method: str) -> set[str]:
    """The first string argument of every ``<x>.<method>("…")`` call in guard.py."""
    found = set()
    for node in ast.walk(ast.parse(guard_source())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == method
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _link_states() -> set[str]:
    names = [n for n in dir(guardlink) if n.isupper() and isinstance(getattr(guardlink, n), str)]
    return {getattr(guardlink, n) for n in names} - set(CONTROLS) - {guardlink.ALIVE}


def test_every_state_the_guard_writes_has_a_name_here():
    written = _guard_calls("status")
    assert written  # the guard still writes its states with status("…")
    assert written <= _link_states()


def test_the_groups_hold_only_states_the_guard_writes():
    written = _guard_calls("status")
    assert FINAL_STATES | WATCHING_STATES | REVERTING_STATES <= written


def test_every_control_file_deployer_writes_is_one_the_guard_reads():
    assert set(CONTROLS) <= _guard_calls("control")


# --- the link tasks, run for real as local processes -----------------------------------


class Host:
    """A host's files for one run, reached through LocalRemote."""

    def __init__(self, root: Path):
        self.script = root / "opt" / "client.py"
        self.script.parent.mkdir(parents=True)
        self.paths = HostPaths(str(self.script), "run-A")
        self.remote = LocalRemote("pi-01")
        self.link = GuardLink(
            self.paths,
            PYTHON,
            remote=lambda: self.remote,
            regain=self.regain,
            clock=Clock(),
            host="pi-01",
        )
        self.regained = 0

    def regain(self, lost):
        if self.regained:
            raise lost
        self.regained += 1
        self.remote = LocalRemote("pi-01")

    @property
    def run_dir(self) -> Path:
        return Path(self.paths.run_dir)

    def write_status(self, *states: str) -> None:
        with open(self.run_dir / "status", "a") as fh:
            for state in states:
                fh.write(json.dumps({"state": state, "pid": 1}) + "\n")


@pytest.fixture
def host(tmp_path):
    host = Host(tmp_path)
    yield host
    host.link.close_stream()
    ProcessReaper(tmp_path).kill_all()


def test_inspect_takes_the_lock_and_reads_the_script_in_one_round_trip(host):
    host.script.write_bytes(b"old")
    host.script.chmod(0o750)
    found = host.link.inspect(owner=json.dumps({"owner": "me", "run_id": "run-A", "since": 1.0}))
    assert (found.lock, found.sha256, found.mode) == (
        "taken",
        hashlib.sha256(b"old").hexdigest(),
        "0750",
    )
    assert json.loads((Path(host.paths.lock) / "owner").read_text())["owner"] == "me"
    assert len(host.remote.commands) == 1
    again = host.link.inspect(owner="{}")
    assert again.lock == "held" and again.held_by.owner == "me"


def test_inspect_without_a_lock_or_a_script(host):
    found = host.link.inspect()
    assert (found.lock, found.sha256, found.mode) == (None, None, None)
    assert not Path(host.paths.lock).exists()


def test_stage_writes_checks_validates_and_arms_then_streams(host):
    host.script.write_bytes(b"old")
    program = b"import sys\nprint(4242)\n"  # a stand-in guard: prints a pid and exits
    pid = host.link.stage(b"new", program, mode="0700", validate="true", owner_of=None)
    assert pid == 4242
    staged = Path(host.paths.staged)
    assert staged.read_bytes() == b"new" and stat.S_IMODE(staged.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(host.paths.guard).stat().st_mode) == 0o700
    host.write_status(ARMED)
    assert [ln["state"] for ln in host.link.lines()] == [ARMED]
    host.link.signal(GO)
    wait_for(lambda: (host.run_dir / GO).exists())
    wait_for(lambda: (host.run_dir / "alive").exists())
    assert len(host.remote.commands) == 1  # staging and the stream: one channel


def test_a_failing_validate_is_reported_and_nothing_is_armed(host):
    with pytest.raises(VerifyError, match="validate command failed \\(exit 3\\)"):
        host.link.stage(b"new", b"x", mode="0700", validate="echo bad >&2; exit 3", owner_of=None)
    assert not (host.run_dir / "status").exists()


def test_a_stream_replays_the_status_and_sees_it_cut(host):
    host.run_dir.mkdir(parents=True)
    host.write_status(ARMED, RUNNING)
    assert [ln["state"] for ln in host.link.lines()] == [ARMED, RUNNING]
    (host.run_dir / "status").write_text("")  # the run's files were lost
    assert host.link.lines() == []
    host.write_status(REVERTED)
    assert host.link.last()["state"] == REVERTED


def test_a_reverted_guard_is_reported_with_the_reason_it_reverted_for(host):
    host.run_dir.mkdir(parents=True)
    host.write_status(ARMED, RUNNING)
    with open(host.run_dir / "status", "a") as fh:  # the reason is on the reverting line only
        fh.write(
            json.dumps({"state": REVERTING, "pid": 1, "reason": "deployer went silent"}) + "\n"
        )
    host.write_status(REVERTED)
    with pytest.raises(GuardError, match="the guard reverted: deployer went silent"):
        host.link.state("soak")


def test_a_lost_stream_is_regained_and_the_swap_words_written_again(host):
    host.run_dir.mkdir(parents=True)
    host.write_status(ARMED)
    host.link.signal(GO)
    wait_for(lambda: (host.run_dir / GO).exists())
    (host.run_dir / GO).unlink()
    host.remote.lost = True
    assert host.link.last()["state"] == ARMED  # on a new session, a new stream
    assert host.regained == 1
    wait_for(lambda: (host.run_dir / GO).exists())  # idempotent: written again


def test_an_api_wait_inside_the_window_is_spent_heard_by_the_guard(host, monkeypatch):
    """idle_heard: the whole wait, beating on the stream (an API back-off must not
    look like a deployer gone); on a lost session it sleeps, never regains."""
    monkeypatch.setattr(guardlink, "BEAT", 0.05)
    host.run_dir.mkdir(parents=True)
    host.write_status(ARMED, RUNNING)
    host.link.lines()  # the stream is open
    beats = host.remote.words.count("alive")
    start = time.monotonic()
    host.link.idle_heard(0.4)
    assert time.monotonic() - start >= 0.4  # a line that came did not end the wait
    assert host.remote.words.count("alive") >= beats + 3
    host.remote.lost = True
    start = time.monotonic()
    host.link.idle_heard(0.2)  # no error, no new session
    assert time.monotonic() - start >= 0.2 and host.regained == 0


def test_the_follower_ends_when_deployers_end_closes(host):
    host.run_dir.mkdir(parents=True)
    host.link.lines()
    follower = host.remote.channels[-1].proc
    host.link.close_stream()
    assert follower.wait(5) == 0  # no sign of life any more: the guard's silence check


def test_cleanup_prunes_removes_the_run_and_releases_its_lock(host):
    backups = Path(host.paths.backups)
    backups.mkdir(parents=True)
    for stamp in ("1", "2", "3"):
        (backups / f"client.py.{stamp}").write_text(stamp)
        (backups / f"client.py.{stamp}").chmod(0o644)
    host.run_dir.mkdir(parents=True)
    Path(host.paths.lock).mkdir()
    (Path(host.paths.lock) / "owner").write_text(json.dumps({"run_id": "run-A"}))
    pruned = host.link.clean(keep=2, remove_run=True, release_lock=True)
    assert pruned == [str(backups / "client.py.1")]
    assert sorted(p.name for p in backups.iterdir()) == ["client.py.2", "client.py.3"]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in backups.iterdir())
    assert not host.run_dir.exists() and not Path(host.paths.lock).exists()


def _staged_run(host) -> Path:
    """A staged run (a stand-in guard) with its stream open, this run's lock, and
    three backups; returns the backups' folder."""
    backups = Path(host.paths.backups)
    backups.mkdir(parents=True)
    for stamp in ("1", "2", "3"):
        (backups / f"client.py.{stamp}").write_text(stamp)
    Path(host.paths.lock).mkdir()
    (Path(host.paths.lock) / "owner").write_text(json.dumps({"run_id": "run-A"}))
    host.link.stage(b"new", b"print(4242)\n", mode="0700", validate="", owner_of=None)
    return backups


def test_cleanup_rides_on_the_open_stream(host):
    """The run's last round trip: no new channel and no new program on the host."""
    backups = _staged_run(host)
    host.write_status(ARMED, RUNNING)  # lines the guard wrote come before the answer
    pruned = host.link.clean(keep=1, remove_run=True, release_lock=True)
    assert pruned == [str(backups / "client.py.1"), str(backups / "client.py.2")]
    assert not host.run_dir.exists() and not Path(host.paths.lock).exists()
    assert len(host.remote.commands) == 1  # the stage's channel only
    assert host.link.stream is None
    assert host.remote.channels[0].proc.wait(5) == 0  # the follower ended


def test_cleanup_is_a_task_again_when_the_follower_has_ended(host):
    backups = _staged_run(host)
    shutil.rmtree(host.run_dir)  # the follower ends when its run dir is gone
    assert host.remote.channels[0].proc.wait(5) == 0
    pruned = host.link.clean(keep=2, remove_run=True, release_lock=True)
    assert pruned == [str(backups / "client.py.1")]
    assert not host.run_dir.exists() and not Path(host.paths.lock).exists()
    assert len(host.remote.commands) == 2 and host.regained == 0


def test_a_cleanup_failing_on_the_stream_is_reported(host):
    backups = _staged_run(host)
    (backups / "client.py.0").mkdir()  # the oldest "backup" cannot be unlinked
    with pytest.raises(RemoteCommandError, match="cleanup task failed: .*client.py.0"):
        host.link.clean(keep=1, remove_run=True, release_lock=True)
    assert len(host.remote.commands) == 1


def test_cleanup_keeps_a_lock_of_another_run(host):
    Path(host.paths.lock).mkdir(parents=True)
    (Path(host.paths.lock) / "owner").write_text(json.dumps({"run_id": "run-B"}))
    host.link.clean(keep=None, remove_run=True, release_lock=True)
    assert Path(host.paths.lock).exists()


def test_the_link_tasks_and_the_guard_start_python_without_site(host):
    """Each start without ``site`` costs the host 10-40 ms less CPU (stdlib only)."""
    host.link.inspect()
    (command,) = host.remote.commands
    assert command.startswith(f"{sh(PYTHON)} -S -c "), command
    assert '"-S", "guard.py", "--detach"' in guard_source()
    assert "-S guard.py --detach" in host.link._start()


def test_the_link_and_the_guard_load_urllib_only_when_a_revert_calls_the_api():
    """urllib.request is ~60 % of the CPU a start of guard.py costs the host; only
    the guard's API calls (a revert closing the window) need it."""
    probe = (
        "import sys\n"
        "g = {'__name__': 'guardlink'}\n"
        "exec(compile(sys.stdin.read(), 'guard.py', 'exec'), g)\n"
        "before = 'urllib.request' in sys.modules\n"
        "g['api_call']({'url': 'http://127.0.0.1:9/{call}', 'params': {}, 'timeout': 1}, 'x')\n"
        "print(before, 'urllib.request' in sys.modules)\n"
    )
    out = subprocess.run(
        [PYTHON, "-S", "-c", probe],
        input=guard_source(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_deployers_beat_leaves_the_shortest_silence_limit_three_beats():
    """A guard reverts when deployer is unheard for ``silence_limit`` (15 s at the
    least): one lost or late beat must never come near it."""
    assert 3 * guardlink.BEAT <= guardlink.SILENCE_MIN


def test_every_word_of_a_link_command_is_quoted(tmp_path):
    hostile = tmp_path / "a b;$(touch pwned)'x" / "client.py"
    hostile.parent.mkdir()
    host = Host.__new__(Host)
    host.script, host.remote = hostile, LocalRemote("pi-01")
    host.paths = HostPaths(str(hostile), "run-A")
    link = GuardLink(host.paths, PYTHON, lambda: host.remote, lambda e: None, Clock(), "pi-01")
    assert link.inspect().sha256 is None
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()
