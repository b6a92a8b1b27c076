"""Options shared by several commands (click only here; the engine gets plain values)."""

from __future__ import annotations

import click


def parse_vars(items) -> dict[str, str]:
    from deployer.inventory import parse_var_overrides

    return parse_var_overrides(list(items))


def rollout_options() -> list:
    return [
        click.option(
            "--parallel",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Hosts upgraded at once.",
        ),
        click.option(
            "--batch",
            metavar="N|P%",
            help="Waves of N hosts (or P% of them); a wave ends before the next.",
        ),
        click.option(
            "--canary",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="A first wave of N hosts that must all succeed.",
        ),
        click.option(
            "--max-failures",
            metavar="N|P%",
            help="Stop starting hosts once more than N (or P%) failed over the run.",
        ),
    ]


def wait_offline_option():
    return click.option(
        "--wait-offline",
        metavar="DURATION",
        callback=_check_duration,
        help="Park hosts whose client is offline instead of failing them, and upgrade "
        "each once it has been back long enough to trust; hosts still offline after "
        "DURATION (90s, 30m, 24h, 1h30m) end 'offline'. A re-run of the same targets "
        "picks up a wait that was interrupted.",
    )


def _check_duration(ctx: click.Context, param: click.Parameter, value: str | None):
    from deployer.errors import UsageError
    from deployer.rollout import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value, what=param.opts[0])
    except UsageError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None


def expect_sha256_option():
    return click.option(
        "--expect-sha256",
        metavar="HEX",
        callback=_check_sha256,
        help="Install only a script with this sha256 (the one reviewed); a host whose "
        "script differs fails before anything is touched on it. Overrides the inventory's "
        "expect_sha256.",
    )


def _check_sha256(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from deployer.inventory import SHA256_RE

    if value is None:
        return None
    if not SHA256_RE.match(value.strip()):
        raise click.BadParameter(
            f"{value!r} is not a sha256 (64 hex digits); deployer render HOST -o FILE prints it"
        )
    return value.strip().lower()


def build_policy(parallel: int, batch: str | None, canary: int, max_failures: str | None):
    from deployer.rollout import RolloutPolicy

    return RolloutPolicy(parallel=parallel, batch=batch, canary=canary, max_failures=max_failures)
