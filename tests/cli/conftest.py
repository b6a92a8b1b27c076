"""Fixtures the CLI tests share."""

from __future__ import annotations

import logging

import pytest
from pytest_httpserver import HTTPServer

from tests.inventories import BASE, ENV, write


@pytest.fixture
def env(monkeypatch):
    """The test inventory's environment credentials, in the process environment."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def inventory_file(tmp_path, env):
    """The test inventory (``tests.inventories.BASE``), ready for ``render``."""
    # the shipped client needs the account's poll URL and forwarding user (SPEC 1b)
    defaults = 'vars = { release = "1", region = "none" }'
    client_vars = 'poll_url = "https://poll.example/cgi", forwarding_user = "acct"'
    assert defaults in BASE
    return write(tmp_path, BASE.replace(defaults, defaults[:-2] + ", " + client_vars + " }", 1))


@pytest.fixture(scope="module")
def server():
    """A provider on 127.0.0.1 (pytest-httpserver), one for a test module; a
    test's handler comes with :func:`tests.cli.answering`."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # its access log quotes the query
    srv = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    srv.start()
    yield srv
    srv.clear()
    srv.stop()
