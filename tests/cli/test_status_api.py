"""`deployer status` and `deployer api` through the real entry point, against a
provider on 127.0.0.1 (pytest-httpserver). Replies are chosen per host by its
dbid, so every test says exactly what the provider answers for which host."""

from __future__ import annotations

import json
import threading
from urllib.parse import quote, quote_plus

import pytest
from werkzeug import Request, Response

from tests.cli import answering, run

pytestmark = pytest.mark.cli

USER_ID = "usr-51d04b887f3a9c2e"
DBIDS = {"pi-01": "dbid-0a1b2c3d4e01", "pi-02": "dbid+9f8e/7d6c==02", "pi-03": "dbid-77aa88bb9903"}
UUIDS = {
    "pi-01": "11sldd20-20sz-aa20-aa02-aa0salskd801",
    "pi-02": "22sldd20-20sz-aa20-aa02-aa0salskd802",
    "pi-03": "33sldd20-20sz-aa20-aa02-aa0salskd803",
}
CREDENTIALS = (USER_ID, *DBIDS.values(), *UUIDS.values())
HOST_BY_DBID = {dbid: name for name, dbid in DBIDS.items()}

INVENTORY = """\
[provider]
api_url = "{api_url}"
ssh_host = "fw1.example"
user_id = "${{TEST_SSHREACH_USER}}"
rate_limit = 200.0
timeout = 5.0

[defaults]
template = "client.py.j2"

[groups.lab]

{hosts}
"""

HOST = """\
[hosts.{name}]
dbid = "{dbid}"
host_uuid = "{uuid}"
ports_id = {ports_id}
ssh_port = {ssh_port}
groups = {groups}
"""


def ok(message: str = "OK", **extra) -> dict:
    return {"message": message, "error_code": 0, "success": True, **extra}


def code(error_code: int, message: str = "no", success: bool = False) -> dict:
    return {"message": message, "error_code": error_code, "success": success}


class Provider:
    """What the fake provider answers, per host; and what it was asked."""

    def __init__(self):
        self.answers: dict[str, dict | Response] = {}
        self.asked: list[tuple[str, str, dict[str, str]]] = []  # (call, host, query)
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        call = request.path.rsplit("/", 1)[-1]
        host = HOST_BY_DBID.get(request.args.get("dbid", ""), "?")
        with self._lock:
            self.asked.append((call, host, request.args.to_dict()))
        answer = self.answers.get(host, ok("online"))
        if isinstance(answer, Response):
            return answer
        return Response(json.dumps(answer), content_type="application/json")

    def hosts_asked(self) -> list[str]:
        return sorted(host for _, host, _ in self.asked)


@pytest.fixture
def provider(server):
    yield from answering(server, Provider())


@pytest.fixture
def inventory(tmp_path, server, monkeypatch):
    monkeypatch.setenv("TEST_SSHREACH_USER", USER_ID)
    (tmp_path / "client.py.j2").write_text("# client\n")
    hosts = "\n".join(
        HOST.format(
            name=name,
            dbid=DBIDS[name],
            uuid=UUIDS[name],
            ports_id=1000 + i,
            ssh_port=20000 + i,
            groups='["lab"]' if name != "pi-03" else "[]",
        )
        for i, name in enumerate(DBIDS)
    )
    path = tmp_path / "deployer.toml"
    path.write_text(INVENTORY.format(api_url=server.url_for("/api/{call}"), hosts=hosts))
    path.chmod(0o600)  # it holds literal credentials: private, or deployer refuses it
    return str(path)


def leaks(*texts: str) -> list[str]:
    found = []
    for text in texts:
        for secret in CREDENTIALS:
            for form in (secret, quote(secret, safe=""), quote_plus(secret), secret[:10]):
                if form in text:
                    found.append(form)
    return found


# --- deployer status ------------------------------------------------------------


def test_status_all_online_exits_0_with_a_table(provider, inventory):
    result = run("-i", inventory, "status")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["HOST", "ONLINE", "ERROR_CODE", "DETAIL"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["pi-01", "yes", "0"],
        ["pi-02", "yes", "0"],
        ["pi-03", "yes", "0"],
    ]
    assert provider.hosts_asked() == ["pi-01", "pi-02", "pi-03"]
    assert {call for call, _, _ in provider.asked} == {"client_status"}


def test_status_json_reports_offline_and_exits_1(provider, inventory):
    provider.answers["pi-02"] = code(24, "offline", success=True)
    result = run("-i", inventory, "status", "--json")
    assert result.code == 1
    assert json.loads(result.stdout) == [
        {"host": "pi-01", "online": True, "error_code": 0},
        {"host": "pi-02", "online": False, "error_code": 24},
        {"host": "pi-03", "online": True, "error_code": 0},
    ]


def test_status_unreachable_hosts_show_their_code_or_null(provider, inventory):
    provider.answers["pi-01"] = code(23, "client blocked")
    provider.answers["pi-03"] = Response("<html>no such page</html>", status=404)
    result = run("-i", inventory, "--quiet", "status", "--json", "--parallel", "2")
    assert result.code == 1
    assert json.loads(result.stdout) == [
        {"host": "pi-01", "online": False, "error_code": 23},
        {"host": "pi-02", "online": True, "error_code": 0},
        {"host": "pi-03", "online": False, "error_code": None},
    ]
    assert "pi-01" in result.stderr and "client blocked" in result.stderr
    assert "HTTP 404" in result.stderr
    assert provider.hosts_asked() == ["pi-01", "pi-02", "pi-03"]  # 23 and 404: no retry


def test_status_table_marks_unreachable_hosts(provider, inventory):
    provider.answers["pi-02"] = code(31, "wrong data")
    result = run("-i", inventory, "status", "pi-02")
    assert result.code == 1
    assert result.stdout.splitlines()[1].split()[:4] == ["pi-02", "no", "31", "unreachable"]


def test_status_asks_only_the_targets(provider, inventory):
    result = run("-i", inventory, "status", "@lab", "--json")
    assert result.code == 0
    assert [row["host"] for row in json.loads(result.stdout)] == ["pi-01", "pi-02"]
    assert provider.hosts_asked() == ["pi-01", "pi-02"]


def test_status_unknown_target_is_a_usage_error_before_any_request(provider, inventory):
    result = run("-i", inventory, "status", "pi-99")
    assert result.code == 2
    assert "pi-99" in result.stderr
    assert provider.asked == []


def test_status_parallel_must_be_positive(provider, inventory):
    result = run("-i", inventory, "status", "--parallel", "0")
    assert result.code == 2 and provider.asked == []


# --- deployer api -------------------------------------------------------------------


def test_api_prints_the_reply_and_exits_0_on_success(provider, inventory):
    provider.answers["pi-01"] = ok("online")
    result = run("-i", inventory, "api", "client_status", "pi-01")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout) == ok("online")
    assert [(c, h) for c, h, _ in provider.asked] == [("client_status", "pi-01")]


def test_api_offline_status_is_success_true_so_exit_0(provider, inventory):
    provider.answers["pi-03"] = code(24, "offline", success=True)
    result = run("-i", inventory, "api", "client_status", "pi-03")
    assert result.code == 0
    assert json.loads(result.stdout)["error_code"] == 24


@pytest.mark.parametrize("error_code", [11, 21, 22, 23, 31])
def test_api_error_codes_are_printed_not_retried_and_exit_1(provider, inventory, error_code):
    provider.answers["pi-02"] = code(error_code, "provider says no")
    result = run("-i", inventory, "api", "connect", "pi-02")
    assert result.code == 1
    assert json.loads(result.stdout) == code(error_code, "provider says no")
    assert len(provider.asked) == 1


def test_api_set_allow_clientless_sends_allow(provider, inventory):
    provider.answers["pi-01"] = ok("success", allow_clientless=False)
    result = run("-i", inventory, "api", "set_allow_clientless", "pi-01", "--allow", "false")
    assert result.code == 0
    assert json.loads(result.stdout)["allow_clientless"] is False
    ((_, _, query),) = provider.asked
    assert query["allow"] == "false" and query["ports_id"] == "1000"


@pytest.mark.parametrize(
    "argv",
    [
        ("api", "set_allow_clientless", "pi-01"),  # --allow missing
        ("api", "connect", "pi-01", "--allow", "true"),  # --allow where it does not belong
        ("api", "reboot", "pi-01"),  # not one of the four calls
        ("api", "set_allow_clientless", "pi-01", "--allow", "yes"),
        ("api", "connect", "pi-99"),  # no such host
        ("api", "connect", "pi-0*"),  # more than one host
        ("api", "connect"),
    ],
)
def test_api_usage_errors_exit_2_without_a_request(provider, inventory, argv):
    result = run("-i", inventory, *argv)
    assert result.code == 2, (result.stdout, result.stderr)
    assert provider.asked == []


def test_api_transient_failure_that_persists_is_an_error_exit_1(provider, inventory):
    provider.answers["pi-01"] = Response("<html>wrong place</html>", status=403)
    result = run("-i", inventory, "api", "disconnect", "pi-01")
    assert result.code == 1
    assert result.stdout == ""
    assert "HTTP 403" in result.stderr and "disconnect" in result.stderr


# --- credentials never reach the output ----------------------------------------------


def test_no_credential_in_any_output_even_at_debug(provider, inventory):
    echo = f"bad {DBIDS['pi-02']} / {UUIDS['pi-02']} for {USER_ID}"
    provider.answers["pi-02"] = code(31, echo)
    provider.answers["pi-01"] = Response(f"proxy error for user {USER_ID}", status=404)
    outputs = [
        run("-i", inventory, "-vv", "api", "connect", "pi-02"),
        run("-i", inventory, "-vv", "api", "connect", "pi-01"),
        run("-i", inventory, "-vv", "status"),
        run("-i", inventory, "-vv", "status", "--json"),
    ]
    assert "…" in outputs[0].stdout  # the echoed ids are there, masked
    for result in outputs:
        assert leaks(result.stdout, result.stderr) == [], result
    assert any("deployer.api" in result.stderr for result in outputs)  # debug logs were on
