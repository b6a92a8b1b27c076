"""``source = "provider"`` and ``--expect-sha256`` through the real entry point,
against a provider on 127.0.0.1 (pytest-httpserver) that serves
``get_client_script`` per ``client_id`` and answers every host offline, so no
run gets as far as SSH: what these tests pin is everything before it."""

from __future__ import annotations

import hashlib
import json
import stat
import threading

import pytest
from werkzeug import Request, Response

from deployer.secrets import secret_forms
from tests.cli import answering, run

pytestmark = pytest.mark.cli

USER_ID = "usr-51d04b887f3a9c2e"
API_KEY = "key/7Qx+9zZk4T1=="  # URL-encoding matters
CLIENT_IDS = {"pi-01": "cid-dfb39cdd-0001", "pi-02": "cid-dfb39cdd-0002"}
DBIDS = {"pi-01": 'dbid"q\\0001', "pi-02": "dbid-0002aaaa", "pi-03": "dbid-0003bbbb"}
UUIDS = {name: f"uuid-{name}-5a1e4c2b9f00" for name in DBIDS}
CREDENTIALS = (USER_ID, API_KEY, *CLIENT_IDS.values(), *DBIDS.values(), *UUIDS.values())

INVENTORY = """\
[provider]
api_url = "{api_url}"
ssh_host = "fw1.example"
user_id = "{user_id}"
api_key = "${{TEST_SSHREACH_API_KEY}}"
rate_limit = 200.0
timeout = 5.0

[defaults]
source = "provider"
stable_for = 40
online_timeout = 5

[hosts.pi-01]
dbid = {dbid1}
host_uuid = "{uuid1}"
client_id = "{cid1}"
ports_id = 1001
ssh_port = 20001

[hosts.pi-02]
dbid = "{dbid2}"
host_uuid = "{uuid2}"
client_id = "{cid2}"
ports_id = 1002
ssh_port = 20002

[hosts.pi-03]
source = "template"
template = "client.py.j2"
dbid = "{dbid3}"
host_uuid = "{uuid3}"
ports_id = 1003
ssh_port = 20003
"""


def generated(name: str, release: str = "1") -> str:
    """A provider-generated client: the ids as constants, in its own quoting."""
    return (
        f"# SSHReach client {release}\n"
        f"USER_ID = {USER_ID!r}\nDBID = {json.dumps(DBIDS[name])}\n"
        f"HOST_UUID = '{UUIDS[name]}'\nCLIENT_ID = \"{CLIENT_IDS[name]}\"\n"
        "print('poll')\n"
    )


def ok(**extra) -> dict:
    return {"message": "OK", "error_code": 0, "success": True, **extra}


class Provider:
    """Scripts by client_id; every client offline; records what was asked."""

    def __init__(self):
        self.scripts = {cid: generated(name) for name, cid in CLIENT_IDS.items()}
        self.script_error: dict | None = None
        self.asked: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        call = request.path.rsplit("/", 1)[-1]
        query = request.args.to_dict()
        with self._lock:
            self.asked.append((call, query))
        if call == "get_client_script":
            answer = self.script_error or ok(script=self.scripts[query["client_id"]])
        elif call == "client_status":
            answer = {"message": "offline", "error_code": 24, "success": True}
        else:
            answer = ok()
        return Response(json.dumps(answer), content_type="application/json")

    def calls(self) -> list[str]:
        return [call for call, _ in self.asked]


@pytest.fixture
def provider(server):
    yield from answering(server, Provider())


@pytest.fixture
def inventory(tmp_path, server, monkeypatch):
    monkeypatch.setenv("TEST_SSHREACH_API_KEY", API_KEY)
    (tmp_path / "client.py.j2").write_text("# template client\nDBID = {{ dbid | tojson }}\n")
    path = tmp_path / "deployer.toml"
    path.write_text(
        INVENTORY.format(
            api_url=server.url_for("/api/{call}"),
            user_id=USER_ID,
            dbid1=json.dumps(DBIDS["pi-01"]),
            dbid2=DBIDS["pi-02"],
            dbid3=DBIDS["pi-03"],
            uuid1=UUIDS["pi-01"],
            uuid2=UUIDS["pi-02"],
            uuid3=UUIDS["pi-03"],
            cid1=CLIENT_IDS["pi-01"],
            cid2=CLIENT_IDS["pi-02"],
        )
    )
    path.chmod(0o600)  # literal credentials: a private file
    return str(path)


def leaks(*texts: str) -> list[str]:
    return [f for t in texts for s in CREDENTIALS for f in [*secret_forms([s]), s[:9]] if f in t]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- deployer render ------------------------------------------------------------------------


def test_render_prints_the_providers_script_masked(provider, inventory):
    result = run("-vv", "-i", inventory, "render", "pi-01")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("# SSHReach client 1\n") and "print('poll')" in result.stdout
    assert 'CLIENT_ID = "…0001"' in result.stdout and "HOST_UUID = '…9f00'" in result.stdout
    assert "credentials masked" in result.stderr and sha(generated("pi-01")) in result.stderr
    assert leaks(result.stdout, result.stderr) == []
    assert provider.asked == [
        ("get_client_script", {"api_key": API_KEY, "client_id": CLIENT_IDS["pi-01"]})
    ]


def test_render_output_writes_the_exact_script_private(provider, inventory, tmp_path):
    target = tmp_path / "reviewed.py"
    result = run("-i", inventory, "render", "pi-02", "-o", str(target))
    assert result.code == 0, result.stderr
    assert target.read_text() == generated("pi-02")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert result.stdout == f"{sha(generated('pi-02'))}  {target}\n"


@pytest.mark.parametrize(
    "error, fragment",
    [
        ({"message": "bad key", "error_code": 32, "success": False}, "error_code 32 (invalid api"),
        ({"message": "region?", "error_code": 41, "success": False}, "error_code 41 (invalid reg"),
    ],
)
def test_render_reports_a_provider_error_and_exits_1(provider, inventory, error, fragment):
    provider.script_error = {**error, "message": f"{error['message']} {API_KEY}"}
    result = run("-i", inventory, "render", "pi-01")
    assert result.code == 1 and result.stdout == ""
    assert fragment in result.stderr and "get_client_script for host pi-01" in result.stderr
    assert leaks(result.stderr) == []


def test_render_refuses_a_script_that_is_not_python(provider, inventory):
    provider.scripts[CLIENT_IDS["pi-01"]] = f"<html>{CLIENT_IDS['pi-01']} 502</html>\n"
    result = run("-i", inventory, "render", "pi-01")
    assert result.code == 1 and result.stdout == ""
    assert "host pi-01: the provider's script is not valid Python" in result.stderr
    assert leaks(result.stderr) == []


def test_render_template_option_is_refused_for_a_provider_host(provider, inventory, tmp_path):
    result = run("-i", inventory, "render", "pi-01", "--template", str(tmp_path / "client.py.j2"))
    assert result.code == 2 and 'host pi-01 has source = "provider"' in result.stderr
    assert provider.asked == []


def test_render_of_a_template_host_makes_no_request(provider, inventory):
    result = run("-i", inventory, "render", "pi-03")
    assert result.code == 0 and result.stdout.startswith("# template client\n")
    assert provider.asked == []


# --- deployer upgrade ------------------------------------------------------------------------


def upgrade_json(inventory: str, *args: str):
    result = run("-vv", "-i", inventory, "upgrade", "--json", *args)
    assert leaks(result.stdout, result.stderr) == []
    return result, json.loads(result.stdout)


def by_host(report: dict) -> dict[str, dict]:
    return {h["host"]: h for h in report["hosts"]}


def test_a_script_that_is_not_python_fails_its_host_before_anything_is_touched(provider, inventory):
    provider.scripts[CLIENT_IDS["pi-01"]] = "def client(:\n    pass\n"
    result, report = upgrade_json(inventory, "pi-01", "pi-02")
    assert result.code == 1
    hosts = by_host(report)
    assert hosts["pi-01"]["result"] == "failed"
    assert hosts["pi-01"]["error"]["type"] == "InvalidScript"
    assert hosts["pi-01"]["error"]["step"] == "fetch"
    assert [(s["step"], s["status"]) for s in hosts["pi-01"]["steps"]] == [("fetch", "failed")]
    # pi-02's script was fine: it went on to preflight (its client is offline)
    assert hosts["pi-02"]["error"]["step"] == "preflight"
    assert hosts["pi-02"]["new_sha256"] == sha(generated("pi-02"))
    # both fetched before any host started; pi-01 got no other call
    assert provider.calls()[:2] == ["get_client_script"] * 2
    assert provider.calls()[2:] == ["client_status"]


def test_an_invalid_api_key_stops_the_run(provider, inventory, tmp_path):
    provider.script_error = {"message": f"invalid {API_KEY}", "error_code": 32, "success": False}
    report_file = tmp_path / "report.json"
    result, report = upgrade_json(inventory, "all", "--report", str(report_file))
    assert result.code == 1
    results = {h["host"]: h["result"] for h in report["hosts"]}
    assert results == {"pi-01": "failed", "pi-02": "skipped", "pi-03": "skipped"}
    first = by_host(report)["pi-01"]["error"]
    assert (first["api_error_code"], first["type"]) == (32, "InvalidApiKey")
    assert (
        "account-level error (API code 32 on pi-01" in by_host(report)["pi-03"]["error"]["message"]
    )
    assert provider.calls() == ["get_client_script"]  # not retried; nothing else asked
    assert leaks(report_file.read_text()) == []


def test_expect_sha256_must_be_a_sha256(provider, inventory):
    result = run("-i", inventory, "upgrade", "pi-03", "--expect-sha256", "abc123")
    assert result.code == 2 and "is not a sha256 (64 hex digits)" in result.stderr
    assert provider.asked == []


def test_a_pin_mismatch_fails_the_host_with_both_hashes_and_no_request(provider, inventory):
    wrong = "0" * 64
    result, report = upgrade_json(inventory, "pi-03", "--expect-sha256", wrong)
    assert result.code == 1
    error = by_host(report)["pi-03"]["error"]
    assert error["type"] == "PinMismatch" and error["step"] == "pin"
    assert wrong in error["message"] and by_host(report)["pi-03"]["new_sha256"] in error["message"]
    assert provider.asked == []  # a template host: the pin failed before any call


def test_the_reviewed_hash_passes_the_pin(provider, inventory, tmp_path):
    reviewed = tmp_path / "reviewed.py"
    digest = run("-i", inventory, "render", "pi-01", "-o", str(reviewed)).stdout.split()[0]
    provider.asked.clear()
    result, report = upgrade_json(inventory, "pi-01", "--expect-sha256", digest.upper())
    host = by_host(report)["pi-01"]
    assert host["new_sha256"] == digest
    assert host["error"]["step"] == "preflight"  # past the pin; the client is offline here
    assert provider.calls() == ["get_client_script", "client_status"]


def test_the_api_command_shows_a_client_script_masked(provider, inventory):
    result = run("-i", inventory, "api", "get_client_script", "pi-01")
    assert result.code == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["success"] is True and "print('poll')" in reply["script"]
    assert leaks(result.stdout, result.stderr) == []
