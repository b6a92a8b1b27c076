"""The simulator's tunnels: one TCP listener per connected host on 127.0.0.1,
each accepted connection relayed byte for byte to the SSH server.

All listeners and relayed connections live in one selector thread (no thread
per connection), so a 2-core machine relays hundreds of tunnels. Other threads
talk to it through :meth:`TunnelRelay.open` and :meth:`TunnelRelay.close`,
which return only when the relay thread has done the work: after ``close``
returns, the listener is gone and every connection through it is cut.
"""

from __future__ import annotations

import errno
import logging
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from deployer.sandbox import ports

log = logging.getLogger(__name__)

READ_SIZE = 65536
BUFFER_LIMIT = 256 * 1024  # stop reading a side while its peer has this much unsent
ACCEPTS_PER_WAKEUP = 64
COMMAND_TIMEOUT = 5.0


_LINGER_RESET = struct.pack("ii", 1, 0)


class _End:
    """One socket of a relayed connection and the bytes waiting to be sent to it."""

    __slots__ = ("sock", "peer", "pipe", "outbuf", "eof", "shut", "connecting", "mask")

    def __init__(self, sock: socket.socket, pipe: _Pipe, connecting: bool = False):
        self.sock = sock
        self.pipe = pipe
        self.peer: _End = self
        self.outbuf = bytearray()
        self.eof = False  # the other side sent FIN
        self.shut = False  # we sent FIN to it
        self.connecting = connecting
        self.mask = 0


class _Pipe:
    """A downstream connection (accepted on a tunnel) and its upstream (the SSH server)."""

    __slots__ = ("name", "down", "up", "closed")

    def __init__(self, name: str, down: socket.socket, up: socket.socket):
        self.name = name
        self.down = _End(down, self)
        self.up = _End(up, self, connecting=True)
        self.down.peer, self.up.peer = self.up, self.down
        self.closed = False


class TunnelRelay:
    """Per-host listeners relaying to one target address, served by one thread."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[str, socket.socket] = {}
        self._pipes: dict[str, set[_Pipe]] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self._reserved: dict[str, tuple[int, socket.socket | None]] = {}
        self._reserve_lock = threading.Lock()
        self.accepted_total = 0

    # --- the public, thread-safe side ----------------------------------------

    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="tunnel-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        for name in list(self._reserved):
            self._release(name)
        if not self._running:
            return
        self._submit(self._shutdown)
        if self._thread:
            self._thread.join(COMMAND_TIMEOUT)
        self._wake_r.close()
        self._wake_w.close()

    def reserve(self, name: str, port: int) -> bool:
        """Hold ``port`` for ``name`` while its tunnel is closed: a bound socket
        without SO_REUSEADDR, so no other program (another sandbox) listens on it.
        Returns False if the port is busy now (retried by :meth:`retry_reservations`)."""
        with self._reserve_lock:
            _port, held = self._reserved.get(name, (port, None))
            if held is None and name not in self._listeners:
                held = ports.bind_exclusive(port)
            self._reserved[name] = (port, held)
            return held is not None

    def reserve_free(self, name: str) -> int:
        """Pick a free tunnel port for ``name`` and hold it at once; return it."""
        port, held = ports.reserve_free_port()
        with self._reserve_lock:
            self._reserved[name] = (port, held)
        return port

    def retry_reservations(self) -> None:
        for name, (port, held) in list(self._reserved.items()):
            if held is None and name not in self._listeners:
                self.reserve(name, port)

    def _release(self, name: str) -> None:
        with self._reserve_lock:
            port, held = self._reserved.get(name, (0, None))
            if held is not None:
                held.close()
                self._reserved[name] = (port, None)

    def open(self, name: str, port: int) -> None:
        """Listen on 127.0.0.1:``port`` for ``name``; raises OSError if the port is taken."""
        self._release(name)
        try:
            sock = socket.create_server(("127.0.0.1", port), backlog=128)
        except OSError:
            self.reserve(name, port)
            raise
        sock.setblocking(False)
        try:
            self._submit(self._add_listener, name, sock)
        except BaseException:
            sock.close()
            raise

    def close(self, name: str) -> int:
        """Close ``name``'s listener and cut every connection through it; return how many."""
        count = self._submit(self._remove, name)
        if name in self._reserved:
            self.reserve(name, self._reserved[name][0])
        return count

    def is_open(self, name: str) -> bool:
        return name in self._listeners

    def connection_count(self, name: str) -> int:
        return len(self._pipes.get(name, ()))

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if threading.current_thread() is self._thread:
            return fn(*args)
        done = threading.Event()
        box: dict[str, Any] = {}
        self._commands.put((fn, args, done, box))
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if not done.wait(COMMAND_TIMEOUT):
            raise TimeoutError("tunnel relay did not answer")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # --- the relay thread --------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            for key, events in self._sel.select(timeout=1.0):
                kind, obj = key.data
                try:
                    if kind == "wake":
                        self._run_commands()
                    elif kind == "listener":
                        self._accept(obj, key.fileobj)
                    else:
                        self._service(obj, events)
                except Exception:  # noqa: BLE001 - the relay must keep relaying
                    log.exception("tunnel relay error")
        self._sel.close()

    def _run_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                fn, args, done, box = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                box["result"] = fn(*args)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                box["error"] = exc
            done.set()

    def _add_listener(self, name: str, sock: socket.socket) -> None:
        if name in self._listeners:
            sock.close()
            return
        self._listeners[name] = sock
        self._pipes.setdefault(name, set())
        self._sel.register(sock, selectors.EVENT_READ, ("listener", name))

    def _remove(self, name: str) -> int:
        sock = self._listeners.pop(name, None)
        if sock is not None:
            self._sel.unregister(sock)
            sock.close()
        pipes = self._pipes.pop(name, set())
        for pipe in list(pipes):
            self._close_pipe(pipe, reset=True)
        return len(pipes)

    def _shutdown(self) -> None:
        for name in list(self._listeners):
            self._remove(name)
        self._running = False

    def _accept(self, name: str, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                down, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on tunnel %s failed: %s", name, exc)
                return
            self._start_pipe(name, down)

    def _start_pipe(self, name: str, down: socket.socket) -> None:
        down.setblocking(False)
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        for sock in (down, up):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = up.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            log.warning("tunnel %s: SSH server unreachable: %s", name, errno.errorcode.get(err))
            down.close()
            up.close()
            return
        pipe = _Pipe(name, down, up)
        self._pipes.setdefault(name, set()).add(pipe)
        self.accepted_total += 1
        self._update(pipe.down)
        self._update(pipe.up)

    def _service(self, end: _End, events: int) -> None:
        pipe = end.pipe
        if events & selectors.EVENT_WRITE and not pipe.closed:
            self._on_writable(end)
        if events & selectors.EVENT_READ and not pipe.closed:
            self._on_readable(end)
        if not pipe.closed:
            self._after_io(pipe)

    def _on_writable(self, end: _End) -> None:
        if end.connecting:
            err = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close_pipe(end.pipe)
                return
            end.connecting = False
        self._flush(end)

    def _on_readable(self, end: _End) -> None:
        try:
            data = end.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_pipe(end.pipe)
            return
        if not data:
            end.eof = True
            return
        end.peer.outbuf += data
        if not end.peer.connecting:
            self._flush(end.peer)

    def _flush(self, end: _End) -> None:
        if end.outbuf:
            try:
                sent = end.sock.send(end.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_pipe(end.pipe)
                return
            del end.outbuf[:sent]
        if not end.outbuf and end.peer.eof and not end.shut:
            end.shut = True
            try:
                end.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close_pipe(end.pipe)

    def _after_io(self, pipe: _Pipe) -> None:
        for end in (pipe.down, pipe.up):
            if end.peer.eof and not end.outbuf and not end.shut and not end.connecting:
                self._flush(end)
                if pipe.closed:
                    return
        if pipe.down.shut and pipe.up.shut:
            self._close_pipe(pipe)
            return
        self._update(pipe.down)
        self._update(pipe.up)

    def _update(self, end: _End) -> None:
        mask = 0
        if not end.eof and len(end.peer.outbuf) < BUFFER_LIMIT:
            mask |= selectors.EVENT_READ
        if end.connecting or end.outbuf:
            mask |= selectors.EVENT_WRITE
        if mask == end.mask:
            return
        if end.mask == 0:
            self._sel.register(end.sock, mask, ("end", end))
        elif mask == 0:
            self._sel.unregister(end.sock)
        else:
            self._sel.modify(end.sock, mask, ("end", end))
        end.mask = mask

    def _close_pipe(self, pipe: _Pipe, reset: bool = False) -> None:
        if pipe.closed:
            return
        pipe.closed = True
        for end in (pipe.down, pipe.up):
            if end.mask:
                self._sel.unregister(end.sock)
                end.mask = 0
            if reset:  # a cut: RST, and no TIME_WAIT left on the tunnel's port
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            end.sock.close()
        pipes = self._pipes.get(pipe.name)
        if pipes is not None:
            pipes.discard(pipe)
