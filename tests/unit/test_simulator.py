"""The provider simulator's API, heartbeat, fault and state behaviour, over real
HTTP on 127.0.0.1 (SPEC 1 and 7). Tunnels and client processes are in
tests/e2e/test_sandbox.py."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from deployer.sandbox.client import SandboxClient, SandboxClientError
from deployer.sandbox.simulator import Faults, HostSpec, Simulator, TokenBucket

pytestmark = pytest.mark.unit

USER = "user-0001"
HOSTS = [
    HostSpec("sbx-01", "db01", "uuid-0001", 1001, 0),
    HostSpec("sbx-02", "db02", "uuid-0002", 1002, 0),
]
OK = {"message": "OK", "error_code": 0, "success": True}
ONLINE = {"message": "online", "error_code": 0, "success": True}
OFFLINE = {"message": "offline", "error_code": 24, "success": True}


@pytest.fixture
def sim():
    simulator = Simulator(USER, HOSTS, ("127.0.0.1", 9), Faults(), rng=random.Random(7))
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


def raw(sim: Simulator, call: str, params, method: str = "GET") -> tuple[int, str, bytes]:
    query = urllib.parse.urlencode(params, doseq=True)
    url = sim.api_url.format(call=call)
    if method == "GET":
        request = urllib.request.Request(f"{url}?{query}")
    else:
        request = urllib.request.Request(url, data=query.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def api(sim: Simulator, call: str, params, method: str = "GET") -> dict:
    status, ctype, body = raw(sim, call, params, method)
    assert (status, ctype) == (200, "application/json")
    return json.loads(body)


def beat(admin: SandboxClient, host: HostSpec = HOSTS[0], sha: str = "abc", pid: int = 42):
    return admin.heartbeat(host.host_uuid, sha, pid)


# --- the four calls -------------------------------------------------------------------


def test_client_status_is_offline_until_a_heartbeat_then_online(sim, admin):
    assert api(sim, "client_status", ids()) == OFFLINE
    beat(admin)
    assert api(sim, "client_status", ids()) == ONLINE
    assert api(sim, "client_status", ids(HOSTS[1])) == OFFLINE


def test_calls_work_with_post_form_parameters_too(sim, admin):
    beat(admin)
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
        ids(ports_id="1002"),  # another host's ports_id
        ids(ports_id="01001"),
        ids(HOSTS[1], dbid=HOSTS[0].dbid),  # a mix of two hosts' ids
        ids(dbid=None),
        ids(user_id=None),
        {**ids(), "dbid": ["db01", "db01"]},  # repeated parameter
        {},
    ],
)
def test_bad_or_unknown_ids_are_31(sim, params):
    reply = api(sim, "client_status", params)
    assert reply == {"message": "wrong data", "error_code": 31, "success": False}


@pytest.mark.parametrize("allow", ["yes", "True", "1", "", None])
def test_set_allow_clientless_needs_allow_true_or_false(sim, allow):
    params = ids(allow=allow)
    assert api(sim, "set_allow_clientless", params)["error_code"] == 31
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
    host = admin.host("sbx-01")
    assert host["allow_clientless"] is True
    [[t_open, t_close]] = host["exposures"]
    assert t_close is None and before <= t_open <= time.time()
    reply = api(sim, "set_allow_clientless", ids(allow="false"))
    assert reply["allow_clientless"] is False and reply["success"] is True
    [[t_open2, t_close]] = admin.host("sbx-01")["exposures"]
    assert t_open2 == t_open and t_open <= t_close <= time.time()
    api(sim, "set_allow_clientless", ids(allow="false"))
    assert len(admin.host("sbx-01")["exposures"]) == 1


def test_connect_is_24_while_the_client_is_offline(sim, admin):
    assert api(sim, "connect", ids()) == {
        "message": "client inactive",
        "error_code": 24,
        "success": False,
    }
    assert admin.host("sbx-01")["tunnel_open"] is False


def test_disconnect_without_a_tunnel_is_ok(sim):
    assert api(sim, "disconnect", ids()) == OK


def test_blocked_host_gets_23_on_every_call_until_unblocked(sim, admin):
    beat(admin)
    admin.set_faults(blocked=["sbx-01"])
    blocked = {"message": "client blocked", "error_code": 23, "success": False}
    for call in ("connect", "disconnect", "client_status"):
        assert api(sim, call, ids()) == blocked
    assert api(sim, "set_allow_clientless", ids(allow="true")) == blocked
    assert api(sim, "client_status", ids(HOSTS[1])) == OFFLINE
    assert admin.host("sbx-01")["blocked"] is True
    admin.set_faults(blocked=[])
    assert api(sim, "client_status", ids()) == ONLINE


def test_rate_limit_per_user_id_answers_22_then_recovers(sim, admin):
    admin.set_faults(rate_limit=5)
    codes = [api(sim, "client_status", ids())["error_code"] for _ in range(12)]
    assert codes[:5] == [24] * 5
    assert codes.count(22) >= 5
    assert api(sim, "client_status", ids(user_id="nobody"))["error_code"] == 31  # not limited
    time.sleep(0.5)
    assert api(sim, "client_status", ids())["error_code"] == 24
    limited = {"message": "too many api calls", "error_code": 22, "success": False}
    assert limited in [api(sim, "client_status", ids()) for _ in range(10)]
    assert admin.host("sbx-01")["api_calls"]["client_status"] >= 23  # every request counted


def test_rate_limit_zero_means_unlimited():
    bucket = TokenBucket(0)
    assert all(bucket.take(0) for _ in range(1000))


# --- heartbeats and offline detection ------------------------------------------------


def test_heartbeat_records_sha256_and_pid(admin):
    assert beat(admin, HOSTS[1], sha="f" * 64, pid=4242)["host"] == "sbx-02"
    host = admin.host("sbx-02")
    assert (host["online"], host["script_sha256"], host["client_pid"]) == (True, "f" * 64, 4242)


def test_heartbeat_from_an_unknown_host_is_refused(admin):
    with pytest.raises(SandboxClientError, match="HTTP 404"):
        admin.heartbeat("uuid-nope", "x", 1)


def test_offline_after_the_configured_silence(sim, admin):
    admin.set_faults(offline_after=0.4)
    beat(admin)
    seen = time.monotonic()
    assert api(sim, "client_status", ids()) == ONLINE
    while api(sim, "client_status", ids()) == ONLINE:
        assert time.monotonic() - seen < 2.0
        time.sleep(0.02)
    silent = time.monotonic() - seen
    assert 0.4 <= silent <= 0.4 + 0.5
    assert admin.host("sbx-01")["online"] is False
    beat(admin)
    assert api(sim, "client_status", ids()) == ONLINE  # a heartbeat is online at once


# --- faults ---------------------------------------------------------------------------


def test_fail_rate_one_answers_502_with_an_html_body(sim, admin):
    admin.set_faults(fail_rate=1.0)
    status, ctype, body = raw(sim, "client_status", ids())
    assert (status, ctype) == (502, "text/html")
    assert body.lstrip().startswith(b"<html>")
    assert admin.host("sbx-01")["api_calls"]["client_status"] == 1
    assert admin.state()["calls"]["fail"] == 1


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
    assert set(statuses) == {200, 502}


def test_latency_delays_api_replies_but_not_heartbeats(sim, admin):
    admin.set_faults(latency=0.3)
    start = time.monotonic()
    api(sim, "client_status", ids())
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    beat(admin)
    admin.state()
    assert time.monotonic() - start < 0.3


def test_faults_never_touch_heartbeats_or_admin_routes(sim, admin):
    admin.set_faults(fail_rate=1.0, garbage_rate=1.0)
    beat(admin)
    assert admin.host("sbx-01")["online"] is True
    assert admin.faults()["fail_rate"] == 1.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"latency": -1}, "latency must be >= 0"),
        ({"fail_rate": 2}, "fail_rate must be between 0 and 1"),
        ({"rate_limit": "fast"}, "rate_limit must be a number"),
        ({"blocked": "sbx-01"}, "blocked must be a list"),
        ({"blocked": ["sbx-99"]}, "unknown host"),
        ({"offline_after": 0}, "offline_after must be > 0"),
        ({"latencies": 1}, "unknown fault 'latencies'"),
    ],
)
def test_bad_fault_changes_are_refused_with_400(admin, changes, message):
    with pytest.raises(SandboxClientError, match="HTTP 400") as exc:
        admin.set_faults(**changes)
    assert message in str(exc.value)
    assert admin.faults() == Faults().to_json()


def test_faults_updated_validates_and_keeps_other_values():
    faults = Faults().updated({"latency": 1, "blocked": ["a"]})
    assert (faults.latency, faults.blocked, faults.rate_limit) == (1.0, ("a",), 50.0)
    with pytest.raises(ValueError, match="garbage_rate"):
        faults.updated({"garbage_rate": 1.5})
    with pytest.raises(ValueError, match="must be a number"):
        faults.updated({"latency": True})


# --- the state document -----------------------------------------------------------------


def test_state_document_has_the_spec_shape(sim, admin):
    beat(admin, sha="s" * 64)
    api(sim, "client_status", ids())
    api(sim, "set_allow_clientless", ids(allow="true"))
    state = admin.state()
    assert state["api_url"] == sim.api_url and state["api_url"].endswith("/api/{call}")
    assert set(state["hosts"]) == {"sbx-01", "sbx-02"}
    host = state["hosts"]["sbx-01"]
    for key in ("online", "allow_clientless", "tunnel_open", "api_calls", "script_sha256"):
        assert key in host
    assert host["api_calls"] == {
        "connect": 0,
        "disconnect": 0,
        "client_status": 1,
        "set_allow_clientless": 1,
    }
    assert host["script_sha256"] == "s" * 64
    assert host["exposures"][0][1] is None
    assert state["hosts"]["sbx-02"]["script_sha256"] is None


def test_calls_with_bad_ids_are_not_counted_for_any_host(sim, admin):
    api(sim, "client_status", ids(dbid="db02"))
    assert all(sum(h["api_calls"].values()) == 0 for h in admin.state()["hosts"].values())
    assert admin.state()["calls"]["by_code"] == {"31": 1}


def test_reset_counters_zeroes_calls_and_keeps_an_open_window(sim, admin):
    api(sim, "set_allow_clientless", ids(allow="true"))
    api(sim, "set_allow_clientless", ids(allow="false"))
    api(sim, "set_allow_clientless", ids(allow="true"))
    admin.reset_counters()
    host = admin.host("sbx-01")
    assert host["api_calls"]["set_allow_clientless"] == 0
    assert len(host["exposures"]) == 1 and host["exposures"][0][1] is None


def test_unknown_routes_are_404(sim):
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{sim.base_url}/nope", timeout=5)
    assert exc.value.code == 404


def test_sandbox_client_accepts_the_state_url():
    client = SandboxClient("http://127.0.0.1:1/sandbox/state")
    assert client.base_url == "http://127.0.0.1:1"
    assert client.state_url == "http://127.0.0.1:1/sandbox/state"
