"""Credentials that must never reach output, logs, reports or the journal.

A :class:`Secret` prints as its last four characters at most. The raw value
is only available through :meth:`Secret.reveal`, which the API client (to
build a query), the template renderer (the client script needs the ids) and
the guard's config use. :class:`RedactingFilter` scrubs known secret values
from every log record as a second line of defence.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from urllib.parse import quote, quote_plus


def mask(value: str) -> str:
    """Show at most the last 4 characters of a credential."""
    value = str(value)
    if len(value) <= 4:
        return "****"
    return "…" + value[-4:]


class Secret:
    """A credential string that masks itself everywhere but :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = str(value)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret({mask(self._value)!r})"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return self._value == other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self):
        raise TypeError("Secret values are not picklable")


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each raw secret in ``text`` by its mask.
    (A blank "secret" is no credential: masking it would garble every space.)"""
    for raw in sorted({s for s in secrets if s and s.strip()}, key=len, reverse=True):
        if raw in text:
            text = text.replace(raw, mask(raw))
    return text


def secret_forms(values: Iterable[str]) -> list[str]:
    """Each credential as text may hold it, longest first: raw, URL-encoded, and
    the inside of a Python or JSON string literal (either quote, escaped
    backslashes and quotes, ``\\x``/``\\u`` escapes). A script the provider
    generates writes the ids in whatever quoting it likes; scrubbing every form
    masks them all. For ids of letters, digits and ``-`` every form is the raw one.
    """
    forms: set[str] = set()
    for value in values:
        if value and value.strip():
            forms.update(
                {
                    value,
                    quote(value, safe=""),
                    quote_plus(value),
                    json.dumps(value)[1:-1],
                    json.dumps(value, ensure_ascii=False)[1:-1],
                    repr(value)[1:-1],
                    ascii(value)[1:-1],
                    _escaped(value, "'"),
                    _escaped(value, '"'),
                }
            )
    return sorted(forms, key=len, reverse=True)


def _escaped(value: str, quote_char: str) -> str:
    """``value`` inside a ``quote_char`` string literal with only ``\\`` and the quote escaped."""
    return value.replace("\\", "\\\\").replace(quote_char, "\\" + quote_char)


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs registered secret values from records."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self._secrets: set[str] = {s for s in secrets if s}

    def add(self, *secrets: str) -> None:
        self._secrets.update(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = scrub(record.getMessage(), self._secrets)
            record.msg, record.args = message, None
            if record.exc_info and not record.exc_text:
                # the traceback is formatted after filtering: format and scrub it now
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:
                record.exc_text = scrub(record.exc_text, self._secrets)
        return True
