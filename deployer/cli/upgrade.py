"""``deployer upgrade`` and ``deployer rollback``: unpack options, run, render."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deployer.cli.options import (
    expect_sha256_option,
    parse_vars,
    rollout_options,
    wait_offline_option,
)


def _common(func):
    options = [
        click.argument("targets", nargs=-1, required=True),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Read-only steps only; print the unified diff of each script.",
        ),
        click.option("--force", is_flag=True, help="Reinstall even if the script is unchanged."),
        *rollout_options(),
        wait_offline_option(),
        click.option(
            "--online-timeout",
            type=click.FloatRange(min=0.1),
            metavar="SECONDS",
            help="Seconds to wait for the new client online (default: inventory).",
        ),
        click.option(
            "--stable-for",
            type=click.FloatRange(min=0),
            metavar="SECONDS",
            help="Seconds the new client must stay online before commit.",
        ),
        click.option(
            "--break-lock",
            is_flag=True,
            help="Take a host lock left behind by a deployer that is gone.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout."),
        click.option(
            "--report",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help="Also write the JSON report to FILE.",
        ),
        click.option(
            "--junit",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help="Also write a JUnit XML report to FILE (one testcase per host).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command()
@_common
@click.option(
    "--var",
    "var_items",
    multiple=True,
    metavar="K=V",
    help="Set a template var (overrides the inventory); repeatable.",
)
@click.option(
    "--template",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Render this template instead of the hosts' own (template hosts only).",
)
@expect_sha256_option()
@click.pass_context
def upgrade(ctx: click.Context, var_items, template, expect_sha256, **kw) -> None:
    """Upgrade the client script on TARGETS (names, @group, all, globs)."""
    _run(ctx, "upgrade", var_items, template, expect_sha256=expect_sha256, **kw)


@click.command()
@_common
@click.pass_context
def rollback(ctx: click.Context, **kw) -> None:
    """Reinstall the newest backup on TARGETS through the same safe stages."""
    _run(ctx, "rollback", (), None, **kw)


def _run(
    ctx,
    command,
    var_items,
    template,
    *,
    targets,
    dry_run,
    force,
    online_timeout,
    stable_for,
    wait_offline,
    break_lock,
    as_json,
    report,
    junit,
    expect_sha256=None,
    **rollout_kw,
) -> None:
    from deployer import report as reporting
    from deployer.cli.options import build_policy
    from deployer.progress import make_progress
    from deployer.targets import select_hosts
    from deployer.upgrade import UpgradeRequest, run_upgrade
    from deployer.workflow import UpgradeOptions

    obj = ctx.obj
    inventory = obj.load_inventory(parse_vars(var_items))
    hosts = select_hosts(inventory, targets)
    policy = build_policy(**rollout_kw)
    request = UpgradeRequest(
        inventory=inventory,
        hosts=hosts,
        state_dir=obj.state_dir(inventory.path),
        options=UpgradeOptions(
            command=command, force=force, dry_run=dry_run, break_lock=break_lock
        ),
        policy=policy,
        template=Path(template).resolve() if template else None,
        online_timeout=online_timeout,
        stable_for=stable_for,
        expect_sha256=expect_sha256,
        wait_offline=wait_offline,
    )
    secrets = inventory.secret_values()
    progress = make_progress(sys.stderr, len(hosts), quiet=obj.quiet, secrets=secrets)
    run = run_upgrade(request, progress)
    for host in run.hosts:
        if host.diff is not None:
            click.echo(host.diff or f"# {host.host}: no change", nl=not host.diff)
    if report:
        reporting.write_json(run, report, secrets)
    if junit:
        reporting.write_junit(run, junit, command=command, secrets=secrets)
    if as_json:
        click.echo(reporting.to_json_text(run, secrets))
    elif not obj.quiet:
        click.echo(reporting.render_table(run, secrets), err=True)
    ctx.exit(run.exit_code())
