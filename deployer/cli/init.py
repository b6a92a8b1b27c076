"""``deployer init``: write a commented starter inventory and the client template.

Both files are copied verbatim from the package data ``deployer.templates``
(``starter.toml.j2`` becomes ``deployer.toml``, or the path of the global
``-i``; ``client.py.j2`` goes to ``templates/`` beside it), so an installed
deployer needs nothing from the source tree. The starter is not rendered:
its ``{{ ... }}`` are deployer's own command templates.
An existing file is never overwritten: init checks every target first and
writes nothing if one exists. Files are written owner-only (0600) and the
directories init creates are 0700: an inventory may come to hold literal
credentials, and deployer refuses one that others can read.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

# package resource -> path written, relative to the inventory's directory
STARTER_TEMPLATE = ("client.py.j2", "templates/client.py.j2")
STARTER_INVENTORY = "starter.toml.j2"
STARTER_ENV = (
    "SSHREACH_USER_ID",
    "SSHREACH_POLL_URL",
    "SSHREACH_FORWARDING_USER",
    "PI01_DBID",
    "PI01_HOST_UUID",
)
FILE_MODE = 0o600
DIR_MODE = 0o700


def starter_text(resource: str) -> str:
    """The text of one shipped starter file."""
    from importlib.resources import files

    return files("deployer.templates").joinpath(resource).read_text(encoding="utf-8")


def write_starter(inventory: Path) -> list[Path]:
    """Write the starter inventory at ``inventory`` and the client template beside it.

    Refuses (UsageError, exit 2) before writing anything if a target exists.
    """
    from deployer.errors import UsageError

    resource, relative = STARTER_TEMPLATE
    targets = [(STARTER_INVENTORY, inventory), (resource, inventory.parent / relative)]
    for _, path in targets:
        if path.exists() or path.is_symlink():
            raise UsageError(
                f"{path} already exists; deployer init never overwrites: "
                "move it away or run init in an empty directory"
            )
    written = []
    for resource, path in targets:
        _make_dirs(path.parent)
        _write_private(path, starter_text(resource))
        written.append(path)
    return written


def _make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700; existing ones stay as they are."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    path.mkdir(mode=DIR_MODE)
    os.chmod(path, DIR_MODE)  # mkdir's mode is cut by the umask, never widened: be exact


def _write_private(path: Path, text: str) -> None:
    """Write a new file with mode 0600 (``O_EXCL``: never clobber)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)
        handle.write(text)


@click.command()
@click.pass_obj
def init(obj) -> None:
    """Write a commented starter deployer.toml and templates/client.py.j2 here.

    With the global -i PATH, the inventory goes to PATH and templates/ beside
    it. Refuses (exit 2) if either file already exists.
    """
    inventory = Path(obj.inventory_option or "deployer.toml").expanduser()
    for path in write_starter(inventory):
        click.echo(f"wrote {path}")
    env = " ".join(f"{name}=..." for name in STARTER_ENV)
    option = f"-i {shlex.quote(str(inventory))} " if obj.inventory_option else ""
    click.echo(
        f"next: edit {inventory} (provider, hosts), then\n"
        f"  export {env}\n"
        f"  deployer {option}hosts                       # check the inventory\n"
        f"  deployer {option}upgrade --dry-run pi-01     # read-only: shows the diff"
    )
