"""Credentials with ``& ' < > " \\`` in them are masked in every form that the
templates and commands can give them (issue 11, item 5): jinja's ``tojson``
(HTML-safe: ``<`` -> ``\\u003c``, ``&`` -> ``\\u0026``, ``'`` -> ``\\u0027``),
JSON's ``\\"`` and ``\\\\``, ``shlex.quote``, URL encoding, ``repr``, HTML
escaping. Judged by two fragments of each credential that every one of its
forms carries verbatim: neither may reach the output.
"""

from __future__ import annotations

import json
import logging
import shlex

import pytest

from deployer.clock import FakeClock
from deployer.inventory import load_inventory
from deployer.plan import plan_host
from deployer.report import render_table, to_json_text, to_junit_xml
from deployer.result import Outcome, RunResult
from deployer.secrets import RedactingFilter, scrub
from deployer.workflow import HostRun, RunContext, UpgradeOptions
from tests.doubles import FakeApi, ProcessReaper, Recorder, RemoteFactory
from tests.hostile_inventory import DBID, USER_ID, leaked, write_inventory
from tests.local_site import Site

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("guard_without_api")]


@pytest.fixture
def inventory(tmp_path):
    return load_inventory(write_inventory(tmp_path))


def host_run(inventory, options: UpgradeOptions):
    host = inventory.hosts["pi-01"]
    plan = plan_host(inventory, host, "run-hostile")
    ctx = RunContext(
        run_id="run-hostile",
        inventory=inventory,
        api=FakeApi(),
        remote_factory=RemoteFactory(),
        options=options,
        events=Recorder(),
        clock=FakeClock(),
    )
    return HostRun(ctx, plan).execute(), ctx.events


def reports(result) -> list[str]:
    run = RunResult("run-hostile", 0.0, 1.0, [result])
    return [to_json_text(run), render_table(run), to_junit_xml(run)]


def test_the_fixture_really_prints_every_form(inventory):
    from deployer.render import render_script

    text = render_script(inventory, inventory.hosts["pi-01"]).text
    for raw in (DBID, USER_ID):
        assert raw in text  # PLAIN
        assert shlex.quote(raw) in text  # SHELL
    assert "\\u003c" in text and "\\u0026" in text and "\\u0027" in text  # HTML-safe tojson
    assert "&amp;" in text and "%26" in text  # HTML, URL


def test_a_dry_run_diff_masks_every_form_of_hostile_credentials(inventory):
    result, _ = host_run(inventory, UpgradeOptions(dry_run=True))
    assert result.result is Outcome.PLANNED, result.error
    assert "+SHELL = " in result.diff
    assert leaked(result.diff) == [], result.diff


def test_a_failing_validate_that_echoes_hostile_credentials_is_masked(inventory):
    result, events = host_run(inventory, UpgradeOptions())
    assert result.result is Outcome.FAILED
    assert "validate command failed" in result.error.message
    assert leaked(result.error.message) == [], result.error.message
    for text in reports(result) + events.messages:
        assert leaked(text) == [], text


def test_the_log_masks_every_form_of_hostile_credentials(inventory, caplog):
    from deployer.render import render_script

    text = render_script(inventory, inventory.hosts["pi-01"]).text
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    logger = logging.getLogger("deployer.test_hostile")
    handler = Capture()
    handler.addFilter(RedactingFilter(inventory.secret_values()))
    logger.addHandler(handler)
    try:
        for line in text.splitlines():
            logger.warning("script line: %s", line)
        logger.warning("argv %r", [DBID, USER_ID])
    finally:
        logger.removeHandler(handler)
    assert len(records) == len(text.splitlines()) + 1
    for record in records:
        assert leaked(record) == [], record


def test_scrub_masks_each_quoting_of_a_hostile_credential(inventory):
    from urllib.parse import quote, quote_plus

    import markupsafe

    forms = {
        "raw": DBID,
        "json": json.dumps(DBID),
        "json raw utf-8": json.dumps(DBID, ensure_ascii=False),
        "html-safe json": json.dumps(DBID)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("'", "\\u0027"),
        "shlex": shlex.quote(DBID),
        "repr": repr(DBID),
        "url": quote(DBID),
        "url (no safe)": quote(DBID, safe=""),
        "url (query)": quote_plus(DBID),
        "html": str(markupsafe.escape(DBID)),
    }
    secrets = inventory.secret_values()
    for name, form in forms.items():
        assert leaked(scrub(f"x {form} y", secrets)) == [], name


def test_a_health_command_whose_output_tail_cuts_a_credential_leaks_no_part_of_it(tmp_path):
    """The error keeps the last 300 characters of the output: a credential cut by
    that tail must still be masked (mask first, then cut)."""
    reaper = ProcessReaper(tmp_path)
    try:
        # DBID-SECRET-2222 followed by 290 characters: the tail starts inside it
        health = "printf '%s' {{ dbid | quote }}; printf 'y%.0s' $(seq 1 290); exit 1"
        site = Site(tmp_path, health=health)
        result = site.run(release="2")
        assert result.result is Outcome.ROLLED_BACK, result.error
        assert "health command failed" in result.error.message
        raw = "DBID-SECRET-2222"
        pieces = [raw[i : i + 5] for i in range(len(raw) - 4)]  # more than the last four
        assert [p for p in pieces if p in result.error.message] == [], result.error.message
    finally:
        reaper.kill_all()
