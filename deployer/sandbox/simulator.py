"""A faithful local SSHReach: the four API calls of SPEC 1, client heartbeats,
one TCP tunnel per host, the offline rule, fault injection and an independent
record of what a run did (``GET /sandbox/state``).

The rule that matters most: while a host's allow-clientless is false, a client
that goes offline (no heartbeat for ``offline_after`` seconds) gets its tunnel
closed and every connection through it cut, checked every
:data:`MONITOR_INTERVAL` seconds. A deployer that forgets the window loses its
own SSH session here exactly as it would in production.

Routes (all on 127.0.0.1):

- ``GET|POST /api/{call}`` — the provider API (faults apply here only);
- ``POST /sandbox/heartbeat`` — ``{"host_uuid", "sha256", "pid"}`` from a client;
- ``GET /sandbox/state`` — the state document (SPEC 7);
- ``GET|POST /sandbox/faults`` — read or change faults at run time;
- ``POST /sandbox/reset-counters`` — zero the call counters, drop closed exposures.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deployer.sandbox.tunnel import TunnelRelay

log = logging.getLogger(__name__)

API_CALLS = ("connect", "disconnect", "client_status", "set_allow_clientless")
ID_PARAMS = ("user_id", "dbid", "host_uuid", "ports_id")
MONITOR_INTERVAL = 0.05  # seconds between offline checks (the issue asks for <= 0.1)
DEFAULT_RATE_LIMIT = 50.0  # API calls per second per user_id
DEFAULT_OFFLINE_AFTER = 1.5
MAX_BODY = 64 * 1024

MESSAGES = {
    0: "OK",
    11: "not connected",
    12: "not disconnected",
    21: "invalid api call",
    22: "too many api calls",
    23: "client blocked",
    24: "client inactive",
    31: "wrong data",
}

FAIL_BODY = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
GARBAGE_BODY = b"<html><body>Service temporarily in maintenance</body></html>\n"


@dataclass(frozen=True)
class Faults:
    """What the simulator does wrong on purpose (and its timing knobs).

    ``rate_limit`` 0 means unlimited. Faults apply to the four API calls only,
    never to heartbeats or the admin routes.
    """

    latency: float = 0.0  # seconds added to every API reply
    fail_rate: float = 0.0  # share of API replies that are HTTP 502 with an HTML body
    garbage_rate: float = 0.0  # share of API replies that are HTTP 200 but not JSON
    rate_limit: float = DEFAULT_RATE_LIMIT  # API calls per second per user_id (22 above)
    blocked: tuple[str, ...] = ()  # host names answered with 23
    offline_after: float = DEFAULT_OFFLINE_AFTER  # seconds without heartbeat -> offline

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
        for key in ("latency", "fail_rate", "garbage_rate", "rate_limit", "offline_after"):
            if key in values:
                values[key] = _number(key, values[key])
        for key in ("fail_rate", "garbage_rate"):
            if key in values and values[key] > 1:
                raise ValueError(f"{key} must be between 0 and 1")
        if values.get("offline_after", 1) <= 0:
            raise ValueError("offline_after must be > 0")
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
    """A simulated host's identity: what the inventory says about it."""

    name: str
    dbid: str
    host_uuid: str
    ports_id: int
    ssh_port: int


@dataclass
class HostRecord:
    """What the simulator knows about one host at run time."""

    spec: HostSpec
    last_heartbeat: float | None = None  # monotonic
    script_sha256: str | None = None
    client_pid: int | None = None
    allow_clientless: bool = False
    tunnel_open: bool = False
    tunnel_cuts: int = 0  # tunnels closed by the offline rule
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
    """A SPEC 1 reply; ``extra`` keys come first (as in the allow_clientless reply)."""
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


class Simulator:
    """The provider: API semantics, heartbeats, tunnels, faults and the state record.

    The HTTP layer (:meth:`start`) is thin; :meth:`api`, :meth:`heartbeat` and
    :meth:`state` hold the behaviour and are called directly by unit tests.
    """

    def __init__(
        self,
        user_id: str,
        hosts: list[HostSpec],
        ssh_target: tuple[str, int],
        faults: Faults | None = None,
        port: int = 0,
        rng: random.Random | None = None,
    ):
        self.user_id = user_id
        self.faults = faults or Faults()
        self.port = port
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._hosts = {h.name: HostRecord(h) for h in hosts}
        self._by_ids = {(h.dbid, h.host_uuid, str(h.ports_id)): h.name for h in hosts}
        self._by_uuid = {h.host_uuid: h.name for h in hosts}
        self._buckets: dict[str, TokenBucket] = {}
        self._totals: dict[str, int] = {"requests": 0, "fail": 0, "garbage": 0}
        self._codes: dict[str, int] = {}
        self.relay = TunnelRelay(ssh_target)
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Reserve every tunnel port (picking one where ``ssh_port`` is 0), then serve."""
        self.relay.start()
        for record in self._hosts.values():
            spec = record.spec
            if spec.ssh_port == 0:
                record.spec = replace(spec, ssh_port=self.relay.reserve_free(spec.name))
            elif not self.relay.reserve(spec.name, spec.ssh_port):
                log.warning("port %s of %s is busy", spec.ssh_port, spec.name)
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
        self.relay.stop()
        if self._monitor is not None:
            self._monitor.join(2)

    @property
    def ssh_ports(self) -> dict[str, int]:
        return {name: record.spec.ssh_port for name, record in self._hosts.items()}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/{{call}}"

    # --- the API ---------------------------------------------------------------------

    def api(self, call: str, params: dict[str, list[str]]) -> HttpReply:
        """Answer one API request (``params`` as parse_qs gives them)."""
        faults = self.faults
        if faults.latency:
            time.sleep(faults.latency)
        fault = self._draw_fault(faults)
        with self._lock:
            self._totals["requests"] += 1
            record = self._identify(params)
            if record is not None and call in API_CALLS:
                record.api_calls[call] += 1
            if fault == "fail":
                self._totals["fail"] += 1
                return HttpReply(502, "text/html", FAIL_BODY)
            if fault == "garbage":
                self._totals["garbage"] += 1
                return HttpReply(200, "text/html", GARBAGE_BODY)
            body = self._answer(call, params, record, faults)
            code = str(body["error_code"])
            self._codes[code] = self._codes.get(code, 0) + 1
        return HttpReply.json(body)

    def _draw_fault(self, faults: Faults) -> str | None:
        if faults.fail_rate and self._rng.random() < faults.fail_rate:
            return "fail"
        if faults.garbage_rate and self._rng.random() < faults.garbage_rate:
            return "garbage"
        return None

    def _identify(self, params: dict[str, list[str]]) -> HostRecord | None:
        values = [_single(params, key) for key in ID_PARAMS]
        if None in values or values[0] != self.user_id:
            return None
        name = self._by_ids.get((values[1], values[2], values[3]))
        return self._hosts[name] if name else None

    def _answer(
        self, call: str, params: dict[str, list[str]], record: HostRecord | None, faults: Faults
    ) -> dict[str, Any]:
        if call not in API_CALLS:
            return reply(21)
        user_id = _single(params, "user_id")
        if user_id != self.user_id:
            return reply(31)
        bucket = self._buckets.setdefault(user_id, TokenBucket(faults.rate_limit))
        if not bucket.take(faults.rate_limit):
            return reply(22)
        if record is None:
            return reply(31)
        if call == "set_allow_clientless" and _single(params, "allow") not in ("true", "false"):
            return reply(31)
        if record.spec.name in faults.blocked:
            return reply(23)
        return getattr(self, f"_call_{call}")(record, params)

    def _call_connect(self, record: HostRecord, params: dict[str, list[str]]) -> dict[str, Any]:
        if not self._online(record):
            return reply(24)
        if not record.tunnel_open:
            try:
                self.relay.open(record.spec.name, record.spec.ssh_port)
            except OSError as exc:
                log.warning("tunnel for %s: cannot listen: %s", record.spec.name, exc)
                return reply(11)
            record.tunnel_open = True
        return reply(0)

    def _call_disconnect(self, record: HostRecord, params: dict[str, list[str]]) -> dict[str, Any]:
        self._close_tunnel(record)
        return reply(0)

    def _call_client_status(
        self, record: HostRecord, params: dict[str, list[str]]
    ) -> dict[str, Any]:
        if self._online(record):
            return reply(0, "online")
        return {"message": "offline", "error_code": 24, "success": True}

    def _call_set_allow_clientless(
        self, record: HostRecord, params: dict[str, list[str]]
    ) -> dict[str, Any]:
        allow = _single(params, "allow") == "true"
        if allow and not record.allow_clientless:
            record.exposures.append([time.time(), None])
        elif not allow and record.allow_clientless and record.exposures:
            record.exposures[-1][1] = time.time()
        record.allow_clientless = allow
        return reply(0, "success", allow_clientless=allow)

    def _online(self, record: HostRecord) -> bool:
        seen = record.last_heartbeat
        return seen is not None and time.monotonic() - seen <= self.faults.offline_after

    def _close_tunnel(self, record: HostRecord) -> None:
        if record.tunnel_open or self.relay.is_open(record.spec.name):
            self.relay.close(record.spec.name)
        record.tunnel_open = False

    # --- heartbeats and the offline rule --------------------------------------------------

    def heartbeat(self, payload: Any) -> HttpReply:
        if not isinstance(payload, dict) or not isinstance(payload.get("host_uuid"), str):
            return HttpReply.json({"ok": False, "error": "host_uuid missing"}, 400)
        with self._lock:
            name = self._by_uuid.get(payload["host_uuid"])
            if name is None:
                return HttpReply.json({"ok": False, "error": "unknown host_uuid"}, 404)
            record = self._hosts[name]
            record.last_heartbeat = time.monotonic()
            sha = payload.get("sha256")
            record.script_sha256 = sha if isinstance(sha, str) else None
            pid = payload.get("pid")
            record.client_pid = pid if isinstance(pid, int) else None
        return HttpReply.json({"ok": True, "host": name})

    def enforce_offline_rule(self) -> list[str]:
        """Close the tunnel of every offline host whose allow-clientless is false."""
        cut = []
        with self._lock:
            self.relay.retry_reservations()
            for record in self._hosts.values():
                if record.allow_clientless or self._online(record):
                    continue
                if record.tunnel_open:
                    self._close_tunnel(record)
                    record.tunnel_cuts += 1
                    cut.append(record.spec.name)
        for name in cut:
            log.info("%s went offline without allow-clientless: tunnel closed", name)
        return cut

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
                record.exposures = [e for e in record.exposures if e[1] is None]
            self._totals = dict.fromkeys(self._totals, 0)
            self._codes = {}

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            hosts = {name: self._host_state(r, now) for name, r in self._hosts.items()}
            calls = dict(self._totals, by_code=dict(self._codes))
        return {
            "api_url": self.api_url,
            "time": time.time(),
            "faults": self.faults.to_json(),
            "calls": calls,
            "hosts": hosts,
        }

    def _host_state(self, record: HostRecord, now: float) -> dict[str, Any]:
        seen = record.last_heartbeat
        return {
            "online": self._online(record),
            "allow_clientless": record.allow_clientless,
            "tunnel_open": record.tunnel_open,
            "api_calls": dict(record.api_calls),
            "script_sha256": record.script_sha256,
            "exposures": [list(e) for e in record.exposures],
            "ssh_port": record.spec.ssh_port,
            "client_pid": record.client_pid,
            "last_heartbeat_age": None if seen is None else round(now - seen, 3),
            "connections": self.relay.connection_count(record.spec.name),
            "tunnel_cuts": record.tunnel_cuts,
            "blocked": record.spec.name in self.faults.blocked,
        }


def _single(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    if not values or len(values) != 1:
        return None
    return values[0]


# --- HTTP ------------------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, handler, simulator: Simulator):
        self.simulator = simulator
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stalls
    server_version = "sshreach-sandbox"
    server: _HttpServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
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
        elif path == "/sandbox/heartbeat" and method == "POST":
            self._send(sim.heartbeat(_json_or_none(body)))
        elif path == "/sandbox/state" and method == "GET":
            self._send(HttpReply.json(sim.state()))
        elif path == "/sandbox/faults":
            self._faults(method, body)
        elif path == "/sandbox/reset-counters" and method == "POST":
            sim.reset_counters()
            self._send(HttpReply.json({"ok": True}))
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("http: " + format, *args)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
