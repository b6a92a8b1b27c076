"""CLI tests. :func:`run` goes through ``deployer.cli.main.main``, the one boundary
that maps errors to exit codes, with stdout and stderr captured apart;
:func:`answering` gives the provider of the ``server`` fixture (conftest.py) a
test's handler."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner
from pytest_httpserver import HTTPServer

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


def answering(server: HTTPServer, handler: Callable) -> Iterator:
    """A fixture's body: every ``/api/CALL`` on ``server`` goes to ``handler``
    for one test; yields the handler."""
    server.clear()
    server.expect_request(re.compile(r"^/api/[a-z_]+$")).respond_with_handler(handler)
    yield handler
    server.clear()
