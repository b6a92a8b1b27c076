"""Shared test setup. Every test runs with a throwaway HOME, so nothing reads or
writes the real ~/.ssh, and without an inherited $DEPLOYER_INVENTORY."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.sandbox_fixture"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DEPLOYER_INVENTORY", raising=False)
    return home
