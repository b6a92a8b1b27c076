"""ProviderAPI against a real HTTP server on 127.0.0.1 (pytest-httpserver).

The FakeClock takes every backoff sleep, so nothing really waits for a retry;
the rate limiter runs on the real clock at a rate high enough to never matter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import socket
import threading
import time
import traceback
from urllib.parse import quote, quote_plus

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from deployer.api import ProviderAPI
from deployer.clock import FakeClock
from deployer.errors import (
    ApiError,
    ApiTransientError,
    ClientBlocked,
    ClientInactive,
    ForwardingServerUnreachable,
    InvalidApiCall,
    InvalidApiKey,
    InvalidRegion,
    NotConnected,
    NotDisconnected,
    ProviderInternalError,
    TooManyCalls,
    UnknownApiError,
    UsageError,
    WrongData,
)
from deployer.events import EventSink
from deployer.model import HostConfig, ProviderConfig
from deployer.ratelimit import RateLimiter
from deployer.retry import NO_RETRY, RetryPolicy
from deployer.secrets import Secret

pytestmark = pytest.mark.unit

USER_ID = "usr-7f3a9c2e51d04b88"
DBID = "dbid+Qx/9zZk4T1=="  # needs URL-encoding: checks the encoded forms too
HOST_UUID = "20sldd20-20sz-aa20-aa02-aa0salskd82a"
API_KEY = "key/9+Zz=Ab_cd-Q7x"  # needs URL-encoding too
CLIENT_ID = "dfb39cdd-5a1e-4c2b-9f00-8e7d6c5b4a39"
CREDENTIALS = (USER_ID, DBID, HOST_UUID, API_KEY, CLIENT_ID)

FOUR = RetryPolicy(attempts=4, base=1.0, cap=3.0, deadline=100.0)

HOST = HostConfig(
    name="pi-01", dbid=Secret(DBID), host_uuid=Secret(HOST_UUID), ports_id=1234, ssh_port=12345
)
PROVIDER_HOST = dataclasses.replace(HOST, source="provider", client_id=Secret(CLIENT_ID))


def leaks(text: str) -> list[str]:
    """Credential forms (raw, URL-encoded, or a long prefix) found in ``text``."""
    found = []
    for secret in CREDENTIALS:
        for form in (secret, quote(secret, safe=""), quote_plus(secret), secret[:8]):
            if form in text:
                found.append(form)
    return found


def reply(code: int = 0, success: bool = True, message: str = "OK", status: int = 200, **extra):
    body = {"message": message, "error_code": code, "success": success, **extra}
    return Response(json.dumps(body), status=status, content_type="application/json")


def raw(body: str, status: int = 200, content_type: str = "text/html") -> Response:
    return Response(body, status=status, content_type=content_type)


class Script:
    """Answers with the given replies in turn, repeating the last one."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.queries: list[dict[str, str]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self._lock:
            self.queries.append(request.args.to_dict())
            self.paths.append(request.path)
            item = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return item if isinstance(item, Response) else item(request)

    @property
    def count(self) -> int:
        return len(self.queries)


class Recorder(EventSink):
    def __init__(self):
        self.messages: list[tuple[str | None, str]] = []

    def message(self, host, text):
        self.messages.append((host, text))


@pytest.fixture(scope="module")
def server():
    srv = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    srv.start()
    yield srv
    srv.clear()
    srv.stop()


@pytest.fixture
def serve(server):
    """serve(*replies) -> Script answering every call under /api/."""
    server.clear()

    def install(*replies) -> Script:
        script = Script(*replies)
        server.expect_request(re.compile(r"^/api/[a-z_]+$")).respond_with_handler(script)
        return script

    yield install
    server.clear()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def events():
    return Recorder()


@pytest.fixture
def make_api(server, clock, events):
    made = []

    def make(
        retry: RetryPolicy = FOUR,
        timeout: float = 5.0,
        api_url: str | None = None,
        api_key: str | None = API_KEY,
        **kw,
    ):
        provider = ProviderConfig(
            api_url=api_url or server.url_for("/api/{call}"),
            ssh_host="fw1.example",
            user_id=Secret(USER_ID),
            rate_limit=1000.0,
            timeout=timeout,
            api_key=Secret(api_key) if api_key else None,
        )
        kw.setdefault("limiter", RateLimiter(1000.0))
        api = ProviderAPI(
            provider, retry=retry, clock=clock, events=events, rng=random.Random(3), **kw
        )
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


# --- the query and the happy paths -----------------------------------------------


def test_each_call_sends_the_credentials_and_ids_in_the_query(serve, make_api):
    script = serve(reply(), reply(allow_clientless=True))
    api = make_api()
    api.connect(HOST)
    api.set_allow_clientless(HOST, True)
    base = {"user_id": USER_ID, "dbid": DBID, "host_uuid": HOST_UUID, "ports_id": "1234"}
    assert script.queries == [base, {**base, "allow": "true"}]
    assert script.paths == ["/api/connect", "/api/set_allow_clientless"]


def test_client_status_online_offline_and_inactive_failure(serve, make_api):
    serve(
        reply(message="online"),
        reply(24, True, "offline"),
        reply(24, False, "client inactive"),
    )
    api = make_api()
    assert api.client_status(HOST) is True
    assert api.client_status(HOST) is False  # 24 with success true: offline, not an error
    with pytest.raises(ClientInactive):
        api.client_status(HOST)  # 24 with success false is an error


def test_set_allow_clientless_false_sends_false(serve, make_api):
    script = serve(reply(allow_clientless=False, message="success"))
    make_api().set_allow_clientless(HOST, False)
    assert script.queries[0]["allow"] == "false"


# --- error codes and their policy ------------------------------------------------


@pytest.mark.parametrize(
    "code, cls, call",
    [
        (21, InvalidApiCall, "connect"),
        (23, ClientBlocked, "connect"),
        (31, WrongData, "disconnect"),
        (24, ClientInactive, "connect"),  # 24 outside client_status: an error
        (99, UnknownApiError, "client_status"),
    ],
)
def test_codes_that_are_never_retried(serve, make_api, clock, code, cls, call):
    script = serve(reply(code, False, "nope, sorry"))
    api = make_api()
    with pytest.raises(cls) as info:
        api.call(call, HOST)
    err = info.value
    assert script.count == 1 and clock.sleeps == []
    assert (err.code, err.call, err.host, err.step) == (code, call, "pi-01", None)
    text = str(err)
    assert call in text and "pi-01" in text and str(code) in text and "nope, sorry" in text


@pytest.mark.parametrize(
    "code, cls, call",
    [
        (11, NotConnected, "connect"),
        (12, NotDisconnected, "disconnect"),
    ],
)
def test_retried_codes_back_off_with_full_jitter_then_raise(
    serve, make_api, clock, events, code, cls, call
):
    script = serve(reply(code, False, "busy"))
    api = make_api(retry=FOUR)
    with pytest.raises(cls) as info:
        api.call(call, HOST)
    assert script.count == FOUR.attempts
    assert len(clock.sleeps) == FOUR.attempts - 1
    for n, slept in enumerate(clock.sleeps):
        assert 0.0 <= slept <= FOUR.ceiling(n)
    assert "gave up after 4 attempts" in str(info.value)
    assert api.calls_for("pi-01") == 4
    assert [h for h, _ in events.messages] == ["pi-01"] * 3
    assert "retry 1/3" in events.messages[0][1]


def test_too_many_calls_is_retried_past_the_attempts_until_the_deadline(serve, make_api, clock):
    # 22 means "later": it gets throttled_attempts tries within the deadline, not attempts
    policy = RetryPolicy(attempts=2, base=0.1, cap=0.2, deadline=1000.0, throttled_attempts=6)
    script = serve(reply(22, False, "slow down"))
    api = make_api(retry=policy)
    with pytest.raises(TooManyCalls) as info:
        api.connect(HOST)
    assert script.count == 6 and len(clock.sleeps) == 5
    assert "gave up after 6 attempts" in str(info.value)


def test_too_many_calls_stops_at_the_deadline(serve, make_api, clock):
    policy = RetryPolicy(attempts=2, base=1.0, cap=1.0, deadline=0.5, throttled_attempts=50)
    script = serve(reply(22, False, "slow down"))
    api = make_api(retry=policy)
    with pytest.raises(TooManyCalls):
        api.connect(HOST)
    assert script.count < 50 and sum(clock.sleeps) <= 0.5 + 1e-9


def test_a_retried_code_that_clears_returns_normally(serve, make_api, clock):
    script = serve(reply(11, False, "not connected"), reply(11, False, "x"), reply())
    api = make_api()
    api.connect(HOST)
    assert script.count == 3 and len(clock.sleeps) == 2
    assert api.calls_for("pi-01") == 3 and api.calls_for("other") == 0


def test_the_waits_between_retries_are_spent_by_idle_when_one_is_given(serve, make_api, clock):
    """Inside the window the workflow waits heard by the host's guard: its ``idle``
    spends each back-off instead of a sleep, for exactly as long."""
    serve(
        reply(11, False, "not connected"),
        reply(11, False, "x"),
        reply(),
        reply(11, False, "not connected"),
        reply(allow_clientless=False),
    )
    api = make_api()
    spent: list[float] = []
    assert api.client_status(HOST, idle=spent.append)
    assert len(spent) == 2 and clock.sleeps == []
    api.set_allow_clientless(HOST, False)  # no idle: slept as before
    assert len(clock.sleeps) == 1 and len(spent) == 2


def test_too_many_calls_slows_the_shared_limiter(serve, make_api, clock):
    serve(reply(22, False, "slow down"), reply())
    limiter = RateLimiter(1000.0)
    api = make_api(limiter=limiter)
    api.connect(HOST)
    assert api.too_many_calls_seen == 1
    # halved by the 22, then one success gave back 1/32 of the rate
    assert limiter.effective_rate == pytest.approx(500.0 + 1000.0 / 32)


def test_no_retry_policy_raises_the_first_retryable_error(serve, make_api, clock):
    script = serve(reply(11, False, "x"))
    with pytest.raises(NotConnected) as info:
        make_api().call("connect", HOST, retry=NO_RETRY)
    assert script.count == 1 and clock.sleeps == []
    assert "gave up" not in str(info.value)


def test_the_deadline_bounds_the_total_wait(serve, make_api, clock):
    script = serve(reply(11, False, "x"))
    policy = RetryPolicy(attempts=1000, base=1.0, cap=2.0, deadline=6.0)
    start = clock.now()
    with pytest.raises(NotConnected):
        make_api(retry=policy).connect(HOST)
    assert clock.now() - start <= 6.0 + 1e-9
    assert 3 < script.count < 1000


# --- transient failures ----------------------------------------------------------


GARBAGE = [
    raw("<html><body>Bad Gateway</body></html>", 502),
    raw("oops", 500),
    raw("service unavailable", 503),
    raw("<html>a captive portal</html>", 200),
    raw("", 200),
    raw('{"message": "OK"', 200, "application/json"),  # truncated JSON
    raw('["OK", 0, true]', 200, "application/json"),  # not an object
    raw('{"message": "OK", "error_code": "0", "success": true}', 200, "application/json"),
    raw('{"message": "OK", "error_code": 0}', 200, "application/json"),  # no success
    raw('{"message": "OK", "error_code": true, "success": true}', 200, "application/json"),
    raw('{"message": 5, "error_code": 0, "success": true}', 200, "application/json"),
    reply(0, False, "inconsistent"),
    raw("slow down", 429),
]


@pytest.mark.parametrize("bad", GARBAGE, ids=lambda r: f"{r.status_code}-{r.get_data()[:20]!r}")
def test_transient_replies_are_retried_then_raised(serve, make_api, clock, bad):
    script = serve(bad)
    with pytest.raises(ApiTransientError) as info:
        make_api().connect(HOST)
    assert script.count == FOUR.attempts and len(clock.sleeps) == FOUR.attempts - 1
    assert "pi-01" in str(info.value) and "connect" in str(info.value)
    assert info.value.code is None


@pytest.mark.parametrize("bad", GARBAGE[:4], ids=["502", "500", "503", "html"])
def test_a_transient_failure_that_clears_returns_normally(serve, make_api, bad):
    script = serve(bad, reply(message="online"))
    assert make_api().client_status(HOST) is True
    assert script.count == 2


def test_http_429_also_slows_the_limiter(serve, make_api):
    serve(raw("slow down", 429), reply())
    api = make_api()
    api.connect(HOST)
    assert api.too_many_calls_seen == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 301, 302])
def test_other_http_statuses_are_not_retried(serve, make_api, clock, status):
    resp = raw("<html>Not Found</html>", status)
    resp.headers["Location"] = "http://127.0.0.1:9/elsewhere"
    script = serve(resp)
    with pytest.raises(ApiError) as info:
        make_api().connect(HOST)
    assert type(info.value) is ApiError  # not transient, not a provider code
    assert script.count == 1 and clock.sleeps == []
    assert f"HTTP {status}" in str(info.value) and "api_url" in str(info.value)


def test_a_spec_reply_with_an_http_error_status_is_judged_by_its_code(serve, make_api):
    script = serve(reply(21, False, "invalid call", status=404))
    with pytest.raises(InvalidApiCall):
        make_api().connect(HOST)
    assert script.count == 1


def test_a_request_that_outlives_the_timeout_is_transient(serve, make_api):
    def slow(request):
        time.sleep(0.6)
        return reply()

    script = serve(slow)
    api = make_api(retry=RetryPolicy(attempts=2, base=0.1, cap=0.1, deadline=10), timeout=0.2)
    with pytest.raises(ApiTransientError) as info:
        api.connect(HOST)
    assert "timeout" in str(info.value) and "0.2s" in str(info.value)
    assert api.calls_for("pi-01") == 2
    assert script.count >= 1  # the server saw them, even if it answered late


def test_a_refused_connection_is_transient(make_api, clock):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = make_api(api_url=f"http://127.0.0.1:{port}/api/{{call}}")
    with pytest.raises(ApiTransientError) as info:
        api.connect(HOST)
    assert "connection failed" in str(info.value)
    assert api.calls_for("pi-01") == FOUR.attempts


# --- set_allow_clientless must be confirmed ----------------------------------------


def test_allow_clientless_reply_must_confirm_the_value(serve, make_api, clock):
    script = serve(
        reply(allow_clientless=False, message="success"),
        reply(message="success"),  # no allow_clientless at all
        reply(allow_clientless=True, message="success"),
    )
    make_api().set_allow_clientless(HOST, True)
    assert script.count == 3 and len(clock.sleeps) == 2


def test_allow_clientless_never_confirmed_raises_transient(serve, make_api):
    serve(reply(allow_clientless=True, message="success"))
    with pytest.raises(ApiTransientError) as info:
        make_api().set_allow_clientless(HOST, False)
    assert "allow_clientless=true, expected false" in str(info.value)


def test_per_call_retry_policy_overrides_the_default(serve, make_api):
    script = serve(reply(allow_clientless=True, message="success"))
    hard = RetryPolicy(attempts=9, base=1.0, cap=10.0, deadline=1000.0)
    with pytest.raises(ApiTransientError):
        make_api(retry=NO_RETRY).set_allow_clientless(HOST, False, retry=hard)
    assert script.count == 9


# --- raw calls and misuse ---------------------------------------------------------


def test_raw_call_returns_non_transient_codes_without_retry(serve, make_api, clock):
    script = serve(reply(22, False, "too many"))
    got = make_api().raw_call("connect", HOST)
    assert got == {"message": "too many", "error_code": 22, "success": False}
    assert script.count == 1 and clock.sleeps == []


def test_raw_call_retries_transient_failures(serve, make_api):
    script = serve(raw("bad gateway", 502), reply(24, True, "offline"))
    assert make_api().raw_call("client_status", HOST)["error_code"] == 24
    assert script.count == 2


def test_raw_call_masks_credentials_the_provider_echoes(serve, make_api):
    serve(reply(31, False, f"unknown dbid {DBID} for user {USER_ID}", echo=[HOST_UUID]))
    got = make_api().raw_call("disconnect", HOST)
    assert leaks(json.dumps(got)) == []
    assert got["message"].startswith("unknown dbid …")


@pytest.mark.parametrize(
    "call, allow",
    [("reboot", None), ("connect", True), ("set_allow_clientless", None)],
)
def test_misuse_is_refused_before_any_request(serve, make_api, call, allow):
    script = serve(reply())
    api = make_api()
    with pytest.raises(UsageError):
        api.call(call, HOST, allow=allow)
    with pytest.raises(UsageError):
        api.raw_call(call, HOST, allow=allow)
    assert script.count == 0 and api.calls_for("pi-01") == 0


# --- parallel use: counter and pool -------------------------------------------------


def test_parallel_calls_are_counted_per_host_and_fit_the_pool(serve, make_api, caplog):
    caplog.set_level(logging.WARNING, logger="urllib3")

    def slowish(request):
        time.sleep(0.01)  # keep 16 requests in flight together
        return reply(message="online")

    serve(slowish)
    api = make_api(pool_size=16)
    hosts = [
        HostConfig(
            name=f"h{i}", dbid=Secret(DBID), host_uuid=Secret(HOST_UUID), ports_id=i, ssh_port=1
        )
        for i in range(4)
    ]
    gate = threading.Barrier(16)

    def worker(i: int) -> None:
        gate.wait()
        for _ in range(5):
            api.client_status(hosts[i % 4])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [api.calls_for(h.name) for h in hosts] == [20, 20, 20, 20]
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


# --- credentials never leak ---------------------------------------------------------


def _echo_url(request: Request) -> Response:
    """A hostile error page that quotes the request URL (with its query)."""
    return raw(f"<html>cannot serve {request.full_path} {request.url}</html>", 404)


def _echo_url_200(request: Request) -> Response:
    return raw(f"proxy says: {request.url}", 200)


FAILURES = {
    "code-31-echo": lambda req: reply(31, False, f"bad {DBID}/{HOST_UUID} user {USER_ID}"),
    "code-11": lambda req: reply(11, False, "not connected"),
    "code-22": lambda req: reply(22, False, f"too many for {USER_ID}"),
    "unknown-code": lambda req: reply(77, False, req.url),
    "http-500": lambda req: raw(f"error at {req.url}", 500),
    "http-404-echo": _echo_url,
    "garbage-echo": _echo_url_200,
    "allow-mismatch": lambda req: reply(message=req.url, allow_clientless=False),
}


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_no_credential_in_errors_logs_or_events(serve, make_api, caplog, events, name):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    serve(FAILURES[name])
    with pytest.raises(ApiError) as info:
        make_api().set_allow_clientless(HOST, True)
    _assert_no_leak(info.value, caplog, events)


def test_no_credential_after_a_timeout_or_refused_connection(serve, make_api, caplog, events):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    serve(lambda req: (time.sleep(0.5), reply())[1])
    with pytest.raises(ApiTransientError) as timed_out:
        make_api(retry=NO_RETRY, timeout=0.1).connect(HOST)
    _assert_no_leak(timed_out.value, caplog, events)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ApiTransientError) as refused:
        make_api(api_url=f"http://127.0.0.1:{port}/api/{{call}}").connect(HOST)
    _assert_no_leak(refused.value, caplog, events)


def test_urllib3_debug_log_is_captured_but_its_query_is_cut(serve, make_api, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    serve(reply())
    make_api().connect(HOST)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    assert any("/api/connect?<query hidden>" in line for line in lines)
    assert leaks("\n".join(lines)) == []


def test_reprs_hold_no_credentials(make_api):
    api = make_api()
    assert leaks(repr(api)) == [] and leaks(repr(api.provider)) == [] and leaks(repr(HOST)) == []


def _client_log(caplog) -> list[str]:
    """Every record but the test server's own access log (werkzeug)."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(r) for r in caplog.records if not r.name.startswith("werkzeug")]


def _assert_no_leak(err: BaseException, caplog, events) -> None:
    assert err.__cause__ is None and err.__context__ is None
    texts = [
        str(err),
        repr(err),
        repr(err.args),
        "".join(traceback.format_exception(err)),
        "\n".join(_client_log(caplog)),
        "\n".join(text for _, text in events.messages),
    ]
    assert _client_log(caplog), "expected log records to inspect"
    for text in texts:
        assert leaks(text) == [], text


# --- get_client_script (SPEC 1b) ------------------------------------------------------

# what a provider generates: the ids as constants, in its own quoting
CLIENT_SCRIPT = (
    "# generated by the provider\n"
    f"USER_ID = {USER_ID!r}\nDBID = {DBID!r}\nHOST_UUID = {json.dumps(HOST_UUID)}\n"
    "print('polling')\n"
)


def test_get_client_script_asks_with_the_api_key_and_client_id_only(serve, make_api):
    script = serve(reply(script=CLIENT_SCRIPT))
    got = make_api().get_client_script(PROVIDER_HOST)
    assert got == CLIENT_SCRIPT  # exact, unmasked: it is what gets installed
    assert script.paths == ["/api/get_client_script"]
    assert script.queries == [{"api_key": API_KEY, "client_id": CLIENT_ID}]


@pytest.mark.parametrize("code, cls", [(32, InvalidApiKey), (41, InvalidRegion)])
def test_client_script_codes_that_are_never_retried(serve, make_api, clock, code, cls):
    script = serve(reply(code, False, "no such thing"))
    with pytest.raises(cls) as info:
        make_api().get_client_script(PROVIDER_HOST)
    assert script.count == 1 and clock.sleeps == []
    err = info.value
    assert (err.code, err.call, err.host) == (code, "get_client_script", "pi-01")
    assert f"error_code {code}" in str(err) and "no such thing" in str(err)


@pytest.mark.parametrize(
    "code, cls", [(40, ForwardingServerUnreachable), (45, ProviderInternalError)]
)
def test_client_script_transient_codes_back_off_then_raise(serve, make_api, clock, code, cls):
    script = serve(reply(code, False, "try later"))
    with pytest.raises(cls) as info:
        make_api(retry=FOUR).get_client_script(PROVIDER_HOST)
    assert script.count == FOUR.attempts and len(clock.sleeps) == FOUR.attempts - 1
    assert all(0.0 <= s <= FOUR.ceiling(n) for n, s in enumerate(clock.sleeps))
    assert "gave up after 4 attempts" in str(info.value)


def test_client_script_45_that_clears_returns_the_script(serve, make_api, clock):
    script = serve(reply(45, False, "oops"), reply(40, False, "fw down"), reply(script="x = 1\n"))
    assert make_api().get_client_script(PROVIDER_HOST) == "x = 1\n"
    assert script.count == 3 and len(clock.sleeps) == 2


@pytest.mark.parametrize("body", [{}, {"script": None}, {"script": 5}, {"script": ["a"]}])
def test_an_ok_reply_without_a_script_string_is_transient(serve, make_api, body):
    script = serve(reply(**body))
    with pytest.raises(ApiTransientError, match="no script"):
        make_api().get_client_script(PROVIDER_HOST)
    assert script.count == FOUR.attempts


@pytest.mark.parametrize(
    "host, api_key, missing",
    [(HOST, API_KEY, "client_id"), (PROVIDER_HOST, None, "api_key")],
)
def test_client_script_without_its_credentials_is_refused_before_a_request(
    serve, make_api, host, api_key, missing
):
    script = serve(reply(script="x = 1\n"))
    api = make_api(api_key=api_key)
    with pytest.raises(UsageError, match=missing):
        api.get_client_script(host)
    with pytest.raises(UsageError, match=missing):
        api.raw_call("get_client_script", host)
    assert script.count == 0


def test_raw_client_script_masks_the_ids_in_the_script(serve, make_api):
    serve(reply(script=CLIENT_SCRIPT, echo=f"{API_KEY} {CLIENT_ID}"))
    got = make_api().raw_call("get_client_script", PROVIDER_HOST)
    assert leaks(json.dumps(got)) == []
    assert "print('polling')" in got["script"]


SCRIPT_FAILURES = {
    "32-echo": lambda req: reply(32, False, f"bad key {API_KEY} for {CLIENT_ID}"),
    "41": lambda req: reply(41, False, f"region of {CLIENT_ID}?"),
    "45-url": lambda req: reply(45, False, req.url),
    "http-404-echo": _echo_url,
    "garbage-echo": _echo_url_200,
    "no-script": lambda req: reply(message=f"{API_KEY}"),
}


@pytest.mark.parametrize("name", sorted(SCRIPT_FAILURES))
def test_no_api_key_or_client_id_in_errors_logs_or_events(serve, make_api, caplog, events, name):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    serve(SCRIPT_FAILURES[name])
    with pytest.raises(ApiError) as info:
        make_api().get_client_script(PROVIDER_HOST)
    _assert_no_leak(info.value, caplog, events)


def test_reprs_hold_no_api_key_or_client_id(make_api):
    api = make_api()
    for text in (repr(api), repr(api.provider), repr(PROVIDER_HOST), str(api.provider)):
        assert leaks(text) == [], text


def test_opening_within_a_budget_never_waits_for_a_slot_past_it(serve, make_api, clock):
    """The shared limiter is busy for the next minute: a call that must be over
    within 20 s sends nothing and fails at once, instead of landing later."""
    script = serve(reply(allow_clientless=True))
    limiter = RateLimiter(1.0 / 60, clock)
    api = make_api(limiter=limiter)
    assert limiter.acquire()  # someone took the only slot of this minute
    t0 = clock.now()
    with pytest.raises(ApiTransientError, match="no API call slot"):
        api.set_allow_clientless(HOST, True, within=20.0)
    assert clock.now() - t0 < 20.0
    assert script.count == 0


def test_opening_within_a_budget_goes_through_on_an_idle_limiter(serve, make_api, clock):
    script = serve(reply(allow_clientless=True))
    api = make_api(timeout=5.0)
    api.set_allow_clientless(HOST, True, within=6.0)
    assert script.count == 1


class TickingClock(FakeClock):
    """Time passes while deployer works: each look at the clock costs 1 ms."""

    def now(self) -> float:
        self.advance(0.001)
        return super().now()


def test_the_last_retry_inside_a_budget_is_sent_not_refused_at_the_edge(serve, server, events):
    """The wait before the last retry ran to the very end of the budget, so the
    retry found no time left and was refused: the soak's last look lost its last
    try to a 502 storm that had just ended (found by the chaos campaign)."""
    script = serve(raw("bad gateway", 502), reply())
    provider = ProviderConfig(
        api_url=server.url_for("/api/{call}"),
        ssh_host="fw1.example",
        user_id=Secret(USER_ID),
        rate_limit=1000.0,
        timeout=5.0,
    )
    clock = TickingClock()
    patient = RetryPolicy(attempts=30, base=100.0, cap=100.0, deadline=1000.0)
    api = ProviderAPI(provider, retry=patient, clock=clock, events=events, rng=random.Random(3))
    try:
        t0 = clock.now()
        assert api.client_status(HOST, within=5.0 + 3.0) is True
        assert script.count == 2  # the retry waited (almost) to the edge, and went out
        assert 2.5 < clock.now() - t0 <= 3.0
    finally:
        api.close()
