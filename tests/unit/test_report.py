"""Reports: the human table, the JSON file and JUnit XML, and that no credential
reaches any of them."""

from __future__ import annotations

import io
import json
import stat
import xml.etree.ElementTree as ET

import pytest

from deployer.model import HostConfig
from deployer.report import (
    render_table,
    summary_line,
    to_junit_xml,
    write_json,
    write_junit,
)
from deployer.result import ErrorInfo, HostResult, Outcome, RunResult, StepRecord
from deployer.rollout import Rollout, RolloutPolicy
from deployer.secrets import Secret

pytestmark = pytest.mark.unit


def sample_run() -> RunResult:
    steps = [StepRecord("preflight", "ok", 0.02), StepRecord("swap", "ok", 0.4)]
    hosts = [
        HostResult("sbx-01", Outcome.UPGRADED, "a" * 64, "b" * 64, 0.31, 6, 4.2, steps),
        HostResult("sbx-02", Outcome.UNCHANGED, "b" * 64, "b" * 64, 0.0, 2, 1.0),
        HostResult(
            "sbx-03",
            Outcome.ROLLED_BACK,
            "a" * 64,
            "b" * 64,
            1.5,
            9,
            12.0,
            steps + [StepRecord("verify", "failed", 10.0)],
            ErrorInfo("verify", "ClientOffline", "client not online after 10s\nsecond line", 24),
        ),
        HostResult(
            "sbx-04",
            Outcome.FAILED,
            error=ErrorInfo("preflight", "ClientBlocked", "client blocked", 23),
        ),
        HostResult("sbx-05", Outcome.UNSAFE, error=ErrorInfo("close", "ApiError", "window?")),
        HostResult(
            "sbx-06",
            Outcome.SKIPPED,
            error=ErrorInfo(None, "RolloutStopped", "failure budget exceeded (3 > 2)"),
        ),
        HostResult("sbx-07", Outcome.PLANNED),
    ]
    return RunResult("run-42", started=1_700_000_000.0, finished=1_700_000_030.5, hosts=hosts)


# --- table -------------------------------------------------------------------------


def test_table_has_one_row_per_host_with_one_line_errors():
    text = render_table(sample_run())
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["HOST", "RESULT"]
    assert len(lines) == 1 + 7 + 1
    row = next(line for line in lines if line.startswith("sbx-03"))
    assert "rolled_back" in row
    assert "1.50" in row and " 9 " in row and "12.0" in row
    assert "ClientOffline at verify [API 24]: client not online after 10s" in row
    assert "second line" not in text
    assert "failure budget exceeded (3 > 2)" in text
    assert lines[-1] == summary_line(sample_run())


def test_table_columns_line_up():
    lines = render_table(sample_run()).splitlines()[:-1]
    result_col = lines[0].index("RESULT")
    assert all(line[result_col - 2 : result_col] == "  " for line in lines)


def test_summary_line_counts_and_interruption():
    run = sample_run()
    assert summary_line(run) == (
        "7 hosts: 1 upgraded, 1 unchanged, 1 rolled_back, 1 failed, 1 unsafe, 1 skipped, 1 planned"
    )
    run.interrupted = True
    assert summary_line(run).endswith("(interrupted)")
    assert summary_line(RunResult("r", 0.0)) == "0 hosts: nothing to do"


def test_long_error_messages_are_cut():
    run = RunResult(
        "r", 0.0, hosts=[HostResult("h", Outcome.FAILED, error=ErrorInfo("s", "E", "x" * 500))]
    )
    row = render_table(run).splitlines()[1]
    assert len(row) < 200 and row.endswith("…")


# --- JSON ----------------------------------------------------------------------------


def test_write_json_to_a_path_and_a_stream(tmp_path):
    run = sample_run()
    path = tmp_path / "out" / "report.json"
    write_json(run, path)
    assert json.loads(path.read_text()) == run.to_json()
    stream = io.StringIO()
    write_json(run, stream)
    assert json.loads(stream.getvalue()) == run.to_json()
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left


# --- JUnit ---------------------------------------------------------------------------


def parse_junit(text: str) -> ET.Element:
    root = ET.fromstring(text.encode())
    assert root.tag == "testsuites"
    return root.find("testsuite")


def test_junit_counts_and_mapping():
    suite = parse_junit(to_junit_xml(sample_run(), command="upgrade"))
    assert suite.get("tests") == "7"
    assert suite.get("failures") == "3"  # rolled_back, failed, unsafe
    assert suite.get("skipped") == "1"
    assert suite.get("errors") == "0"
    assert float(suite.get("time")) == pytest.approx(30.5)
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == [f"sbx-0{i}" for i in range(1, 8)]
    assert {c.get("classname") for c in cases.values()} == {"deployer.upgrade"}
    assert cases["sbx-03"].get("time") == "12.000"
    for name in ("sbx-01", "sbx-02", "sbx-07"):
        assert cases[name].find("failure") is None and cases[name].find("skipped") is None
    failure = cases["sbx-03"].find("failure")
    assert failure.get("type") == "ClientOffline"
    assert failure.get("message").startswith("rolled_back: ClientOffline at verify [API 24]")
    assert "api_error_code: 24" in failure.text
    assert cases["sbx-05"].find("failure").get("message").startswith("unsafe:")
    assert "deployer recover" in cases["sbx-05"].find("failure").text
    skipped = cases["sbx-06"].find("skipped")
    assert skipped.get("message") == "failure budget exceeded (3 > 2)"
    assert "swap: ok 0.400s" in cases["sbx-01"].find("system-out").text


def test_junit_counts_agree_with_case_elements():
    suite = parse_junit(to_junit_xml(sample_run()))
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases)
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)


def test_junit_survives_control_characters_in_output(tmp_path):
    error = ErrorInfo("validate", "RemoteCommandError", "py_compile failed:\x1b[31m\x00 bad\x07")
    run = RunResult("r", 0.0, 1.0, [HostResult("h", Outcome.FAILED, error=error)])
    path = tmp_path / "junit.xml"
    write_junit(run, path, command="rollback")
    suite = parse_junit(path.read_text())
    case = suite.find("testcase")
    assert case.get("classname") == "deployer.rollback"
    assert "bad" in case.find("failure").get("message")


# --- no credentials in any report ---------------------------------------------------------

RAW = {
    "dbid": "DBID-raw-credential-9911",
    "uuid": "20sldd20-20sz-aa20-aa02-aa0salskd82a",
}


def secret_hosts() -> list[HostConfig]:
    return [
        HostConfig(f"pi-0{i}", Secret(RAW["dbid"] + str(i)), Secret(RAW["uuid"] + str(i)), i, i)
        for i in range(1, 4)
    ]


def reports(run: RunResult, secrets=()) -> list[str]:
    stream = io.StringIO()
    write_json(run, stream, secrets=secrets)
    return [render_table(run, secrets), stream.getvalue(), to_junit_xml(run, secrets=secrets)]


def test_no_credential_reaches_any_report():
    hosts = secret_hosts()

    def run_host(host, control):
        # a workflow formats errors with the host's (masking) Secret values
        message = f"wrong data for dbid {host.dbid} / uuid {host.host_uuid!r}"
        outcome = Outcome.FAILED if host.name == "pi-02" else Outcome.UPGRADED
        error = (
            ErrorInfo("preflight", "WrongData", message, 31) if outcome is Outcome.FAILED else None
        )
        return HostResult(host.name, outcome, error=error)

    rollout = Rollout(hosts, run_host, RolloutPolicy(parallel=2))
    run = RunResult("r1", 1.0, 2.0, rollout.run())
    raw_values = [v for h in hosts for v in h.secret_values()]
    for text in reports(run):
        assert "pi-02" in text
        for raw in raw_values:
            assert raw not in text
        assert "…9112" in text  # the masked form, as Secret prints itself


# --- the installed script's mode -----------------------------------------------------


def mode_run(*modes: str | None) -> RunResult:
    hosts = [HostResult(f"pi-0{i}", Outcome.UPGRADED) for i, _ in enumerate(modes, 1)]
    for host, mode in zip(hosts, modes, strict=True):
        host.installed_mode = mode
    return RunResult("run-7", 0.0, 1.0, hosts)


def test_table_warns_under_the_summary_about_a_script_others_could_read():
    lines = render_table(mode_run("0755", "0700", None, "0640")).splitlines()
    assert lines[-3] == "4 hosts: 4 upgraded"
    assert lines[-2:] == [
        "warning: pi-01: the installed script was mode 0755: "
        "group and others could read the host's credentials",
        "warning: pi-04: the installed script was mode 0640: "
        "group could read the host's credentials",
    ]
    assert render_table(mode_run("0700", "0600")).splitlines()[-1] == "2 hosts: 2 upgraded"


def test_junit_system_out_carries_the_installed_mode_and_its_warning():
    suite = parse_junit(to_junit_xml(mode_run("0755", "0700", None)))
    outs = [case.find("system-out").text.splitlines() for case in suite.iter("testcase")]
    assert "installed_mode: 0755" in outs[0]
    warning = "warning: pi-01: the installed script was mode 0755"
    assert any(line.startswith(warning) for line in outs[0])
    assert "installed_mode: 0700" in outs[1] and not any("warning" in x for x in outs[1])
    assert "installed_mode: -" in outs[2]


# --- the report files' own mode ------------------------------------------------------


def test_report_files_are_private(tmp_path, open_umask):
    """They hold no credential, but they map the fleet: owner-only, even when they
    replace a file that others could read."""
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    for path in (report, junit):
        path.write_text("old")
        path.chmod(0o644)
    write_json(sample_run(), report)
    write_junit(sample_run(), junit)
    for path in (report, junit):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    write_json(sample_run(), tmp_path / "new" / "report.json")
    assert stat.S_IMODE((tmp_path / "new" / "report.json").stat().st_mode) == 0o600


def test_reports_scrub_a_leaked_raw_credential_as_second_defence():
    leaked = RAW["dbid"]
    error = ErrorInfo("connect", "ApiError", f"GET /api/connect?dbid={leaked} failed", 11)
    run = RunResult("r", 0.0, 1.0, [HostResult("pi-01", Outcome.FAILED, error=error)])
    unscrubbed = reports(run)
    assert all(leaked in text for text in unscrubbed)  # the test would see a leak
    for text in reports(run, secrets=[leaked]):
        assert leaked not in text
        assert "…9911" in text


def test_a_short_dbid_inside_the_run_id_and_hashes_is_not_masked_in_reports():
    dbid = "0556"
    run_id = f"20250101T000000Z-{dbid}ab"
    sha = "ab" + dbid + "c" * 58
    error = ErrorInfo("connect", "WrongData", f"wrong data for dbid={dbid} (run {run_id})", 31)
    host = HostResult("pi-01", Outcome.FAILED, sha, sha, error=error)
    run = RunResult(run_id, 0.0, 1.0, [host])
    table, report, junit = reports(run, secrets=[dbid])
    data = json.loads(report)
    assert data["run_id"] == run_id
    assert (data["hosts"][0]["old_sha256"], data["hosts"][0]["new_sha256"]) == (sha, sha)
    assert data["hosts"][0]["error"]["message"] == f"wrong data for dbid=**** (run {run_id})"
    assert "dbid=**** (run 20250101T000000Z-0" in table  # the cell is cut at 80 characters
    suite = parse_junit(junit)
    assert f'value="{run_id}"' in junit and sha in junit
    assert all(f"={dbid}" not in (e.text or "") + str(e.attrib) for e in suite.iter())
