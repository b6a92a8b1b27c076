"""The SSHReach provider API client (docs/reference/api-codes.md).

One :class:`ProviderAPI` per run, shared by every host's thread: one
``requests.Session`` with a connection pool sized for parallel use, a timeout
on every request, the run-wide :class:`~deployer.ratelimit.RateLimiter`, and
retries by a :class:`~deployer.retry.RetryPolicy`.

How a reply is judged (docs/reference/api-codes.md is the user-facing table):

- ``error_code`` 0 with ``success: true``: ok.
- ``client_status`` answering 24 with ``success: true``: the client is offline
  (not an error).
- any other code raises its :mod:`deployer.errors` class; 11, 12, 22, 40 and
  45 are retried by the default policies, 21, 23, 24, 31, 32 and 41 never;
  unknown codes raise :class:`~deployer.errors.UnknownApiError` and are never
  retried. A 22 also slows the shared rate limiter.
- ``get_client_script`` is asked with the account's ``api_key`` and the
  host's ``client_id`` instead of the host's ids; its reply must also carry a
  ``script`` string (else it is a malformed, transient reply). That script is
  the one thing returned unmasked: it is what gets installed.
- network errors, timeouts, HTTP 5xx, HTTP 429 and 2xx bodies that are not
  the provider's JSON reply are transient (:class:`~deployer.errors.ApiTransientError`).
- any other HTTP status (3xx, 4xx) without the provider's JSON reply raises a plain
  :class:`~deployer.errors.ApiError` that is not retried (usually a wrong
  ``api_url``). Redirects are not followed: they would resend the credentials.

Credentials (``user_id``, ``dbid``, ``host_uuid``, ``client_id``, ``api_key``)
travel only in the query string. They never reach an exception,
a log record or an event: messages are built here from our own words and the
provider's scrubbed message, requests' exceptions (which quote the URL) are
reduced to their kind, and the URL query is cut out of urllib3's log records.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from deployer.clock import Clock
from deployer.errors import (
    API_ERRORS_BY_CODE,
    ApiError,
    ApiTransientError,
    UnknownApiError,
    UsageError,
)
from deployer.events import EventSink
from deployer.model import HostConfig, ProviderConfig
from deployer.ratelimit import Limiter, RateLimiter
from deployer.retry import DEFAULT_RETRY, RetryPolicy
from deployer.secrets import scrub, secret_forms

log = logging.getLogger("deployer.api")

SCRIPT_CALL = "get_client_script"
CALLS: tuple[str, ...] = (
    "connect",
    "disconnect",
    "client_status",
    "set_allow_clientless",
    SCRIPT_CALL,
)

CODE_MEANINGS: dict[int, str] = {
    0: "ok",
    11: "not connected; the tunnel could not be opened",
    12: "not disconnected; the tunnel may stay open",
    21: "invalid api call; check api_url",
    22: "too many API calls",
    23: "client blocked",
    24: "client inactive",
    31: "wrong data; check user_id, dbid, host_uuid and ports_id",
    32: "invalid api key; check [provider] api_key",
    40: "forwarding server unreachable",
    41: "invalid region; check the client's region at the provider",
    45: "provider internal error",
}

OFFLINE_CODE = 24
TOO_MANY_CALLS_CODE = 22
_MESSAGE_LIMIT = 200  # characters of provider text quoted in an error
SEND_SLACK = 0.05  # seconds a retry within a budget keeps from its edge (time passes as it starts)

# urllib3 loggers that may print a request URL (with its credential query).
_URLLIB3_LOGGERS = (
    "urllib3.connectionpool",
    "urllib3.poolmanager",
    "urllib3.util.retry",
    "urllib3.connection",
    "urllib3.response",
)
_QUERY_RE = re.compile(r"\?[^\s'\"<>]+")


def hide_query(text: str) -> str:
    """Cut every URL query string out of ``text``."""
    return _QUERY_RE.sub("?<query hidden>", text)


class UrlQueryFilter(logging.Filter):
    """Cuts URL queries out of urllib3's log records (they hold credentials)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: drop its arguments, keep the format
            message = str(record.msg)
        record.msg, record.args = hide_query(message), None
        return True


def install_urllib3_filter() -> None:
    """Attach :class:`UrlQueryFilter` to urllib3's loggers (idempotent)."""
    for name in _URLLIB3_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UrlQueryFilter) for f in logger.filters):
            logger.addFilter(UrlQueryFilter())


def _network_reason(exc: BaseException) -> str:
    """A URL-free description of a requests exception: the OS error if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and not isinstance(cur, requests.RequestException):
            if cur.strerror:
                return cur.strerror
        todo.extend([cur.__cause__, cur.__context__, getattr(cur, "reason", None)])
        todo.extend(a for a in cur.args if isinstance(a, BaseException))
    return type(exc).__name__


def _is_spec_reply(reply: Any) -> bool:
    return (
        isinstance(reply, dict)
        and type(reply.get("error_code")) is int
        and isinstance(reply.get("success"), bool)
        and isinstance(reply.get("message"), str)
    )


class ProviderAPI:
    """The four SSHReach calls with retries, rate limit, counters and redaction."""

    def __init__(
        self,
        provider: ProviderConfig,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        limiter: Limiter | None = None,
        clock: Clock | None = None,
        pool_size: int = 16,
        events: EventSink | None = None,
        rng: random.Random | None = None,
    ):
        self.provider = provider
        self.retry = retry
        self._clock = clock or Clock()
        self.limiter: Limiter = limiter or RateLimiter(provider.rate_limit, self._clock)
        self._events = events or EventSink()
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._too_many = 0
        self._session = self._make_session(pool_size)
        install_urllib3_filter()

    @staticmethod
    def _make_session(pool_size: int) -> requests.Session:
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def __repr__(self) -> str:
        return f"ProviderAPI(api_url={self.provider.api_url!r}, retry={self.retry!r})"

    def __enter__(self) -> ProviderAPI:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    # --- counters -----------------------------------------------------------

    def calls_for(self, host_name: str) -> int:
        """HTTP requests made for ``host_name`` so far, retries included."""
        with self._lock:
            return self._calls[host_name]

    @property
    def too_many_calls_seen(self) -> int:
        """How many ``22 too many API calls`` replies this client has had."""
        with self._lock:
            return self._too_many

    # --- the calls ----------------------------------------------------------

    def connect(self, host: HostConfig) -> None:
        """Open the host's tunnel on the forwarding server."""
        self.call("connect", host)

    def disconnect(self, host: HostConfig) -> None:
        """Close the host's tunnel."""
        self.call("disconnect", host)

    def client_status(
        self,
        host: HostConfig,
        *,
        retry: RetryPolicy | None = None,
        within: float | None = None,
        idle: Callable[[float], None] | None = None,
    ) -> bool:
        """True if the client is online; False if the provider says offline (24).
        ``retry``, ``within`` and ``idle`` as for :meth:`set_allow_clientless`."""
        reply = self.call("client_status", host, retry=retry, within=within, idle=idle)
        return reply["error_code"] == 0

    def set_allow_clientless(
        self,
        host: HostConfig,
        allow: bool,
        *,
        retry: RetryPolicy | None = None,
        within: float | None = None,
        idle: Callable[[float], None] | None = None,
    ) -> None:
        """Set allow-clientless; returns only once the reply confirms ``allow``.

        ``within``: seconds after which no request may still be under way (no
        limiter slot, no retry, no HTTP request that could land later): opening
        the window must not land after the armed guard stopped waiting for it.
        ``idle(seconds)`` spends the waits between retries instead of a sleep
        (the workflow stays heard by the host's guard meanwhile); it must not
        raise."""
        self.call("set_allow_clientless", host, allow=allow, retry=retry, within=within, idle=idle)

    def get_client_script(self, host: HostConfig) -> str:
        """The script the provider generated for ``host``'s ``client_id``
        (docs/how-to/provider-source.md).

        Returned exactly as the provider sent it, credentials and all (it is
        the script to install): keep it out of output, logs and errors."""
        self._check(SCRIPT_CALL, None, host)
        reply = self._with_retries(SCRIPT_CALL, host, None, self.retry, raw=False)
        return reply["script"]

    def call(
        self,
        call: str,
        host: HostConfig,
        *,
        allow: bool | None = None,
        retry: RetryPolicy | None = None,
        within: float | None = None,
        idle: Callable[[float], None] | None = None,
    ) -> dict[str, Any]:
        """Make ``call`` for ``host`` under ``retry`` (and, given ``within``, done
        within that many seconds, waiting between tries with ``idle``); return the
        provider's reply (credentials it echoed masked)."""
        self._check(call, allow, host)
        not_after = None if within is None else self._clock.now() + within
        reply = self._with_retries(
            call, host, allow, retry or self.retry, raw=False, not_after=not_after, idle=idle
        )
        return self._masked(reply, host)

    def raw_call(self, call: str, host: HostConfig, allow: bool | None = None) -> dict[str, Any]:
        """One call as the provider answers it: transient failures are retried,
        any JSON reply of the provider (whatever its code) is returned, not raised (masked)."""
        self._check(call, allow, host)
        reply = self._with_retries(call, host, allow, self.retry.without_codes(), raw=True)
        return self._masked(reply, host)

    # --- machinery ------------------------------------------------------------

    def _check(self, call: str, allow: bool | None, host: HostConfig) -> None:
        if call not in CALLS:
            raise UsageError(f"unknown API call {call!r}; use one of: {', '.join(CALLS)}")
        if (call == "set_allow_clientless") != (allow is not None):
            raise UsageError("allow=true|false goes with set_allow_clientless and no other call")
        if call == SCRIPT_CALL and self.provider.api_key is None:
            raise UsageError(
                f"{SCRIPT_CALL} needs the account's api_key; add api_key = "
                '"${SSHREACH_API_KEY}" to [provider]'
            )
        if call == SCRIPT_CALL and host.client_id is None:
            raise UsageError(
                f"{SCRIPT_CALL} for host {host.name} needs its client_id; add "
                f'client_id = "..." to [hosts.{host.name}]'
            )

    def _with_retries(
        self,
        call: str,
        host: HostConfig,
        allow: bool | None,
        policy: RetryPolicy,
        raw: bool,
        not_after: float | None = None,
        idle: Callable[[float], None] | None = None,
    ) -> dict[str, Any]:
        start = self._clock.now()
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(call, host, allow, raw, not_after)
            except ApiError as exc:
                wait = self._next_wait(policy, exc, attempt, start, not_after)
                if wait is None:
                    self._give_up(exc, attempt, policy)
                    raise
                self._announce(host, exc, attempt, policy, wait)
            if idle is None:
                self._clock.sleep(wait)
            else:
                idle(wait)

    def _next_wait(
        self,
        policy: RetryPolicy,
        exc: ApiError,
        attempt: int,
        start: float,
        not_after: float | None = None,
    ) -> float | None:
        if not policy.should_retry(exc) or attempt >= policy.attempts_for(exc):
            return None
        end = start + policy.deadline
        if not_after is not None:  # the next try must be able to finish in time
            end = min(end, not_after - self.provider.timeout)
        # the retry must still find time when it starts: the clock moves on meanwhile
        remaining = end - self._clock.now() - SEND_SLACK
        if remaining <= 0:
            return None
        return min(policy.delay(attempt - 1, self._rng), remaining)

    @staticmethod
    def _give_up(exc: ApiError, attempt: int, policy: RetryPolicy) -> None:
        if attempt > 1:
            exc.message = f"{exc.message} (gave up after {attempt} attempts)"
            exc.args = (exc.message,)
        log.debug("%s", exc.message)

    def _announce(
        self, host: HostConfig, exc: ApiError, attempt: int, policy: RetryPolicy, wait: float
    ) -> None:
        text = f"{exc.message}; retry {attempt}/{policy.attempts - 1} in {wait:.1f}s"
        log.info("%s", text)
        self._events.message(host.name, text)

    def _attempt(
        self,
        call: str,
        host: HostConfig,
        allow: bool | None,
        raw: bool,
        not_after: float | None = None,
    ) -> dict[str, Any]:
        if not_after is None:
            self.limiter.acquire()
        else:  # a slot late enough that the request could land after not_after: none
            max_wait = not_after - self.provider.timeout - self._clock.now()
            if max_wait < 0:
                why = "no time left for another call within its budget"
                raise self._error(ApiTransientError, call, host, why)
            if not self.limiter.acquire(max_wait=max_wait):
                why = "no API call slot in the time left (the shared rate limit is busy)"
                raise self._error(ApiTransientError, call, host, why)
        with self._lock:
            self._calls[host.name] += 1
        started = self._clock.now()
        response, failure = self._send(call, host, allow)
        if failure is not None:
            log.debug("%s %s: %s", call, host.name, failure)
            raise self._error(ApiTransientError, call, host, failure)
        assert response is not None  # _send gives a response or a failure
        reply = self._reply(call, host, response)
        log.debug(
            "%s %s: HTTP %s, error_code %s in %.3fs",
            call,
            host.name,
            response.status_code,
            reply["error_code"],
            self._clock.now() - started,
        )
        return self._judge(call, host, allow, reply, raw)

    def _query(self, call: str, host: HostConfig, allow: bool | None) -> dict[str, str]:
        if call == SCRIPT_CALL:  # _check made sure both are there
            assert self.provider.api_key is not None and host.client_id is not None
            return {"api_key": self.provider.api_key.reveal(), "client_id": host.client_id.reveal()}
        query = {
            "user_id": self.provider.user_id.reveal(),
            "dbid": host.dbid.reveal(),
            "host_uuid": host.host_uuid.reveal(),
            "ports_id": str(host.ports_id),
        }
        if allow is not None:
            query["allow"] = "true" if allow else "false"
        return query

    def _send(
        self, call: str, host: HostConfig, allow: bool | None
    ) -> tuple[requests.Response | None, str | None]:
        """GET the call. Returns (response, None) or (None, URL-free failure text).

        requests' exceptions quote the URL with its query, so none of them
        leaves this function: they become a short description instead.
        """
        url = self.provider.api_url.replace("{call}", call)
        timeout = self.provider.timeout
        try:
            response = self._session.get(
                url, params=self._query(call, host, allow), timeout=timeout, allow_redirects=False
            )
        except requests.exceptions.Timeout:
            return None, f"no reply within {timeout:g}s (timeout)"
        except requests.exceptions.ConnectionError as exc:
            return None, f"connection failed: {self._clean(_network_reason(exc), host)}"
        except requests.exceptions.RequestException as exc:
            return None, f"request failed: {type(exc).__name__}"
        return response, None

    def _reply(self, call: str, host: HostConfig, response: requests.Response) -> dict[str, Any]:
        """The provider's JSON reply in ``response``, or the transient/HTTP error it stands for."""
        status = response.status_code
        if status >= 500:
            raise self._error(ApiTransientError, call, host, f"HTTP {status} from the provider")
        try:
            reply = json.loads(response.content)
        except (ValueError, RecursionError):
            reply = None
        if _is_spec_reply(reply) and (200 <= status < 300 or reply["error_code"] != 0):
            return reply
        if status == 429:
            self._saw_too_many_calls()
            raise self._error(ApiTransientError, call, host, "HTTP 429 (too many requests)")
        if not 200 <= status < 300:
            text = f"HTTP {status} from the provider (not retried; check api_url)"
            raise self._error(ApiError, call, host, text)
        excerpt = self._clean(response.content[:80].decode("utf-8", "replace"), host)
        text = f"HTTP {status} but the reply is not the provider's JSON: {excerpt!r}"
        raise self._error(ApiTransientError, call, host, text)

    def _judge(
        self, call: str, host: HostConfig, allow: bool | None, reply: dict[str, Any], raw: bool
    ) -> dict[str, Any]:
        code, success = reply["error_code"], reply["success"]
        if code == TOO_MANY_CALLS_CODE:
            self._saw_too_many_calls()
        if raw:
            if code == 0:
                self.limiter.record_success()
            return reply
        if code == 0 and not success:
            text = "inconsistent reply: error_code 0 with success false"
            raise self._error(ApiTransientError, call, host, text)
        offline = code == OFFLINE_CODE and success and call == "client_status"
        if code != 0 and not offline:
            raise self._code_error(call, host, reply)
        if allow is not None and reply.get("allow_clientless") is not allow:
            said = json.dumps(reply.get("allow_clientless"))
            text = f"reply says allow_clientless={said}, expected {json.dumps(allow)}"
            raise self._error(ApiTransientError, call, host, text)
        if call == SCRIPT_CALL and not isinstance(reply.get("script"), str):
            text = "reply has no script (a string) beside error_code 0"
            raise self._error(ApiTransientError, call, host, text)
        self.limiter.record_success()
        return reply

    def _saw_too_many_calls(self) -> None:
        with self._lock:
            self._too_many += 1
        self.limiter.slow_down()

    def _code_error(self, call: str, host: HostConfig, reply: dict[str, Any]) -> ApiError:
        code = reply["error_code"]
        cls = API_ERRORS_BY_CODE.get(code, UnknownApiError)
        meaning = CODE_MEANINGS.get(code, "unknown error code")
        said = self._clean(reply["message"], host)
        text = f"error_code {code} ({meaning}), provider says {said!r}"
        return self._error(cls, call, host, text, code=code)

    def _error(
        self,
        cls: type[ApiError],
        call: str,
        host: HostConfig,
        text: str,
        code: int | None = None,
    ) -> ApiError:
        message = f"API call {call} for host {host.name} failed: {text}"
        return cls(self._clean(message, host, limit=None), call=call, code=code, host=host.name)

    def _secrets(self, host: HostConfig) -> list[str]:
        values = [self.provider.user_id.reveal(), *host.secret_values()]
        if self.provider.api_key:
            values.append(self.provider.api_key.reveal())
        return secret_forms(values)

    def _clean(self, text: str, host: HostConfig, limit: int | None = _MESSAGE_LIMIT) -> str:
        """Provider or library text made safe to show: no credentials, no query,
        one line, bounded length."""
        text = " ".join(hide_query(scrub(str(text), self._secrets(host))).split())
        if limit is not None and len(text) > limit:
            text = text[: limit - 1] + "…"
        return text

    def _masked(self, reply: Any, host: HostConfig) -> Any:
        """The reply with any credential the provider echoed (in a string) masked."""
        if isinstance(reply, str):
            return scrub(reply, self._secrets(host))
        if isinstance(reply, dict):
            return {self._masked(k, host): self._masked(v, host) for k, v in reply.items()}
        if isinstance(reply, list):
            return [self._masked(v, host) for v in reply]
        return reply


# --- the fleet's status (deployer status) ------------------------------------------


@dataclass(frozen=True)
class HostStatus:
    """One host's ``client_status``: online, offline (24) or unreachable (error)."""

    host: str
    online: bool
    error_code: int | None  # 0 online, 24 offline, else the failure's code (None: transient)
    error: str | None = None  # the failure's message, credential-free

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "online": self.online, "error_code": self.error_code}


def host_status(api: ProviderAPI, host: HostConfig) -> HostStatus:
    """Ask the provider about one host; a failure becomes an offline status."""
    try:
        online = api.client_status(host)
    except ApiError as exc:
        return HostStatus(host.name, False, exc.code, str(exc))
    return HostStatus(host.name, online, 0 if online else OFFLINE_CODE)


def fleet_status(api: ProviderAPI, hosts: Sequence[HostConfig], parallel: int) -> list[HostStatus]:
    """``host_status`` of every host, ``parallel`` at a time, in the given order."""
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        return list(pool.map(lambda host: host_status(api, host), hosts))
