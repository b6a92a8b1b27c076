"""``deployer history``: past runs and host results, as the journal recorded them.

The journal stores and queries (:class:`~deployer.journal.Journal`); this
module builds the view of it that ``deployer history`` prints:
:func:`past_runs` gives the runs as JSON-ready dicts (``--json``), and
:func:`runs_table` and :func:`host_history` render them as text
(docs/reference/journal.md, "deployer history").
"""

from __future__ import annotations

from typing import Any

from deployer.columns import align
from deployer.facts import HostFacts
from deployer.journal import Journal, RunRecord
from deployer.result import SUCCESS_OUTCOMES, iso

# Successful results are counted; others name their hosts, up to this many.
NAMED_HOSTS_PER_RESULT = 3
_SUCCESS = {o.value for o in SUCCESS_OUTCOMES}


def past_runs(journal: Journal, host: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """Past runs, newest first, as JSON-ready dicts (``deployer history --json``).

    Each run carries ``status`` (finished | running | unfinished: stopped
    without finishing, see ``deployer recover``) and its hosts' results.
    With ``host``: only the runs that touched it, only that host, with its steps.
    """
    out = []
    for run in journal.runs(host=host, limit=limit):
        hosts = journal.host_results(run.run_id)
        if host is not None:
            hosts = [h for h in hosts if h["host"] == host]
            for entry in hosts:
                entry["steps"] = journal.steps(run.run_id, host)
        out.append(_history_entry(run, hosts))
    return out


def _history_entry(run: RunRecord, hosts: list[dict[str, Any]]) -> dict[str, Any]:
    if run.finished is not None:
        status = "finished"
    else:
        status = "running" if run.is_live() else "unfinished"
    return {
        "run_id": run.run_id,
        "command": run.command,
        "inventory": run.inventory,
        "status": status,
        "started": iso(run.started),
        "finished": iso(run.finished),
        "ok": run.ok,
        "interrupted": run.interrupted,
        "machine": run.machine,
        "pid": run.pid,
        "hosts": [_history_host(h) for h in hosts],
    }


def _history_host(entry: dict[str, Any]) -> dict[str, Any]:
    facts = HostFacts.from_json(entry["facts"])
    out = {
        "host": entry["host"],
        "result": entry["result"],
        "started": iso(entry["started"]),
        "finished": iso(entry["finished"]),
        "old_sha256": facts.old_sha256,
        "new_sha256": facts.new_sha256,
        "error": entry["error"],
    }
    if "steps" in entry:
        out["steps"] = [
            {
                "step": s["step"],
                "status": s["status"],
                "seconds": None if s["seconds"] is None else round(s["seconds"], 3),
                "began": iso(s["began"]),
            }
            for s in entry["steps"]
        ]
    return out


def _when(iso_time: str | None) -> str:
    return "-" if iso_time is None else iso_time.replace("T", " ").replace("+00:00", "Z")


def _ok(run: dict[str, Any]) -> str:
    if run["status"] != "finished":
        return run["status"]
    label = "yes" if run["ok"] else "no"
    return label + (" (interrupted)" if run["interrupted"] else "")


def _pending(run: dict[str, Any]) -> str:
    """How a host without a result reads: still running, or left unfinished."""
    return "running" if run["status"] == "running" else "unfinished"


def _hosts_summary(run: dict[str, Any]) -> str:
    by_result: dict[str, list[str]] = {}
    for h in run["hosts"]:
        by_result.setdefault(h["result"] or _pending(run), []).append(h["host"])
    parts = []
    for result, names in by_result.items():
        part = f"{len(names)} {result}"
        if result not in _SUCCESS:
            shown = names[:NAMED_HOSTS_PER_RESULT]
            more = ", …" if len(names) > len(shown) else ""
            part += f" ({', '.join(shown)}{more})"
        parts.append(part)
    return ", ".join(parts) or "no host started"


def runs_table(runs: list[dict[str, Any]]) -> str:
    rows = [["RUN", "COMMAND", "STARTED", "FINISHED", "OK", "HOSTS"]]
    for run in runs:
        rows.append(
            [
                run["run_id"],
                run["command"],
                _when(run["started"]),
                _when(run["finished"]),
                _ok(run),
                _hosts_summary(run),
            ]
        )
    return "\n".join(align(rows))


def host_history(runs: list[dict[str, Any]]) -> str:
    blocks = []
    for run in runs:
        lines = [
            f"{run['run_id']}  {run['command']}  started {_when(run['started'])}"
            f"  finished {_when(run['finished'])}  ok: {_ok(run)}"
        ]
        for h in run["hosts"]:
            lines.append("  " + _host_line(h, _pending(run)))
            rows = [
                [s["step"], s["status"], "-" if s["seconds"] is None else f"{s['seconds']:.2f}s"]
                for s in h.get("steps", [])
            ]
            if rows:
                lines.extend("    " + line for line in align(rows))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _host_line(h: dict[str, Any], pending: str) -> str:
    line = f"{h['host']}: {h['result'] or pending}"
    if h["old_sha256"] or h["new_sha256"]:
        old, new = (h[k][:12] if h[k] else "-" for k in ("old_sha256", "new_sha256"))
        line += f"  sha256 {old} -> {new}"
    error = h["error"]
    if error:
        where = f" at {error['step']}" if error.get("step") else ""
        line += f"  error: {error.get('type')}{where}: {error.get('message')}"
    return line
