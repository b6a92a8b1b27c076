"""No test module imports another test module: what tests share lives in helper
modules (tests/inventories.py, tests/doubles.py, tests/local_site.py, …) or in
a directory's conftest.py. Importing a test module couples two test files and
runs the imported one's module code again under another name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[1]

# `from tests.unit.test_x import y`, `import tests.e2e.test_x`, `from .test_x import y`
TEST_MODULE_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+(?:tests(?:\.\w+)*\.|\.+)test_\w+", re.MULTILINE
)


def test_no_test_module_imports_another_test_module():
    found = [
        f"{path.relative_to(TESTS)}: {match.group(0).strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        for match in TEST_MODULE_IMPORT.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == [], "move what is shared into a helper module or conftest.py"


def test_the_check_sees_each_form_of_such_an_import():
    for line in (
        "from tests.unit.test_inventory import BASE",
        "    from tests.unit.test_workflow import Site",
        "import tests.e2e.test_upgrade",
        "from .test_rollout import FakeRunner",
    ):
        assert TEST_MODULE_IMPORT.search(line), line
    for line in ("from tests.inventories import BASE", "from tests.cli import run"):
        assert not TEST_MODULE_IMPORT.search(line), line
