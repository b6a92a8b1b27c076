"""Deployer's side of the guard protocol (deployer/guardlink.py) against the
host's side (deployer/guard.py): one vocabulary, and the status as read on
local files through LocalRemote (the real shell commands run)."""

from __future__ import annotations

import ast

import pytest

from deployer import guardlink
from deployer.guardlink import (
    CONTROLS,
    FINAL_STATES,
    REVERTING_STATES,
    WATCHING_STATES,
    guard_source,
    read_status,
)
from deployer.hostfiles import HostPaths
from tests.doubles import LocalRemote

pytestmark = pytest.mark.unit


@pytest.fixture
def remote():
    return LocalRemote("pi-01")


@pytest.fixture
def paths(tmp_path):
    return HostPaths(str(tmp_path / "opt" / "client.py"), "run-A")


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


def test_guard_status_ignores_a_partial_last_line(remote, paths, tmp_path):
    run = tmp_path / "opt/.client.py.deployer/runs/run-A"
    run.mkdir(parents=True)
    (run / "status").write_text(
        '{"state": "running", "t": 1.0}\n{"state": "backed_up", "t": 2.0}\n{"state": "sto'
    )
    assert [ln["state"] for ln in read_status(remote, paths)] == ["running", "backed_up"]
    assert (run / "alive").exists()  # each read is deployer's sign of life


def test_guard_status_missing_is_empty(remote, paths):
    assert read_status(remote, paths) == []
