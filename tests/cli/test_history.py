"""`deployer history`: past runs from the journal, as a table or JSON."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner

from deployer.cli.main import cli
from deployer.clock import FakeClock
from deployer.journal import Journal, journal_path
from tests.inventories import BASE, ENV, write

pytestmark = pytest.mark.cli


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def state(tmp_path):
    """A journal with two finished runs and one left unfinished by a dead process."""
    state = tmp_path / "state"
    clock = FakeClock()
    with Journal(state, clock=clock) as j:
        j.start_run("run-1", "upgrade", "/fleet/deployer.toml", ["pi-01", "pi-02"], {})
        for host in ("pi-01", "pi-02"):
            j.step_begin("run-1", host, "preflight")
            j.step_end("run-1", host, "preflight", "ok", 0.02)
        j.finish_host("run-1", "pi-01", "upgraded", facts={"new_sha256": "b" * 64})
        j.finish_host(
            "run-1",
            "pi-02",
            "rolled_back",
            error={"step": "first_life", "type": "ClientOffline", "message": "never online"},
        )
        j.finish_run("run-1", ok=False)
        clock.advance(60)
        j.start_run("run-2", "rollback", "/fleet/deployer.toml", ["pi-02"], {})
        j.step_begin("run-2", "pi-02", "preflight")
        j.step_end("run-2", "pi-02", "preflight", "ok", 0.5)
        j.finish_host("run-2", "pi-02", "upgraded")
        j.finish_run("run-2", ok=True)
    # A run whose process died mid-swap.
    crash = (
        "import sys\nfrom deployer.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "j.start_run('run-3', 'upgrade', 'inv', ['pi-03'], {})\n"
        "j.step_begin('run-3', 'pi-03', 'swap')\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(state)], check=True)
    return state


def test_table_lists_runs_newest_first_with_host_results(state):
    result = _run("--state-dir", str(state), "history")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RUN", "COMMAND", "STARTED", "FINISHED", "OK", "HOSTS"]
    assert [line.split()[0] for line in lines[1:]] == ["run-3", "run-2", "run-1"]
    run3, run2, run1 = lines[1:]
    assert "unfinished" in run3 and "1 unfinished (pi-03)" in run3
    assert "rollback" in run2 and "yes" in run2 and "1 upgraded" in run2
    assert "1 upgraded, 1 rolled_back (pi-02)" in run1 and " no " in run1


def test_limit_keeps_the_newest_runs(state):
    result = _run("--state-dir", str(state), "history", "--limit", "1")
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["run-3"]


def test_json_carries_runs_hosts_and_errors(state):
    result = _run("--state-dir", str(state), "history", "--json")
    assert result.exit_code == 0, result.stderr
    runs = json.loads(result.stdout)
    assert [r["run_id"] for r in runs] == ["run-3", "run-2", "run-1"]
    assert [r["status"] for r in runs] == ["unfinished", "finished", "finished"]
    run1 = runs[2]
    assert (run1["command"], run1["ok"], run1["interrupted"]) == ("upgrade", False, False)
    assert run1["started"].endswith("+00:00") and run1["finished"] is not None
    hosts = {h["host"]: h for h in run1["hosts"]}
    assert hosts["pi-01"]["result"] == "upgraded"
    assert hosts["pi-01"]["new_sha256"] == "b" * 64
    assert hosts["pi-02"]["error"]["type"] == "ClientOffline"
    assert "steps" not in hosts["pi-01"]


def test_host_shows_only_runs_that_touched_it_with_its_steps(state):
    result = _run("--state-dir", str(state), "history", "pi-02", "--json")
    runs = json.loads(result.stdout)
    assert [r["run_id"] for r in runs] == ["run-2", "run-1"]
    assert all([h["host"] for h in r["hosts"]] == ["pi-02"] for r in runs)
    assert runs[1]["hosts"][0]["steps"] == [
        {"step": "preflight", "status": "ok", "seconds": 0.02, "began": runs[1]["started"]}
    ]

    text = _run("--state-dir", str(state), "history", "pi-02").stdout
    assert "run-1" in text and "run-3" not in text
    assert "pi-02: rolled_back" in text and "ClientOffline at first_life: never online" in text
    assert "preflight  ok  0.50s" in text


def test_host_step_that_never_ended_is_shown_as_started(state):
    text = _run("--state-dir", str(state), "history", "pi-03").stdout
    assert "pi-03: unfinished" in text
    assert "swap  started  -" in text


def test_empty_state_dir_says_so_and_creates_nothing(tmp_path):
    state = tmp_path / "nothing"
    result = _run("--state-dir", str(state), "history")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"no runs recorded in {state}"
    assert not state.exists()


def test_empty_json_is_an_empty_list(tmp_path):
    result = _run("--state-dir", str(tmp_path), "history", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []
    assert "no runs recorded" in result.stderr


def test_unknown_host_has_no_runs(state):
    result = _run("--state-dir", str(state), "history", "pi-99")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"no runs recorded for pi-99 in {state}"


def test_without_inventory_or_state_dir_the_hint_names_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run("history")
    assert result.exit_code == 0
    assert "no runs recorded in" in result.stdout
    assert "pass -i INVENTORY or --state-dir DIR" in result.stdout
    assert not (tmp_path / ".deployer").exists()


def test_default_state_dir_is_beside_the_inventory(tmp_path, monkeypatch):
    inventory = tmp_path / "fleet" / "deployer.toml"
    inventory.parent.mkdir()
    inventory.write_text("")
    with Journal(inventory.parent / ".deployer") as j:
        j.start_run("run-9", "upgrade", str(inventory), [], {})
        j.finish_run("run-9", ok=True)
    monkeypatch.chdir(tmp_path)
    result = _run("-i", str(inventory), "history")
    assert result.exit_code == 0
    assert "run-9" in result.stdout
    assert journal_path(inventory.parent / ".deployer").exists()


def test_recover_leaves_a_run_of_another_machine_alone_and_says_how_to_force(tmp_path):
    """A run recorded on another machine (a CI job's container) that wrote its last
    record just now may still be at work there: recover leaves its host pending,
    exit 1, and names --force. Nothing is reached (no API call, no SSH)."""
    inventory = write(tmp_path, BASE)
    state = tmp_path / "state"
    with Journal(state) as j:
        j.start_run("run-ci", "upgrade", str(inventory), ["pi-01"], {})
        j.update_host("run-ci", "pi-01", tunnel_opened=True, lock_maybe_held=True)
        j.step_begin("run-ci", "pi-01", "inspect")
    conn = sqlite3.connect(journal_path(state))
    with conn:
        conn.execute("UPDATE runs SET machine = 'ci-job-4711'")
    conn.close()
    runner = CliRunner(env=ENV)
    result = runner.invoke(
        cli, ["-i", str(inventory), "--state-dir", str(state), "recover", "--json"]
    )
    assert result.exit_code == 1, result.output
    (host,) = json.loads(result.stdout)["hosts"]
    assert (host["host"], host["result"]) == ("pi-01", "skipped")
    assert "ci-job-4711" in host["error"]["message"]
    assert "pi-01: left alone, still pending" in result.stderr and "--force" in result.stderr
    with Journal(state) as j:
        assert j.host_state("run-ci", "pi-01")["result"] is None
