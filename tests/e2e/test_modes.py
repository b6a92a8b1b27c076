"""Credentials at rest (issue 17), end to end on both SSH servers: the installed
script, its backups and the run's files are owner-only; a script others could
read is reported (not failed); the operator's journal and report files are
private; an inventory with a literal credential that others can read is refused
before anything is touched."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sandbox_fixture import requires_openssh

pytestmark = pytest.mark.e2e

SSHDS = ["embedded", pytest.param("openssh", marks=[requires_openssh, pytest.mark.openssh])]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def deployer(inventory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(inventory), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("sshd", SSHDS)
def test_scripts_backups_and_reports_stay_owner_only(sandbox_factory, sshd, tmp_path):
    sb = sandbox_factory(hosts=1, sshd=sshd)
    (name,) = sb.hosts
    script = sb.host_dir(name) / "client.py"
    assert mode(sb.inventory) == 0o600 and mode(sb.dir / "sandbox.json") == 0o600
    script.chmod(0o755)  # as an older install left it: readable by everyone
    report, junit = tmp_path / "r.json", tmp_path / "j.xml"
    proc = deployer(
        sb.inventory, "upgrade", name, "--var", "release=2",
        "--json", "--report", str(report), "--junit", str(junit),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    [host] = json.loads(proc.stdout)["hosts"]
    assert (host["result"], host["installed_mode"]) == ("upgraded", "0755")
    assert "is mode 0755: group and others can read it" in proc.stderr
    assert "installed_mode: 0755" in junit.read_text()
    # on the host: the new script, every backup and the backups folder owner-only
    base = script.parent / ".client.py.deployer"
    assert mode(script) == 0o700
    assert mode(base / "backups") == 0o700
    assert [mode(b) & 0o077 for b in (base / "backups").iterdir()] == [0]
    assert list((base / "runs").iterdir()) == []
    # on the operator's side: reports and the journal private
    assert mode(report) == 0o600 and mode(junit) == 0o600
    state = sb.dir / ".deployer"
    assert mode(state) == 0o700
    assert all(mode(f) & 0o077 == 0 for f in state.iterdir())

    again = deployer(sb.inventory, "upgrade", name, "--var", "release=2", "--json")
    [host] = json.loads(again.stdout)["hosts"]
    assert (host["result"], host["installed_mode"]) == ("unchanged", "0700")
    assert "group and others can read it" not in again.stderr

    crash = deployer(
        sb.inventory, "upgrade", name, "--var", "release=3", "--var", "sandbox_fail=crash", "--json"
    )
    assert json.loads(crash.stdout)["hosts"][0]["result"] == "rolled_back", crash.stderr[-2000:]
    assert mode(script) == 0o700  # restored with the inventory's mode, not the backup's


def test_a_readable_inventory_with_a_literal_credential_touches_nothing(sandbox_factory):
    sb = sandbox_factory(hosts=1)
    (name,) = sb.hosts
    sb.client.reset_counters()
    before = sb.host(name)["script_sha256"]
    loose = sb.dir / "loose.toml"
    loose.write_text(sb.inventory.read_text())
    os.chmod(loose, 0o644)
    proc = deployer(loose, "upgrade", name, "--var", "release=2")
    assert proc.returncode == 2
    assert f"chmod 600 {loose}" in proc.stderr
    host = sb.host(name)
    assert sum(host["api_calls"].values()) == 0
    assert host["script_sha256"] == before
