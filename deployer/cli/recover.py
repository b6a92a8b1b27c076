"""``deployer history``: past runs and host results, read from the state journal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from deployer.journal import Journal, journal_path
from deployer.result import SUCCESS_OUTCOMES

# Successful results are counted; others name their hosts, up to this many.
NAMED_HOSTS_PER_RESULT = 3
_SUCCESS = {o.value for o in SUCCESS_OUTCOMES}


@click.command()
@click.argument("host", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON on stdout.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    default=20,
    show_default=True,
    help="Show at most N runs.",
)
@click.pass_obj
def history(obj: Any, host: str | None, as_json: bool, limit: int) -> None:
    """Past runs, newest first, with each host's result.

    With HOST: only the runs that touched HOST, with its steps.
    Reads STATE_DIR/journal.sqlite3 (see --state-dir); records nothing.
    """
    state_dir = obj.state_dir()
    runs: list[dict[str, Any]] = []
    if journal_path(state_dir).exists():
        with Journal(state_dir) as journal:
            runs = journal.history(host=host, limit=limit)
    if as_json:
        click.echo(json.dumps(runs, indent=2))
    elif not runs:
        click.echo(_nothing_recorded(obj, state_dir, host))
    elif host is None:
        click.echo(_runs_table(runs))
    else:
        click.echo(_host_history(runs))
    if as_json and not runs:
        click.echo(_nothing_recorded(obj, state_dir, host), err=True)


def _nothing_recorded(obj: Any, state_dir: Path, host: str | None) -> str:
    text = f"no runs recorded in {state_dir}"
    if host is not None:
        text = f"no runs recorded for {host} in {state_dir}"
    inventory = obj.inventory_path()
    if not obj.state_dir_option and not inventory.exists():
        text += (
            f" (no inventory at {inventory}: the state dir is .deployer/ beside it;"
            " pass -i INVENTORY or --state-dir DIR)"
        )
    return text


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


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _runs_table(runs: list[dict[str, Any]]) -> str:
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
    return _table(rows)


def _host_history(runs: list[dict[str, Any]]) -> str:
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
                lines.extend("    " + line for line in _table(rows).splitlines())
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
@click.option(
    "--force",
    is_flag=True,
    help="Presume runs (and recovers) recorded on another machine dead now, without "
    "waiting for their deadline. Only when you know they are gone.",
)
@click.pass_obj
def recover(obj: Any, as_json: bool, force: bool) -> None:
    """Finish every interrupted run from the journal.

    Closes every allow-clientless window a journalled run may have left open,
    lets or makes each uncommitted guard revert, waits for a client online,
    releases locks, closes tunnels deployer opened and records each host's
    final result. It acts on a host only while it holds the host's lock: a
    host whose lock another run holds, or that a run on another machine may
    still be working on, is left alone (skipped) and stays pending. Harmless
    when nothing is dangling. Exit 0 when every host ends verified, 1 when some
    host was left alone, 3 when some host is still unsafe.
    """
    import sys

    from deployer import report as reporting
    from deployer.errors import EXIT_FAILED, EXIT_OK, EXIT_UNSAFE
    from deployer.events import EventSink
    from deployer.progress import make_progress
    from deployer.recover import run_recover
    from deployer.result import Outcome
    from deployer.secrets import scrub

    inventory = obj.load_inventory()
    state_dir = obj.state_dir(inventory.path)
    secrets = inventory.secret_values()

    def progress(total: int) -> EventSink:
        return make_progress(sys.stderr, total, quiet=obj.quiet, secrets=secrets)

    run = run_recover(inventory, state_dir, progress, force=force)
    left = [h for h in run.hosts if h.result is Outcome.SKIPPED]
    if as_json:
        click.echo(reporting.to_json_text(run, secrets))
    elif not run.hosts:
        click.echo(f"nothing to recover: no interrupted run in {state_dir}", err=True)
    elif not obj.quiet:
        click.echo(reporting.render_table(run, secrets), err=True)
    for host in left:
        reason = scrub(host.error.message if host.error else "", secrets)
        click.echo(f"{host.host}: left alone, still pending: {reason}", err=True)
    unsafe = any(h.result is Outcome.UNSAFE for h in run.hosts)
    raise SystemExit(EXIT_UNSAFE if unsafe else EXIT_FAILED if left else EXIT_OK)
