"""A faithful local SSHReach provider: the API of docs/reference/api-codes.md (and
``get_client_script``), the client poll endpoint (docs/how-to/client-template.md), the offline rule,
fault injection and an independent record of what a run did
(``GET /sandbox/state``).

The simulator only decides; the forwarding SSH server
(:mod:`deployer.sandbox.forwarding`) carries the tunnels, which belong to the
clients: a client polls, reads ``command``, and starts or ends its own
``ssh -R``. So ``connect`` sets the command to "1" and the tunnel appears at
the client's next poll; ``disconnect`` sets it to "0" and has the forwarding
server end the host's session at once (not a cut).

The rule that matters most: while a host's allow-clientless is false, a client
that goes offline (no poll for ``offline_after`` seconds) has its forwarding
session ended, with every connection through it, checked every
:data:`MONITOR_INTERVAL` seconds, and counted in ``tunnel_cuts``. A deployer
that forgets the window loses its own SSH session here exactly as it would in
production.

Routes (all on 127.0.0.1):

- ``GET|POST /api/{call}`` — the provider API (``connect``, ``disconnect``,
  ``client_status``, ``set_allow_clientless``, ``get_client_script``);
- ``GET /poll/get_port4.php`` — the clients' poll (so ``poll_url`` is ``{base}/poll``);
- ``GET /sandbox/state`` — the state document (docs/how-to/sandbox.md);
- ``GET|POST /sandbox/faults`` — read or change faults at run time;
- ``POST /sandbox/reset-counters`` — zero the counters, drop closed exposures;
- ``GET|POST /sandbox/clients`` — the runner's schedule of client stops and
  starts (:class:`deployer.sandbox.clients.Schedule`), when it has one.

Credentials arrive in query strings: nothing here logs a query string.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deployer.sandbox.forwarding import Forwarder, NoForwarder, Tunnel

log = logging.getLogger(__name__)

HOST_CALLS = ("connect", "disconnect", "client_status", "set_allow_clientless")
API_CALLS = (*HOST_CALLS, "get_client_script")
ID_PARAMS = ("user_id", "dbid", "host_uuid", "ports_id")
POLL_PATH = "/poll/get_port4.php"
POLL_IDS = ("uid", "dbid", "key", "ports_id")  # user_id, dbid, host_uuid, ports_id
FORWARDING_SERVER = "127.0.0.1"
MONITOR_INTERVAL = 0.05  # seconds between offline checks
CONNECT_WAIT_POLL = 0.05  # seconds between tunnel checks under the connect_wait fault
DEFAULT_RATE_LIMIT = 50.0  # API calls per second per user_id
DEFAULT_OFFLINE_AFTER = 1.5
MAX_BODY = 64 * 1024
SCRIPT_ERROR_CODES = (0, 40, 41, 45)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_VERSION = 64

MESSAGES = {
    0: "OK",
    11: "not connected",
    12: "not disconnected",
    21: "invalid api call",
    22: "too many api calls",
    23: "client blocked",
    24: "client inactive",
    31: "wrong data",
    32: "invalid api key",
    40: "forwarding server unreachable",
    41: "invalid region",
    45: "internal error",
}

FAIL_BODY = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
GARBAGE_BODY = b"<html><body>Service temporarily in maintenance</body></html>\n"


@dataclass(frozen=True)
class Faults:
    """What the simulator does wrong on purpose (and its timing knobs).

    ``rate_limit`` 0 means unlimited. ``latency``, ``fail_rate`` and
    ``garbage_rate`` apply to the API calls only; ``poll_fail_rate`` to the
    clients' polls only; nothing applies to the admin routes.
    """

    latency: float = 0.0  # seconds added to every API reply
    fail_rate: float = 0.0  # share of API replies that are HTTP 502 with an HTML body
    garbage_rate: float = 0.0  # share of API replies that are HTTP 200 but not JSON
    rate_limit: float = DEFAULT_RATE_LIMIT  # API calls per second per user_id (22 above)
    blocked: tuple[str, ...] = ()  # host names answered with 23 (polls: an error)
    offline_after: float = DEFAULT_OFFLINE_AFTER  # seconds without a poll -> offline
    connect_wait: float = 0.0  # >0: connect waits up to this for the tunnel, else 11
    client_script_error: int = 0  # get_client_script answers this code (40, 41, 45)
    poll_fail_rate: float = 0.0  # share of polls answered HTTP 502
    disconnect_ssl_when_server_unreachable: bool = False  # the polls' "T"/"F"
    offer_upgrade: bool = False  # the polls' upgrade "T"

    def updated(self, changes: dict[str, Any]) -> Faults:
        """A copy with ``changes`` applied; ValueError names a bad key or value."""
        known = {f.name for f in fields(self)}
        for key in changes:
            if key not in known:
                raise ValueError(f"unknown fault {key!r} (known: {', '.join(sorted(known))})")
        values = dict(changes)
        if "blocked" in values:
            blocked = values["blocked"]
            if isinstance(blocked, str) or not all(isinstance(b, str) for b in blocked):
                raise ValueError("blocked must be a list of host names")
            values["blocked"] = tuple(blocked)
        numbers = ("latency", "fail_rate", "garbage_rate", "rate_limit", "offline_after")
        for key in (*numbers, "connect_wait", "poll_fail_rate"):
            if key in values:
                values[key] = _number(key, values[key])
        for key in ("fail_rate", "garbage_rate", "poll_fail_rate"):
            if key in values and values[key] > 1:
                raise ValueError(f"{key} must be between 0 and 1")
        if values.get("offline_after", 1) <= 0:
            raise ValueError("offline_after must be > 0")
        for key in ("disconnect_ssl_when_server_unreachable", "offer_upgrade"):
            if key in values and not isinstance(values[key], bool):
                raise ValueError(f"{key} must be true or false")
        code = values.get("client_script_error", 0)
        if isinstance(code, bool) or code not in SCRIPT_ERROR_CODES:
            raise ValueError(f"client_script_error must be one of {SCRIPT_ERROR_CODES}")
        return replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocked"] = list(self.blocked)
        return data


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if value < 0:
        raise ValueError(f"{key} must be >= 0")
    return float(value)


@dataclass(frozen=True)
class HostSpec:
    """A simulated host's identity: what the provider knows about it."""

    name: str
    dbid: str
    host_uuid: str
    ports_id: int
    iport: int  # the tunnel's port on the forwarding server
    sshd_port: int = 0  # the host's own SSH server (reported in the state only)
    client_id: str = ""  # for get_client_script


@dataclass
class HostRecord:
    """What the simulator knows about one host at run time."""

    spec: HostSpec
    command: str = "0"  # what the next poll answers: "1" a tunnel should be up
    last_poll: float | None = None  # monotonic
    polls: int = 0
    script_sha256: str | None = None
    version: str | None = None
    upgradable: bool | None = None
    allow_clientless: bool = False
    tunnel_cuts: int = 0  # sessions ended by the offline rule
    api_calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(API_CALLS, 0))
    exposures: list[list[float | None]] = field(default_factory=list)


class TokenBucket:
    """``rate`` calls per second with a burst of one second's worth; 0 = unlimited."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = max(rate, 1.0)
        self.stamp = time.monotonic()

    def take(self, rate: float) -> bool:
        if rate <= 0:
            return True
        now = time.monotonic()
        self.rate = rate
        self.tokens = min(max(rate, 1.0), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def reply(code: int, message: str | None = None, **extra: Any) -> dict[str, Any]:
    """A provider reply (docs/reference/api-codes.md); ``extra`` keys come first
    (as in the allow_clientless reply)."""
    body: dict[str, Any] = dict(extra)
    body["message"] = message if message is not None else MESSAGES[code]
    body["error_code"] = code
    body["success"] = code == 0
    return body


@dataclass(frozen=True)
class HttpReply:
    status: int
    content_type: str
    body: bytes

    @classmethod
    def json(cls, data: Any, status: int = 200) -> HttpReply:
        return cls(status, "application/json", json.dumps(data).encode() + b"\n")


@dataclass(frozen=True)
class _Later:
    """The part of a call that must not hold the simulator's lock: waiting for a
    tunnel (``connect`` under connect_wait) or ending one (``disconnect``)."""

    action: str
    iport: int
    seconds: float = 0.0


class Simulator:
    """The provider: API semantics, polls, the offline rule, faults and the state record.

    The HTTP layer (:meth:`start`) is thin; :meth:`api`, :meth:`poll` and
    :meth:`state` hold the behaviour and are called directly by unit tests.
    ``forwarder`` is the forwarding server that carries the tunnels;
    ``scripts_dir`` holds ``CLIENT_ID.py``, what get_client_script returns.
    """

    def __init__(
        self,
        user_id: str,
        hosts: list[HostSpec],
        forwarder: Forwarder | None = None,
        faults: Faults | None = None,
        port: int = 0,
        rng: random.Random | None = None,
        api_key: str = "",
        scripts_dir: Path | None = None,
    ):
        self.user_id = user_id
        self.api_key = api_key
        self.faults = faults or Faults()
        self.port = port
        self.forwarder: Forwarder = forwarder or NoForwarder()
        self.scripts_dir = scripts_dir
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._hosts = {h.name: HostRecord(h) for h in hosts}
        self._by_ids = {(h.dbid, h.host_uuid, str(h.ports_id)): h.name for h in hosts}
        self._by_client_id = {h.client_id: h.name for h in hosts if h.client_id}
        self._buckets: dict[str, TokenBucket] = {}
        self._totals: dict[str, int] = {"requests": 0, "fail": 0, "garbage": 0, "polls": 0}
        self._codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.clients: Any = None  # a deployer.sandbox.clients.Schedule (the runner's)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._httpd = _HttpServer(("127.0.0.1", self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        self._http_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._http_thread.start()
        self._monitor = threading.Thread(target=self._monitor_loop, name="monitor", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._monitor is not None:
            self._monitor.join(2)

    @property
    def iports(self) -> dict[str, int]:
        return {name: record.spec.iport for name, record in self._hosts.items()}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/{{call}}"

    @property
    def poll_url(self) -> str:
        return f"{self.base_url}/poll"

    # --- the API ---------------------------------------------------------------------

    def api(self, call: str, params: dict[str, list[str]]) -> HttpReply:
        """Answer one API request (``params`` as parse_qs gives them)."""
        faults = self.faults
        if faults.latency:
            time.sleep(faults.latency)
        fault = self._draw_fault(faults)
        with self._lock:
            self._totals["requests"] += 1
            record = self._identify(call, params)
            if record is not None:
                record.api_calls[call] += 1
            if fault == "fail":
                self._totals["fail"] += 1
                return HttpReply(502, "text/html", FAIL_BODY)
            if fault == "garbage":
                self._totals["garbage"] += 1
                return HttpReply(200, "text/html", GARBAGE_BODY)
            body = self._answer(call, params, record, faults)
        if isinstance(body, _Later):
            body = self._finish(body)
        with self._lock:
            code = str(body["error_code"])
            self._codes[code] = self._codes.get(code, 0) + 1
        return HttpReply.json(body)

    def _draw_fault(self, faults: Faults) -> str | None:
        if faults.fail_rate and self._rng.random() < faults.fail_rate:
            return "fail"
        if faults.garbage_rate and self._rng.random() < faults.garbage_rate:
            return "garbage"
        return None

    def _identify(self, call: str, params: dict[str, list[str]]) -> HostRecord | None:
        """The host a request names with valid ids (counted in its api_calls)."""
        if call == "get_client_script":
            if _single(params, "api_key") != self.api_key or not self.api_key:
                return None
            name = self._by_client_id.get(_single(params, "client_id") or "")
            return self._hosts[name] if name else None
        if call not in HOST_CALLS:
            return None
        values = _singles(params, ID_PARAMS)
        if values is None or values[0] != self.user_id:
            return None
        name = self._by_ids.get((values[1], values[2], values[3]))
        return self._hosts[name] if name else None

    def _answer(
        self, call: str, params: dict[str, list[str]], record: HostRecord | None, faults: Faults
    ) -> dict[str, Any] | _Later:
        if call not in API_CALLS:
            return reply(21)
        if call == "get_client_script":
            return self._call_get_client_script(params, record, faults)
        user_id = _single(params, "user_id")
        if user_id != self.user_id:
            return reply(31)
        if not self._take(faults):
            return reply(22)
        if record is None:
            return reply(31)
        if call == "set_allow_clientless" and _single(params, "allow") not in ("true", "false"):
            return reply(31)
        if record.spec.name in faults.blocked:
            return reply(23)
        return getattr(self, f"_call_{call}")(record, params, faults)

    def _take(self, faults: Faults) -> bool:
        """One call of the account against its rate limit."""
        bucket = self._buckets.setdefault(self.user_id, TokenBucket(faults.rate_limit))
        return bucket.take(faults.rate_limit)

    def _call_connect(self, record: HostRecord, params, faults: Faults) -> dict[str, Any] | _Later:
        if not self._online(record):
            return reply(24)
        record.command = "1"  # the client starts its tunnel at its next poll
        if faults.connect_wait > 0:
            return _Later("connect", record.spec.iport, faults.connect_wait)
        return reply(0)

    def _call_disconnect(self, record: HostRecord, params, faults: Faults) -> _Later:
        record.command = "0"
        return _Later("disconnect", record.spec.iport)

    def _call_client_status(self, record: HostRecord, params, faults: Faults) -> dict[str, Any]:
        if self._online(record):
            return reply(0, "online")
        return {"message": "offline", "error_code": 24, "success": True}

    def _call_set_allow_clientless(
        self, record: HostRecord, params: dict[str, list[str]], faults: Faults
    ) -> dict[str, Any]:
        allow = _single(params, "allow") == "true"
        if allow and not record.allow_clientless:
            record.exposures.append([time.time(), None])
        elif not allow and record.allow_clientless and record.exposures:
            record.exposures[-1][1] = time.time()
        record.allow_clientless = allow
        return reply(0, "success", allow_clientless=allow)

    def _call_get_client_script(
        self, params: dict[str, list[str]], record: HostRecord | None, faults: Faults
    ) -> dict[str, Any]:
        if not self.api_key or _single(params, "api_key") != self.api_key:
            return reply(32)
        if not self._take(faults):
            return reply(22)
        if record is None:
            return reply(31)
        if record.spec.name in faults.blocked:
            return reply(23)
        if faults.client_script_error:
            return reply(faults.client_script_error)
        try:
            text = (self.scripts_dir / f"{record.spec.client_id}.py").read_text()  # type: ignore[operator]
        except (OSError, TypeError, UnicodeDecodeError) as exc:
            log.error("get_client_script for %s: %s", record.spec.name, type(exc).__name__)
            return reply(45)
        return reply(0, script=text)

    def _finish(self, later: _Later) -> dict[str, Any]:
        """Wait for or end a tunnel, without the lock (polls go on meanwhile)."""
        if later.action == "disconnect":
            self.forwarder.cut(later.iport)  # a disconnect, not counted as a cut
            return reply(12) if later.iport in self.forwarder.open_ports() else reply(0)
        deadline = time.monotonic() + later.seconds
        while later.iport not in self.forwarder.open_ports():
            if time.monotonic() >= deadline:
                return reply(11)
            time.sleep(CONNECT_WAIT_POLL)
        return reply(0)

    def _online(self, record: HostRecord) -> bool:
        seen = record.last_poll
        return seen is not None and time.monotonic() - seen <= self.faults.offline_after

    # --- the clients' poll --------------------------------------------------------------

    def poll(self, params: dict[str, list[str]]) -> HttpReply:
        """Answer one client poll: the command and the tunnel's endpoint."""
        faults = self.faults
        if faults.poll_fail_rate and self._rng.random() < faults.poll_fail_rate:
            return HttpReply(502, "text/html", FAIL_BODY)
        with self._lock:
            self._totals["polls"] += 1
            record, error = self._poll_record(params)
            if record is None:
                return HttpReply.json({"error": error})
            if record.spec.name in faults.blocked:
                return HttpReply.json({"error": MESSAGES[23]})
            record.last_poll = time.monotonic()
            record.polls += 1
            record.script_sha256 = _single(params, "sha256")
            record.version = _single(params, "ver")
            record.upgradable = _single(params, "upgradable") == "True"
            return HttpReply.json(self._poll_reply(record, faults))

    def _poll_record(self, params: dict[str, list[str]]) -> tuple[HostRecord | None, str]:
        """The polling host, or None and why: every parameter is checked."""
        values = _singles(params, (*POLL_IDS, "ver", "upgradable"))
        if values is None or values[0] != self.user_id:
            return None, MESSAGES[31]
        name = self._by_ids.get((values[1], values[2], values[3]))
        if name is None:
            return None, MESSAGES[31]
        version, upgradable = values[4], values[5]
        if not version or len(version) > MAX_VERSION or upgradable not in ("True", "False"):
            return None, MESSAGES[31]
        if "sha256" in params and not SHA256_RE.match(_single(params, "sha256") or ""):
            return None, MESSAGES[31]
        return self._hosts[name], ""

    @staticmethod
    def _poll_reply(record: HostRecord, faults: Faults) -> dict[str, str]:
        return {
            "command": record.command,
            "iport": str(record.spec.iport),
            "forwarding_server": FORWARDING_SERVER,
            "disconnect_ssl_when_server_unreachable": _flag(
                faults.disconnect_ssl_when_server_unreachable
            ),
            "upgrade": _flag(faults.offer_upgrade),
        }

    # --- the offline rule ------------------------------------------------------------------

    def enforce_offline_rule(self) -> list[str]:
        """End the forwarding session of every offline host whose allow-clientless
        is false; each one is a counted cut."""
        with self._lock:
            exposed = [r for r in self._hosts.values() if self._cuttable(r)]
        if not exposed:
            return []
        forwarded = self.forwarder.open_ports()
        cut = []
        for record in exposed:
            if record.spec.iport not in forwarded:
                continue
            with self._lock:
                if not self._cuttable(record):
                    continue
                record.tunnel_cuts += 1  # counted first: whoever sees the session end sees it
            if self.forwarder.cut(record.spec.iport):
                cut.append(record.spec.name)
                log.info("%s went offline without allow-clientless: tunnel cut", record.spec.name)
            else:  # the session ended by itself meanwhile: nothing was cut
                with self._lock:
                    record.tunnel_cuts -= 1
        return cut

    def _cuttable(self, record: HostRecord) -> bool:
        return not record.allow_clientless and not self._online(record)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL):
            try:
                self.enforce_offline_rule()
            except Exception:  # noqa: BLE001 - the monitor must keep running
                log.exception("monitor error")

    # --- admin -------------------------------------------------------------------------------

    def set_faults(self, changes: dict[str, Any]) -> Faults:
        with self._lock:
            faults = self.faults.updated(changes)
            unknown = set(faults.blocked) - set(self._hosts)
            if unknown:
                raise ValueError(f"blocked: unknown host(s) {', '.join(sorted(unknown))}")
            self.faults = faults
            return faults

    def reset_counters(self) -> None:
        with self._lock:
            for record in self._hosts.values():
                record.api_calls = dict.fromkeys(API_CALLS, 0)
                record.tunnel_cuts = 0
                record.polls = 0
                record.exposures = [e for e in record.exposures if e[1] is None]
            self._totals = dict.fromkeys(self._totals, 0)
            self._codes = {}

    def state(self) -> dict[str, Any]:
        tunnels = self.forwarder.tunnels()
        now = time.monotonic()
        with self._lock:
            hosts = {name: self._host_state(r, now, tunnels) for name, r in self._hosts.items()}
            calls = dict(self._totals, by_code=dict(self._codes))
        return {
            "api_url": self.api_url,
            "poll_url": self.poll_url,
            "time": time.time(),
            "faults": self.faults.to_json(),
            "calls": calls,
            "hosts": hosts,
        }

    def _host_state(self, record: HostRecord, now: float, tunnels: dict[int, Tunnel]):
        seen = record.last_poll
        tunnel = tunnels.get(record.spec.iport)
        return {
            "online": self._online(record),
            "allow_clientless": record.allow_clientless,
            "tunnel_open": tunnel is not None,
            "tunnel_pids": list(tunnel.pids) if tunnel else [],
            "tunnel_cuts": record.tunnel_cuts,
            "polls": record.polls,
            "api_calls": dict(record.api_calls),
            "script_sha256": record.script_sha256,
            "exposures": [list(e) for e in record.exposures],
            "command": record.command,
            "iport": record.spec.iport,
            "sshd_port": record.spec.sshd_port,
            "last_poll_age": None if seen is None else round(now - seen, 3),
            "connections": tunnel.connections if tunnel else 0,
            "blocked": record.spec.name in self.faults.blocked,
            "version": record.version,
            "upgradable": record.upgradable,
        }


def _flag(value: bool) -> str:
    return "T" if value else "F"


def _single(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    if not values or len(values) != 1:
        return None
    return values[0]


def _singles(params: dict[str, list[str]], keys: tuple[str, ...]) -> list[str] | None:
    """The single value of each of ``keys``, or None if any is missing or repeated."""
    found = []
    for key in keys:
        value = _single(params, key)
        if value is None:
            return None
        found.append(value)
    return found


# --- HTTP ------------------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of clients poll at once after a restart

    def __init__(self, address, handler, simulator: Simulator):
        self.simulator = simulator
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stalls
    server_version = "sshreach-sandbox"
    server: _HttpServer

    def do_GET(self) -> None:  # http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        sim = self.server.simulator
        url = urlsplit(self.path)
        body = self._read_body()
        if body is None:
            return
        path = url.path
        if path.startswith("/api/"):
            params = parse_qs(url.query, keep_blank_values=True)
            if method == "POST" and body:
                form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
                for key, values in form.items():
                    params.setdefault(key, []).extend(values)
            self._send(sim.api(path[len("/api/") :], params))
        elif path == POLL_PATH and method == "GET":
            self._send(sim.poll(parse_qs(url.query, keep_blank_values=True)))
        elif path == "/sandbox/state" and method == "GET":
            self._send(HttpReply.json(sim.state()))
        elif path == "/sandbox/faults":
            self._faults(method, body)
        elif path == "/sandbox/reset-counters" and method == "POST":
            sim.reset_counters()
            self._send(HttpReply.json({"ok": True}))
        elif path == "/sandbox/clients" and sim.clients is not None:
            status, reply_ = sim.clients.handle(method, _json_or_none(body))
            self._send(HttpReply.json(reply_, status))
        else:
            self._send(HttpReply(404, "text/html", b"<html><body>404 Not Found</body></html>\n"))

    def _faults(self, method: str, body: bytes) -> None:
        sim = self.server.simulator
        if method == "GET":
            self._send(HttpReply.json(sim.faults.to_json()))
            return
        changes = _json_or_none(body)
        if not isinstance(changes, dict):
            self._send(HttpReply.json({"ok": False, "error": "body must be a JSON object"}, 400))
            return
        try:
            faults = sim.set_faults(changes)
        except ValueError as exc:
            self._send(HttpReply.json({"ok": False, "error": str(exc)}, 400))
            return
        log.info("faults now %s", faults.to_json())
        self._send(HttpReply.json(faults.to_json()))

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length else 0
        except ValueError:
            size = -1
        if size < 0 or size > MAX_BODY:
            self.close_connection = True
            self._send(HttpReply(400, "text/plain", b"bad request body\n"))
            return None
        return self.rfile.read(size) if size else b""

    def _send(self, reply_: HttpReply) -> None:
        self.send_response(reply_.status)
        self.send_header("Content-Type", reply_.content_type)
        self.send_header("Content-Length", str(len(reply_.body)))
        self.end_headers()
        self.wfile.write(reply_.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The query string holds credentials: log the path only, at debug level.
        log.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
