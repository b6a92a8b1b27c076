"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def guard_without_api(monkeypatch):
    """The guard's own provider calls are off (``api: None``): unit tests have no
    provider to call; the e2e tests on the sandbox cover them. A module that runs
    the real guard uses it for every test with ``pytest.mark.usefixtures``."""
    from deployer import workflow

    real = workflow.guard_config

    def guard_config(*args, **kwargs):
        return {**real(*args, **kwargs), "api": None}

    monkeypatch.setattr(workflow, "guard_config", guard_config)
