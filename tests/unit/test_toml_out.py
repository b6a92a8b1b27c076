"""deployer.sandbox.toml_out: what it writes reads back the same through tomllib."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deployer.sandbox.toml_out import toml_table, toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

pytestmark = pytest.mark.unit

VALUES = {
    "text": "plain",
    "empty": "",
    "quotes": 'say "hi" \\ there',
    "lines": "one\ntwo\r\n\tthree",
    "control": "\x00\x1b\x7f",
    "unicode": "café ✓ ü",
    "template": "python3 {{ script_path | quote }}",
    "env": "${NOT_EXPANDED}",
    "yes": True,
    "no": False,
    "zero": 0,
    "negative": -7,
    "big": 2**40,
    "half": 0.5,
    "tiny": 1e-07,
    "huge": 1e20,
    "list": [1, "two", 3.0, False],
    "empty_list": [],
    "nested_list": [[1, 2], ["a"]],
    "empty_table": {},
    "inline": {"a": 1, "b": "x", "c": [True], "d": {"e": "deep"}},
    "dashed-key": "ok",
}


def test_a_table_round_trips():
    text = toml_table("hosts.sb-001", VALUES)
    assert tomllib.loads(text) == {"hosts": {"sb-001": VALUES}}


def test_tables_joined_round_trip_and_keep_their_order():
    text = "\n".join(
        [toml_table("defaults", {"stable_for": 2.5}), toml_table("defaults.service", {"k": "v"})]
    )
    assert tomllib.loads(text) == {"defaults": {"stable_for": 2.5, "service": {"k": "v"}}}
    assert text == '[defaults]\nstable_for = 2.5\n\n[defaults.service]\nk = "v"\n'


def test_a_tuple_is_a_list_and_anything_else_its_string():
    path = Path("/tmp/sandbox/hosts/sb-001/client.py")
    assert tomllib.loads(f"v = {toml_value((1, 2))}") == {"v": [1, 2]}
    assert tomllib.loads(f"v = {toml_value(path)}") == {"v": str(path)}


def test_the_exact_forms():
    assert toml_value(True) == "true"
    assert toml_value(3) == "3"
    assert toml_value(0.25) == "0.25"
    assert toml_value({}) == "{}"
    assert toml_value({"a": [1, "b"]}) == '{ a = [1, "b"] }'
    assert toml_value('a"b') == '"a\\"b"'


def test_a_character_beyond_the_bmp_round_trips():
    assert tomllib.loads(f"v = {toml_value('🚀')}") == {"v": "🚀"}


def test_every_control_character_and_del_round_trip():
    text = "".join(chr(c) for c in range(0x20)) + "\x7f" + 'a"b\\c é 中'
    assert tomllib.loads(f"v = {toml_value(text)}") == {"v": text}
