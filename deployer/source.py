"""Where a host's new client script comes from (``source``:
docs/how-to/provider-source.md).

Two sources, one result, a :class:`Script` (the exact text, its sha256 — the
version — and where it came from):

* :class:`TemplateSource` (``source = "template"``, the default) renders the
  host's Jinja2 template locally (docs/how-to/client-template.md). Its errors are
  :class:`~deployer.errors.TemplateError`: exit 2 before any network call.
* :class:`ProviderSource` (``source = "provider"``) fetches the script the
  provider generated for the host's ``client_id`` (``get_client_script`` with
  the account's ``api_key``) and refuses one that is empty, not UTF-8 text or
  not Python (:class:`~deployer.errors.InvalidScript`). Fetching needs the
  network, so it is not one of the exit-2 plan checks: a refused or failed
  fetch fails that host only.

:func:`check_pin` holds a script to a reviewed sha256 (``--expect-sha256``,
the ``expect_sha256`` key), whatever its source.

:func:`settle_scripts` is the network part of the plan phase for a run: it
fetches every provider host's script and checks every pin **before any host
starts** (so before any window opens), and turns each refusal into the host's
``failed`` result. It stops fetching at the first account-level code (32,
invalid api key: every other fetch would get the same answer); then no host
starts at all.

What must stay true: a script's text holds the host's credentials, so it is
never in a repr, a log record or an error message (errors quote our own words,
the host name and hashes only); show it only through ``render.mask_secrets``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from deployer.errors import (
    ApiError,
    DeployerError,
    InvalidScript,
    PinMismatch,
    ScriptRefused,
    UsageError,
)
from deployer.model import HostConfig, Inventory
from deployer.result import ErrorInfo, HostResult, Outcome, StepRecord, StepStatus
from deployer.rollout import RUN_STOPPING_CODES, SKIPPED_ERROR_TYPE
from deployer.secrets import scrub

if TYPE_CHECKING:
    from deployer.events import EventSink
    from deployer.plan import HostPlan

TEMPLATE, PROVIDER = "template", "provider"
PROVIDER_ORIGIN = "provider (get_client_script)"
FETCH_STEP = "fetch"  # the step named in a failed fetch's error (plan phase, before preflight)
PIN_STEP = "pin"  # the step named in a pin mismatch's error


@dataclass(frozen=True)
class Script:
    """A script to install. ``text`` holds credentials: it is kept out of repr."""

    text: str = field(repr=False)
    sha256: str
    origin: str  # the template's path, or PROVIDER_ORIGIN

    @property
    def data(self) -> bytes:
        return self.text.encode("utf-8")


class ScriptSource(Protocol):
    """Gives the script to install on a host."""

    def script_for(self, host: HostConfig) -> Script: ...


class TemplateSource:
    """The host's template (or ``template``, from ``--template``), rendered locally."""

    def __init__(self, inventory: Inventory, template: Path | None = None):
        self.inventory = inventory
        self.template = template

    def script_for(self, host: HostConfig) -> Script:
        from deployer.render import render_script

        rendered = render_script(self.inventory, host, self.template)
        return Script(rendered.text, rendered.sha256, str(rendered.template))


class ProviderSource:
    """The provider's current script for the host's ``client_id``, checked locally."""

    def __init__(self, api: Any, secrets: Sequence[str] = ()):
        self.api = api  # deployer.api.ProviderAPI, or a fake with get_client_script
        self.secrets = list(secrets)  # credentials to mask in a refusal's message

    def fetch(self, host: HostConfig) -> str:
        """The script as the provider sends it (raises ApiError)."""
        return self.api.get_client_script(host)

    def script_for(self, host: HostConfig) -> Script:
        return provider_script(host.name, self.fetch(host), self.secrets)


def source_for(inventory: Inventory, host: HostConfig, api: Any, template: Path | None = None):
    """The :class:`ScriptSource` of ``host``; ``template`` is ``--template``."""
    check_template_option([host], template)
    if host.source == PROVIDER:
        return ProviderSource(api, inventory.secret_values())
    return TemplateSource(inventory, template)


def check_template_option(hosts: Sequence[HostConfig], template: Path | None) -> None:
    """``--template`` replaces a host's template; a provider host has none (exit 2)."""
    fetching = [h.name for h in hosts if h.source == PROVIDER]
    if template is not None and fetching:
        raise UsageError(
            f"--template replaces a host's template, but host {fetching[0]} has "
            'source = "provider" (the provider\'s script); target template hosts only, '
            "or drop --template"
        )


# --- checks -----------------------------------------------------------------------


def provider_script(host_name: str, text: Any, secrets: Sequence[str] = ()) -> Script:
    """``text`` from the provider as a :class:`Script`, or :class:`InvalidScript`:
    empty, not UTF-8 text, or not Python (``compile()`` here, nothing run)."""

    def refuse(problem: str) -> InvalidScript:
        message = (
            f"host {host_name}: the provider's script {problem}; nothing was touched on the "
            f"host. Check its client at the provider (deployer api get_client_script "
            f'{host_name}) or deploy a template (source = "template")'
        )
        return InvalidScript(scrub(message, secrets), host=host_name, step=FETCH_STEP)

    if not isinstance(text, str) or not text.strip():
        raise refuse("is empty")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise refuse(f"is not valid UTF-8 text (character {exc.start + 1} is not)") from None
    problem = _python_problem(text)
    if problem:
        raise refuse(f"is not valid Python ({problem})")
    return Script(text, hashlib.sha256(data).hexdigest(), PROVIDER_ORIGIN)


def _python_problem(text: str) -> str | None:
    """Why ``text`` does not compile, in words that quote none of it; None if it does."""
    try:
        with warnings.catch_warnings():  # SyntaxWarnings would print script lines
            warnings.simplefilter("ignore")
            compile(text, "<provider script>", "exec", dont_inherit=True)
    except SyntaxError as exc:  # msg and line only: exc.text is a line of the script
        return f"{exc.msg}, line {exc.lineno}"
    except (ValueError, RecursionError, OverflowError, MemoryError) as exc:
        return type(exc).__name__  # e.g. a NUL byte, or nesting too deep to compile
    return None


def check_pin(host_name: str, sha256: str, expected: str | None) -> None:
    """Raise :class:`PinMismatch` unless ``sha256`` is the pinned hash (no pin: pass)."""
    if expected and sha256 != expected.lower():
        raise PinMismatch(
            f"host {host_name}: the script's sha256 is {sha256}, but {expected.lower()} is "
            "pinned (--expect-sha256 or expect_sha256); nothing was touched on the host. "
            f"Review the script (deployer render {host_name}) and pin its sha256, or drop "
            "the pin",
            host=host_name,
            step=PIN_STEP,
        )


# --- the plan phase of a run ------------------------------------------------------


@dataclass
class Fetched:
    """What fetching a fleet's provider scripts gave."""

    texts: dict[str, str] = field(default_factory=dict, repr=False)  # host -> raw script
    errors: dict[str, ApiError] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None  # the host whose account-level error stopped fetching


def fetch_all(api: Any, hosts: Sequence[HostConfig], parallel: int = 1) -> Fetched:
    """``get_client_script`` for each host, ``parallel`` at a time (``--parallel``; the
    run's rate limiter paces them); the first account-level error
    (:data:`~deployer.rollout.RUN_STOPPING_CODES`) stops the fetches not yet begun."""
    fetched, lock, stop = Fetched(), threading.Lock(), threading.Event()

    def fetch(host: HostConfig) -> None:
        if stop.is_set():
            return
        started = time.monotonic()
        try:
            text = api.get_client_script(host)
        except ApiError as exc:
            with lock:
                fetched.errors[host.name] = exc
                fetched.seconds[host.name] = time.monotonic() - started
                if exc.code in RUN_STOPPING_CODES and fetched.stopped_by is None:
                    fetched.stopped_by = host.name
                    stop.set()
            return
        with lock:
            fetched.texts[host.name] = text
            fetched.seconds[host.name] = time.monotonic() - started

    if hosts:
        workers = max(1, min(len(hosts), parallel))
        with ThreadPoolExecutor(workers, thread_name_prefix="deployer-fetch") as pool:
            for future in [pool.submit(fetch, host) for host in hosts]:
                future.result()  # a bug (not an ApiError) surfaces here
    return fetched


@dataclass
class Settled:
    """The plans to run (scripts filled in) and the hosts that must not start."""

    plans: dict[str, HostPlan]
    refused: dict[str, HostResult] = field(default_factory=dict)


def settle_scripts(
    plans: Mapping[str, HostPlan],
    api: Any,
    inventory: Inventory,
    *,
    expect_sha256: str | None = None,
    parallel: int = 1,
) -> Settled:
    """Fetch every provider host's script into its plan, then check every pin.

    ``expect_sha256`` (``--expect-sha256``) overrides each host's own
    ``expect_sha256``. A refused host gets a ``failed`` result; when an
    account-level error stopped the fetching, every other host gets ``skipped``.
    """
    secrets = inventory.secret_values()
    settled = Settled(dict(plans))
    fetching = [p.host for p in plans.values() if p.host.source == PROVIDER]
    fetched = fetch_all(api, fetching, parallel)
    for host in fetching:
        error: DeployerError | None = fetched.errors.get(host.name)
        if error is None and host.name not in fetched.texts:
            continue  # never fetched (an account-level error came first): skipped below
        if error is None:
            try:
                script = provider_script(host.name, fetched.texts[host.name], secrets)
            except ScriptRefused as exc:
                error = exc
        if error is not None:
            seconds = fetched.seconds.get(host.name, 0.0)
            settled.refused[host.name] = _failed(
                api, host.name, error, FETCH_STEP, seconds, secrets
            )
            continue
        settled.plans[host.name] = dataclasses.replace(
            plans[host.name], script=script.data, sha256=script.sha256, template=script.origin
        )
    if fetched.stopped_by is not None:
        _skip_the_rest(settled, fetched.stopped_by)
        return settled
    for name, plan in settled.plans.items():
        pin = expect_sha256 or plan.host.expect_sha256
        if name in settled.refused or not pin or plan.sha256 is None:
            continue
        try:
            check_pin(name, plan.sha256, pin)
        except PinMismatch as exc:
            result = _failed(api, name, exc, PIN_STEP, 0.0, secrets)
            result.new_sha256 = plan.sha256
            settled.refused[name] = result
    return settled


def _failed(
    api: Any, name: str, exc: Exception, step: str, seconds: float, secrets: Sequence[str]
) -> HostResult:
    error = ErrorInfo.from_exception(exc, step)
    error.message = scrub(error.message, secrets)  # ours are clean already; be sure
    return HostResult(
        host=name,
        result=Outcome.FAILED,
        api_calls=api.calls_for(name),
        duration_seconds=seconds,
        steps=[StepRecord(step, StepStatus.FAILED, seconds)],
        error=error,
    )


def _skip_the_rest(settled: Settled, stopped_by: str) -> None:
    """An account-level error: no host starts (those that failed keep their failure)."""
    cause = settled.refused[stopped_by].error
    assert cause is not None  # a refused host carries its error
    reason = (
        f"run stopped: account-level error (API code {cause.api_error_code} on {stopped_by}: "
        f"{cause.type})"
    )
    for name in settled.plans:
        if name not in settled.refused:
            error = ErrorInfo(step=None, type=SKIPPED_ERROR_TYPE, message=reason)
            settled.refused[name] = HostResult(name, Outcome.SKIPPED, error=error)


def report_refused(result: HostResult, events: EventSink) -> HostResult:
    """Tell the run's sinks (progress, journal) about a host that will not start."""
    if result.result is Outcome.FAILED:
        events.host_started(result.host)
        for step in result.steps:
            events.step_started(result.host, step.step)
            events.step_finished(result.host, step.step, step.status, step.seconds)
    events.host_finished(result)
    return result
