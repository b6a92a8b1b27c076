"""The provider simulator's API, poll, fault and state behaviour, over real HTTP
on 127.0.0.1 (SPEC 1, 1b and 7). The forwarding server is a recording double
here; the real one, the clients and their tunnels are in
tests/e2e/test_sandbox.py."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from deployer.sandbox.client import SandboxClient, SandboxClientError
from deployer.sandbox.forwarding import Tunnel
from deployer.sandbox.simulator import Faults, HostSpec, Simulator, TokenBucket

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

USER = "user-0001"
API_KEY = "k" * 32
HOSTS = [
    HostSpec("sbx-01", "db01", "uuid-0001", 1001, 21001, 31001, "client-0001"),
    HostSpec("sbx-02", "db02", "uuid-0002", 1002, 21002, 31002, "client-0002"),
]
SHA = "a" * 64
OK = {"message": "OK", "error_code": 0, "success": True}
ONLINE = {"message": "online", "error_code": 0, "success": True}
OFFLINE = {"message": "offline", "error_code": 24, "success": True}
WRONG = {"error": "wrong data"}


class RecordingForwarder:
    """The forwarding server as the simulator sees it: which IPORTs are forwarded
    (set by the test, as a client's tunnel would), and which cuts it was asked for."""

    port = 0

    def __init__(self):
        self.forwarded: dict[int, Tunnel] = {}
        self.cuts: list[int] = []
        self.cut_works = True
        self.lock = threading.Lock()

    def open(self, host: HostSpec, pids=(4242,), connections=0) -> None:
        with self.lock:
            self.forwarded[host.iport] = Tunnel(host.iport, connections, tuple(pids))

    def open_ports(self) -> set[int]:
        with self.lock:
            return set(self.forwarded)

    def tunnels(self) -> dict[int, Tunnel]:
        with self.lock:
            return dict(self.forwarded)

    def cut(self, iport: int) -> bool:
        with self.lock:
            self.cuts.append(iport)
            if not self.cut_works:
                return False
            return self.forwarded.pop(iport, None) is not None


@pytest.fixture
def forwarder() -> RecordingForwarder:
    return RecordingForwarder()


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "client-0001.py").write_text("# the provider's script for sbx-01\n")
    return tmp_path


@pytest.fixture
def sim(forwarder, scripts):
    simulator = Simulator(
        USER, HOSTS, forwarder, Faults(), rng=random.Random(7), api_key=API_KEY, scripts_dir=scripts
    )
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def admin(sim) -> SandboxClient:
    return SandboxClient(sim.base_url)


def ids(host: HostSpec = HOSTS[0], **changes) -> dict[str, str]:
    params = {
        "user_id": USER,
        "dbid": host.dbid,
        "host_uuid": host.host_uuid,
        "ports_id": str(host.ports_id),
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


def poll_params(host: HostSpec = HOSTS[0], **changes) -> dict[str, str]:
    """What the production client sends (contract A), with ``changes``."""
    params = {
        "ports_id": str(host.ports_id),
        "key": host.host_uuid,
        "uid": USER,
        "dbid": host.dbid,
        "ver": "deployer-1",
        "upgradable": "False",
        "sha256": SHA,
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


def get(url: str, params) -> tuple[int, str, bytes]:
    query = urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(f"{url}?{query}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def raw(sim: Simulator, call: str, params, method: str = "GET") -> tuple[int, str, bytes]:
    url = sim.api_url.format(call=call)
    if method == "GET":
        return get(url, params)
    query = urllib.parse.urlencode(params, doseq=True)
    request = urllib.request.Request(url, data=query.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def api(sim: Simulator, call: str, params, method: str = "GET") -> dict:
    status, ctype, body = raw(sim, call, params, method)
    assert (status, ctype) == (200, "application/json")
    return json.loads(body)


def poll(sim: Simulator, host: HostSpec = HOSTS[0], **changes) -> dict:
    status, ctype, body = get(f"{sim.poll_url}/get_port4.php", poll_params(host, **changes))
    assert (status, ctype) == (200, "application/json")
    return json.loads(body)


# --- the poll --------------------------------------------------------------------------


def test_a_poll_answers_every_field_a_real_client_reads(sim):
    assert sim.poll_url == f"{sim.base_url}/poll"
    assert poll(sim) == {
        "command": "0",
        "iport": "21001",
        "forwarding_server": "127.0.0.1",
        "disconnect_ssl_when_server_unreachable": "F",
        "upgrade": "F",
    }


def test_a_poll_is_counted_and_records_sha256_version_and_upgradable(sim, admin):
    poll(sim, ver="370", upgradable="True")
    poll(sim, HOSTS[1], sha256=None)
    one, two = admin.host("sbx-01"), admin.host("sbx-02")
    assert (one["polls"], one["script_sha256"], one["version"], one["upgradable"]) == (
        1,
        SHA,
        "370",
        True,
    )
    assert (two["polls"], two["script_sha256"], two["upgradable"]) == (1, None, False)
    assert 0 <= one["last_poll_age"] < 1


@pytest.mark.parametrize(
    "changes",
    [
        {"uid": "someone-else"},
        {"dbid": "db99"},
        {"key": "uuid-9999"},
        {"ports_id": "1002"},  # another host's ports_id
        {"dbid": "db02"},  # a mix of two hosts' ids
        {"uid": None},
        {"key": None},
        {"ver": None},
        {"ver": ""},
        {"ver": "v" * 65},
        {"upgradable": None},
        {"upgradable": "yes"},
        {"upgradable": "false"},
        {"sha256": "not-a-sha"},
        {"sha256": "A" * 64},
        {"dbid": ["db01", "db01"]},  # repeated parameter
    ],
)
def test_a_poll_with_any_wrong_parameter_is_an_error_and_not_a_sign_of_life(sim, admin, changes):
    assert poll(sim, **changes) == WRONG
    host = admin.host("sbx-01")
    assert (host["polls"], host["online"], host["last_poll_age"]) == (0, False, None)


def test_client_status_is_offline_until_a_poll_then_online_until_it_ages(sim, admin):
    admin.set_faults(offline_after=0.4)
    assert api(sim, "client_status", ids()) == OFFLINE
    poll(sim)
    polled = time.monotonic()
    assert api(sim, "client_status", ids()) == ONLINE
    assert api(sim, "client_status", ids(HOSTS[1])) == OFFLINE
    while api(sim, "client_status", ids()) == ONLINE:
        assert time.monotonic() - polled < 2.0
        time.sleep(0.02)
    assert 0.4 <= time.monotonic() - polled <= 0.4 + 0.5
    poll(sim)
    assert api(sim, "client_status", ids()) == ONLINE  # a poll is online at once


# --- connect and disconnect ----------------------------------------------------------------


def test_connect_is_24_while_the_client_is_offline(sim, admin):
    inactive = {"message": "client inactive", "error_code": 24, "success": False}
    assert api(sim, "connect", ids()) == inactive
    assert admin.host("sbx-01")["command"] == "0"


def test_connect_answers_at_once_and_takes_effect_at_the_next_poll(sim, admin, forwarder):
    poll(sim)
    assert api(sim, "connect", ids()) == OK
    host = admin.host("sbx-01")
    assert (host["command"], host["tunnel_open"], host["tunnel_pids"]) == ("1", False, [])
    assert poll(sim)["command"] == "1"
    assert poll(sim, HOSTS[1])["command"] == "0"  # only that host
    forwarder.open(HOSTS[0], pids=(555,), connections=2)  # the client's ssh -R arrived
    host = admin.host("sbx-01")
    assert (host["tunnel_open"], host["tunnel_pids"], host["connections"]) == (True, [555], 2)
    assert api(sim, "connect", ids()) == OK  # idempotent


def test_connect_wait_answers_11_when_no_tunnel_comes_in_time(sim, admin):
    poll(sim)
    admin.set_faults(connect_wait=0.3)
    start = time.monotonic()
    reply = api(sim, "connect", ids())
    assert reply == {"message": "not connected", "error_code": 11, "success": False}
    assert time.monotonic() - start >= 0.3
    assert admin.host("sbx-01")["command"] == "1"  # the tunnel may still come


def test_connect_wait_answers_0_once_the_tunnel_is_open(sim, admin, forwarder):
    poll(sim)
    admin.set_faults(connect_wait=5)
    threading.Timer(0.3, forwarder.open, args=(HOSTS[0],)).start()
    start = time.monotonic()
    assert api(sim, "connect", ids()) == OK
    assert 0.3 <= time.monotonic() - start < 2.0
    assert poll(sim)["command"] == "1"  # polls went on while connect waited


def test_disconnect_sets_0_and_ends_the_session_without_counting_a_cut(sim, admin, forwarder):
    poll(sim)
    api(sim, "connect", ids())
    forwarder.open(HOSTS[0])
    assert api(sim, "disconnect", ids()) == OK
    assert forwarder.cuts == [HOSTS[0].iport]
    host = admin.host("sbx-01")
    assert (host["command"], host["tunnel_open"], host["tunnel_cuts"]) == ("0", False, 0)
    assert poll(sim)["command"] == "0"


def test_disconnect_without_a_tunnel_is_ok_and_12_when_the_session_stays(sim, forwarder):
    assert api(sim, "disconnect", ids()) == OK  # no tunnel, offline: still fine
    forwarder.open(HOSTS[0])
    forwarder.cut_works = False
    assert api(sim, "disconnect", ids()) == {
        "message": "not disconnected",
        "error_code": 12,
        "success": False,
    }


# --- the offline rule --------------------------------------------------------------------------


def test_an_offline_client_without_allow_clientless_has_its_session_cut(sim, admin, forwarder):
    admin.set_faults(offline_after=0.3)
    poll(sim)
    api(sim, "connect", ids())
    forwarder.open(HOSTS[0])
    polled = time.monotonic()
    admin.wait_tunnel(["sbx-01"], open=False, timeout=3)
    assert time.monotonic() - polled >= 0.3  # not before offline_after
    host = admin.host("sbx-01")
    assert (host["online"], host["tunnel_cuts"], host["command"]) == (False, 1, "1")
    assert forwarder.cuts == [HOSTS[0].iport]


def test_allow_clientless_keeps_an_offline_clients_tunnel_until_revoked(sim, admin, forwarder):
    admin.set_faults(offline_after=0.3)
    poll(sim)
    api(sim, "set_allow_clientless", ids(allow="true"))
    forwarder.open(HOSTS[0])
    time.sleep(0.8)
    host = admin.host("sbx-01")
    assert (host["online"], host["tunnel_open"], forwarder.cuts) == (False, True, [])
    api(sim, "set_allow_clientless", ids(allow="false"))
    admin.wait_tunnel(["sbx-01"], open=False, timeout=3)
    assert admin.host("sbx-01")["tunnel_cuts"] == 1


def test_an_online_client_keeps_its_tunnel(sim, admin, forwarder):
    admin.set_faults(offline_after=0.3)
    forwarder.open(HOSTS[0])
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        poll(sim)
        time.sleep(0.05)
    assert forwarder.cuts == []


# --- the other calls ---------------------------------------------------------------------------


def test_calls_work_with_post_form_parameters_too(sim):
    poll(sim)
    assert api(sim, "client_status", ids(), method="POST") == ONLINE


def test_unknown_call_is_21_even_with_bad_ids(sim):
    invalid = {"message": "invalid api call", "error_code": 21, "success": False}
    assert api(sim, "reboot", ids()) == invalid
    assert api(sim, "reboot", {}) == invalid
    assert api(sim, "connect/extra", ids()) == invalid


@pytest.mark.parametrize(
    "params",
    [
        ids(user_id="someone-else"),
        ids(dbid="db99"),
        ids(host_uuid="uuid-9999"),
        ids(ports_id="1002"),
        ids(ports_id="01001"),
        ids(HOSTS[1], dbid=HOSTS[0].dbid),
        ids(dbid=None),
        ids(user_id=None),
        {**ids(), "dbid": ["db01", "db01"]},
        {},
    ],
)
def test_bad_or_unknown_ids_are_31(sim, params):
    reply = api(sim, "client_status", params)
    assert reply == {"message": "wrong data", "error_code": 31, "success": False}


@pytest.mark.parametrize("allow", ["yes", "True", "1", "", None])
def test_set_allow_clientless_needs_allow_true_or_false(sim, allow):
    assert api(sim, "set_allow_clientless", ids(allow=allow))["error_code"] == 31
    assert sim.state()["hosts"]["sbx-01"]["allow_clientless"] is False


def test_set_allow_clientless_replies_and_records_exposure_windows(sim, admin):
    before = time.time()
    reply = api(sim, "set_allow_clientless", ids(allow="true"))
    assert reply == {
        "allow_clientless": True,
        "message": "success",
        "error_code": 0,
        "success": True,
    }
    assert list(reply) == ["allow_clientless", "message", "error_code", "success"]
    api(sim, "set_allow_clientless", ids(allow="true"))  # still the same window
    [[t_open, t_close]] = admin.host("sbx-01")["exposures"]
    assert t_close is None and before <= t_open <= time.time()
    assert api(sim, "set_allow_clientless", ids(allow="false"))["allow_clientless"] is False
    [[t_open2, t_close]] = admin.host("sbx-01")["exposures"]
    assert t_open2 == t_open and t_open <= t_close <= time.time()


def test_blocked_host_gets_23_on_every_call_and_an_error_on_its_polls(sim, admin):
    poll(sim)
    admin.set_faults(blocked=["sbx-01"])
    blocked = {"message": "client blocked", "error_code": 23, "success": False}
    for call in ("connect", "disconnect", "client_status"):
        assert api(sim, call, ids()) == blocked
    assert api(sim, "set_allow_clientless", ids(allow="true")) == blocked
    assert poll(sim) == {"error": "client blocked"}
    assert admin.host("sbx-01")["polls"] == 1  # the refused poll is no sign of life
    assert admin.host("sbx-01")["blocked"] is True
    admin.set_faults(blocked=[])
    assert api(sim, "client_status", ids()) == ONLINE


def test_rate_limit_per_user_id_answers_22_then_recovers(sim, admin):
    admin.set_faults(rate_limit=5)
    codes = [api(sim, "client_status", ids())["error_code"] for _ in range(12)]
    assert codes[:5] == [24] * 5
    assert codes.count(22) >= 5
    assert api(sim, "client_status", ids(user_id="nobody"))["error_code"] == 31  # not limited
    assert poll(sim)["command"] == "0"  # polls are not API calls: never limited
    time.sleep(0.5)
    assert api(sim, "client_status", ids())["error_code"] == 0
    limited = {"message": "too many api calls", "error_code": 22, "success": False}
    assert limited in [api(sim, "client_status", ids()) for _ in range(10)]
    assert admin.host("sbx-01")["api_calls"]["client_status"] >= 23  # every request counted


def test_rate_limit_zero_means_unlimited():
    bucket = TokenBucket(0)
    assert all(bucket.take(0) for _ in range(1000))


# --- get_client_script -----------------------------------------------------------------------


def script_params(**changes) -> dict[str, str]:
    params = {"api_key": API_KEY, "client_id": HOSTS[0].client_id, **changes}
    return {k: v for k, v in params.items() if v is not None}


def test_get_client_script_returns_the_file_read_at_request_time(sim, admin, scripts):
    reply = api(sim, "get_client_script", script_params())
    assert reply == {
        "script": "# the provider's script for sbx-01\n",
        "message": "OK",
        "error_code": 0,
        "success": True,
    }
    (scripts / "client-0001.py").write_text("# regenerated\n")
    assert api(sim, "get_client_script", script_params())["script"] == "# regenerated\n"
    assert admin.host("sbx-01")["api_calls"]["get_client_script"] == 2


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"api_key": "wrong"}, 32),
        ({"api_key": None}, 32),
        ({"client_id": "client-9999"}, 31),
        ({"client_id": None}, 31),
        ({"client_id": HOSTS[1].client_id}, 45),  # no script generated for it
    ],
)
def test_get_client_script_errors(sim, changes, code):
    reply = api(sim, "get_client_script", script_params(**changes))
    assert (reply["error_code"], reply["success"], "script" in reply) == (code, False, False)


@pytest.mark.parametrize(
    "code, message",
    [
        (40, "forwarding server unreachable"),
        (41, "invalid region"),
        (45, "internal error"),
    ],
)
def test_get_client_script_fault_answers_the_code(sim, admin, code, message):
    admin.set_faults(client_script_error=code)
    reply = api(sim, "get_client_script", script_params())
    assert reply == {"message": message, "error_code": code, "success": False}


# --- faults ------------------------------------------------------------------------------


def test_fail_rate_one_answers_502_with_an_html_body(sim, admin):
    admin.set_faults(fail_rate=1.0)
    status, ctype, body = raw(sim, "client_status", ids())
    assert (status, ctype) == (502, "text/html")
    assert body.lstrip().startswith(b"<html>")
    assert admin.host("sbx-01")["api_calls"]["client_status"] == 1
    assert admin.state()["calls"]["fail"] == 1
    assert poll(sim)["command"] == "0"  # polls unaffected


def test_garbage_rate_one_answers_200_that_is_not_json(sim, admin):
    admin.set_faults(garbage_rate=1.0)
    status, _ctype, body = raw(sim, "connect", ids())
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)


def test_partial_fail_rate_mixes_502_and_real_replies(sim, admin):
    admin.set_faults(fail_rate=0.5, rate_limit=0)
    statuses = [raw(sim, "client_status", ids())[0] for _ in range(60)]
    assert 0 < statuses.count(502) < 60


def test_poll_faults_fail_polls_and_set_the_reply_flags(sim, admin):
    admin.set_faults(poll_fail_rate=1.0)
    assert get(f"{sim.poll_url}/get_port4.php", poll_params())[0] == 502
    assert admin.host("sbx-01")["polls"] == 0
    admin.set_faults(
        poll_fail_rate=0, disconnect_ssl_when_server_unreachable=True, offer_upgrade=True
    )
    reply = poll(sim)
    assert (reply["disconnect_ssl_when_server_unreachable"], reply["upgrade"]) == ("T", "T")


def test_latency_delays_api_replies_but_not_polls_or_the_state(sim, admin):
    admin.set_faults(latency=0.3)
    start = time.monotonic()
    api(sim, "client_status", ids())
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    poll(sim)
    admin.state()
    assert time.monotonic() - start < 0.3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"latency": -1}, "latency must be >= 0"),
        ({"fail_rate": 2}, "fail_rate must be between 0 and 1"),
        ({"rate_limit": "fast"}, "rate_limit must be a number"),
        ({"blocked": "sbx-01"}, "blocked must be a list"),
        ({"blocked": ["sbx-99"]}, "unknown host"),
        ({"offline_after": 0}, "offline_after must be > 0"),
        ({"connect_wait": -1}, "connect_wait must be >= 0"),
        ({"client_script_error": 12}, "client_script_error must be one of"),
        ({"offer_upgrade": "yes"}, "offer_upgrade must be true or false"),
        ({"latencies": 1}, "unknown fault 'latencies'"),
    ],
)
def test_bad_fault_changes_are_refused_with_400(admin, changes, message):
    with pytest.raises(SandboxClientError, match="HTTP 400") as exc:
        admin.set_faults(**changes)
    assert message in str(exc.value)
    assert admin.faults() == Faults().to_json()


# --- the state document -----------------------------------------------------------------


def test_state_document_has_the_spec_shape(sim, admin):
    poll(sim)
    api(sim, "client_status", ids())
    api(sim, "set_allow_clientless", ids(allow="true"))
    state = admin.state()
    assert state["api_url"] == sim.api_url and state["api_url"].endswith("/api/{call}")
    assert set(state["hosts"]) == {"sbx-01", "sbx-02"}
    host = state["hosts"]["sbx-01"]
    spec_keys = {"online", "allow_clientless", "tunnel_open", "tunnel_pids", "tunnel_cuts"}
    spec_keys |= {"polls", "api_calls", "script_sha256", "exposures"}
    contract_keys = {"command", "iport", "sshd_port", "last_poll_age", "connections", "blocked"}
    assert spec_keys | contract_keys <= set(host)
    assert host["api_calls"] == {
        "connect": 0,
        "disconnect": 0,
        "client_status": 1,
        "set_allow_clientless": 1,
        "get_client_script": 0,
    }
    assert (host["iport"], host["sshd_port"], host["command"]) == (21001, 31001, "0")
    assert host["exposures"][0][1] is None
    assert state["calls"]["polls"] == 1


def test_calls_with_bad_ids_are_not_counted_for_any_host(sim, admin):
    api(sim, "client_status", ids(dbid="db02"))
    assert all(sum(h["api_calls"].values()) == 0 for h in admin.state()["hosts"].values())
    assert admin.state()["calls"]["by_code"] == {"31": 1}


def test_reset_counters_zeroes_counts_and_keeps_an_open_window(sim, admin):
    poll(sim)
    api(sim, "set_allow_clientless", ids(allow="true"))
    api(sim, "set_allow_clientless", ids(allow="false"))
    api(sim, "set_allow_clientless", ids(allow="true"))
    admin.reset_counters()
    host = admin.host("sbx-01")
    assert (host["api_calls"]["set_allow_clientless"], host["polls"]) == (0, 0)
    assert len(host["exposures"]) == 1 and host["exposures"][0][1] is None


def test_unknown_routes_are_404(sim):
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{sim.base_url}/nope", timeout=5)
    assert exc.value.code == 404


def test_sandbox_client_accepts_the_state_url():
    client = SandboxClient("http://127.0.0.1:1/sandbox/state")
    assert client.base_url == "http://127.0.0.1:1"
    assert client.state_url == "http://127.0.0.1:1/sandbox/state"
