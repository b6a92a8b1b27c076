"""deployer/remote.py ``SshRemote.open`` before any SSH: the tunnel's TCP port."""

from __future__ import annotations

import socket

import fabric
import pytest

from deployer.errors import TunnelNotUp
from deployer.model import HostConfig, ProviderConfig
from deployer.remote import SshRemote
from deployer.secrets import Secret

pytestmark = pytest.mark.unit


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once it is closed


def test_a_tunnel_not_up_yet_is_refused_before_fabric_is_set_up(monkeypatch):
    """While a tunnel comes up deployer tries again every 0.25-2 s: each refusal
    must cost a connect(), not a fabric Connection and its config."""

    def no_fabric(*args, **kwargs):
        raise AssertionError("a fabric Connection was made for a port that refuses")

    monkeypatch.setattr(fabric, "Connection", no_fabric)
    provider = ProviderConfig("http://x/{call}", "127.0.0.1", Secret("u" * 8))
    host = HostConfig("pi-01", Secret("d" * 8), Secret("h" * 8), 1, _closed_port())
    with pytest.raises(TunnelNotUp, match="SSH to 127.0.0.1:.* failed: ConnectionRefusedError"):
        SshRemote(provider, host).open()
