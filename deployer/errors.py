"""One root exception, narrow subclasses, and the exit codes they map to.

Every expected failure is a :class:`DeployerError`. The CLI boundary
(``deployer/cli/main.py``) turns one into a single line on stderr and the
exit code below; anything else is a bug and is logged with its traceback at
debug level. Messages never contain credentials: build them from masked
values only (see ``deployer.secrets``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_FAILED = 1  # some host rolled_back / failed / skipped, none unsafe
EXIT_USAGE = 2  # usage, inventory or template error: nothing touched
EXIT_UNSAFE = 3  # some host's end state is not verified
EXIT_OFFLINE = 4  # --wait-offline: every host succeeded but some stayed offline (nothing touched)
EXIT_INTERRUPTED = 130  # interrupted, after the safe wind-down


class DeployerError(Exception):
    """Root of every expected deployer failure."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, host: str | None = None, step: str | None = None):
        super().__init__(message)
        self.message = message
        self.host = host
        self.step = step

    def __str__(self) -> str:
        return self.message


# --- local input: exit 2, nothing touched ------------------------------------


class LocalInputError(DeployerError):
    """Bad local input; raised before any network call."""

    exit_code = EXIT_USAGE


class UsageError(LocalInputError):
    """Bad command-line arguments."""


class InventoryError(LocalInputError):
    """The inventory file is missing, malformed or inconsistent."""


class TemplateError(LocalInputError):
    """A template does not exist, does not parse, or uses an undefined name."""


# --- the provider API ---------------------------------------------------------


class ApiError(DeployerError):
    """A provider API call failed. ``code`` is the provider's ``error_code``."""

    code: int | None = None

    def __init__(self, message: str, *, call: str, code: int | None = None, **kw):
        super().__init__(message, **kw)
        self.call = call
        if code is not None:
            self.code = code


class ApiTransientError(ApiError):
    """Network error, timeout, HTTP 5xx or a reply that is not the provider's JSON."""


class NotConnected(ApiError):
    code = 11


class NotDisconnected(ApiError):
    code = 12


class InvalidApiCall(ApiError):
    code = 21


class TooManyCalls(ApiError):
    code = 22


class ClientBlocked(ApiError):
    code = 23


class ClientInactive(ApiError):
    code = 24


class WrongData(ApiError):
    code = 31


# get_client_script (docs/how-to/provider-source.md) has codes of its own.


class InvalidApiKey(ApiError):
    """32: the account's ``api_key`` is wrong; every fetch of the run would fail."""

    code = 32


class ForwardingServerUnreachable(ApiError):
    """40: the provider cannot reach the forwarding server; usually passes."""

    code = 40


class InvalidRegion(ApiError):
    """41: the client's region is not valid at the provider (its settings there)."""

    code = 41


class ProviderInternalError(ApiError):
    """45: the provider failed inside; usually passes."""

    code = 45


class UnknownApiError(ApiError):
    """An error code docs/reference/api-codes.md does not list; never retried."""


API_ERRORS_BY_CODE: dict[int, type[ApiError]] = {
    cls.code: cls
    for cls in (
        NotConnected,
        NotDisconnected,
        InvalidApiCall,
        TooManyCalls,
        ClientBlocked,
        ClientInactive,
        WrongData,
        InvalidApiKey,
        ForwardingServerUnreachable,
        InvalidRegion,
        ProviderInternalError,
    )
}


# --- the remote host ----------------------------------------------------------


class RemoteError(DeployerError):
    """Something on the remote host failed."""


class HostKeyError(RemoteError):
    """The host key is unknown (strict) or changed (always refused)."""


class SshConnectError(RemoteError):
    """The SSH session could not be opened or was lost."""


class TunnelNotUp(SshConnectError):
    """Nothing answers SSH at the tunnel's endpoint yet (refused, reset, no banner).

    Expected right after ``connect``: a real client opens its tunnel at its next
    poll, seconds later. Retried until ``provider.tunnel_timeout``."""


class SshSessionLost(SshConnectError):
    """An open SSH session died: the tunnel under it ended (the old client's stop
    ended its tunnel process, the provider cut it) or the network went away."""


class RemoteCommandError(RemoteError):
    """A remote command exited non-zero; carries the command and its output tail."""

    def __init__(
        self,
        message: str,
        *,
        command: str = "",
        exit_status: int | None = None,
        output_tail: str = "",
        **kw,
    ):
        super().__init__(message, **kw)
        self.command = command
        self.exit_status = exit_status
        self.output_tail = output_tail


class LockHeld(RemoteError):
    """Another deployer holds the host lock."""


class VerifyError(RemoteError):
    """A remote check (sha256, validate, health) disagreed with what we expect."""


# --- the workflow --------------------------------------------------------------


class ScriptRefused(DeployerError):
    """A script to install was refused before anything was touched on its host."""


class InvalidScript(ScriptRefused):
    """The provider's script is empty, not UTF-8 text, or not valid Python."""


class PinMismatch(ScriptRefused):
    """The script's sha256 is not the pinned one (``--expect-sha256``, ``expect_sha256``)."""


class ClientOffline(DeployerError):
    """The client did not come (or stay) online."""


class GuardError(DeployerError):
    """The guard reported a failure or stopped answering."""


class Interrupted(DeployerError):
    """Ctrl-C or SIGTERM; the host was wound down safely."""

    exit_code = EXIT_INTERRUPTED


class JournalError(DeployerError):
    """The state journal cannot be opened or written."""


# --- message help -------------------------------------------------------------


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a mistyped ``name`` most likely meant, for a message's
    "did you mean" fix; None when none is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None
