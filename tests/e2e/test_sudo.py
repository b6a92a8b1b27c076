"""``sudo = true`` end to end: a non-root SSH user on the OpenSSH sandbox whose
client script lives in a root-only tree, so every step must go through sudo.

Needs root (to create the user and its sudoers entry), sudo and OpenSSH's
sshd; `.ci/run` installs both packages. Skipped elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sandbox_fixture import Sandbox, requires_openssh

pytestmark = [pytest.mark.e2e, pytest.mark.openssh, requires_openssh]

USER = "deployer-sudo-e2e"
SUDOERS = Path("/etc/sudoers.d/deployer-sudo-e2e")


@pytest.fixture(scope="module")
def sudo_user():
    if os.geteuid() != 0 or not shutil.which("sudo") or not shutil.which("useradd"):
        pytest.skip("needs root, sudo and useradd (apt-get install sudo)")
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], capture_output=True, check=False)
    # no password, but not "locked" ('!'): sshd without PAM refuses locked accounts
    subprocess.run(["usermod", "-p", "*", USER], capture_output=True, check=True)
    home = Path(pwd.getpwnam(USER).pw_dir)
    SUDOERS.write_text(f"{USER} ALL=(ALL) NOPASSWD: ALL\n")
    SUDOERS.chmod(0o440)
    try:
        yield home
    finally:
        SUDOERS.unlink(missing_ok=True)
        subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)


def _authorize(home: Path, pubkey: Path) -> None:
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_bytes(pubkey.read_bytes())
    entry = pwd.getpwnam(USER)
    for path in (ssh, ssh / "authorized_keys"):
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _inventory_as_user(sb: Sandbox, host: str, sudo: bool) -> Path:
    """A copy of the sandbox inventory where ``host`` is reached as USER."""
    header = f"[hosts.{host}]\n"
    text = sb.inventory.read_text()
    assert header in text
    extra = f'ssh_user = "{USER}"\nsudo = {"true" if sudo else "false"}\n'
    path = sb.dir / ("sudo.toml" if sudo else "nosudo.toml")
    path.write_text(text.replace(header, header + extra, 1))
    path.chmod(0o600)  # the sandbox's literal credentials: private, or refused
    return path


def _run(inventory: Path, *args: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(inventory), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)["hosts"][0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_sudo_host_is_upgraded_and_rolled_back_as_a_non_root_user(sandbox_factory, sudo_user):
    sb = sandbox_factory(hosts=1, sshd="openssh")
    host = sb.hosts[0]
    _authorize(sudo_user, sb.dir / "id_ed25519.pub")
    script = sb.host_dir(host) / "client.py"
    old_sha = _sha(script)

    # the control: as the same user without sudo, nothing can be done and nothing changes
    code, report = _run(
        _inventory_as_user(sb, host, sudo=False), "upgrade", host, "--var", "release=2"
    )
    assert code == 1 and report["result"] == "failed", report
    assert report["error"]["step"] == "lock", report["error"]  # logged in, but no right to write
    assert _sha(script) == old_sha

    inventory = _inventory_as_user(sb, host, sudo=True)
    code, report = _run(inventory, "upgrade", host, "--var", "release=2")
    assert code == 0 and report["result"] == "upgraded", (report["error"], report["steps"])
    assert _sha(script) == report["new_sha256"] != old_sha
    assert script.stat().st_uid == 0  # the staged file took the installed script's owner
    # the script holds credentials: owner-only (the inventory's 0700), and so are
    # its backups and their folder, written through sudo as root
    base = script.parent / ".client.py.deployer"
    assert script.stat().st_mode & 0o777 == 0o700
    assert all(b.stat().st_mode & 0o077 == 0 for b in (base / "backups").iterdir())
    assert (base / "backups").stat().st_mode & 0o777 == 0o700
    hosts = sb.client.wait_for(
        [host], lambda h: h["script_sha256"] == report["new_sha256"], 15, "running the new script"
    )
    assert hosts[host]["allow_clientless"] is False

    code, report = _run(inventory, "rollback", host)
    assert code == 0 and report["result"] == "upgraded", (report["error"], report["steps"])
    assert _sha(script) == old_sha
