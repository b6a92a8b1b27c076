"""The sandbox's forwarding SSH server: where each client's tunnel process
(``ssh -N -R IPORT:localhost:SSHD_PORT USER@127.0.0.1``) logs in, as on the
provider's forwarding server in production (docs/how-to/sandbox.md).

What must stay true, whichever server runs:

- one account user (the current user), public-key login with the account
  key only; no shell, exec, SFTP or local forwarding: remote forwarding only;
- a remote forward is accepted only for a port that is some host's IPORT and
  only while no other session forwards it (else refused, and the client's
  ``ssh -o ExitOnForwardFailure=yes`` exits with "remote port forwarding
  failed"); the IPORT listens on 127.0.0.1 only;
- :meth:`Forwarder.cut` ends the session that forwards an IPORT (its listener
  and every connection through it go with it) and returns once it is gone;
- :meth:`Forwarder.tunnels` names, per forwarded IPORT, the open connections
  and the client-side ``ssh`` processes at the other end of the session,
  found from the session's peer socket (:mod:`deployer.sandbox.procnet`).

:class:`EmbeddedForwardingServer` is asyncssh in a thread of the runner; it
holds every IPORT while no tunnel forwards it (a bound socket, so no other
program takes it) and can delay each direction of every forwarded
connection (``--ssh-latency``). :class:`OpenSshForwardingServer` is the
system's sshd with ``AllowTcpForwarding remote`` and ``PermitListen``; a cut
is SIGTERM to the per-session sshd that owns the IPORT's listening socket.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deployer.sandbox import ports, processes, procnet
from deployer.sandbox.loop import LoopThread
from deployer.sandbox.sshd import LISTEN_BACKLOG, key_only_server_class

log = logging.getLogger(__name__)

READ_SIZE = 65536
CUT_TIMEOUT = 3.0  # seconds for a cut session to be gone
RESERVE_RETRY = 1.0  # seconds between attempts to hold IPORTs freed by a closed tunnel
DELAY_QUEUE = 256  # chunks in flight per direction under --ssh-latency
KEEPALIVE_INTERVAL = 15  # as OpenSSH's ClientAliveInterval
KEEPALIVE_COUNT = 3


@dataclass(frozen=True)
class Tunnel:
    """An IPORT forwarded now: open connections through it and the client-side pids."""

    iport: int
    connections: int
    pids: tuple[int, ...]


class Forwarder(Protocol):
    """What the simulator needs of the forwarding server."""

    port: int

    def open_ports(self) -> set[int]:
        """The IPORTs some session forwards now (cheap: the offline rule asks often)."""
        ...

    def tunnels(self) -> dict[int, Tunnel]:
        """Every forwarded IPORT with its connections and tunnel pids."""
        ...

    def cut(self, iport: int) -> bool:
        """End the session forwarding ``iport``; False if none did."""
        ...


class NoForwarder:
    """No forwarding server: no tunnel ever opens (the simulator alone, in tests)."""

    port = 0

    def open_ports(self) -> set[int]:
        return set()

    def tunnels(self) -> dict[int, Tunnel]:
        return {}

    def cut(self, iport: int) -> bool:
        return False


# --- relaying one forwarded connection ----------------------------------------------------


def _write_eof(writer: Any) -> None:
    try:
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError, AttributeError):
        pass


async def _pump(reader: Any, writer: Any) -> None:
    while data := await reader.read(READ_SIZE):
        writer.write(data)
        await writer.drain()
    _write_eof(writer)


async def _pump_delayed(reader: Any, writer: Any, delay: float) -> None:
    """Forward ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    line: asyncio.Queue = asyncio.Queue(DELAY_QUEUE)
    sender = asyncio.ensure_future(_deliver(line, writer))
    try:
        while True:
            data = await reader.read(READ_SIZE)
            put = asyncio.ensure_future(line.put((loop.time() + delay, data)))
            await asyncio.wait([put, sender], return_when=asyncio.FIRST_COMPLETED)
            if not put.done():  # the sender failed: its error ends the relay below
                put.cancel()
                break
            if not data:
                break
        await sender
    finally:
        sender.cancel()


async def _deliver(line: asyncio.Queue, writer: Any) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due, data = await line.get()
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if not data:
            _write_eof(writer)
            return
        writer.write(data)
        await writer.drain()


async def relay(a: tuple[Any, Any], b: tuple[Any, Any], delay: float = 0.0) -> None:
    """Copy a's reader to b's writer and back until both ends sent EOF (half-close
    relayed) or one side fails; ``delay`` seconds on each direction."""

    def pump(reader: Any, writer: Any) -> Any:
        if delay > 0:
            return asyncio.ensure_future(_pump_delayed(reader, writer, delay))
        return asyncio.ensure_future(_pump(reader, writer))

    pumps = [pump(a[0], b[1]), pump(b[0], a[1])]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


# --- the embedded server ------------------------------------------------------------------


class _Session:
    """One login of a tunnel process: its connection, peer port and forwards."""

    __slots__ = ("conn", "peer_port", "listeners", "pids", "closed")

    def __init__(self, conn: Any, peer_port: int):
        self.conn = conn
        self.peer_port = peer_port
        self.listeners: dict[int, Any] = {}
        self.pids: tuple[int, ...] | None = None  # found once, from the peer socket
        self.closed = False


class EmbeddedForwardingServer:
    """asyncssh on 127.0.0.1:``port`` for ``user`` with ``authorized_keys``,
    forwarding the IPORTs in ``held`` (port -> a socket holding it, or None)."""

    def __init__(
        self,
        host_key: Path,
        authorized_keys: Path,
        user: str,
        held: dict[int, socket.socket | None],
        latency: float = 0.0,
        port: int = 0,
    ):
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.user = user
        self.iports = frozenset(held)
        self.latency = latency
        self.port = port
        self._held = dict(held)
        self._lock = threading.Lock()
        self._by_port: dict[int, _Session] = {}  # claimed or forwarded IPORTs
        self._thread = LoopThread("forwarding-sshd")
        self._server: Any = None
        self._retry: asyncio.Task | None = None

    # --- the thread-safe side ---------------------------------------------------------

    def start(self) -> int:
        try:
            self._thread.start(self._listen)
        except Exception as exc:
            self._release_held()
            raise RuntimeError(f"embedded forwarding server failed: {exc}") from exc
        return self.port

    def stop(self) -> None:
        self._thread.stop(self._shutdown)
        self._release_held()

    def open_ports(self) -> set[int]:
        with self._lock:
            return {p for p, s in self._by_port.items() if p in s.listeners}

    def tunnels(self) -> dict[int, Tunnel]:
        with self._lock:
            found = [(p, s, s.listeners.get(p)) for p, s in self._by_port.items()]
        forwarded = [(p, s, lst) for p, s, lst in found if lst is not None]
        self._find_pids([s for _p, s, _lst in forwarded if s.pids is None])
        return {p: Tunnel(p, lst.active, s.pids or ()) for p, s, lst in forwarded}

    def cut(self, iport: int) -> bool:
        if not self._thread.running():
            return False
        return self._thread.call(self._cut(iport), CUT_TIMEOUT + 2)

    def _find_pids(self, sessions: list[_Session]) -> None:
        """The client's end of each session's connection, then who holds it (one /proc pass)."""
        if not sessions:
            return
        sockets = procnet.tcp_sockets()
        by_inode = {}
        for session in sessions:
            found = procnet.client_side(sockets, session.peer_port, self.port)
            if found is not None:
                by_inode[found.inode] = session
        for inode, pids in procnet.socket_owners(by_inode).items():
            if pids:
                by_inode[inode].pids = tuple(sorted(pids))

    def _release_held(self) -> None:
        with self._lock:
            for port, sock in self._held.items():
                if sock is not None:
                    sock.close()
                self._held[port] = None

    # --- the loop side ---------------------------------------------------------------

    async def _listen(self) -> None:
        import asyncssh

        keys = asyncssh.read_authorized_keys(str(self.authorized_keys))
        host_key = asyncssh.read_private_key(str(self.host_key))
        server_class = _forwarding_server_class()
        self._server = await asyncssh.create_server(
            lambda: server_class(self.user, keys, self),
            "127.0.0.1",
            self.port,
            server_host_keys=[host_key],
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            login_timeout=30,
            keepalive_interval=KEEPALIVE_INTERVAL,
            keepalive_count_max=KEEPALIVE_COUNT,
            backlog=LISTEN_BACKLOG,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._retry = asyncio.ensure_future(self._hold_free_ports())

    async def _shutdown(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._server is not None:
            self._server.close()
        with self._lock:
            sessions = set(self._by_port.values())
        for session in sessions:
            self._end(session)

    async def _hold_free_ports(self) -> None:
        """Hold again every IPORT that no tunnel forwards (a closed tunnel's port may
        stay busy in TIME_WAIT for a while)."""
        while True:
            await asyncio.sleep(RESERVE_RETRY)
            with self._lock:
                for port, sock in self._held.items():
                    if sock is None and port not in self._by_port:
                        self._held[port] = ports.bind_exclusive(port)

    def session_started(self, conn: Any) -> _Session:
        peer = conn.get_extra_info("peername") or ("", 0)
        return _Session(conn, int(peer[1]))

    def session_ended(self, session: _Session) -> None:
        self._end(session)

    def forward_requested(self, session: _Session, host: str, port: int) -> Any:
        """asyncssh's ``server_requested``: False (refused) or a coroutine that
        listens on 127.0.0.1:``port`` and returns the listener."""
        if port not in self.iports:
            log.info("refused a forward of port %s: not a tunnel port", port)
            return False
        with self._lock:
            if port in self._by_port or session.closed:
                log.info("refused a forward of port %s: already forwarded", port)
                return False
            self._by_port[port] = session
            sock = self._held.get(port)
            self._held[port] = None
        return self._open_listener(session, host, port, sock)

    async def _open_listener(
        self, session: _Session, host: str, port: int, sock: socket.socket | None
    ) -> Any:
        listener = _listener_class()(self, session, host, port)
        try:
            if sock is None:  # not held (a closed tunnel's TIME_WAIT): bind with SO_REUSEADDR
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            else:
                # The connections it accepts inherit the option: Linux lets a later
                # bind take the port past their TIME_WAIT only if they had it too.
                # Without it a cut tunnel's port stayed unusable for ~60 s.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.server = await asyncio.start_server(
                listener.accepted, sock=sock, backlog=LISTEN_BACKLOG
            )
        except OSError as exc:
            log.warning("cannot listen on tunnel port %s: %s", port, exc)
            if sock is not None:
                sock.close()
            with self._lock:
                if self._by_port.get(port) is session:
                    del self._by_port[port]
            return False
        with self._lock:
            session.listeners[port] = listener
        if session.closed:
            listener.close()
            return False
        log.info("tunnel port %s forwarded (session from port %s)", port, session.peer_port)
        return listener

    def listener_closed(self, listener: Any) -> None:
        with self._lock:
            session = listener.session
            session.listeners.pop(listener.port, None)
            if self._by_port.get(listener.port) is session:
                del self._by_port[listener.port]
                self._held[listener.port] = ports.bind_exclusive(listener.port)

    def _end(self, session: _Session) -> None:
        """Close the session's listeners (and their connections) and the session."""
        session.closed = True
        for listener in list(session.listeners.values()):
            listener.close()
        with self._lock:
            for port in [p for p, s in self._by_port.items() if s is session]:
                del self._by_port[port]
        session.conn.close()

    async def _cut(self, iport: int) -> bool:
        with self._lock:
            session = self._by_port.get(iport)
        if session is None:
            return False
        self._end(session)
        try:
            await asyncio.wait_for(session.conn.wait_closed(), CUT_TIMEOUT)
        except asyncio.TimeoutError:
            session.conn.abort()
        log.info("tunnel port %s cut (session from port %s ended)", iport, session.peer_port)
        return True


@functools.cache
def _forwarding_server_class() -> type:
    base = key_only_server_class()

    class ForwardingServer(base):  # type: ignore[misc, valid-type]
        """The account user's login: remote forwarding of tunnel ports, nothing else."""

        def __init__(self, user: str, keys: Any, owner: EmbeddedForwardingServer):
            super().__init__(user, keys)
            self._owner = owner
            self._session: _Session | None = None

        def connection_made(self, conn: Any) -> None:
            super().connection_made(conn)
            self._session = self._owner.session_started(conn)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._session is not None:
                self._owner.session_ended(self._session)

        def server_requested(self, listen_host: str, listen_port: int) -> Any:
            assert self._session is not None
            return self._owner.forward_requested(self._session, listen_host, listen_port)

    return ForwardingServer


@functools.cache
def _listener_class() -> type:
    import asyncssh

    class TunnelListener(asyncssh.SSHListener):
        """A tunnel port on 127.0.0.1: each connection goes back to the client
        as a forwarded-tcpip channel of the session that asked for it."""

        def __init__(self, owner: EmbeddedForwardingServer, session: _Session, host, port):
            super().__init__()
            self.owner = owner
            self.session = session
            self.listen_host = host
            self.port = port
            self.server: asyncio.AbstractServer | None = None
            self.writers: set[asyncio.StreamWriter] = set()
            self.active = 0
            self.closed = False

        def get_port(self) -> int:
            return self.port

        def close(self) -> None:
            if self.closed:
                return
            self.closed = True
            if self.server is not None:
                self.server.close()
            for writer in list(self.writers):
                writer.close()
            self.owner.listener_closed(self)

        async def wait_closed(self) -> None:
            if self.server is not None:
                await self.server.wait_closed()

        async def accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            if self.closed:
                writer.close()
                return
            self.writers.add(writer)
            self.active += 1
            try:
                await self._forward(reader, writer)
            except Exception as exc:  # noqa: BLE001 - one connection's end, not the server's
                log.debug("tunnel port %s: connection ended: %s", self.port, exc)
            finally:
                self.active -= 1
                self.writers.discard(writer)
                writer.close()

        async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            peer = writer.get_extra_info("peername") or ("127.0.0.1", 0)
            try:
                channel = await self.session.conn.open_connection(
                    self.listen_host, self.port, peer[0], peer[1]
                )
            except (OSError, asyncssh.Error) as exc:
                log.info("tunnel port %s: the client refused the connection: %s", self.port, exc)
                return
            try:
                await relay((reader, writer), channel, self.owner.latency)
            finally:
                channel[1].close()

    return TunnelListener


# --- OpenSSH as the forwarding server -------------------------------------------------------


class OpenSshForwardingServer:
    """The system's sshd as the forwarding server (``--sshd openssh``)."""

    def __init__(self, server: Any, port: int, iports: Iterable[int]):
        self.server = server  # an openssh.OpenSshServer, not started
        self.port = port
        self.iports = frozenset(iports)
        self._pids: dict[int, tuple[int, ...]] = {}  # listening inode -> tunnel pids

    def start(self) -> int:
        self.server.start()
        return self.port

    def stop(self) -> None:
        self.server.stop()
        sessions = self._session_processes(procnet.port_owners([self.port, *self.iports]))
        processes.terminate(sessions, 2.0)

    def alive(self) -> bool:
        return self.server.alive()

    def open_ports(self) -> set[int]:
        sockets = procnet.tcp_sockets()
        return {p for p in self.iports if procnet.listener(sockets, p) is not None}

    def tunnels(self) -> dict[int, Tunnel]:
        sockets = procnet.tcp_sockets()
        listening = {}
        for port in self.iports:
            found = procnet.listener(sockets, port)
            if found is not None:
                listening[port] = found.inode
        self._find_pids(sockets, [i for i in listening.values() if i not in self._pids])
        self._pids = {i: p for i, p in self._pids.items() if i in listening.values()}
        return {
            port: Tunnel(port, procnet.established_to(sockets, port), self._pids.get(inode, ()))
            for port, inode in listening.items()
        }

    def _find_pids(self, sockets: list[procnet.TcpSocket], inodes: list[int]) -> None:
        """Listening inode -> its sshd -> that sshd's connection from the client ->
        the client's end of it -> the processes that hold that end."""
        if not inodes:
            return
        client_ends: dict[int, int] = {}  # client-side inode -> listening inode
        for inode, owners in procnet.socket_owners(inodes).items():
            for pid in owners:
                mine = procnet.socket_inodes(pid)
                for sock in sockets:
                    if sock.inode in mine and sock.local_port == self.port and sock.established:
                        end = procnet.client_side(sockets, sock.remote_port, self.port)
                        if end is not None:
                            client_ends[end.inode] = inode
        for client_inode, pids in procnet.socket_owners(client_ends).items():
            if pids:
                self._pids[client_ends[client_inode]] = tuple(sorted(pids))

    def cut(self, iport: int) -> bool:
        sockets = procnet.tcp_sockets()
        found = procnet.listener(sockets, iport)
        if found is None:
            return False
        owners = procnet.socket_owners([found.inode])[found.inode]
        targets = self._session_processes(owners)
        for pid in targets:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + CUT_TIMEOUT
        while time.monotonic() < deadline:
            if procnet.listener(procnet.tcp_sockets(), iport) is None:
                log.info("tunnel port %s cut (sshd %s ended)", iport, targets)
                return True
            time.sleep(0.02)
        processes.kill_now(targets)
        return True

    def _session_processes(self, pids: Iterable[int]) -> list[int]:
        """The per-session sshd processes among ``pids`` and their privileged
        monitors; never the listening sshd itself."""
        main = self.server.pid
        found = set()
        for pid in pids:
            if pid == main or not processes.cmdline(pid).startswith("sshd"):
                continue
            found.add(pid)
            parent = procnet.ppid(pid)
            if parent and parent != main and processes.cmdline(parent).startswith("sshd"):
                found.add(parent)
        return sorted(found)
