"""`deployer hosts [TARGETS...]`: list hosts with groups and tunnel endpoint.

No credentials are shown: only names, groups, the tunnel endpoint, the SSH user
and the service kind.
"""

from __future__ import annotations

import json

import click

from deployer.columns import align

COLUMNS = (
    ("HOST", "host"),
    ("GROUPS", "groups"),
    ("ENDPOINT", "endpoint"),
    ("SSH USER", "ssh_user"),
    ("SERVICE", "service"),
)


@click.command(help="List hosts (all, or those TARGETS name) with groups and tunnel endpoint.")
@click.argument("targets", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list on stdout.")
@click.pass_obj
def hosts(obj, targets: tuple[str, ...], as_json: bool) -> None:
    from deployer.inventory import describe_host
    from deployer.targets import select_hosts

    inventory = obj.load_inventory()
    rows = [describe_host(inventory, h) for h in select_hosts(inventory, targets or ("all",))]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_table(rows))


def format_table(rows: list[dict]) -> str:
    """Plain aligned columns (no rich: this is a quick, greppable listing)."""
    cells = [[title for title, _ in COLUMNS]]
    for row in rows:
        cells.append([_cell(row[key]) for _, key in COLUMNS])
    return "\n".join(align(cells))


def _cell(value: object) -> str:
    if isinstance(value, list):
        return ",".join(value) or "-"
    return str(value)
