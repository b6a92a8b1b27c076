"""An inventory that holds a literal credential must be private, as ssh wants of a
private key: every command refuses it (exit 2) before any network call, names
the ``chmod 600`` that fixes it and never prints the credential."""

from __future__ import annotations

import json
import logging

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.cli import run

pytestmark = pytest.mark.cli

DBID = "dbid-7c1e55d0a4b2"
UUID = "9f3b2a10-7e6d-4c5b-8a9f-0e1d2c3b4a59"
USER_ID = "usr-2b7f0c9e41d8"

INVENTORY = """\
[provider]
api_url = "{api_url}"
ssh_host = "127.0.0.1"
user_id = "${{TEST_PRIVATE_USER}}"
rate_limit = 200.0
timeout = 2.0
tunnel_timeout = 1.0

[defaults]
template = "client.py.j2"

[hosts.pi-01]
dbid = "{dbid}"
host_uuid = "${{TEST_PRIVATE_UUID}}"
ports_id = 1234
ssh_port = 9
"""


@pytest.fixture
def provider():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # its access log quotes the query
    server = HTTPServer(host="127.0.0.1", port=0)
    asked: list[str] = []

    def answer(request: Request) -> Response:
        asked.append(request.path)
        reply = {"message": "online", "error_code": 0, "success": True}
        return Response(json.dumps(reply), content_type="application/json")

    server.expect_request(r"/api/client_status").respond_with_handler(answer)
    server.start()
    yield server, asked
    server.clear()
    server.stop()


@pytest.fixture
def inventory(tmp_path, provider, monkeypatch):
    """A readable (0644) inventory with a literal dbid: the other ids from ${ENV}."""
    monkeypatch.setenv("TEST_PRIVATE_USER", USER_ID)
    monkeypatch.setenv("TEST_PRIVATE_UUID", UUID)
    server, _ = provider
    (tmp_path / "client.py.j2").write_text("# client\n")
    path = tmp_path / "deployer.toml"
    path.write_text(INVENTORY.format(api_url=server.url_for("/api/{call}"), dbid=DBID))
    path.chmod(0o644)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ("upgrade", "pi-01"),
        ("upgrade", "--dry-run", "pi-01", "--json"),
        ("rollback", "pi-01"),
        ("status",),
        ("render", "pi-01"),
        ("hosts",),
    ],
    ids=lambda c: " ".join(c),
)
def test_a_readable_inventory_with_a_literal_credential_is_refused(inventory, provider, command):
    _, asked = provider
    result = run("-vv", "-i", str(inventory), *command)

    assert result.code == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == (
        f"deployer: error: {inventory}:13: [hosts.pi-01] dbid: a literal credential in a file "
        f"that group and others can read (mode 0644); chmod 600 {inventory} "
        "(or write every credential as ${NAME} and set NAME in the environment)"
    )
    for secret in (DBID, UUID, USER_ID):
        assert secret not in result.stdout + result.stderr
        assert secret[-4:] not in result.stdout + result.stderr  # not even masked
    assert asked == []  # no provider call
    assert not (inventory.parent / ".deployer").exists()  # no journal: nothing touched
    assert inventory.stat().st_mode & 0o777 == 0o644  # the fix is the user's to make


def test_after_the_chmod_the_same_inventory_works(inventory, provider):
    """The control: the provider above is reachable, so the refusal is what kept
    deployer from calling it."""
    _, asked = provider
    inventory.chmod(0o600)
    result = run("-i", str(inventory), "status", "--json")

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout) == [{"host": "pi-01", "online": True, "error_code": 0}]
    assert asked == ["/api/client_status"]
