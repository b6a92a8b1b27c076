"""Hostile values end to end: vars and paths full of shell and quoting
metacharacters go through ``deployer upgrade`` literally — into the script as
data, onto the host as file names — and nothing in them is ever executed.

A value that a shell would run creates a marker file; the markers must never
appear, and the installed script must hold the exact value.
"""

from __future__ import annotations

import ast
import getpass
import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest

from deployer.sandbox import processes
from deployer.sandbox.sshd import session_env
from tests.e2e.sandbox_checks import (
    assert_window_shut,
    rendered,
    run_json,
    wait_running,
)
from tests.sandbox_fixture import Sandbox, write_private

pytestmark = pytest.mark.e2e


def hostile(marker: Path) -> str:
    """Everything a careless shell, Python literal or template would trip on."""
    m = shlex.quote(str(marker))
    return (
        f"$(touch {m}) `touch {m}` ; touch {m} && rm -rf x | cat; "
        "it's \"double\" 'single' \\back\\slash \\n {{ not_jinja }} {% raw %} %s %(x)s"
        "\nsecond line\ttab  two  spaces "
        "ünïcødé Ωμέγα 日本 🚀 \u200b zero-width"
    )


def release_in(script: bytes) -> str:
    """The value of ``RELEASE = str(…)`` in the installed client, as Python reads it."""
    tree = ast.parse(script)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["RELEASE"]:
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "str":
                (value,) = value.args  # the template writes str(<the var as a JSON literal>)
            return ast.literal_eval(value)
    raise AssertionError("no RELEASE = … in the installed script")


@pytest.fixture(scope="module")
def fleet(module_sandbox_factory) -> Sandbox:
    return module_sandbox_factory(hosts=2)


def test_a_hostile_var_is_written_into_the_script_literally_and_never_run(fleet, tmp_path):
    sb, host = fleet, "sbx-01"
    marker = tmp_path / "pwned-var"
    value = hostile(marker)
    expected = rendered(sb, host, "--var", f"release={value}")

    code, report, err = run_json(sb, "upgrade", host, "--var", f"release={value}")

    assert (code, report["result"]) == (0, "upgraded"), err
    installed = (sb.host_dir(host) / "client.py").read_bytes()
    assert installed == expected
    assert release_in(installed) == value
    for verbatim in (f"$(touch {marker})", f"`touch {marker}`", "; touch ", "rm -rf x | cat;"):
        assert verbatim.encode() in installed, verbatim  # data, not code
    assert b"{{ not_jinja }} {% raw %} %s %(x)s" in installed
    assert "ünïcødé Ωμέγα 日本 🚀 \u200b zero-width".encode() in installed
    assert_window_shut(wait_running(sb, host, report["new_sha256"]))
    assert not marker.exists()
    assert not list(tmp_path.glob("pwned*"))


HOSTILE_DIRS = [
    pytest.param(
        'it\'s a "dir" $(touch PWNED) `touch PWNED` ; rm -rf x & ünï $HOME * ~',
        id="quotes-substitution-spaces",  # sha256sum output split on spaces (fixed ad14e57)
    ),
    pytest.param(
        "back\\slash\ttab $(touch PWNED)",
        id="backslash",  # sha256sum escapes such names in its output (fixed ad14e57)
    ),
]


def hostile_inventory(sb: Sandbox, host: str, new_dir: Path) -> Path:
    """A copy of the sandbox inventory (same provider, same ids) with ``host``'s
    script and pidfile under ``new_dir``; beside the original so the template
    path still resolves."""
    text = sb.inventory.read_text()
    old_line = f'script_path = "{sb.host_dir(host)}/client.py"'
    assert text.count(old_line) == 1, text
    text = text.replace(old_line, f"script_path = {json.dumps(str(new_dir / 'client.py'))}")
    text += f"\n[hosts.{host}.service]\npidfile = {json.dumps(str(new_dir / 'client.pid'))}\n"
    return write_private(sb.dir / "hostile.toml", text)


def move_client(sb: Sandbox, hsb: Sandbox, host: str, new_dir: Path) -> str:
    """Run ``host``'s client from ``new_dir`` instead of its sandbox dir: the script
    deployer renders for that path (so its good-poll file, which the ready probe
    reads, is ``new_dir/client.py.poll``), started as the pidfile service starts
    it. The old client's tunnel process is adopted by the new one. Its sha256."""
    old = sb.client_pid(host)
    assert old and processes.terminate([old]) == []
    new_dir.mkdir(parents=True)
    script = rendered(hsb, host)
    fd = os.open(new_dir / "client.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with os.fdopen(fd, "wb") as handle:
        handle.write(script)
    processes.start_pidfile_service(
        run=f"exec python3 {shlex.quote(str(new_dir / 'client.py'))}",
        pidfile=new_dir / "client.pid",
        log_path=new_dir / "client.out",
        cwd=str(new_dir),
        env=session_env(getpass.getuser(), str(new_dir)),
    )
    sha = hashlib.sha256(script).hexdigest()
    assert (new_dir / "client.py").read_bytes() == script
    wait_running(sb, host, sha)
    return sha


@pytest.mark.parametrize("hostile_dir", HOSTILE_DIRS)
def test_a_script_path_full_of_shell_metacharacters_is_upgraded_and_rolled_back(
    sandbox_factory, hostile_dir
):
    sb, host = sandbox_factory(hosts=1), "sbx-01"
    new_dir = sb.dir / "hosts" / hostile_dir / "sub dir"
    pwned = sb.dir / "hosts" / "PWNED"
    hsb = Sandbox(sb.dir, hostile_inventory(sb, host, new_dir), sb.info, sb.client)
    original_sha = move_client(sb, hsb, host, new_dir)
    expected = rendered(hsb, host, "--var", "release=2")
    untouched = (sb.host_dir(host) / "client.py").read_bytes()

    code, report, err = run_json(hsb, "upgrade", host, "--var", "release=2")

    assert (code, report["result"]) == (0, "upgraded"), err
    assert report["old_sha256"] == original_sha
    assert (new_dir / "client.py").read_bytes() == expected
    assert_window_shut(wait_running(sb, host, report["new_sha256"]))
    assert processes.alive(processes.read_pidfile(new_dir / "client.pid") or 0)
    assert (sb.host_dir(host) / "client.py").read_bytes() == untouched

    code, back, err = run_json(hsb, "rollback", host)

    assert (code, back["new_sha256"]) == (0, original_sha), err
    assert_window_shut(wait_running(sb, host, original_sha))
    assert not pwned.exists() and not (Path.cwd() / "PWNED").exists()
    assert not list(sb.dir.rglob("PWNED")), list(sb.dir.rglob("PWNED"))
    assert (sb.dir / "hosts").exists() and (sb.dir / "hosts" / hostile_dir).is_dir()
    leftovers = sorted(p.name for p in new_dir.iterdir())
    assert "client.py" in leftovers and not any(".lock" in n for n in leftovers), leftovers
