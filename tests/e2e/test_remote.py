"""deployer's SSH session (deployer/remote.py ``SshRemote``) against a sandbox host's
real SSH server, through the host's real tunnel."""

from __future__ import annotations

import pytest

from deployer import remote
from deployer.inventory import load_inventory
from deployer.remote import SshRemote

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_the_session_reader_sleeps_between_wake_ups_and_close_still_ends_it(
    sandbox_factory, monkeypatch
):
    """paramiko's reader wakes every 0.1 s by default (a fifth of deployer's CPU over
    a real-profile soak); deployer sets its own wake-up, and ``close`` must still end
    the reader at once: here the wake-up is 10 min, so only the socket's shutdown can."""
    sb = sandbox_factory(hosts=1)
    name = sb.hosts[0]
    sb.connect(name)
    inventory = load_inventory(sb.inventory)
    monkeypatch.setattr(remote, "READER_WAKE", 600.0)
    session = SshRemote(inventory.provider, inventory.hosts[name]).open()
    transport = session._conn.transport
    assert transport.sock.gettimeout() == 600.0
    assert session.run("echo still-reading").stdout.strip() == "still-reading"
    session.close()
    assert not transport.is_alive()
