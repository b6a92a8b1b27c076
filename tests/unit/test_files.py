"""deployer.files.atomic_write: a local file replaced whole, with an exact mode."""

from __future__ import annotations

import os
import stat

import pytest

from deployer.files import UMASK, atomic_write

pytestmark = pytest.mark.unit


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    saved = os.umask(0o077)
    yield os.umask
    os.umask(saved)


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    atomic_write(target, "new ✓\n", mode=0o600)
    assert target.read_bytes() == "new ✓\n".encode()
    atomic_write(target, b"\x00bytes", mode=0o600)
    assert target.read_bytes() == b"\x00bytes"
    assert os.listdir(tmp_path) == ["report.json"]


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_a_given_mode_is_exact_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "a", "x", mode=0o600)
    atomic_write(tmp_path / "b", "x", mode=0o640)
    assert mode_of(tmp_path / "a") == 0o600
    assert mode_of(tmp_path / "b") == 0o640


def test_a_given_mode_replaces_a_wider_file(tmp_path):
    target = tmp_path / "script.py"
    target.write_text("old")
    target.chmod(0o644)
    atomic_write(target, "new", mode=0o600)
    assert mode_of(target) == 0o600


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_umask_mode_is_what_open_creates(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "runner.json", "{}\n", mode=UMASK)
    assert mode_of(tmp_path / "runner.json") == 0o666 & ~mask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "target").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        atomic_write(tmp_path / "target", "x", mode=0o600)
    assert os.listdir(tmp_path) == ["target"]
    assert (tmp_path / "target").is_dir()


def test_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "file", "x", mode=0o600)
