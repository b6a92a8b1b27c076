"""docs/reference/journal.md lists exactly the host facts that deployer journals:
the fields of :class:`deployer.facts.HostFacts`, the one record the workflow,
the rollout and the journal write and ``recover`` reads."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from deployer.facts import FACT_NAMES, HostFacts, known

pytestmark = pytest.mark.unit

JOURNAL_DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "journal.md"


def documented_facts(text: str) -> list[str]:
    """The facts named in the first column of the table under ``## Host facts``."""
    section = text.split("\n## Host facts\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("fact", "---"):
            names.extend(re.findall(r"`([a-z0-9_]+)`", cells[0]))
    return names


def test_the_doc_lists_every_fact_of_the_record_once_and_no_other():
    documented = documented_facts(JOURNAL_DOC.read_text())
    assert len(documented) == len(set(documented)), "a fact is listed twice"
    assert set(documented) == set(FACT_NAMES)


def test_the_doc_parser_sees_a_fact_added_or_dropped():
    text = JOURNAL_DOC.read_text()
    extra = text.replace("| `committed` |", "| `committed` |  |  |\n| `guard_dir` |", 1)
    assert "guard_dir" in documented_facts(extra)
    assert "committed" not in documented_facts(text.replace("| `committed` |", "| committed |"))


def test_facts_read_back_with_defaults_and_ignore_other_keys():
    facts = HostFacts.from_json({"swap_started": True, "old_sha256": None, "guard_dir": "/x"})
    assert facts == HostFacts(swap_started=True)
    assert not facts.committed and facts.new_sha256 is None
    assert facts.left_on_host() and not HostFacts(old_sha256="a").left_on_host()


def test_known_names_only_the_facts_given_and_refuses_others():
    assert known(window_maybe_open=False, old_sha256=None) == {
        "window_maybe_open": False,
        "old_sha256": None,
    }
    with pytest.raises(TypeError):
        known(**{"guard_dir": "/opt/.g"})


def test_facts_are_one_frozen_record():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HostFacts().committed = True  # type: ignore[misc]
