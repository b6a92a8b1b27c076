"""Shared test setup. Every test runs with a throwaway HOME, so nothing reads or
writes the real ~/.ssh, and without an inherited $DEPLOYER_INVENTORY."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.sandbox_fixture"]


@pytest.fixture
def open_umask():
    """umask 022, as on most machines: a test of a file mode must not pass only
    because the runner's umask happens to be strict."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DEPLOYER_INVENTORY", raising=False)
    return home
