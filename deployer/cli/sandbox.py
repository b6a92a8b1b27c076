"""``deployer sandbox up|down|status``: the local simulated fleet (SPEC 7).

Only unpacks options, calls :mod:`deployer.sandbox.fleet` and prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from deployer.sandbox.simulator import DEFAULT_RATE_LIMIT

DIR_OPTION = click.option(
    "--dir",
    "directory",
    default=".sandbox",
    show_default=True,
    metavar="DIR",
    help="The sandbox directory (inventory, keys, host files, logs).",
)


@click.group()
def sandbox() -> None:
    """The local simulated fleet: a provider simulator, an SSH server and N clients."""


@sandbox.command()
@click.option("--hosts", default=3, show_default=True, type=int, help="Number of hosts.")
@DIR_OPTION
@click.option("--api-latency", default=0.0, type=float, metavar="S", help="Seconds per API reply.")
@click.option(
    "--rate-limit",
    default=DEFAULT_RATE_LIMIT,
    show_default=True,
    type=float,
    metavar="R",
    help="API calls per second the simulator accepts (22 above; 0 = unlimited).",
)
@click.option(
    "--fail-rate", default=0.0, type=float, metavar="P", help="Share of API replies that are 502."
)
@click.option(
    "--sshd",
    type=click.Choice(["embedded", "openssh"]),
    default="embedded",
    show_default=True,
    help="The SSH server: embedded (asyncssh, no root) or the system's OpenSSH.",
)
def up(
    hosts: int,
    directory: str,
    api_latency: float,
    rate_limit: float,
    fail_rate: float,
    sshd: str,
) -> None:
    """Start the sandbox in the background with release 1 on every host."""
    from deployer.sandbox import fleet

    try:
        info = fleet.up(
            directory,
            hosts=hosts,
            sshd=sshd,
            api_latency=api_latency,
            rate_limit=rate_limit,
            fail_rate=fail_rate,
        )
    except fleet.SandboxRunning as exc:
        info = exc.info
        click.echo(f"A sandbox already runs in {info.dir} ({len(info.hosts)} hosts, {info.sshd}).")
        click.echo(f"To start a different one: deployer sandbox down --dir {_q(info.dir)}")
        _next_steps(info)
        return
    click.echo(
        f"Sandbox up in {info.dir}: {len(info.hosts)} hosts "
        f"({info.hosts[0]} … {info.hosts[-1]}, group @sandbox), {info.sshd} sshd, "
        f"release 1 online everywhere."
    )
    click.echo(f"Simulator: {info.base_url}  (state: {info.state_url})")
    _next_steps(info)


def _q(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def _next_steps(info) -> None:
    inv = _q(info.inventory)
    click.echo("Next:")
    click.echo(f"  deployer -i {inv} status")
    click.echo(f"  deployer -i {inv} upgrade {info.hosts[0]} --var release=2")
    click.echo(f"  deployer -i {inv} upgrade all --var release=2")
    click.echo(f"  deployer sandbox status --dir {_q(info.dir)}")
    click.echo(f"  deployer sandbox down --dir {_q(info.dir)}")


@sandbox.command()
@DIR_OPTION
def down(directory: str) -> None:
    """Stop every sandbox process; check no process or port is left."""
    from deployer.sandbox import fleet

    report = fleet.down(directory)
    root = Path(directory).expanduser().resolve()
    if not report.was_running and not report.stopped:
        click.echo(f"No sandbox was running in {root}.")
    else:
        click.echo(f"Sandbox in {root} stopped ({len(report.stopped)} processes).")
    if not report.clean:
        raise fleet.SandboxError(
            f"left behind: pids {report.leftover_pids or '-'}, "
            f"listening ports {report.open_ports or '-'}"
        )


@sandbox.command()
@DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the /sandbox/state document.")
def status(directory: str, as_json: bool) -> None:
    """Show the simulator's view of every host (exit 1 if no sandbox runs)."""
    from deployer.sandbox import fleet

    state = fleet.status(directory)
    if as_json:
        json.dump(state, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    _print_table(state)


def _print_table(state: dict) -> None:
    from deployer.sandbox.simulator import Faults

    faults = state.get("faults", {})
    defaults = Faults().to_json()
    active = ", ".join(f"{k}={v}" for k, v in faults.items() if v != defaults.get(k))
    click.echo(f"Simulator API: {state['api_url']}")
    click.echo(
        f"Faults: {active or 'none'} (rate limit {faults.get('rate_limit')}/s, "
        f"offline after {faults.get('offline_after')} s)"
    )
    header = f"{'HOST':<10} {'ONLINE':<7} {'ALLOW':<6} {'TUNNEL':<7} {'CALLS':>5} "
    click.echo(header + f"{'WINDOWS':>7}  SCRIPT")
    for name, host in state["hosts"].items():
        calls = sum(host["api_calls"].values())
        sha = (host.get("script_sha256") or "-")[:12]
        click.echo(
            f"{name:<10} {_yes(host['online']):<7} {_yes(host['allow_clientless']):<6} "
            f"{_yes(host['tunnel_open']):<7} {calls:>5} {len(host['exposures']):>7}  {sha}"
        )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
