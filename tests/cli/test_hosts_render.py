"""`deployer hosts` and `deployer render` through the real entry point (exit codes)."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest

from tests.cli import Run, run
from tests.inventories import DBID, MALFORMED, SECRETS, UUID, write

pytestmark = pytest.mark.cli


def assert_no_credentials(result: Run) -> None:
    for secret in SECRETS:
        assert secret not in result.stdout
        assert secret not in result.stderr


@pytest.mark.parametrize(
    ("text", "fragment"), [(c[1], c[2]) for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_inventory_exits_2_with_one_line(tmp_path, env, text, fragment):
    path = write(tmp_path, text, name="bad.toml")
    result = run("-i", str(path), "hosts")
    assert result.code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert_no_credentials(result)


def test_missing_inventory_says_how_to_point_at_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("hosts")
    assert result.code == 2
    assert "deployer.toml: inventory file not found" in result.stderr
    assert "-i PATH" in result.stderr and "$DEPLOYER_INVENTORY" in result.stderr


def test_inventory_found_through_environment(inventory_file, monkeypatch, tmp_path):
    monkeypatch.setenv("DEPLOYER_INVENTORY", str(inventory_file))
    monkeypatch.chdir(tmp_path.parent)
    result = run("hosts")
    assert result.code == 0, result.stderr
    assert "pi-01" in result.stdout


def test_hosts_table(inventory_file):
    result = run("-i", str(inventory_file), "hosts")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["HOST", "GROUPS", "ENDPOINT", "SSH", "USER", "SERVICE"]
    assert lines[1].split() == ["pi-01", "lab", "fw1.example:12345", "pi", "systemd"]
    assert lines[2].split() == ["pi-02", "lab,edge", "fw1.example:12346", "edge", "systemd"]
    assert_no_credentials(result)


def test_hosts_json_with_targets(inventory_file):
    result = run("-i", str(inventory_file), "hosts", "--json", "@edge")
    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["host"] for r in rows] == ["pi-02"]
    assert rows[0]["endpoint"] == "fw1.example:12346"
    assert rows[0]["groups"] == ["lab", "edge"]
    assert_no_credentials(result)


def test_hosts_unmatched_target_exits_2(inventory_file):
    result = run("-i", str(inventory_file), "hosts", "pi-1")
    assert result.code == 2
    assert "target 'pi-1' matches no host or group; did you mean 'pi-01'?" in result.stderr


def test_render_prints_the_script_with_credentials_masked(inventory_file):
    result = run("-i", str(inventory_file), "render", "pi-01")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("#!/usr/bin/env python3\n")
    assert 'DBID = "…2222"' in result.stdout
    assert 'HOST_UUID = "…3333"' in result.stdout
    assert 'USER_ID = "…1111"' in result.stdout
    assert "credentials masked" in result.stderr
    assert_no_credentials(result)


def test_render_output_writes_exact_script_private(inventory_file, tmp_path):
    target = tmp_path / "out" / "client.py"
    target.parent.mkdir()
    result = run(
        "-i", str(inventory_file), "render", "pi-01", "--var", "release=9", "-o", str(target)
    )
    assert result.code == 0, result.stderr
    data = target.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert result.stdout == f"{digest}  {target}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    namespace: dict = {"__name__": "client"}
    exec(compile(data, str(target), "exec"), namespace)
    assert (namespace["DBID"], namespace["HOST_UUID"], namespace["RELEASE"]) == (DBID, UUID, "9")
    assert_no_credentials(result)
    assert list(target.parent.iterdir()) == [target]  # no temp file left behind


def test_render_output_replaces_a_readable_file_with_a_private_one(inventory_file, tmp_path):
    target = tmp_path / "client.py"
    target.write_text("old")
    target.chmod(0o644)
    assert run("-i", str(inventory_file), "render", "pi-02", "-o", str(target)).code == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "DBID-SECRET-4444" in target.read_text()


def test_render_undefined_var_exits_2_with_fix(inventory_file, tmp_path):
    template = tmp_path / "t.j2"
    template.write_text("x = {{ build_id }}\n")
    result = run("-i", str(inventory_file), "render", "pi-01", "--template", str(template))
    assert result.code == 2
    assert f"{template}:1: undefined name 'build_id'" in result.stderr
    assert "--var build_id=VALUE" in result.stderr
    ok = run(
        "-i",
        str(inventory_file),
        "render",
        "pi-01",
        "--template",
        str(template),
        "--var",
        "build_id=7",
    )
    assert (ok.code, ok.stdout) == (0, "x = 7\n")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["render", "pi-01", "--var", "oops"], "--var 'oops': expected NAME=VALUE"),
        (["render", "pi-9"], "target 'pi-9' matches no host or group"),
        (["render", "pi-*"], "render takes one host; 'pi-*' matches 2 hosts"),
        (["render", "pi-01", "--var", "host=x"], "var 'host' shadows the built-in"),
    ],
)
def test_render_usage_errors_exit_2(inventory_file, args, fragment):
    result = run("-i", str(inventory_file), *args)
    assert result.code == 2
    assert fragment in result.stderr
    assert result.stdout == ""
