"""The embedded SSH server of the sandbox: asyncssh on 127.0.0.1, no root and no
system package needed.

It behaves like OpenSSH where deployer can tell the difference: public-key
authentication only (against one authorized key, for the current user only);
``exec`` runs the command with ``/bin/sh -c`` in a new session (as sshd does)
in the user's home, streams stdout and stderr, and reports the exit status
once the command has exited **and** its output pipes are closed — so a
command that leaves a background process holding stdout hangs here as it
would under OpenSSH; SFTP with ``posix-rename@openssh.com``. A process that a
command detaches (``setsid … &``) survives the session: nothing is killed when
a channel closes. Port forwarding, agent and X11 forwarding are refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import posixpath
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READ_SIZE = 65536
START_TIMEOUT = 10.0
LISTEN_BACKLOG = 1024  # every tunnel of a big fleet may connect at once


def session_env(user: str, home: str) -> dict[str, str]:
    """The environment of a command run over SSH (what sshd gives a session)."""
    return {
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/sh",
        "PATH": DEFAULT_PATH,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }


class EmbeddedSshServer:
    """An asyncssh server running its own event loop in a background thread."""

    def __init__(
        self,
        host_key: Path,
        authorized_key: Path,
        user: str,
        home: str,
        port: int = 0,
    ):
        self.host_key = host_key
        self.authorized_key = authorized_key
        self.user = user
        self.home = home
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._children: set[asyncio.subprocess.Process] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> int:
        """Start listening; return the port."""
        self._thread = threading.Thread(target=self._run, name="embedded-sshd", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("embedded SSH server did not start")
        if self._error is not None:
            raise RuntimeError(f"embedded SSH server failed: {self._error}") from self._error
        return self.port

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(5)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.exception("embedded sshd shutdown")
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(5)

    # --- the loop thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._listen())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _listen(self) -> None:
        import asyncssh

        keys = asyncssh.read_authorized_keys(str(self.authorized_key))
        host_key = asyncssh.read_private_key(str(self.host_key))
        self._server = await asyncssh.create_server(
            lambda: _KeyOnlyServer(self.user, keys),
            "127.0.0.1",
            self.port,
            server_host_keys=[host_key],
            process_factory=self._handle_process,
            sftp_factory=lambda chan: _HomeSftpServer(chan, self.home),
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            login_timeout=30,
            backlog=LISTEN_BACKLOG,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for proc in list(self._children):
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGHUP)
                except ProcessLookupError:
                    pass

    # --- exec ------------------------------------------------------------------------------

    async def _handle_process(self, process: Any) -> None:
        command = process.command
        argv = ["/bin/sh", "-c", command] if command is not None else ["/bin/sh"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.home,
                env=session_env(self.user, self.home),
                start_new_session=True,
            )
        except OSError as exc:
            process.stderr.write(f"sh: {exc}\n".encode())
            process.exit(127)
            return
        self._children.add(proc)
        try:
            status = await _relay_process(process, proc)
        finally:
            self._children.discard(proc)
        _finish(process, status)


async def _relay_process(process: Any, proc: asyncio.subprocess.Process) -> int:
    """Pump the channel into the command and its output back; return its status."""
    feeder = asyncio.ensure_future(_pump_stdin(process, proc))
    outputs = [
        asyncio.ensure_future(_pump_output(proc.stdout, process.stdout)),
        asyncio.ensure_future(_pump_output(proc.stderr, process.stderr)),
    ]
    status = await proc.wait()
    await asyncio.gather(*outputs, return_exceptions=True)  # until the pipes close, as sshd
    feeder.cancel()
    return status


async def _pump_stdin(process: Any, proc: asyncio.subprocess.Process) -> None:
    stdin = proc.stdin
    assert stdin is not None
    try:
        while True:
            data = await process.stdin.read(READ_SIZE)
            if not data:
                break
            stdin.write(data)
            await stdin.drain()
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 - channel or pipe gone
        pass
    finally:
        try:
            stdin.close()
        except OSError:
            pass


async def _pump_output(source: asyncio.StreamReader | None, target: Any) -> None:
    assert source is not None
    channel_ok = True
    while True:
        data = await source.read(READ_SIZE)
        if not data:
            return
        if not channel_ok:
            continue  # keep draining so the command never blocks on a full pipe
        try:
            target.write(data)
            await target.drain()
        except Exception:  # noqa: BLE001 - the client went away; keep draining
            channel_ok = False


def _finish(process: Any, status: int) -> None:
    try:
        if status < 0:
            name = signal.Signals(-status).name.removeprefix("SIG")
            process.exit_with_signal(name)
        else:
            process.exit(status)
    except Exception:  # noqa: BLE001 - the channel may already be closed
        log.debug("exit status not delivered (channel closed)")


@functools.cache
def _server_classes():
    import asyncssh

    class KeyOnlyServer(asyncssh.SSHServer):
        """Public-key auth only, and only for the sandbox's user."""

        def __init__(self, user: str, keys: Any):
            self._user = user
            self._keys = keys
            self._conn: Any = None

        def connection_made(self, conn: Any) -> None:
            self._conn = conn

        def begin_auth(self, username: str) -> bool:
            if username == self._user:
                self._conn.set_authorized_keys(self._keys)
            return True

        def password_auth_supported(self) -> bool:
            return False

        def kbdint_auth_supported(self) -> bool:
            return False

        def public_key_auth_supported(self) -> bool:
            return True

    class HomeSftpServer(asyncssh.SFTPServer):
        """The local filesystem, with relative paths taken from the user's home (as sftp-server)."""

        def __init__(self, chan: Any, home: str):
            super().__init__(chan)
            self._home = os.fsencode(home)

        def map_path(self, path: bytes) -> bytes:
            if path.startswith(b"/"):
                return path
            return posixpath.join(self._home, path)

    return KeyOnlyServer, HomeSftpServer


def _KeyOnlyServer(user: str, keys: Any) -> Any:  # noqa: N802 - a class factory
    return _server_classes()[0](user, keys)


def _HomeSftpServer(chan: Any, home: str) -> Any:  # noqa: N802 - a class factory
    return _server_classes()[1](chan, home)
