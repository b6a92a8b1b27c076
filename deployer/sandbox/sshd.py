"""The embedded SSH servers of the sandbox's hosts (what deployer logs in to,
through a host's tunnel): asyncssh on 127.0.0.1, one port per host, no root
and no system package needed.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deployer.sandbox.loop import LoopThread

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READ_SIZE = 65536
START_TIMEOUT = 10.0
LISTEN_BACKLOG = 1024  # a big fleet run may open many sessions at once


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
    """asyncssh servers on 127.0.0.1, one per port, in one event loop of their own
    (a background thread): every host of the sandbox has its own port, all
    share the host key, the authorized key and the user."""

    def __init__(
        self,
        host_key: Path,
        authorized_key: Path,
        user: str,
        home: str,
        ports: Sequence[int] = (0,),
    ):
        self.host_key = host_key
        self.authorized_key = authorized_key
        self.user = user
        self.home = home
        self.ports = list(ports)
        self._thread = LoopThread("embedded-sshd")
        self._servers: list[Any] = []
        self._children: set[asyncio.subprocess.Process] = set()

    @property
    def port(self) -> int:
        return self.ports[0]

    def start(self) -> list[int]:
        """Start listening on every port (0: any free one); return the ports."""
        try:
            self._thread.start(self._listen, START_TIMEOUT)
        except Exception as exc:
            raise RuntimeError(f"embedded SSH server failed: {exc}") from exc
        return self.ports

    def stop(self) -> None:
        self._thread.stop(self._shutdown)

    async def _listen(self) -> None:
        import asyncssh

        keys = asyncssh.read_authorized_keys(str(self.authorized_key))
        host_key = asyncssh.read_private_key(str(self.host_key))
        for index, port in enumerate(self.ports):
            server = await asyncssh.create_server(
                lambda: _KeyOnlyServer(self.user, keys),
                "127.0.0.1",
                port,
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
            self._servers.append(server)
            self.ports[index] = server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
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


def key_only_server_class() -> type:
    """The asyncssh server class that allows public-key login of one user only
    (and nothing else: no forwarding unless a subclass allows it)."""
    return _server_classes()[0]


def _KeyOnlyServer(user: str, keys: Any) -> Any:  # a class factory
    return _server_classes()[0](user, keys)


def _HomeSftpServer(chan: Any, home: str) -> Any:  # a class factory
    return _server_classes()[1](chan, home)
