"""`deployer render HOST`: print the client script that an upgrade would install on HOST.

The host's template rendered, or for ``source = "provider"`` the provider's
current script (fetched with ``get_client_script``, checked like an upgrade
checks it). On stdout the credentials are masked (secrets never reach
output); ``--output FILE`` writes the exact script (mode 0600) and prints only
its sha256 and path, like ``sha256sum``: the hash to pin with ``--expect-sha256``.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command(
    help="Print the script an upgrade would install on HOST: its rendered template, or the "
    'provider\'s script for source = "provider" (credentials masked; --output for the exact '
    "file)."
)
@click.argument("host")
@click.option("--var", "var_items", multiple=True, metavar="NAME=VALUE", help="Override a var.")
@click.option(
    "--template",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Render this template instead of the host's (template hosts only).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the exact script (mode 0600) here; print its sha256 and path.",
)
@click.pass_obj
def render(
    obj, host: str, var_items: tuple[str, ...], template: Path | None, output: Path | None
) -> None:
    from deployer.errors import UsageError
    from deployer.inventory import parse_var_overrides
    from deployer.render import mask_secrets
    from deployer.targets import select_hosts

    overrides = parse_var_overrides(var_items)
    inventory = obj.load_inventory(overrides)
    selected = select_hosts(inventory, [host])
    if len(selected) != 1:
        raise UsageError(f"render takes one host; '{host}' matches {len(selected)} hosts")
    script = _script(inventory, selected[0], template)
    if output is None:
        click.echo(mask_secrets(script.text, inventory), nl=False)
        click.echo(
            f"deployer: credentials masked; --output FILE writes the exact script "
            f"(sha256 {script.sha256})",
            err=True,
        )
        return
    write_private(output, script.data)
    click.echo(f"{script.sha256}  {output}")


def _script(inventory, host, template: Path | None):
    """The host's script from its source; only a provider host opens the API."""
    from deployer.source import PROVIDER, source_for

    if host.source != PROVIDER:
        return source_for(inventory, host, None, template).script_for(host)
    from deployer.api import ProviderAPI

    with ProviderAPI(inventory.provider, pool_size=1) as api:
        return source_for(inventory, host, api, template).script_for(host)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (it holds credentials)."""
    from deployer.errors import UsageError
    from deployer.files import atomic_write

    try:
        atomic_write(path, data, mode=0o600)
    except OSError as exc:
        raise UsageError(
            f"--output {path}: cannot write ({exc.strerror}); pick a writable path"
        ) from None
