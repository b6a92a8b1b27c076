"""Load, validate and query the inventory (``deployer.toml``, docs/reference/inventory.md).

The loader reads TOML, replaces ``${ENV_NAME}`` in every string, checks every
table against the key schemas below (policies as data), merges each host's
settings (defaults < groups in the host's listed order < host < ``--var``) and
returns the frozen :class:`~deployer.model.Inventory`. Every problem is an
:class:`~deployer.errors.InventoryError` of one line: the file, the line where
it can be found, the table and key, what is wrong and the fix. Credential values
(:data:`SECRET_KEYS`) never appear in a message.

Like OpenSSH with a private key, the loader refuses a file that holds a
credential as a literal value (not ``${ENV}``) while group or others may read
it, and names the ``chmod 600`` that fixes it.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deployer.errors import InventoryError, UsageError, closest_name
from deployer.model import HostConfig, Inventory, ProviderConfig, ServiceConfig
from deployer.result import readable_by
from deployer.secrets import Secret, scrub
from deployer.targets import RESERVED_TARGETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

KeyPath = tuple[str, ...]

# --- the schema: policies as data ----------------------------------------------

TOP_LEVEL_KEYS = ("provider", "defaults", "groups", "hosts")
PROVIDER_TYPES: dict[str, type] = {
    "api_url": str,
    "ssh_host": str,
    "user_id": str,
    "rate_limit": float,
    "timeout": float,
    "offline_detection": float,
    "tunnel_timeout": float,
    "api_key": str,
}
PROVIDER_REQUIRED = ("api_url", "ssh_host", "user_id")
PROVIDER_DEFAULTS = {
    "rate_limit": 5.0,
    "timeout": 10.0,
    "offline_detection": 30.0,
    "tunnel_timeout": 30.0,
}

# Settings that [defaults], [groups.X] and [hosts.X] may all hold.
SETTING_TYPES: dict[str, type] = {
    "ssh_user": str,
    "ssh_key": str,
    "known_hosts": str,
    "host_key_policy": str,
    "template": str,
    "script_path": str,
    "mode": str,
    "sudo": bool,
    "online_timeout": float,
    "stable_for": float,
    "keep_backups": int,
    "validate": str,
    "health": str,
    "guard_deadline": float,
    "python": str,
    "source": str,
    "expect_sha256": str,
    "vars": dict,
    "service": dict,
}
# Keys only a [hosts.X] table may hold.
HOST_ONLY_TYPES: dict[str, type] = {
    "dbid": str,
    "host_uuid": str,
    "ports_id": int,
    "ssh_port": int,
    "client_id": str,
    "groups": list,
}
HOST_REQUIRED = ("dbid", "host_uuid", "ports_id", "ssh_port")
SERVICE_TYPES: dict[str, type] = {
    name: str for name in ("kind", "unit", "pidfile", "run", "start", "stop", "check", "ready")
}
# service.kind -> the fields it needs (non-empty after merging).
SERVICE_REQUIRED: dict[str, tuple[str, ...]] = {
    "systemd": ("unit",),
    "pidfile": ("pidfile", "run"),
    "command": ("start", "stop", "check"),
}
HOST_KEY_POLICIES = ("strict", "accept-new")
SOURCES = ("template", "provider")  # where a host's script comes from (deployer.source)
# Credential keys, wherever they stand: masked in messages, and a literal one
# (not ${ENV}) makes the file private (see _check_private).
SECRET_KEYS = frozenset({"user_id", "dbid", "host_uuid", "api_key", "client_id"})

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MODE_RE = re.compile(r"^0?[0-7]{3}$")
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
ENV_ESCAPE = "$${"
ENV_ONLY_RE = re.compile(r"(?:\$\{[A-Za-z_][A-Za-z0-9_]*\}|\s)+")  # fullmatch: no literal part
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
TYPE_NAMES.update({dict: "a table", list: "an array"})

MISSING_FILE_HINT = "pass -i PATH or set $DEPLOYER_INVENTORY (default: ./deployer.toml)"


# --- locating keys in the source text (tomllib gives no positions) --------------


def _split_key(text: str) -> KeyPath:
    """Split a TOML dotted key (``hosts."pi-01".service``) into its parts."""
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([^.\s]+)', text)
    return tuple(a or b or c for a, b, c in parts)


_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\[\]#]+?)\s*\]\]?\s*(?:#.*)?$")


class _Locator:
    """Finds the line of a table or key in the inventory source, best effort."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.sections: list[tuple[KeyPath, int]] = [((), 0)]  # (table path, header index)
        for index, line in enumerate(self.lines):
            match = _HEADER_RE.match(line)
            if match:
                self.sections.append((_split_key(match.group(1)), index))

    def line_of(self, path: KeyPath) -> int | None:
        found = self._line_in_table(path)
        if found is None and path:
            for table, start in self.sections:
                if table[: len(path)] == path:
                    return start + 1
        return found

    def _line_in_table(self, path: KeyPath) -> int | None:
        best: tuple[KeyPath, int] | None = None
        for number, (table, _start) in enumerate(self.sections):
            if path[: len(table)] == table and (best is None or len(table) >= len(best[0])):
                best = (table, number)
        if best is None:
            return None
        table, number = best
        start = self.sections[number][1]
        end = self.sections[number + 1][1] if number + 1 < len(self.sections) else len(self.lines)
        rest = path[len(table) :]
        if rest:
            found = self._find_key(rest, start, end)
            if found is not None:
                return found + 1
        return start + 1 if table else None

    def _find_key(self, rest: KeyPath, start: int, end: int) -> int | None:
        head = re.escape(rest[0])
        pattern = re.compile(rf"""^\s*(?:{head}|"{head}"|'{head}')\s*[=.]""")
        for index in range(start, end):
            if pattern.match(self.lines[index]):
                return index
        return None


# --- error building ---------------------------------------------------------------


@dataclass
class _Source:
    """The inventory file being loaded: where errors point and what they must hide."""

    path: Path
    locator: _Locator
    secrets: set[str]

    def error(self, key: KeyPath, problem: str, fix: str) -> InventoryError:
        line = self.locator.line_of(key)
        where = f"{self.path}:{line}" if line else str(self.path)
        what = f"{_describe_key(key)}: " if key else ""
        message = f"{where}: {what}{problem}; {fix}"
        one_line = message.replace("\r", "\\r").replace("\n", "\\n")
        return InventoryError(scrub(one_line, self.secrets))


def _describe_key(key: KeyPath) -> str:
    """``('hosts', 'pi-01', 'ssh_port')`` -> ``[hosts.pi-01] ssh_port``."""
    tables = {"provider": 1, "defaults": 1, "groups": 2, "hosts": 2}
    depth = tables.get(key[0], 1)
    if len(key) > depth and key[depth] == "service" and len(key) > depth + 1:
        depth += 1
    table, rest = key[:depth], key[depth:]
    text = f"[{'.'.join(table)}]"
    return f"{text} {'.'.join(rest)}" if rest else text


def _unknown_key_fix(name: str, valid: Iterable[str]) -> str:
    closest = closest_name(name, valid)
    if closest:
        return f"did you mean '{closest}'?"
    return f"valid keys: {', '.join(sorted(valid))}"


# --- reading and interpolation ----------------------------------------------------


def _read(path: Path) -> str:
    if not path.exists():
        raise InventoryError(f"{path}: inventory file not found; {MISSING_FILE_HINT}")
    if not path.is_file():
        raise InventoryError(f"{path}: not a file; {MISSING_FILE_HINT}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise InventoryError(
            f"{path}: cannot read ({exc.strerror}); check its permissions"
        ) from None


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        where = f"{path}:{match.group(1)}" if match else str(path)
        problem = message.replace(match.group(0), "").strip() if match else message
        column = f" (column {match.group(2)})" if match else ""
        raise InventoryError(
            f"{where}: TOML syntax error: {problem}{column}; fix the syntax at that line"
        ) from None


def _check_private(raw: dict[str, Any], source: _Source) -> None:
    """Refuse a file that holds a literal credential and that group or others may read.

    As OpenSSH does with a private key: the fix is ``chmod 600``, or ``${NAME}``
    for every credential. The message names the key and its line, never the value.
    """
    found = next(_literal_credentials(raw), None)
    if found is None or os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(source.path.stat().st_mode)
    except OSError:  # just read it: gone meanwhile, nothing to protect
        return
    readers = readable_by(mode)
    if readers:
        raise source.error(
            found,
            f"a literal credential in a file that {readers} can read (mode {mode:04o})",
            f"chmod 600 {shlex.quote(str(source.path))} "
            "(or write every credential as ${NAME} and set NAME in the environment)",
        )


def _literal_credentials(table: dict[str, Any], key: KeyPath = ()) -> Iterator[KeyPath]:
    """The key paths of credentials written as literal values, not ``${ENV}``."""
    for name, value in table.items():
        if isinstance(value, dict):
            yield from _literal_credentials(value, (*key, name))
        elif name in SECRET_KEYS and isinstance(value, str) and value.strip():
            if not ENV_ONLY_RE.fullmatch(value):
                yield (*key, name)


def _interpolate(value: Any, key: KeyPath, env: Mapping[str, str], source: _Source) -> Any:
    if isinstance(value, str):
        return _interpolate_string(value, key, env, source)
    if isinstance(value, dict):
        return {k: _interpolate(v, (*key, k), env, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, key, env, source) for v in value]
    return value


def _interpolate_string(text: str, key: KeyPath, env: Mapping[str, str], source: _Source) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == ENV_ESCAPE:
            return "${"
        name = match.group(1)
        if name is None:
            raise source.error(
                key,
                "malformed '${' (expected ${NAME} with NAME made of letters, digits, _)",
                f"write ${{NAME}}, or {ENV_ESCAPE} for a literal '${{'",
            )
        if name not in env:
            raise source.error(
                key,
                f"environment variable {name} is not set",
                f"export {name}=... before running deployer (or write {ENV_ESCAPE} "
                "for a literal '${')",
            )
        return env[name]

    return ENV_RE.sub(replace, text)


# --- checking one table -----------------------------------------------------------


def _check_type(value: Any, expected: type, key: KeyPath, source: _Source) -> Any:
    is_bool = isinstance(value, bool)
    if expected is float and isinstance(value, int) and not is_bool:
        return float(value)
    if not isinstance(value, expected) or (is_bool and expected is not bool):
        got = _type_name(value)
        fix = f"write {TYPE_NAMES[expected]}"
        if key[-1] == "mode" and isinstance(value, int):
            fix = 'quote it as an octal string, e.g. mode = "0700"'
        raise source.error(key, f"must be {TYPE_NAMES[expected]}, got {got}", fix)
    return value


def _type_name(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number")):
        if isinstance(value, kind):
            return name
    names: dict[type, str] = {str: "a string", dict: "a table", list: "an array"}
    return names.get(type(value), type(value).__name__)


def _check_table(
    table: Any, types: Mapping[str, type], key: KeyPath, source: _Source, hint: str = ""
) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise source.error(key, f"must be a table, got {_type_name(table)}", "write it as [table]")
    checked = {}
    for name, value in table.items():
        if name not in types:
            if hint and name in HOST_ONLY_TYPES:
                raise source.error((*key, name), "a host-only key", hint)
            raise source.error((*key, name), "unknown key", _unknown_key_fix(name, types))
        checked[name] = _check_type(value, types[name], (*key, name), source)
    return checked


def _check_settings(table: Any, key: KeyPath, source: _Source, host: bool) -> dict[str, Any]:
    types = {**SETTING_TYPES, **HOST_ONLY_TYPES} if host else SETTING_TYPES
    hint = "" if host else "move it to a [hosts.NAME] table"
    settings = _check_table(table, types, key, source, hint)
    for name, value in settings.items():
        check = _VALUE_CHECKS.get(name)
        if check:
            settings[name] = check(value, (*key, name), source)
    return settings


def _check_service(value: dict, key: KeyPath, source: _Source) -> dict[str, Any]:
    service = _check_table(value, SERVICE_TYPES, key, source)
    kind = service.get("kind")
    if kind is not None and kind not in SERVICE_REQUIRED:
        raise source.error(
            (*key, "kind"),
            f"unknown service kind '{kind}'",
            f"use one of {_choices(SERVICE_REQUIRED)}",
        )
    return service


def _check_vars(value: dict, key: KeyPath, source: _Source) -> dict[str, Any]:
    for name in value:
        if not VAR_NAME_RE.match(name):
            raise source.error(
                (*key, name),
                "a var name must be an identifier (letters, digits, _)",
                "rename it, e.g. with _ instead of -",
            )
    return dict(value)


def _check_choice(choices: Sequence[str]):
    def check(value: str, key: KeyPath, source: _Source) -> str:
        if value not in choices:
            raise source.error(key, f"'{value}' is not allowed", f"use one of {_choices(choices)}")
        return value

    return check


def _choices(choices: Iterable[str]) -> str:
    return ", ".join(f"'{c}'" for c in choices)


def _check_absolute(value: str, key: KeyPath, source: _Source) -> str:
    if not value.startswith("/") or "\n" in value or "\x00" in value:
        raise source.error(key, f"'{value}' is not an absolute path", "write a path from /")
    return value


def _check_mode(value: str, key: KeyPath, source: _Source) -> str:
    if not MODE_RE.match(value):
        raise source.error(key, f"'{value}' is not an octal file mode", 'write e.g. "0700"')
    return value


def _check_number(minimum: float, strict: bool):
    def check(value: float, key: KeyPath, source: _Source) -> float:
        if value < minimum or (strict and value == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise source.error(key, f"{value:g} is out of range", f"use a value {bound}")
        return value

    return check


def _check_port(value: int, key: KeyPath, source: _Source) -> int:
    if not 1 <= value <= 65535:
        raise source.error(key, f"{value} is out of range", "use a port in 1..65535")
    return value


def _check_sha256(value: str, key: KeyPath, source: _Source) -> str:
    if not SHA256_RE.match(value):
        raise source.error(
            key,
            f"'{value}' is not a sha256 (64 hex digits)",
            "write the hex digest of the reviewed script (deployer render HOST -o FILE prints it)",
        )
    return value.lower()


def _check_nonempty(value: str, key: KeyPath, source: _Source) -> str:
    if not value.strip():
        raise source.error(key, "must not be empty", "set a value")
    return value


def _check_groups(value: list, key: KeyPath, source: _Source) -> list[str]:
    for item in value:
        if not isinstance(item, str):
            raise source.error(
                key, f"group names must be strings, got {_type_name(item)}", 'write ["lab"]'
            )
    return list(dict.fromkeys(value))


_VALUE_CHECKS = {
    "host_key_policy": _check_choice(HOST_KEY_POLICIES),
    "source": _check_choice(SOURCES),
    "expect_sha256": _check_sha256,
    "client_id": _check_nonempty,
    "script_path": _check_absolute,
    "mode": _check_mode,
    "online_timeout": _check_number(0, strict=True),
    "stable_for": _check_number(0, strict=False),
    "keep_backups": _check_number(0, strict=False),
    "guard_deadline": _check_number(0, strict=True),
    "python": _check_nonempty,
    "ssh_user": _check_nonempty,
    "template": _check_nonempty,
    "service": _check_service,
    "vars": _check_vars,
    "dbid": _check_nonempty,
    "host_uuid": _check_nonempty,
    "ports_id": _check_number(0, strict=False),
    "ssh_port": _check_port,
    "groups": _check_groups,
}


# --- provider ---------------------------------------------------------------------


def _load_provider(doc: dict[str, Any], source: _Source) -> ProviderConfig:
    if "provider" not in doc:
        raise source.error(
            (), "no [provider] table", "add [provider] with api_url, ssh_host, user_id"
        )
    table = _check_table(doc["provider"], PROVIDER_TYPES, ("provider",), source)
    for name in PROVIDER_REQUIRED:
        if name not in table:
            raise source.error(("provider",), f"missing key '{name}'", f'add {name} = "..."')
        _check_nonempty(table[name], ("provider", name), source)
    values = {**PROVIDER_DEFAULTS, **table}
    for name in ("rate_limit", "timeout", "offline_detection", "tunnel_timeout"):
        _check_number(0, strict=True)(values[name], ("provider", name), source)
    _check_api_url(values["api_url"], source)
    if "api_key" in values:
        _check_nonempty(values["api_key"], ("provider", "api_key"), source)
    return ProviderConfig(
        api_url=values["api_url"],
        ssh_host=values["ssh_host"],
        user_id=Secret(values["user_id"]),
        rate_limit=values["rate_limit"],
        timeout=values["timeout"],
        offline_detection=values["offline_detection"],
        tunnel_timeout=values["tunnel_timeout"],
        api_key=Secret(values["api_key"]) if "api_key" in values else None,
    )


def _check_api_key(
    provider: ProviderConfig, hosts: Mapping[str, HostConfig], source: _Source
) -> None:
    """source = "provider" fetches with the account's api_key: it must be there."""
    fetching = [name for name, host in hosts.items() if host.source == "provider"]
    if fetching and provider.api_key is None:
        raise source.error(
            ("provider",),
            f"missing key 'api_key' (host {fetching[0]} has source = \"provider\")",
            'add api_key = "${SSHREACH_API_KEY}" and export SSHREACH_API_KEY',
        )


def _check_api_url(url: str, source: _Source) -> None:
    key = ("provider", "api_url")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise source.error(
            key, "not an http(s) URL", 'write e.g. "https://sshreach.me/init/api/{call}"'
        )
    if "{call}" not in url:
        raise source.error(
            key, "has no '{call}' placeholder", "put {call} where the API call name goes"
        )


# --- merging hosts ----------------------------------------------------------------


@dataclass
class _Layer:
    key: KeyPath  # the table it comes from, e.g. ("groups", "lab")
    settings: dict[str, Any]


def _merge(layers: Sequence[_Layer]) -> tuple[dict[str, Any], dict[str, KeyPath]]:
    """Merge settings in precedence order; ``service`` and ``vars`` key by key."""
    merged: dict[str, Any] = {"service": {}, "vars": {}}
    origin: dict[str, KeyPath] = {}
    for layer in layers:
        for name, value in layer.settings.items():
            if name in ("service", "vars"):
                merged[name].update(value)
                for sub in value:
                    origin[f"{name}.{sub}"] = (*layer.key, name, sub)
            else:
                merged[name] = value
            origin[name] = (*layer.key, name)
    return merged, origin


def _resolve_path(raw: str, base: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _local_path(raw: str, base: Path) -> str:
    """ssh_key / known_hosts: ``~`` kept for the SSH layer, relative -> beside the inventory."""
    if raw.startswith("~") or Path(raw).is_absolute():
        return raw
    return str((base / raw).resolve())


def _build_host(
    name: str,
    merged: dict[str, Any],
    origin: dict[str, KeyPath],
    overrides: Mapping[str, str],
    source: _Source,
) -> HostConfig:
    host_key = ("hosts", name)
    for required in HOST_REQUIRED:
        if required not in merged:
            raise source.error(host_key, f"missing key '{required}'", f"add {required} = ...")
    service = _build_service(merged["service"], origin, host_key, source)
    base = source.path.resolve().parent
    settings = {
        k: v for k, v in merged.items() if k in SETTING_TYPES and k not in ("service", "vars")
    }
    raw_template = settings.get("template", str(HostConfig.template))
    template = _resolve_path(raw_template, base)
    provider_source = settings.get("source") == "provider"
    if not provider_source and not template.is_file():
        raise source.error(
            origin.get("template", host_key),
            f"template '{raw_template}' not found (looked at {template})",
            "fix the path (set template = ...); it is relative to the inventory file",
        )
    if provider_source and "client_id" not in merged:
        raise source.error(
            host_key,
            'source = "provider" needs the host\'s client_id',
            f'add client_id = "..." (its client\'s id at the provider) to [hosts.{name}]',
        )
    settings["template"] = template
    for path_key in ("ssh_key", "known_hosts"):
        if path_key in settings:
            settings[path_key] = _local_path(settings[path_key], base)
    return HostConfig(
        name=name,
        dbid=Secret(merged["dbid"]),
        host_uuid=Secret(merged["host_uuid"]),
        ports_id=merged["ports_id"],
        ssh_port=merged["ssh_port"],
        groups=tuple(merged.get("groups", ())),
        client_id=Secret(merged["client_id"]) if "client_id" in merged else None,
        service=service,
        vars={**merged["vars"], **overrides},
        **settings,
    )


def _build_service(
    values: dict[str, Any], origin: dict[str, KeyPath], host_key: KeyPath, source: _Source
) -> ServiceConfig:
    service = ServiceConfig(**values)
    for field_name in SERVICE_REQUIRED[service.kind]:
        if not getattr(service, field_name).strip():
            where = origin.get(f"service.{field_name}") or origin.get("service.kind") or host_key
            raise source.error(
                where,
                f"service kind '{service.kind}' needs service.{field_name}",
                f"set {field_name} in [defaults.service] or [{'.'.join(host_key)}.service]",
            )
    return service


# --- the loader -------------------------------------------------------------------


def load_inventory(
    path: Path,
    overrides: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Inventory:
    """Read, check and merge the inventory at ``path`` (docs/reference/inventory.md)."""
    path = Path(path)
    text = _read(path)
    source = _Source(path, _Locator(text), set())
    raw = _parse(path, text)
    source.secrets.update(_raw_secrets(raw))
    _check_private(raw, source)
    doc = _interpolate(raw, (), os.environ if env is None else env, source)
    source.secrets.update(_raw_secrets(doc))
    for name in doc:
        if name not in TOP_LEVEL_KEYS:
            raise source.error(
                (name,), "unknown top-level key", _unknown_key_fix(name, TOP_LEVEL_KEYS)
            )
    provider = _load_provider(doc, source)
    defaults = _check_settings(doc.get("defaults", {}), ("defaults",), source, host=False)
    groups = _load_groups(doc.get("groups", {}), source)
    hosts = _load_hosts(doc, defaults, groups, dict(overrides or {}), source)
    _check_api_key(provider, hosts, source)
    members = {g: tuple(h for h in hosts if g in hosts[h].groups) for g in groups}
    return Inventory(path=path.resolve(), provider=provider, hosts=hosts, groups=members)


def _raw_secrets(doc: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    provider = doc.get("provider")
    if isinstance(provider, dict):
        found.update(v for k, v in provider.items() if k in SECRET_KEYS and isinstance(v, str))
    hosts = doc.get("hosts")
    for table in hosts.values() if isinstance(hosts, dict) else ():
        if isinstance(table, dict):
            found.update(v for k, v in table.items() if k in SECRET_KEYS and isinstance(v, str))
    return {s for s in found if s}


def _check_names(tables: Any, kind: str, source: _Source) -> dict[str, Any]:
    if not isinstance(tables, dict):
        raise source.error((kind,), "must be a table of tables", f"write [{kind}.NAME] tables")
    for name in tables:
        if not NAME_RE.match(name) or name in RESERVED_TARGETS:
            raise source.error(
                (kind, name),
                f"'{name}' is not a valid {kind[:-1]} name",
                "rename it: letters, digits, '.', '_', '-', starting with a letter or digit, "
                "not 'all'",
            )
    return tables


def _load_groups(tables: Any, source: _Source) -> dict[str, dict[str, Any]]:
    tables = _check_names(tables, "groups", source)
    return {
        name: _check_settings(table, ("groups", name), source, host=False)
        for name, table in tables.items()
    }


def _load_hosts(
    doc: dict[str, Any],
    defaults: dict[str, Any],
    groups: dict[str, dict[str, Any]],
    overrides: dict[str, str],
    source: _Source,
) -> dict[str, HostConfig]:
    tables = _check_names(doc.get("hosts", {}), "hosts", source)
    if not tables:
        raise source.error((), "no hosts defined", "add at least one [hosts.NAME] table")
    hosts: dict[str, HostConfig] = {}
    for name, table in tables.items():
        settings = _check_settings(table, ("hosts", name), source, host=True)
        layers = [_Layer(("defaults",), defaults)]
        for group in settings.get("groups", ()):
            if group not in groups:
                fix = closest_name(group, groups)
                hint = f"did you mean '{fix}'?" if fix else f"add a [groups.{group}] table"
                raise source.error(("hosts", name, "groups"), f"unknown group '{group}'", hint)
            layers.append(_Layer(("groups", group), groups[group]))
        layers.append(_Layer(("hosts", name), settings))
        merged, origin = _merge(layers)
        hosts[name] = _build_host(name, merged, origin, overrides, source)
    _check_unique_ports(hosts, source)
    return hosts


def _check_unique_ports(hosts: Mapping[str, HostConfig], source: _Source) -> None:
    seen: dict[int, str] = {}
    for name, host in hosts.items():
        if host.ssh_port in seen:
            raise source.error(
                ("hosts", name, "ssh_port"),
                f"port {host.ssh_port} is also the tunnel port of host '{seen[host.ssh_port]}'",
                "give each host its own ssh_port",
            )
        seen[host.ssh_port] = name


# --- command-line helpers ---------------------------------------------------------


def parse_var_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` from ``--var`` -> ``{"K": "V"}``; the last one of a name wins."""
    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not VAR_NAME_RE.match(name):
            raise UsageError(
                f"--var {(name if sep else item)!r}: expected NAME=VALUE with NAME an identifier "
                "(letters, digits, _), e.g. --var release=2"
            )
        result[name] = value
    return result


def describe_host(inventory: Inventory, host: HostConfig) -> dict[str, Any]:
    """A credential-free summary of one host (``deployer hosts``)."""
    return {
        "host": host.name,
        "groups": list(host.groups),
        "ssh_host": inventory.provider.ssh_host,
        "ssh_port": host.ssh_port,
        "endpoint": f"{inventory.provider.ssh_host}:{host.ssh_port}",
        "ssh_user": host.ssh_user,
        "service": host.service.kind,
        "script_path": host.script_path,
    }
