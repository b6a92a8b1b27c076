"""Credentials that must never reach output, logs, reports or the journal.

A :class:`Secret` prints as its last four characters at most. The raw value
is only available through :meth:`Secret.reveal`, which the API client (to
build a query), the template renderer (the client script needs the ids) and
the guard's config use. :class:`RedactingFilter` scrubs known secret values
from every log record as a second line of defence.

Where masking happens: at the output boundaries only (terminal, log, report
file, and an error message stored in the journal), and only in free text
(messages, diffs, command output). Identifiers — run ids, sha256s, paths,
host names — are stored, compared and reported as they are: a short numeric
``dbid`` such as ``0556`` turns up inside them by chance.

The rule of :func:`scrub`, for each form a credential can take
(:func:`secret_forms`):

* a form of :data:`WHOLE_TOKEN_BELOW` characters or more is masked wherever
  it appears, even inside a longer word (as before: nothing random holds it);
* a shorter form is masked wherever it is not part of a longer alphanumeric
  token: not where a letter or digit touches its first or last character
  (when that character is a letter or digit itself). So it is masked printed
  on its own, in a URL or query (``?dbid=0556&``), quoted (``'0556'``,
  ``"0556"``), after ``_`` or ``-`` or ``/``, at a line's start or end; and it
  is kept inside ``20250101T000000Z-0556ab``, a sha256 or ``10556``.

What this gives up, on purpose: a short credential glued to letters or digits
(``dbid0556``) is not recognised; no output of deployer prints one that way.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
import shlex
from collections.abc import Callable, Iterable
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


#: a credential form this long is masked anywhere; a shorter one only as a whole token
WHOLE_TOKEN_BELOW = 12
FORMS_CACHED = 65536  # credentials whose forms are kept (a fleet has three per host)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret form in ``text`` by its mask, longest
    first, by the rule in the module docstring (a short form only where it is not
    part of a longer alphanumeric token). A blank "secret" is no credential:
    masking it would garble every space."""
    for raw in sorted({s for s in secrets if s and s.strip()}, key=len, reverse=True):
        if raw not in text:
            continue
        if len(raw) >= WHOLE_TOKEN_BELOW:
            text = text.replace(raw, mask(raw))
        else:
            text = _whole_token(raw).sub(_literal(mask(raw)), text)
    return text


def _literal(value: str) -> Callable[[re.Match[str]], str]:
    """A ``re.sub`` replacement that puts ``value`` in as it is (a string
    replacement would read its backslashes as escapes)."""
    return lambda _match: value


def _whole_token(form: str) -> re.Pattern[str]:
    """``form`` where no letter or digit touches its alphanumeric ends."""
    before = r"(?<![^\W_])" if form[0].isalnum() else ""
    after = r"(?![^\W_])" if form[-1].isalnum() else ""
    return re.compile(before + re.escape(form) + after)


def secret_forms(values: Iterable[str]) -> list[str]:
    """Each credential in every form text may hold it, longest first, computed
    once per credential (the inventory's ``secret_values``):

    * raw;
    * URL-encoded: ``quote`` (``/`` kept, as jinja's ``urlencode``), with
      nothing safe, and ``quote_plus`` (a query);
    * the inside of a JSON string: ``ensure_ascii`` on and off, and jinja's
      HTML-safe ``tojson`` (``<`` ``>`` ``&`` ``'`` as ``\\u003c`` …);
    * the inside of a Python string literal: ``repr``, ``ascii``, either quote
      with only backslashes and the quote escaped;
    * shell-quoted: ``shlex.quote`` (the ``quote`` filter) and its inside;
    * HTML-escaped: jinja's ``e`` filter (``&#39;``, ``&#34;``) and ``html.escape``.

    A script or a command writes the ids in whatever quoting it likes; scrubbing
    every form masks them all. For ids of letters, digits and ``-`` every form
    is the raw one.
    """
    forms: set[str] = set()
    for value in values:
        if value and value.strip():
            forms.update(_forms(value))
    return sorted(forms, key=len, reverse=True)


@functools.lru_cache(maxsize=FORMS_CACHED)
def _forms(value: str) -> frozenset[str]:
    """The forms of one credential, computed once (``secret_values`` runs often)."""
    json_ascii, json_utf8 = json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]
    shell = shlex.quote(value)
    return frozenset(
        {
            value,
            quote(value),
            quote(value, safe=""),
            quote_plus(value),
            json_ascii,
            json_utf8,
            _html_safe_json(json_ascii),
            _html_safe_json(json_utf8),
            repr(value)[1:-1],
            ascii(value)[1:-1],
            _escaped(value, "'"),
            _escaped(value, '"'),
            shell,
            shell[1:-1] if shell.startswith("'") and shell.endswith("'") else shell,
            html.escape(value),
            _jinja_escaped(value),
        }
    )


def _escaped(value: str, quote_char: str) -> str:
    """``value`` inside a ``quote_char`` string literal with only ``\\`` and the quote escaped."""
    return value.replace("\\", "\\\\").replace(quote_char, "\\" + quote_char)


def _html_safe_json(text: str) -> str:
    """JSON as jinja's ``tojson`` leaves it (``jinja2.utils.htmlsafe_json_dumps``)."""
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escape)
    return text


def _jinja_escaped(value: str) -> str:
    """``value`` as jinja's ``e`` filter (markupsafe) writes it."""
    for char, escape in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&#39;")):
        value = value.replace(char, escape)
    return value.replace('"', "&#34;")


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
