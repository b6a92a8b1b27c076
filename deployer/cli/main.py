"""The click entry point: global options, lazy subcommands and the one error boundary.

Each subcommand lives in ``deployer/cli/<name>.py`` and only unpacks its
arguments, calls the engine and renders the result. Subcommand modules are
imported only when their command runs, so ``deployer --help`` stays fast
(no fabric, paramiko or jinja2).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from deployer import __version__
from deployer.errors import EXIT_USAGE, DeployerError
from deployer.secrets import RedactingFilter

log = logging.getLogger("deployer")

# command name -> (module, attribute, one-line help shown by `deployer --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "upgrade": ("deployer.cli.upgrade", "upgrade", "Upgrade the client script on TARGETS."),
    "rollback": ("deployer.cli.upgrade", "rollback", "Reinstall the newest backup on TARGETS."),
    "status": ("deployer.cli.status", "status", "Show client_status of each host."),
    "render": ("deployer.cli.render", "render", "Print the rendered script of HOST."),
    "hosts": ("deployer.cli.hosts", "hosts", "List hosts with groups and tunnel endpoint."),
    "api": ("deployer.cli.api", "api", "Make one raw provider API call."),
    "recover": ("deployer.cli.recover", "recover", "Finish every interrupted run."),
    "history": ("deployer.cli.recover", "history", "Show past runs and host results."),
    "sandbox": ("deployer.cli.sandbox", "sandbox", "The local simulated fleet."),
    "init": ("deployer.cli.init", "init", "Write a starter deployer.toml and templates/."),
}


@dataclass
class CliContext:
    """What the global options say; passed to every subcommand as ``ctx.obj``."""

    inventory_option: str | None = None
    state_dir_option: str | None = None
    verbose: int = 0
    quiet: bool = False
    redactor: RedactingFilter = field(default_factory=RedactingFilter)

    def inventory_path(self) -> Path:
        """``-i``, else ``$DEPLOYER_INVENTORY``, else ``./deployer.toml``."""
        raw = self.inventory_option or os.environ.get("DEPLOYER_INVENTORY") or "deployer.toml"
        return Path(raw).expanduser()

    def state_dir(self, inventory_path: Path | None = None) -> Path:
        if self.state_dir_option:
            return Path(self.state_dir_option).expanduser()
        base = (inventory_path or self.inventory_path()).resolve().parent
        return base / ".deployer"

    def load_inventory(self, var_overrides: dict[str, str] | None = None):
        """Load the inventory and register its secrets with the log redactor."""
        from deployer.inventory import load_inventory

        inventory = load_inventory(self.inventory_path(), overrides=var_overrides or {})
        self.redactor.add(*inventory.secret_values())
        return inventory


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _setup_logging(ctx_obj: CliContext) -> None:
    level = logging.WARNING
    if ctx_obj.verbose == 1:
        level = logging.INFO
    elif ctx_obj.verbose >= 2:
        level = logging.DEBUG
    if ctx_obj.quiet:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ctx_obj.redactor)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_deployer", False)]:
        root.removeHandler(old)
    handler._deployer = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs full URLs (with credentials in the query) at DEBUG: keep it quiet.
    for noisy in ("urllib3", "paramiko", "asyncssh", "invoke", "fabric"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-i",
    "--inventory",
    metavar="PATH",
    help="Inventory file (else $DEPLOYER_INVENTORY, else ./deployer.toml).",
)
@click.option(
    "--state-dir",
    metavar="DIR",
    help="Journal directory (default: .deployer/ beside the inventory).",
)
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(__version__, "--version", prog_name="deployer")
@click.pass_context
def cli(
    ctx: click.Context, inventory: str | None, state_dir: str | None, verbose: int, quiet: bool
) -> None:
    """Upgrade the client script on SSHReach hosts without ever losing a host."""
    ctx.obj = CliContext(inventory, state_dir, verbose, quiet)
    _setup_logging(ctx.obj)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the one boundary that maps errors to exit codes."""
    try:
        rv = cli.main(args=argv, prog_name="deployer", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if exc.exit_code == 2 else exc.exit_code)
    except DeployerError as exc:
        click.echo(f"deployer: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("deployer: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
