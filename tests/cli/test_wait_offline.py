"""``deployer upgrade --wait-offline`` and ``deployer sandbox client`` at the CLI
boundary: parsing, usage errors (exit 2) and the exit status of a run that
leaves hosts offline (4)."""

from __future__ import annotations

import pytest

from deployer.errors import EXIT_OFFLINE
from deployer.result import HostResult, Outcome, RunResult
from tests.cli import run

pytestmark = pytest.mark.cli


@pytest.fixture
def captured(monkeypatch):
    """Replace the engine: record the request, return a run with one offline host."""
    import deployer.upgrade

    seen = {}

    def fake_run_upgrade(request, progress=None, **kw):
        seen["request"] = request
        hosts = [HostResult(h.name, Outcome.UPGRADED) for h in request.hosts]
        hosts[-1] = HostResult(hosts[-1].host, Outcome.OFFLINE, waiting_seconds=90.0)
        return RunResult("run-x", 0.0, 1.0, hosts)

    monkeypatch.setattr(deployer.upgrade, "run_upgrade", fake_run_upgrade)
    return seen


def test_the_option_is_in_the_help():
    result = run("upgrade", "--help")
    assert result.code == 0
    assert "--wait-offline DURATION" in result.stdout


@pytest.mark.parametrize("value", ["30m", "90s", "24h", "1h30m"])
def test_a_duration_reaches_the_engine_in_seconds(inventory_file, captured, value):
    from deployer.rollout import parse_duration

    result = run("-i", str(inventory_file), "upgrade", "all", "--wait-offline", value, "--json")
    assert captured["request"].wait_offline == parse_duration(value)
    assert result.code == EXIT_OFFLINE, result.stderr
    assert '"offline": 1' in result.stdout and '"waiting_seconds": 90.0' in result.stdout


def test_without_the_option_there_is_no_wait(inventory_file, captured):
    run("-i", str(inventory_file), "upgrade", "all")
    assert captured["request"].wait_offline is None


@pytest.mark.parametrize("value", ["30", "soon", "0s", "-5m", "31d", "1h1h"])
def test_a_bad_duration_is_a_usage_error_before_anything_runs(
    inventory_file,
    captured,
    value,
):
    result = run("-i", str(inventory_file), "upgrade", "all", "--wait-offline", value)
    assert result.code == 2
    assert "Invalid value for '--wait-offline'" in result.stderr
    assert "request" not in captured


def test_rollback_takes_the_option_too(inventory_file, captured):
    result = run("-i", str(inventory_file), "rollback", "all", "--wait-offline", "10m")
    assert captured["request"].wait_offline == 600
    assert captured["request"].options.command == "rollback"
    assert result.code == EXIT_OFFLINE


# --- deployer sandbox client ------------------------------------------------------------------


def test_sandbox_client_is_in_the_help():
    result = run("sandbox", "client", "--help")
    assert result.code == 0
    for option in ("--with-tunnel", "--after", "--down", "--up", "--cycles"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["sbx-01", "reboot"], "Invalid value for '{stop|start|flap}'"),
        (["sbx-01", "flap"], "flap needs --down S and --up S"),
        (["sbx-01", "flap", "--down", "1"], "flap needs --down S and --up S"),
        (["sbx-01", "stop", "--down", "1"], "--down and --up go with flap only"),
        (["sbx-01", "start", "--with-tunnel"], "--with-tunnel goes with stop and flap only"),
        (["sbx-01", "stop", "--after", "-1"], "Invalid value for '--after'"),
        (["sbx-01", "flap", "--down", "0", "--up", "1"], "Invalid value for '--down'"),
    ],
)
def test_sandbox_client_usage_errors_exit_2(tmp_path, args, fragment):
    result = run("sandbox", "client", *args, "--dir", str(tmp_path))
    assert result.code == 2
    assert fragment in result.stderr


def test_sandbox_client_without_a_sandbox_says_so(tmp_path):
    result = run("sandbox", "client", "sbx-01", "stop", "--dir", str(tmp_path))
    assert result.code == 1
    assert "no sandbox runs in" in result.stderr
