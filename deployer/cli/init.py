"""``deployer init``: write a commented starter inventory and the client template.

Both files are copied verbatim from the package data ``deployer.templates``
(``starter.toml.j2`` becomes ``deployer.toml``; ``client.py.j2`` goes to
``templates/``), so an installed deployer needs nothing from the source tree.
An existing file is never overwritten: init checks every target first and
writes nothing if one exists.
"""

from __future__ import annotations

from pathlib import Path

import click

# package resource -> path written, relative to the current directory
STARTER_FILES: tuple[tuple[str, str], ...] = (
    ("starter.toml.j2", "deployer.toml"),
    ("client.py.j2", "templates/client.py.j2"),
)
STARTER_ENV = ("SSHREACH_USER_ID", "PI01_DBID", "PI01_HOST_UUID")


def starter_text(resource: str) -> str:
    """The text of one shipped starter file."""
    from importlib.resources import files

    return files("deployer.templates").joinpath(resource).read_text(encoding="utf-8")


def write_starter(directory: Path) -> list[Path]:
    """Write the starter files into ``directory``; refuse if any already exists."""
    from deployer.errors import UsageError

    targets = [(resource, directory / name) for resource, name in STARTER_FILES]
    for _, path in targets:
        if path.exists() or path.is_symlink():
            raise UsageError(
                f"{path} already exists; deployer init never overwrites: "
                "move it away or run init in an empty directory"
            )
    written = []
    for resource, path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as handle:  # "x": never clobber
            handle.write(starter_text(resource))
        written.append(path)
    return written


@click.command()
def init() -> None:
    """Write a commented starter deployer.toml and templates/client.py.j2 here.

    Refuses (exit 2) if either file already exists.
    """
    for path in write_starter(Path.cwd()):
        click.echo(f"wrote {path.relative_to(Path.cwd())}")
    env = " ".join(f"{name}=..." for name in STARTER_ENV)
    click.echo(
        "next: edit deployer.toml (provider, hosts), then\n"
        f"  export {env}\n"
        "  deployer hosts                       # check the inventory\n"
        "  deployer upgrade --dry-run pi-01     # read-only: shows the diff"
    )
