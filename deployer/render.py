"""Render the client script and the small command templates (docs/how-to/client-template.md).

Jinja2 runs with ``StrictUndefined`` (a name the context lacks is an error,
never an empty string), ``keep_trailing_newline`` and no autoescape. Both the
script and the command environments have a ``quote`` filter (``shlex.quote``):
every value inserted into a shell command should go through it, e.g.
``python3 -m py_compile {{ path | quote }}``. Values inserted into the Python
client script should go through ``tojson`` (a JSON string is a Python string
literal), so hostile values stay literal.

The rendered script holds raw credentials (the client needs them): its
:class:`Rendered` hides the text from ``repr`` and :func:`mask_secrets` masks it
for display.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.errors import InventoryError, TemplateError
from deployer.model import HostConfig, Inventory
from deployer.secrets import scrub, secret_forms

# json.dumps options of the ``tojson`` filter: raw UTF-8 (so characters outside
# the BMP stay one character in a Python literal), stable key order.
JSON_DUMPS_KWARGS = {"sort_keys": True, "ensure_ascii": False}
_UNDEFINED_RE = re.compile(r"^'([^']+)' is undefined$")


@dataclass(frozen=True)
class Rendered:
    """A rendered script; ``sha256`` (hex of its UTF-8 bytes) is its version."""

    text: str = field(repr=False)
    sha256: str
    template: Path


def quote(value: Any) -> str:
    """The ``quote`` filter: one shell word, whatever the value holds."""
    return shlex.quote(str(value))


def _environment(loader: Any = None) -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - we render Python and shell, not HTML
    )
    env.filters["quote"] = quote
    env.policies["json.dumps_kwargs"] = dict(JSON_DUMPS_KWARGS)
    builtin_tojson = env.filters["tojson"]

    def tojson(eval_ctx: Any, value: Any, indent: Any = None) -> Any:
        if isinstance(value, jinja2.Undefined):
            str(value)  # StrictUndefined raises UndefinedError naming the missing var
        return builtin_tojson(eval_ctx, value, indent)

    env.filters["tojson"] = jinja2.pass_eval_context(tojson)
    return env


# --- the context ------------------------------------------------------------------


def host_context(inventory: Inventory, host: HostConfig) -> dict[str, Any]:
    """The template context: host settings, ``provider`` and every var
    (docs/how-to/client-template.md)."""
    context: dict[str, Any] = {}
    for item in dataclasses.fields(host):
        context[item.name] = getattr(host, item.name)
    context.update(
        host=host.name,
        dbid=host.dbid.reveal(),
        host_uuid=host.host_uuid.reveal(),
        client_id=host.client_id.reveal() if host.client_id else "",
        groups=list(host.groups),
        template=str(host.template),
        service=dataclasses.asdict(host.service),
        vars=dict(host.vars),
        provider={
            "user_id": inventory.provider.user_id.reveal(),
            "api_url": inventory.provider.api_url,
            "ssh_host": inventory.provider.ssh_host,
            "rate_limit": inventory.provider.rate_limit,
            "timeout": inventory.provider.timeout,
        },
    )
    del context["name"]
    for name, value in host.vars.items():
        if name in context:
            raise InventoryError(
                f"host {host.name}: var '{name}' shadows the built-in template name '{name}'; "
                "rename the var (in the inventory's vars or --var)"
            )
        context[name] = value
    return context


# --- the client script ------------------------------------------------------------


def render_script(inventory: Inventory, host: HostConfig, template: Path | None = None) -> Rendered:
    """Render ``template`` (default: the host's) for ``host``; errors -> TemplateError."""
    import jinja2

    path = Path(template if template is not None else host.template).expanduser().resolve()
    if not path.is_file():
        raise TemplateError(
            f"{path}: template not found; fix --template or the inventory's template key"
        )
    env = _environment(jinja2.FileSystemLoader(str(path.parent)))
    context = host_context(inventory, host)
    try:
        text = env.get_template(path.name).render(context)
    except Exception as exc:  # noqa: BLE001 - any failure inside the template is a template error
        raise _template_error(exc, path, inventory) from None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise TemplateError(
            f"{path}: the rendered script is not valid UTF-8 text (a lone surrogate in a value); "
            "fix the var or inventory value"
        ) from None
    return Rendered(text=text, sha256=hashlib.sha256(data).hexdigest(), template=path)


def _template_error(exc: Exception, path: Path, inventory: Inventory) -> TemplateError:
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError):
        where = f"{exc.filename or path}:{exc.lineno}"
        problem = f"syntax error: {exc.message}"
        fix = "fix the template syntax"
    elif isinstance(exc, jinja2.TemplateNotFound):
        where, problem = str(path), f"includes '{exc.name}', which does not exist"
        fix = f"put it in {path.parent}"
    else:
        where = _template_location(exc, path)
        problem, fix = _describe_failure(exc)
    return TemplateError(scrub(f"{where}: {problem}; {fix}", inventory.secret_values()))


def _template_location(exc: Exception, path: Path) -> str:
    """file:line of the innermost template frame of ``exc``'s traceback."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename and Path(frame.filename).parent == path.parent:
            return f"{frame.filename}:{frame.lineno}"
    return str(path)


def _describe_failure(exc: Exception) -> tuple[str, str]:
    message = getattr(exc, "message", None) or str(exc)
    match = _UNDEFINED_RE.match(message)
    if match:
        name = match.group(1)
        return (
            f"undefined name '{name}'",
            f"pass --var {name}=VALUE or set vars.{name} in the inventory",
        )
    return f"{type(exc).__name__}: {message}", "fix the template or the values it uses"


# --- command templates ------------------------------------------------------------


def render_command(template_str: str, context: dict[str, Any], what: str) -> str:
    """Render a small command template (service start/stop/check, validate, health...)."""
    import jinja2

    env = _environment()
    try:
        return env.from_string(template_str).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{what}: syntax error in command template: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside the template is a template error
        problem, _ = _describe_failure(exc)
        message = (
            f"{what}: {problem} in command template; use only host settings, vars and "
            "the names the command gets (see docs/reference/inventory.md)"
        )
        raise TemplateError(scrub(message, secret_forms(_context_secrets(context)))) from None


def _context_secrets(context: dict[str, Any]) -> list[str]:
    provider = context.get("provider")
    values = [context.get("dbid"), context.get("host_uuid"), context.get("client_id")]
    values.append(provider.get("user_id") if isinstance(provider, dict) else None)
    return [v for v in values if isinstance(v, str)]


def mask_secrets(text: str, inventory: Inventory) -> str:
    """``text`` with every credential of the inventory replaced by its mask."""
    return scrub(text, inventory.secret_values())
