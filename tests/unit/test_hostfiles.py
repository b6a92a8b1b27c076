"""Remote paths, the host lock and backups, on local files through LocalRemote
(the real shell commands run). The guard's status: test_guardlink.py."""

from __future__ import annotations

import hashlib
import json
import shlex
import stat
import subprocess

import pytest

from deployer.errors import LockHeld
from deployer.hostfiles import (
    HostPaths,
    list_backups,
    loose_mode_warning,
    prune_backups,
    read_file,
    read_lock,
    release_lock,
    remote_script_info,
    remote_sha256,
    take_lock,
)
from deployer.model import HostConfig, ProviderConfig
from deployer.remote import SshRemote, sh
from deployer.secrets import Secret
from tests.doubles import LocalRemote

pytestmark = pytest.mark.unit


@pytest.fixture
def remote():
    return LocalRemote("pi-01")


@pytest.fixture
def paths(tmp_path):
    return HostPaths(str(tmp_path / "opt" / "client.py"), "run-A")


# --- paths --------------------------------------------------------------------------


def test_everything_lives_in_one_directory_beside_the_script():
    p = HostPaths("/opt/sshreach/client.py", "R1")
    assert p.base == "/opt/sshreach/.client.py.deployer"
    assert p.lock == "/opt/sshreach/.client.py.deployer/lock"
    assert p.backups == "/opt/sshreach/.client.py.deployer/backups"
    assert p.run_dir == "/opt/sshreach/.client.py.deployer/runs/R1"
    assert p.staged == p.run_dir + "/new-script"
    assert p.guard == p.run_dir + "/guard.py"
    assert p.status == p.run_dir + "/status"
    assert p.control("commit") == p.run_dir + "/commit"


def test_backup_names_sort_by_time():
    p = HostPaths("/opt/client.py", "R1")
    a = p.backup_for("ab" * 32, 1_700_000_000.0)
    b = p.backup_for(None, 1_700_000_061.0)
    assert a == "/opt/.client.py.deployer/backups/client.py.20231114T221320Z.abababab"
    assert b.endswith(".20231114T221421Z.none")
    assert sorted([b, a]) == [a, b]


# --- the lock --------------------------------------------------------------------


def test_lock_is_taken_with_owner_and_time(remote, paths, tmp_path):
    take_lock(remote, paths, "alice@box pid 7", 1000.0)
    owner = json.loads((tmp_path / "opt/.client.py.deployer/lock/owner").read_text())
    assert owner == {"owner": "alice@box pid 7", "run_id": "run-A", "since": 1000.0}
    held = read_lock(remote, paths)
    assert (held.owner, held.run_id, held.since) == ("alice@box pid 7", "run-A", 1000.0)


def test_held_lock_is_refused_naming_owner_and_age(remote, paths):
    take_lock(remote, paths, "alice@box pid 7", 1000.0)
    other = HostPaths(paths.script_path, "run-B")
    with pytest.raises(LockHeld) as info:
        take_lock(remote, other, "bob@ci pid 9", 1042.0)
    msg = str(info.value)
    assert "alice@box pid 7" in msg and "run-A" in msg and "for 42s" in msg
    assert "--break-lock" in msg and "deployer recover" in msg
    assert info.value.host == "pi-01" and info.value.step == "lock"
    assert read_lock(remote, paths).run_id == "run-A"  # untouched


def test_lock_without_owner_file_is_held_by_an_unknown_owner(remote, paths, tmp_path):
    (tmp_path / "opt/.client.py.deployer/lock").mkdir(parents=True)
    with pytest.raises(LockHeld, match="unknown owner"):
        take_lock(remote, paths, "me", 1.0)


def test_break_lock_takes_over(remote, paths):
    take_lock(remote, paths, "gone", 1000.0)
    mine = HostPaths(paths.script_path, "run-B")
    take_lock(remote, mine, "me", 2000.0, break_lock=True)
    held = read_lock(remote, mine)
    assert (held.owner, held.run_id) == ("me", "run-B")


def test_release_removes_only_our_own_lock(remote, paths, tmp_path):
    lock = tmp_path / "opt/.client.py.deployer/lock"
    take_lock(remote, paths, "alice", 1.0)
    release_lock(remote, HostPaths(paths.script_path, "run-B"))
    assert lock.is_dir()
    release_lock(remote, paths)
    assert not lock.exists()
    release_lock(remote, paths)  # already gone: no error


def test_lock_in_a_hostile_directory(remote, tmp_path):
    p = HostPaths(str(tmp_path / "a b $(touch pwned) 'q'" / "client.py"), "R")
    (tmp_path / "a b $(touch pwned) 'q'").mkdir()
    take_lock(remote, p, 'o\'wner "x"', 5.0)
    assert read_lock(remote, p).owner == 'o\'wner "x"'
    release_lock(remote, p)
    assert not list(tmp_path.rglob("pwned"))


# --- backups -----------------------------------------------------------------------


def make_backups(paths: HostPaths, tmp_path, names):
    d = tmp_path / "opt/.client.py.deployer/backups"
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_text(n)
    return d


def test_backups_are_listed_oldest_first(remote, paths, tmp_path):
    make_backups(
        paths,
        tmp_path,
        [
            "client.py.20230102T000000Z.bbbbbbbb",
            "client.py.20230101T000000Z.cccccccc",
            "client.py.20230103T000000Z.aaaaaaaa",
            "client.py.20230104T000000Z.dddddddd.tmp",  # a backup being written
            "other.py.20230105T000000Z.eeeeeeee",
        ],
    )
    names = [b.rsplit("/", 1)[1] for b in list_backups(remote, paths)]
    assert names == [
        "client.py.20230101T000000Z.cccccccc",
        "client.py.20230102T000000Z.bbbbbbbb",
        "client.py.20230103T000000Z.aaaaaaaa",
    ]


def test_no_backup_directory_lists_nothing(remote, paths):
    assert list_backups(remote, paths) == []
    assert prune_backups(remote, paths, 0) == []


def test_prune_keeps_the_newest(remote, paths, tmp_path):
    stamps = ["20230101", "20230102", "20230103", "20230104"]
    d = make_backups(paths, tmp_path, [f"client.py.{s}T000000Z.aaaaaaaa" for s in stamps])
    doomed = prune_backups(remote, paths, 2)
    assert [x.rsplit("/", 1)[1][10:18] for x in doomed] == ["20230101", "20230102"]
    assert sorted(p.name[10:18] for p in d.iterdir()) == ["20230103", "20230104"]
    assert prune_backups(remote, paths, 2) == []
    assert prune_backups(remote, paths, 5) == []
    prune_backups(remote, paths, 0)
    assert list(d.iterdir()) == []


def test_prune_makes_the_backups_it_keeps_owner_only(remote, paths, tmp_path, open_umask):
    """Backups made before deployer kept them private may be readable by others."""
    names = [f"client.py.2023010{i}T000000Z.aaaaaaaa" for i in (1, 2, 3)]
    d = make_backups(paths, tmp_path, names)
    (d / names[2]).chmod(0o755)
    d.chmod(0o755)
    prune_backups(remote, paths, 2)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {
        names[1]: 0o600,
        names[2]: 0o700,
    }
    (d / names[2]).chmod(0o755)
    assert prune_backups(remote, paths, 5) == []  # nothing to remove: still made private
    assert stat.S_IMODE((d / names[2]).stat().st_mode) == 0o700


# --- files ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "text"), [(0o755, "0755"), (0o600, "0600"), (0o4750, "4750")])
def test_remote_script_info_reads_hash_and_mode_in_one_round_trip(remote, tmp_path, mode, text):
    f = tmp_path / "it's a $(script)"
    f.write_bytes(b"hello\n")
    f.chmod(mode)
    before = len(remote.commands)
    info = remote_script_info(remote, str(f))
    assert info == (hashlib.sha256(b"hello\n").hexdigest(), text)
    assert len(remote.commands) == before + 1
    assert remote_script_info(remote, str(tmp_path / "missing")) == (None, None)
    assert remote_script_info(remote, str(tmp_path)) == (None, None)  # a directory


def test_loose_mode_warning_says_who_can_read_and_the_fix():
    assert loose_mode_warning("/opt/c.py", "0700", "0700") is None
    assert loose_mode_warning("/opt/c.py", "0600", "0755") is None
    assert loose_mode_warning("/opt/c.py", None, "0700") is None  # no script, or stat failed
    assert loose_mode_warning("/opt/c.py", "0755", "0700") == (
        "warning: the installed script /opt/c.py is mode 0755: group and others can read it, "
        "and it holds the host's credentials; an upgrade installs it as 0700 "
        "(add --force if the script is unchanged)"
    )
    chosen = loose_mode_warning("/opt/c.py", "0750", "0750")
    assert chosen is not None and "mode 0750: group can read it" in chosen
    assert chosen.endswith(
        'the inventory asks for mode "0750": set mode = "0700" to keep it private'
    )


def test_remote_sha256_of_a_file_and_of_a_missing_one(remote, tmp_path):
    f = tmp_path / "it's a file"
    f.write_bytes(b"hello\n")
    assert remote_sha256(remote, str(f)) == hashlib.sha256(b"hello\n").hexdigest()
    assert remote_sha256(remote, str(tmp_path / "missing")) is None
    assert remote_sha256(remote, str(tmp_path)) is None  # a directory is not a script


def test_read_file_round_trips_bytes(remote, tmp_path):
    data = bytes(range(256)) * 40
    f = tmp_path / "bin"
    f.write_bytes(data)
    assert read_file(remote, str(f)) == data


# --- quoting --------------------------------------------------------------------------

HOSTILE = ["a b", "it's", '"q"', "$(touch pwned)", "`id`", "x;y|z&", "ünï ✓", "-n", "", "\\n"]


def test_sh_quotes_every_word_literally(tmp_path):
    line = "printf '%s\\0' " + sh(*HOSTILE)
    out = subprocess.run(
        ["/bin/sh", "-c", line], cwd=tmp_path, capture_output=True, check=True
    ).stdout
    assert out.decode().split("\0")[:-1] == HOSTILE
    assert list(tmp_path.iterdir()) == []
    assert shlex.split(sh(*HOSTILE)) == HOSTILE


def _ssh_remote(sudo: bool) -> SshRemote:
    provider = ProviderConfig("http://x/{call}", "fw1", Secret("u" * 8))
    host = HostConfig("pi-01", Secret("d" * 8), Secret("h" * 8), 1, 2, sudo=sudo)
    return SshRemote(provider, host)


def test_sudo_wraps_the_whole_command_as_one_word():
    command = "cd '/a b' && echo \"$HOME\" | tr a b"
    assert _ssh_remote(False)._wrap(command, None) == command
    wrapped = _ssh_remote(True)._wrap(command, None)
    assert shlex.split(wrapped) == ["sudo", "-n", "sh", "-c", command]
    assert _ssh_remote(True)._wrap(command, False) == command
    assert shlex.split(_ssh_remote(False)._wrap(command, True))[:2] == ["sudo", "-n"]
