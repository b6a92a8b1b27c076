"""`deployer api CALL HOST [--allow true|false]`: one raw provider API call.

For diagnosis: the provider's reply is printed as JSON with credentials
masked. Transient failures (network, timeout, HTTP 5xx, a reply that is not
provider's JSON reply) are retried; provider error codes are not (a 22 is shown, not
waited out). Exit 0 if the reply says ``success: true``, else 1.
"""

from __future__ import annotations

import json

import click

from deployer.api import CALLS, ProviderAPI, secret_forms
from deployer.secrets import scrub

ALLOW_MISUSE = "--allow true|false goes with set_allow_clientless and no other call"


@click.command(
    help=f"Make one raw provider API call for HOST and print the reply. CALL: {', '.join(CALLS)}."
)
@click.argument("call", type=click.Choice(CALLS), metavar="CALL")
@click.argument("host")
@click.option(
    "--allow",
    type=click.Choice(["true", "false"]),
    help="allow=true|false (set_allow_clientless only, and required there).",
)
@click.pass_context
def api(ctx: click.Context, call: str, host: str, allow: str | None) -> None:
    if (call == "set_allow_clientless") != (allow is not None):
        raise click.UsageError(ALLOW_MISUSE)

    inventory = ctx.obj.load_inventory()
    target = _one_host(inventory, host)
    with ProviderAPI(inventory.provider, pool_size=1) as client:
        reply = client.raw_call(call, target, allow=None if allow is None else allow == "true")
    text = json.dumps(reply, indent=2, ensure_ascii=False)
    click.echo(scrub(text, secret_forms(inventory.secret_values())))
    ctx.exit(0 if reply.get("success") is True else 1)


def _one_host(inventory, name: str):
    from deployer.errors import UsageError
    from deployer.targets import select_hosts

    hosts = select_hosts(inventory, [name])
    if len(hosts) != 1:
        names = ", ".join(h.name for h in hosts)
        raise UsageError(f"HOST must name one host; {name!r} matches {names}")
    return hosts[0]
