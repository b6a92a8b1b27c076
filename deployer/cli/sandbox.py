"""``deployer sandbox up|down|status|client``: the local simulated fleet (docs/how-to/sandbox.md).

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
    """The local SSHReach world: a provider simulator, a forwarding SSH server,
    and N hosts, each with its own SSH server and a real client that owns its tunnel."""


@sandbox.command()
@click.option("--hosts", default=3, show_default=True, type=int, help="Number of hosts.")
@DIR_OPTION
@click.option(
    "--profile",
    type=click.Choice(["fast", "real"]),
    default="fast",
    show_default=True,
    help="fast: polls every 0.5 s, offline after 1.5 s (tests); "
    "real: polls every 5 s, offline after 30 s, API latency 0.2 s (as in production).",
)
@click.option(
    "--api-latency",
    default=None,
    type=float,
    metavar="S",
    help="Seconds per API reply (default: the profile's).",
)
@click.option(
    "--ssh-latency",
    default=0.0,
    type=float,
    metavar="S",
    help="Seconds added to each direction of every connection through a tunnel "
    "(embedded forwarding server only).",
)
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
    help="The SSH servers (forwarding and hosts): embedded (asyncssh, no root) "
    "or the system's OpenSSH.",
)
def up(
    hosts: int,
    directory: str,
    profile: str,
    api_latency: float | None,
    ssh_latency: float,
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
            profile=profile,
            api_latency=api_latency,
            ssh_latency=ssh_latency,
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
        f"profile {info.profile}, release 1 online everywhere, tunnels closed."
    )
    click.echo(f"Simulator: {info.base_url}  (state: {info.state_url})")
    click.echo(f"Forwarding server: 127.0.0.1:{info.forwarding_port}  (ids: {info.sandbox_json})")
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
    header = f"{'HOST':<10} {'ONLINE':<7} {'ALLOW':<6} {'CMD':<4} {'TUNNEL':<14} {'CUTS':>4} "
    click.echo(header + f"{'CALLS':>5} {'WINDOWS':>7}  SCRIPT")
    for name, host in state["hosts"].items():
        calls = sum(host["api_calls"].values())
        sha = (host.get("script_sha256") or "-")[:12]
        tunnel = "pid " + ",".join(map(str, host["tunnel_pids"])) if host["tunnel_pids"] else "-"
        if host["tunnel_open"] and not host["tunnel_pids"]:
            tunnel = "open"
        click.echo(
            f"{name:<10} {_yes(host['online']):<7} {_yes(host['allow_clientless']):<6} "
            f"{host['command']:<4} {tunnel:<14} {host['tunnel_cuts']:>4} "
            f"{calls:>5} {len(host['exposures']):>7}  {sha}"
        )


@sandbox.command()
@click.argument("host")
@click.argument("action", type=click.Choice(["stop", "start", "flap"]))
@DIR_OPTION
@click.option(
    "--with-tunnel",
    is_flag=True,
    help="stop/flap: end the client's tunnel process too (a reboot, or systemd's default "
    "KillMode); without it the tunnel stays, as with KillMode=process.",
)
@click.option(
    "--after",
    default=0.0,
    type=click.FloatRange(min=0),
    metavar="S",
    help="Do it S seconds from now (the sandbox's runner does it; this returns at once).",
)
@click.option(
    "--down",
    "down_for",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="flap: seconds the client stays stopped each cycle.",
)
@click.option(
    "--up",
    "up_for",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="flap: seconds the client runs between two stops.",
)
@click.option(
    "--cycles", default=3, show_default=True, type=click.IntRange(min=1), help="flap: how often."
)
def client(
    host: str,
    action: str,
    directory: str,
    with_tunnel: bool,
    after: float,
    down_for: float | None,
    up_for: float | None,
    cycles: int,
) -> None:
    """Stop or start HOST's client (SIGTERM to its pid; the pidfile convention to
    start it), or make it flap: down --down S, up --up S, --cycles times."""
    from deployer.sandbox import fleet

    if action == "flap":
        if down_for is None or up_for is None:
            raise click.UsageError("flap needs --down S and --up S")
        events = fleet.flap_client(directory, host, down_for, up_for, cycles, after, with_tunnel)
        last = events[-1]["after"]
        click.echo(f"{host}: flapping {cycles}x (down {down_for:g}s, up {up_for:g}s); "
                   f"its client runs again from {last:g}s on.")  # fmt: skip
        return
    if down_for is not None or up_for is not None:
        raise click.UsageError("--down and --up go with flap only")
    if action == "start" and with_tunnel:
        raise click.UsageError("--with-tunnel goes with stop and flap only")
    change = (
        fleet.stop_client(directory, host, with_tunnel, after)
        if action == "stop"
        else fleet.start_client(directory, host, after)
    )
    if change is None:
        click.echo(f"{host}: client {action} scheduled in {after:g}s.")
        return
    _echo_change(change, with_tunnel)


def _echo_change(change, with_tunnel: bool) -> None:
    if change.action == "start":
        state = "started" if change.changed else "already running"
        click.echo(f"{change.host}: client {state}, pid {change.pid}.")
        return
    if not change.changed:
        click.echo(f"{change.host}: client not running.")
    else:
        click.echo(f"{change.host}: client pid {change.pid} stopped (SIGTERM).")
    if change.tunnel_pids:
        click.echo(f"{change.host}: tunnel pid {', '.join(map(str, change.tunnel_pids))} ended.")
    elif not with_tunnel:
        click.echo(f"{change.host}: its tunnel process, if any, stays (as in production).")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
