"""``deployer history``: past runs and host results, read from the state journal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from deployer.history import host_history, past_runs, runs_table
from deployer.journal import Journal, journal_path


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
            runs = past_runs(journal, host=host, limit=limit)
    if as_json:
        click.echo(json.dumps(runs, indent=2))
    elif not runs:
        click.echo(_nothing_recorded(obj, state_dir, host))
    elif host is None:
        click.echo(runs_table(runs))
    else:
        click.echo(host_history(runs))
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
