"""The declared minimum is Python 3.10 (setup.cfg ``python_requires``): every
module of the package, its tests and benchmarks must parse and import there.

No 3.10 interpreter is installed on the gate's machine, so this holds the code
to 3.10's rules statically: the grammar of 3.10 (``ast.parse`` with
``feature_version``), and no import of a standard-library name that 3.10 lacks
unless it is guarded (an ``if sys.version_info >= …`` branch or a ``try`` that
catches ImportError, with a fallback such as ``tomli``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p
    for folder in ("deployer", "tests", "benchmarks")
    for p in (ROOT / folder).rglob("*.py")
    if "__pycache__" not in p.parts
)
# standard-library modules and names that appeared after 3.10
NEW_MODULES = {"tomllib", "wsgiref.types"}
NEW_NAMES = {
    "enum": {"StrEnum", "ReprEnum", "verify", "EnumCheck"},
    "typing": {"Self", "LiteralString", "Never", "assert_never", "reveal_type", "Required"},
    "datetime": {"UTC"},
    "asyncio": {"timeout", "TaskGroup", "Runner"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside an ``if sys.version_info …`` branch or a ``try`` catching ImportError."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.If) and "version_info" in ast.unparse(parent.test):
            return True
        if isinstance(parent, ast.Try) and any(
            h.type is not None and "ImportError" in ast.unparse(h.type) for h in parent.handlers
        ):
            return True
        node = parent
    return False


def _new_imports(tree: ast.AST) -> list[str]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name in NEW_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module in NEW_MODULES else []
            names += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name in NEW_NAMES.get(node.module, ())
            ]
        else:
            continue
        if names and not _guarded(node, parents):
            found.extend(f"line {node.lineno}: {n}" for n in names)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_parses_and_imports_under_python_310(path: Path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 10))
    assert _new_imports(tree) == [], f"{path.relative_to(ROOT)}: needs Python > 3.10"


def test_the_check_catches_a_bare_tomllib_import_and_new_syntax():
    assert _new_imports(ast.parse("import tomllib\n")) == ["line 1: tomllib"]
    assert _new_imports(ast.parse("from typing import Self\n")) == ["line 1: typing.Self"]
    guarded = "import sys\nif sys.version_info >= (3, 11):\n    import tomllib\n"
    assert _new_imports(ast.parse(guarded)) == []
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))
