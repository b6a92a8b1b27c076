"""The remote host behind a small interface.

The workflow talks to a :class:`Remote`: run a shell command, write a file,
open a :class:`Channel` (one command that stays open, for the guard's link),
close. :class:`SshRemote` implements it on fabric (paramiko) through the
tunnel endpoint ``ssh_host:ssh_port``, with the host key policy of the
inventory: ``strict`` refuses unknown keys, ``accept-new`` records them, and
a changed key is always refused. Fabric's own defaults (paramiko's
AutoAddPolicy, no known_hosts loaded, ~/.ssh/config read, local stdin
forwarded) are all overridden here.

Every command handed to :meth:`Remote.run` is one shell string whose words
the caller has quoted with :func:`shlex.quote`; :func:`sh` builds one.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deployer.errors import (
    HostKeyError,
    RemoteCommandError,
    SshConnectError,
    SshSessionLost,
    TunnelNotUp,
)
from deployer.model import HostConfig, ProviderConfig

log = logging.getLogger("deployer.remote")

CONNECT_TIMEOUT = 15.0  # seconds for TCP + SSH handshake + auth
DEFAULT_COMMAND_TIMEOUT = 60.0
OUTPUT_TAIL = 400  # characters of output kept in errors
CLOSE_WAIT = 5.0  # seconds a channel's command gets to exit once its input has ended
# paramiko's reader thread wakes every 0.1 s when nothing arrives (its socket
# timeout), only to check for a close and a keepalive; over a 40 s soak that
# is a fifth of deployer's CPU for the host. Once the handshake is done it
# wakes once a second (keepalives are 5 s apart); ``close`` shuts the socket
# down first, so the thread still ends at once.
READER_WAKE = 1.0


def sh(*words: object) -> str:
    """One shell command line from words, each quoted."""
    return " ".join(shlex.quote(str(w)) for w in words)


def tail(text: str, limit: int = OUTPUT_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class Remote(Protocol):
    """What the workflow needs from a host."""

    name: str

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        check: bool = True,
        sudo: bool | None = None,
    ) -> CommandResult: ...

    def write_file(self, path: str, data: bytes) -> None: ...

    def open_channel(self, command: str, *, sudo: bool | None = None) -> Channel: ...

    def close(self) -> None: ...


class Channel(Protocol):
    """One long-lived command on the host: deployer writes to its stdin and reads
    its stdout line by line as it comes. Its end is :class:`SshSessionLost` when
    the session died under it, :class:`RemoteCommandError` when the command
    itself ended."""

    def write(self, data: bytes) -> None: ...

    def readline(self, timeout: float) -> str | None:
        """The next line (without its newline), or None if none came in ``timeout``."""
        ...

    def close(self) -> None:
        """End the command's input and let it exit, then close the channel."""
        ...


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _host_key_policy(policy: str, known_hosts: Path):
    """A paramiko MissingHostKeyPolicy for ``strict`` or ``accept-new``."""
    import paramiko

    class _Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            if policy == "strict":
                raise HostKeyError(
                    f"unknown host key for {hostname} ({key.get_name()} {fingerprint(key)}); "
                    f'add it to {known_hosts} or set host_key_policy = "accept-new"'
                )
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(known_hosts, "a", encoding="utf-8") as fh:
                fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            client.get_host_keys().add(hostname, key.get_name(), key)
            log.info("recorded new host key for %s (%s)", hostname, fingerprint(key))

    return _Policy()


class SshRemote:
    """A fabric connection to one host through its tunnel endpoint."""

    def __init__(
        self,
        provider: ProviderConfig,
        host: HostConfig,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ):
        self.name = host.name
        self.host = host
        self.endpoint = (provider.ssh_host, host.ssh_port)
        self.connect_timeout = connect_timeout
        self._conn = None
        self._sftp = None

    # -- connection ---------------------------------------------------------

    def open(self) -> SshRemote:
        known_hosts = Path(self.host.known_hosts).expanduser()
        # The TCP connection first: while a tunnel comes up, deployer tries again
        # and again (refused until the client's next poll), and a refusal should
        # cost a connect(), not a fabric Connection and its config each time.
        try:
            sock = socket.create_connection(self.endpoint, timeout=self.connect_timeout)
        except OSError as exc:
            raise self._connect_error(exc, known_hosts) from None
        try:  # the socket is closed on any failure before paramiko owns it
            conn = self._connection(sock, known_hosts)
        except BaseException:
            sock.close()
            raise
        try:
            conn.open()
        except HostKeyError as exc:
            exc.host = self.name
            conn.close()
            sock.close()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to our error types below
            conn.close()
            sock.close()
            raise self._connect_error(exc, known_hosts) from None
        conn.transport.set_keepalive(5)
        sock.settimeout(READER_WAKE)
        self._conn = conn
        return self

    def _connection(self, sock: socket.socket, known_hosts: Path):
        """The fabric Connection over ``sock``, host keys checked against ``known_hosts``."""
        from fabric import Config, Connection

        host = self.host
        config = Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})
        conn = Connection(
            host=self.endpoint[0],
            port=self.endpoint[1],
            user=host.ssh_user,
            config=config,
            connect_timeout=int(self.connect_timeout),
            forward_agent=False,
            connect_kwargs={
                "sock": sock,
                "key_filename": [str(Path(host.ssh_key).expanduser())],
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": self.connect_timeout,
                "auth_timeout": self.connect_timeout,
            },
        )
        conn.client.set_missing_host_key_policy(_host_key_policy(host.host_key_policy, known_hosts))
        if known_hosts.exists():
            conn.client.get_host_keys().load(str(known_hosts))
        return conn

    def _connect_error(self, exc: Exception, known_hosts: Path):
        import paramiko

        where = f"{self.endpoint[0]}:{self.endpoint[1]}"
        if isinstance(exc, paramiko.BadHostKeyException):
            name = _known_hosts_name(*self.endpoint)
            return HostKeyError(
                f"host key for {name} CHANGED: server offers {exc.key.get_name()} "
                f"{fingerprint(exc.key)}, {known_hosts} has {fingerprint(exc.expected_key)} "
                f"(line for '{name}'); if the host was really reinstalled, remove that line "
                f"(ssh-keygen -R '{name}' -f {known_hosts}) and run again",
                host=self.name,
                step="ssh",
            )
        if isinstance(exc, paramiko.AuthenticationException):
            return SshConnectError(
                f"SSH authentication failed for {self.host.ssh_user}@{where} with key "
                f"{self.host.ssh_key}: check ssh_user and ssh_key",
                host=self.name,
                step="ssh",
            )
        if isinstance(exc, FileNotFoundError | PermissionError):
            return SshConnectError(
                f"cannot read SSH key {self.host.ssh_key}: {exc.strerror}",
                host=self.name,
                step="ssh",
            )
        if isinstance(exc, socket.timeout | TimeoutError):
            return TunnelNotUp(
                f"SSH to {where} timed out after {self.connect_timeout:g}s",
                host=self.name,
                step="ssh",
            )
        if isinstance(exc, OSError | EOFError | paramiko.SSHException):
            # refused, reset, closed before the banner: no tunnel (yet) at that port,
            # or the tunnel is up but the host's sshd is not answering through it
            return TunnelNotUp(
                f"SSH to {where} failed: {type(exc).__name__}: {exc}", host=self.name, step="ssh"
            )
        return SshConnectError(
            f"SSH to {where} failed: {type(exc).__name__}: {exc}", host=self.name, step="ssh"
        )

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:  # noqa: BLE001 - closing a dead session
                pass
            self._sftp = None
        if self._conn is not None:
            transport = self._conn.transport
            if transport is not None:
                try:  # wakes paramiko's reader now, not at its next READER_WAKE
                    transport.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the other end
            self._conn.close()
            self._conn = None
            if transport is not None:
                # the socket is released only when paramiko's thread ends (it may
                # be reading the server's last messages): wait for it, so that the
                # connection is closed from this end before, say, ``disconnect``
                transport.join(CLOSE_WAIT)

    # -- commands -------------------------------------------------------------

    def _wrap(self, command: str, sudo: bool | None) -> str:
        if sudo if sudo is not None else self.host.sudo:
            return sh("sudo", "-n", "sh", "-c", command)
        return command

    def run(
        self,
        command: str,
        *,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        check: bool = True,
        sudo: bool | None = None,
    ) -> CommandResult:
        if self._conn is None:
            raise SshConnectError("SSH session is not open", host=self.name)
        full = self._wrap(command, sudo)
        log.debug("%s: run %s", self.name, full)
        try:
            res = self._conn.run(full, hide=True, warn=True, timeout=timeout, in_stream=False)
        except Exception as exc:  # noqa: BLE001 - fabric/invoke/paramiko/socket errors
            raise self._run_error(exc, full, timeout) from None
        result = CommandResult(full, res.exited, res.stdout, res.stderr)
        if check and not result.ok:
            raise RemoteCommandError(
                f"remote command failed (exit {result.exit_status}): {tail(full, 200)}: "
                f"{tail(result.stderr or result.stdout)}",
                host=self.name,
                command=full,
                exit_status=result.exit_status,
                output_tail=tail(result.stderr or result.stdout),
            )
        return result

    def _run_error(self, exc: Exception, command: str, timeout: float | None):
        from invoke.exceptions import CommandTimedOut

        if isinstance(exc, CommandTimedOut):
            return RemoteCommandError(
                f"remote command timed out after {timeout:g}s: {tail(command, 200)}",
                host=self.name,
                command=command,
            )
        return SshSessionLost(f"SSH session lost: {type(exc).__name__}: {exc}", host=self.name)

    def open_channel(self, command: str, *, sudo: bool | None = None) -> SshChannel:
        """Start ``command`` on a channel of its own and keep it open (one round trip)."""
        if self._conn is None:
            raise SshConnectError("SSH session is not open", host=self.name)
        full = self._wrap(command, sudo)
        log.debug("%s: channel %s", self.name, tail(full, 200))
        try:
            chan = self._conn.transport.open_session(timeout=self.connect_timeout)
            chan.exec_command(full)
        except Exception as exc:  # noqa: BLE001 - paramiko/socket errors: the session
            raise SshSessionLost(
                f"SSH session lost: {type(exc).__name__}: {exc}", host=self.name
            ) from None
        return SshChannel(chan, self.name, full)

    def write_file(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` (a fresh temp path; the caller renames it).

        With ``sudo`` the SSH user cannot write beside a root-owned script: the
        data goes to a temp file of the user's, then ``sudo mv`` puts it in place.
        """
        if self._conn is None:
            raise SshConnectError("SSH session is not open", host=self.name)
        if self.host.sudo:
            tmp = self.run("mktemp", sudo=False).stdout.strip()
            self._sftp_put(tmp, data)
            self.run(sh("mv", tmp, path))
            return
        self._sftp_put(path, data)

    def _sftp_put(self, path: str, data: bytes) -> None:
        if self._conn is None:
            raise SshConnectError("SSH session is not open", host=self.name)
        try:
            if self._sftp is None:
                self._sftp = self._conn.sftp()
            sftp = self._sftp
            with sftp.open(path, "wb") as fh:
                fh.set_pipelined(True)
                fh.write(data)
        except OSError as exc:
            raise RemoteCommandError(
                f"upload to {path} failed: {exc}", host=self.name, command=f"sftp put {path}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - paramiko SSHException, EOFError, socket
            raise SshSessionLost(
                f"SSH session lost during upload to {path}: {type(exc).__name__}", host=self.name
            ) from None


class SshChannel:
    """A :class:`Channel` on a paramiko session channel."""

    def __init__(self, chan: Any, name: str, command: str):
        self._chan, self.name, self.command = chan, name, command
        self._buf = b""

    def write(self, data: bytes) -> None:
        try:
            self._chan.sendall(data)
        except Exception as exc:  # noqa: BLE001 - socket, paramiko, EOF: the session
            raise self._ended(exc) from None

    def readline(self, timeout: float) -> str | None:
        end = time.monotonic() + max(timeout, 0.0)
        while b"\n" not in self._buf:
            self._chan.settimeout(max(end - time.monotonic(), 0.0))
            try:
                data = self._chan.recv(65536)
            except TimeoutError:
                return None
            except Exception as exc:  # noqa: BLE001 - the session died under it
                raise self._ended(exc) from None
            if not data:
                raise self._ended(None)
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _ended(self, exc: Exception | None) -> Exception:
        transport = self._chan.get_transport()
        if exc is not None or transport is None or not transport.is_active():
            why = f"{type(exc).__name__}: {exc}" if exc is not None else "the connection closed"
            return SshSessionLost(f"SSH session lost: {why}", host=self.name)
        self._chan.status_event.wait(5)
        status = self._chan.exit_status if self._chan.exit_status_ready() else -1
        err = b""
        while self._chan.recv_stderr_ready():
            err += self._chan.recv_stderr(65536)
        text = err.decode("utf-8", "replace")
        return RemoteCommandError(
            f"remote command ended (exit {status}): {tail(self.command, 200)}: {tail(text)}",
            host=self.name,
            command=self.command,
            exit_status=status,
            output_tail=tail(text),
        )

    def close(self) -> None:
        """End deployer's input (the command sees EOF), let the command exit, then
        close: as a command run to its end, never a channel cut under a running
        command (some servers end the whole connection for that)."""
        try:
            transport = self._chan.get_transport()
            if transport is not None and transport.is_active() and not self._chan.closed:
                self._chan.shutdown_write()
                self._chan.status_event.wait(CLOSE_WAIT)
            self._chan.close()
        except Exception:  # noqa: BLE001 - closing a dead channel
            pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
