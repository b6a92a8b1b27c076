"""Fixtures the CLI tests share."""

from __future__ import annotations

import pytest

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

