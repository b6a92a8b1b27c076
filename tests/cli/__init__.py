"""CLI tests. :func:`run` goes through ``deployer.cli.main.main``, the one boundary
that maps errors to exit codes, with stdout and stderr captured apart."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from deployer.cli.main import main


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def run(*argv: str, cwd: str | Path | None = None) -> Run:
    """Run ``deployer ARGV`` through ``main`` (in ``cwd`` if given)."""
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        old = os.getcwd()
        if cwd is not None:
            os.chdir(cwd)
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os.chdir(old)
        return Run(code, out.getvalue().decode(), err.getvalue().decode())
