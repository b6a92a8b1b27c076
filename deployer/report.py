"""Render a :class:`~deployer.result.RunResult` for humans (table), machines
(JSON, docs/reference/report.md) and CI (JUnit XML).

Reports are built only from result values, which hold no credentials; every
renderer also takes ``secrets`` (raw values, e.g. ``Inventory.secret_values()``)
and scrubs them as a second line of defence, from free text only (error
messages, warnings, command output): identifiers (``IDENTIFIER_FIELDS``: the run
id, host names, sha256s) are reported as they are, since a short credential
such as ``dbid = "0556"`` turns up inside them by chance (``secrets.scrub``).
Report files are written owner-only (``REPORT_FILE_MODE``): they hold no
credential, but they map the fleet.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from deployer.columns import align
from deployer.files import atomic_write
from deployer.result import (
    FAILURE_OUTCOMES,
    NOT_RUN_OUTCOMES,
    HostResult,
    Outcome,
    RunResult,
    iso,
)
from deployer.secrets import scrub

TABLE_COLUMNS = ("HOST", "RESULT", "EXPOSURE s", "API CALLS", "DURATION s", "ERROR")
MAX_ERROR_WIDTH = 80
REPORT_FILE_MODE = 0o600
#: JSON report fields that are identifiers: reported as they are, never scrubbed
IDENTIFIER_FIELDS = frozenset({"run_id", "host", "old_sha256", "new_sha256"})

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


# --- the human table ----------------------------------------------------------


def one_line(text: str, width: int = MAX_ERROR_WIDTH) -> str:
    """The first line of ``text``, cut to ``width`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def error_text(host: HostResult) -> str:
    """``Type at step: message`` (or just the skip reason) for one host."""
    error = host.error
    if error is None:
        return ""
    if host.result is Outcome.SKIPPED:
        return error.message
    where = f" at {error.step}" if error.step else ""
    code = f" [API {error.api_error_code}]" if error.api_error_code is not None else ""
    return f"{error.type}{where}{code}: {error.message}"


def render_table(run: RunResult, secrets: Iterable[str] = ()) -> str:
    """A fixed-width summary table, one row per host, then a counts line."""
    secrets = list(secrets)
    rows = [TABLE_COLUMNS] + [_table_row(h, secrets) for h in run.hosts]
    lines = align(rows, right_from=2)
    lines.append(summary_line(run))
    lines += [scrub(w, secrets) for w in (mode_warning(h) for h in run.hosts) if w]
    return "\n".join(lines) + "\n"


def mode_warning(host: HostResult) -> str | None:
    """A line for a host whose installed script others could read at inspect."""
    readers = host.script_readable_by
    if readers is None:
        return None
    return (
        f"warning: {host.host}: the installed script was mode {host.installed_mode}: "
        f"{readers} could read the host's credentials"
    )


def _table_row(host: HostResult, secrets: list[str]) -> tuple[str, ...]:
    error = one_line(scrub(error_text(host), secrets))
    if host.result is Outcome.SKIPPED:
        return (host.host, host.result.value, "-", "-", "-", error)
    return (
        host.host,
        host.result.value,
        f"{host.exposure_seconds:.2f}",
        str(host.api_calls),
        f"{host.duration_seconds:.1f}",
        error,
    )


def summary_line(run: RunResult) -> str:
    """``12 hosts: 10 upgraded, 1 rolled_back, 1 skipped`` (zero counts left out)."""
    counts = [f"{n} {name}" for name, n in run.summary().items() if n]
    noun = "host" if len(run.hosts) == 1 else "hosts"
    text = f"{len(run.hosts)} {noun}: " + (", ".join(counts) if counts else "nothing to do")
    return text + (" (interrupted)" if run.interrupted else "")


# --- JSON (docs/reference/report.md) ------------------------------------------------


def to_json_text(run: RunResult, secrets: Iterable[str] = ()) -> str:
    report = _masked(run.to_json(), list(secrets))
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def _masked(value: Any, secrets: list[str], key: str | None = None) -> Any:
    """``value`` with every string scrubbed, but those of ``IDENTIFIER_FIELDS``."""
    if isinstance(value, str):
        return value if key in IDENTIFIER_FIELDS else scrub(value, secrets)
    if isinstance(value, dict):
        return {k: _masked(v, secrets, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secrets, key) for v in value]
    return value


def write_json(run: RunResult, target: str | os.PathLike | IO[str], secrets=()) -> None:
    """Write the JSON report (docs/reference/report.md) to a path (atomically) or
    an open text stream."""
    _write_text(to_json_text(run, secrets), target)


# --- JUnit XML ----------------------------------------------------------------------


def to_junit_xml(
    run: RunResult,
    suite_name: str = "deployer",
    *,
    command: str = "upgrade",
    secrets: Iterable[str] = (),
) -> str:
    """One ``<testcase>`` per host: a ``FAILURE_OUTCOMES`` result is a ``<failure>``, a
    ``NOT_RUN_OUTCOMES`` one ``<skipped>``, the rest (``SUCCESS_OUTCOMES``) pass."""
    secrets = list(secrets)
    summary = run.summary()
    failures = sum(summary[o.value] for o in FAILURE_OUTCOMES)
    duration = (run.finished or run.started) - run.started
    attrs = {
        "name": suite_name,
        "tests": str(len(run.hosts)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(sum(summary[o.value] for o in NOT_RUN_OUTCOMES)),
        "time": f"{max(duration, 0.0):.3f}",
        "timestamp": iso(run.started) or "",
    }
    root = ET.Element("testsuites", {k: attrs[k] for k in ("name", "tests", "failures", "time")})
    root.set("errors", "0")
    suite = ET.SubElement(root, "testsuite", attrs)
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "run_id", "value": run.run_id})
    for host in run.hosts:
        _junit_case(suite, host, f"{suite_name}.{command}", secrets)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n"


def _junit_case(suite: ET.Element, host: HostResult, classname: str, secrets: list[str]) -> None:
    case = ET.SubElement(
        suite,
        "testcase",
        {"name": host.host, "classname": classname, "time": f"{host.duration_seconds:.3f}"},
    )

    def clean(text: str) -> str:
        return _xml_safe(scrub(text, secrets))

    if host.result in FAILURE_OUTCOMES:
        kind = host.error.type if host.error else host.result.value
        message = f"{host.result.value}: {one_line(error_text(host), 400) or 'no error recorded'}"
        failure = ET.SubElement(case, "failure", {"message": clean(message), "type": clean(kind)})
        failure.text = clean(_failure_details(host))
    elif host.result in NOT_RUN_OUTCOMES:
        reason = host.error.message if host.error else "not started"
        if host.result is Outcome.OFFLINE:
            reason = f"offline: {reason}"
        ET.SubElement(case, "skipped", {"message": clean(reason)})
    ET.SubElement(case, "system-out").text = clean(_host_log(host))


def _failure_details(host: HostResult) -> str:
    error = host.error
    lines = [f"result: {host.result.value}"]
    if error:
        lines += [f"step: {error.step}", f"type: {error.type}"]
        if error.api_error_code is not None:
            lines.append(f"api_error_code: {error.api_error_code}")
        lines.append(f"message: {error.message}")
    if host.result is Outcome.UNSAFE:
        lines.append("end state not verified: run `deployer recover` and check this host")
    return "\n".join(lines)


def _host_log(host: HostResult) -> str:
    lines = [
        f"result: {host.result.value}",
        f"old_sha256: {host.old_sha256 or '-'}",
        f"new_sha256: {host.new_sha256 or '-'}",
        f"exposure_seconds: {host.exposure_seconds:.3f}",
        f"api_calls: {host.api_calls}",
        f"waiting_seconds: {host.waiting_seconds:.3f}",
        f"installed_mode: {host.installed_mode or '-'}",
    ]
    warning = mode_warning(host)
    if warning:
        lines.append(warning)
    lines += [f"{s.step}: {s.status} {s.seconds:.3f}s" for s in host.steps]
    return "\n".join(lines)


def _xml_safe(text: str) -> str:
    """Drop characters XML 1.0 cannot carry (a remote command's output may hold them)."""
    return _XML_INVALID.sub("\ufffd", text)


def write_junit(
    run: RunResult,
    path: str | os.PathLike,
    suite_name: str = "deployer",
    *,
    command: str = "upgrade",
    secrets: Iterable[str] = (),
) -> None:
    _write_text(to_junit_xml(run, suite_name, command=command, secrets=secrets), path)


# --- writing -------------------------------------------------------------------------


def _write_text(text: str, target: str | os.PathLike | IO[str]) -> None:
    if not isinstance(target, (str, os.PathLike)):  # an open text stream
        target.write(text)
        target.flush()
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, mode=REPORT_FILE_MODE)  # no credential, but a map of the fleet
