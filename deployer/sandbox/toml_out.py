"""A small TOML writer: the sandbox writes its fleet's ``deployer.toml`` with it.

Enough TOML for an inventory, and no more: one ``[table]`` at a time, of bare
keys (letters, digits, ``_`` and ``-``: the caller's own), whose values are
strings, booleans, numbers, lists and inline tables of those. Strings are
TOML basic strings: ``"`` and ``\\`` escaped, control characters (and DEL) as
``\\uXXXX``, everything else as it is (JSON's escapes would not do: it writes a
character beyond the BMP as a surrogate pair, which TOML refuses). The standard library
reads TOML (``tomllib``) but does not write it, and the sandbox needs no
dependency for this.
"""

from __future__ import annotations

from typing import Any

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    """``value`` as a TOML value; anything not listed above as a string (``str(value)``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return toml_string(str(value))


def toml_table(name: str, values: dict[str, Any]) -> str:
    """``[name]`` and a ``key = value`` line a value, newline-terminated."""
    lines = [f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
