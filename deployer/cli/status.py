"""`deployer status [TARGETS...]`: client_status of each host, as a table or JSON.

Exit 0 if every host is online, 1 if any is offline or unreachable. An
unreachable host (the call failed) shows online false with the provider's
error code, or null when there was no provider answer (network, timeout).
"""

from __future__ import annotations

import json

import click

from deployer.columns import align

COLUMNS = ("HOST", "ONLINE", "ERROR_CODE", "DETAIL")


@click.command(help="Show client_status of each host (all, or those TARGETS name).")
@click.argument("targets", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help='Print [{"host", "online", "error_code"}].')
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Hosts asked at once (the inventory's rate_limit still applies).",
)
@click.pass_context
def status(ctx: click.Context, targets: tuple[str, ...], as_json: bool, parallel: int) -> None:
    from deployer.api import ProviderAPI, fleet_status
    from deployer.targets import select_hosts

    inventory = ctx.obj.load_inventory()
    hosts = select_hosts(inventory, targets or ("all",))
    with ProviderAPI(inventory.provider, pool_size=parallel) as api:
        statuses = fleet_status(api, hosts, parallel)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in statuses], indent=2))
    else:
        click.echo(format_table(statuses))
    for s in statuses:
        if s.error:
            click.echo(f"deployer: {s.host}: {s.error}", err=True)
    ctx.exit(0 if statuses and all(s.online for s in statuses) else 1)


def format_table(statuses) -> str:
    """Plain aligned columns: host, online, error_code and a short word on why."""
    cells = [list(COLUMNS)]
    for s in statuses:
        code = "-" if s.error_code is None else str(s.error_code)
        cells.append([s.host, "yes" if s.online else "no", code, _detail(s)])
    return "\n".join(align(cells))


def _detail(s) -> str:
    if s.online:
        return "online"
    if s.error is None:
        return "offline"
    return "unreachable (see below)"
