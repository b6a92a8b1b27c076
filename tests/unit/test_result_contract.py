"""The `--json` report contract of SPEC 5, pinned: exact keys and types of the
run, each host, step, error and summary. Changing one of these is a breaking
change for every pipeline that reads the report."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from deployer.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OFFLINE,
    EXIT_OK,
    EXIT_UNSAFE,
    ClientBlocked,
)
from deployer.result import (
    FAILURE_OUTCOMES,
    NOT_RUN_OUTCOMES,
    REPORT_VERSION,
    SUCCESS_OUTCOMES,
    ErrorInfo,
    HostResult,
    Outcome,
    RunResult,
    StepRecord,
    StepStatus,
)

pytestmark = pytest.mark.unit

REPORT_DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "report.md"

RUN_KEYS = {"report_version", "run_id", "started", "finished", "ok", "hosts", "summary"}
HOST_KEYS = {
    "host",
    "result",
    "old_sha256",
    "new_sha256",
    "exposure_seconds",
    "api_calls",
    "duration_seconds",
    "steps",
    "error",
    "installed_mode",
    "waiting_seconds",
}
STEP_KEYS = {"step", "status", "seconds"}
ERROR_KEYS = {"step", "type", "message", "api_error_code"}
RESULTS = [
    "upgraded",
    "unchanged",
    "rolled_back",
    "failed",
    "unsafe",
    "skipped",
    "planned",
    "offline",
]
STEP_STATUSES = {"ok", "failed", "skipped"}


def document(hosts: list[HostResult], interrupted: bool = False) -> dict:
    run = RunResult("run-1", 1_700_000_000.25, 1_700_000_010.75, hosts, interrupted)
    return json.loads(json.dumps(run.to_json()))  # exactly what a pipeline reads


def full_run() -> list[HostResult]:
    steps = [StepRecord("preflight", "ok", 0.0213), StepRecord("swap", "failed", 1)]
    error = ErrorInfo.from_exception(ClientBlocked("blocked", call="connect"), "connect")
    upgraded = HostResult("pi-01", Outcome.UPGRADED, "a" * 64, "b" * 64, 1.9, 6, 4.2, steps[:1])
    upgraded.installed_mode = "0755"  # the script found at inspect: readable by others
    upgraded.waiting_seconds = 62.5004  # --wait-offline: parked until its client came back
    offline = HostResult(
        "pi-04", Outcome.OFFLINE, api_calls=7, steps=[StepRecord("wait", "failed", 90)]
    )
    offline.error = ErrorInfo("wait", "ClientOffline", "client not seen online")
    offline.waiting_seconds = 90.0
    return [
        upgraded,
        HostResult("pi-02", Outcome.ROLLED_BACK, "a" * 64, "b" * 64, 2, 9, 12, steps, error),
        HostResult("pi-03", Outcome.SKIPPED, error=ErrorInfo(None, "RolloutStopped", "why")),
        offline,
    ]


def assert_iso8601_utc(value: str) -> None:
    parsed = dt.datetime.fromisoformat(value)
    assert parsed.utcoffset() == dt.timedelta(0)


def test_run_keys_and_types():
    doc = document(full_run())
    assert set(doc) == RUN_KEYS
    assert isinstance(doc["report_version"], int) and not isinstance(doc["report_version"], bool)
    assert isinstance(doc["run_id"], str)
    assert isinstance(doc["ok"], bool)
    assert isinstance(doc["hosts"], list)
    assert_iso8601_utc(doc["started"])
    assert_iso8601_utc(doc["finished"])
    assert doc["started"] == "2023-11-14T22:13:20+00:00"


def test_report_version_comes_first_and_is_the_format_s_version():
    doc = document(full_run())
    assert list(doc)[0] == "report_version"
    assert doc["report_version"] == REPORT_VERSION == 1  # raise both, with the docs, together


def test_the_docs_example_is_a_report_of_this_version():
    text = REPORT_DOC.read_text(encoding="utf-8")
    example = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert example["report_version"] == REPORT_VERSION
    assert set(example) == RUN_KEYS
    assert all(set(host) == HOST_KEYS for host in example["hosts"])
    rows = {row[0]: row for row in doc_table("### The run")}
    assert set(rows) == RUN_KEYS
    assert rows["report_version"][2].endswith(f"; {REPORT_VERSION}")


def test_host_keys_and_types():
    for host in document(full_run())["hosts"]:
        assert set(host) == HOST_KEYS
        assert isinstance(host["host"], str)
        assert host["result"] in RESULTS
        for key in ("old_sha256", "new_sha256"):
            assert host[key] is None or (isinstance(host[key], str) and len(host[key]) == 64)
        assert isinstance(host["exposure_seconds"], (int, float))
        assert isinstance(host["duration_seconds"], (int, float))
        assert isinstance(host["api_calls"], int) and not isinstance(host["api_calls"], bool)
        assert isinstance(host["steps"], list)
        assert host["error"] is None or isinstance(host["error"], dict)
        mode = host["installed_mode"]
        assert mode is None or (isinstance(mode, str) and re.fullmatch("[0-7]{4}", mode))
        waiting = host["waiting_seconds"]
        assert isinstance(waiting, (int, float)) and not isinstance(waiting, bool)


def test_waiting_seconds_is_the_time_parked_rounded_to_milliseconds():
    hosts = document(full_run())["hosts"]
    assert [h["waiting_seconds"] for h in hosts] == [62.5, 0.0, 0.0, 90.0]
    assert hosts[3]["result"] == "offline"
    assert hosts[3]["error"]["step"] == "wait"
    assert hosts[3]["steps"] == [{"step": "wait", "status": "failed", "seconds": 90.0}]


def test_installed_mode_is_the_octal_mode_found_at_inspect_or_null():
    hosts = document(full_run())["hosts"]
    assert [h["installed_mode"] for h in hosts] == ["0755", None, None, None]


def test_step_keys_and_types():
    steps = document(full_run())["hosts"][1]["steps"]
    assert [s["step"] for s in steps] == ["preflight", "swap"]
    for step in steps:
        assert set(step) == STEP_KEYS
        assert isinstance(step["step"], str)
        assert step["status"] in STEP_STATUSES
        assert isinstance(step["seconds"], (int, float))
    assert steps[0]["seconds"] == 0.021  # rounded to milliseconds


def test_error_keys_and_types():
    hosts = document(full_run())["hosts"]
    assert hosts[0]["error"] is None
    error = hosts[1]["error"]
    assert set(error) == ERROR_KEYS
    assert error == {
        "step": "connect",
        "type": "ClientBlocked",
        "message": "blocked",
        "api_error_code": 23,
    }
    assert hosts[2]["error"]["api_error_code"] is None
    assert hosts[2]["error"]["step"] is None


def test_summary_counts_every_result_name():
    doc = document(full_run())
    assert list(doc["summary"]) == RESULTS
    assert all(isinstance(n, int) for n in doc["summary"].values())
    assert doc["summary"]["upgraded"] == 1
    assert doc["summary"]["rolled_back"] == 1
    assert doc["summary"]["skipped"] == 1
    assert doc["summary"]["offline"] == 1
    assert sum(doc["summary"].values()) == len(doc["hosts"])


@pytest.mark.parametrize(
    ("results", "interrupted", "ok", "exit_code"),
    [
        (["upgraded", "unchanged", "planned"], False, True, EXIT_OK),
        ([], False, True, EXIT_OK),
        (["upgraded", "skipped"], False, False, EXIT_FAILED),
        (["rolled_back", "failed"], False, False, EXIT_FAILED),
        (["upgraded", "unsafe", "failed"], False, False, EXIT_UNSAFE),
        (["upgraded", "skipped"], True, False, EXIT_INTERRUPTED),
        (["unsafe", "skipped"], True, False, EXIT_UNSAFE),  # unsafe wins over 130
        (["upgraded", "unchanged", "offline"], False, False, EXIT_OFFLINE),
        (["offline"], False, False, EXIT_OFFLINE),
        (["upgraded", "offline", "failed"], False, False, EXIT_FAILED),  # 1 wins over 4
        (["offline", "skipped"], False, False, EXIT_FAILED),
        (["offline", "skipped"], True, False, EXIT_INTERRUPTED),
        (["offline", "unsafe"], False, False, EXIT_UNSAFE),
    ],
)
def test_ok_and_exit_code(results, interrupted, ok, exit_code):
    hosts = [HostResult(f"h{i}", Outcome(r)) for i, r in enumerate(results)]
    run = RunResult("r", 0.0, 1.0, hosts, interrupted)
    assert document(hosts, interrupted)["ok"] is ok
    assert run.exit_code() == exit_code


def test_unfinished_run_has_null_finished():
    doc = RunResult("r", 0.0).to_json()
    assert doc["finished"] is None
    assert doc["hosts"] == [] and doc["ok"] is True


def test_dry_run_diff_is_not_part_of_the_contract():
    host = HostResult("pi-01", Outcome.PLANNED, diff="--- a\n+++ b\n")
    assert set(document([host])["hosts"][0]) == HOST_KEYS


# --- the groups of results: one definition, and the docs say the same ----------------


def doc_tables(heading: str) -> list[list[list[str]]]:
    """The tables under ``heading`` (up to the next heading) of docs/reference/report.md:
    each its rows past the header, each row its cells with backticks dropped."""
    lines = REPORT_DOC.read_text(encoding="utf-8").splitlines()
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in lines[lines.index(heading) + 1 :] + [""]:
        if line.startswith("|"):
            rows.append([c.strip().replace("`", "") for c in line.strip("|").split("|")])
            continue
        if rows:
            tables.append(rows[2:])  # past the header and its |---| line
            rows = []
        if line.startswith("#"):
            break
    return tables


def doc_table(heading: str) -> list[list[str]]:
    return doc_tables(heading)[0]


def test_every_result_is_in_exactly_one_group():
    groups = [SUCCESS_OUTCOMES, FAILURE_OUTCOMES, NOT_RUN_OUTCOMES]
    assert sorted(o.value for g in groups for o in g) == sorted(o.value for o in Outcome)


def test_the_docs_results_table_agrees_with_the_groups():
    rows = doc_table("### Results")
    assert {row[0] for row in rows} == set(RESULTS)
    failure = {row[0] for row in rows if row[2] == "yes"}
    not_run = {row[0] for row in rows if "JUnit: skipped" in row[2]}
    assert failure == {o.value for o in FAILURE_OUTCOMES}
    assert not_run == {o.value for o in NOT_RUN_OUTCOMES}


def test_only_the_success_group_makes_a_run_ok():
    for outcome in Outcome:
        run = RunResult("r", 0.0, 1.0, [HostResult("h", outcome)])
        assert run.ok is (outcome in SUCCESS_OUTCOMES)


# --- step statuses: one definition, and the docs list exactly it --------------------


def test_step_statuses_are_the_definition():
    assert {s.value for s in StepStatus} == STEP_STATUSES


def test_the_docs_list_exactly_the_step_statuses():
    key_table, status_table = doc_tables("### A step")
    assert [row[0] for row in key_table] == ["step", "status", "seconds"]
    assert [row[0] for row in status_table] == [s.value for s in StepStatus]


def test_a_step_record_takes_only_a_defined_status():
    assert StepRecord("swap", "ok", 1).status is StepStatus.OK
    with pytest.raises(ValueError):
        StepRecord("swap", "undone", 1)  # never produced: a rollback is a step of its own
