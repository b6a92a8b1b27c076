"""The CLI boundary: global options, lazy imports, the error-to-exit-code mapping."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.cli

HEAVY = ("fabric", "paramiko", "jinja2", "asyncssh", "rich", "requests")


def test_help_imports_no_heavy_module():
    code = (
        "import sys\n"
        "from deployer.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "Commands:" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:"


def test_every_listed_command_loads():
    import click

    from deployer.cli.main import COMMANDS, cli

    ctx = click.Context(cli)
    for name in COMMANDS:
        assert isinstance(cli.get_command(ctx, name), click.Command), name


def test_version_and_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "deployer", "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "deployer, version" in out.stdout


def test_unknown_command_is_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "deployer", "frobnicate"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "No such command" in out.stderr


def test_missing_inventory_exits_2_with_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(tmp_path / "nope.toml"), "upgrade", "all"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.toml" in lines[0]
