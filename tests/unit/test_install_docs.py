"""Install instructions name the distribution ``sshreach-deployer``; the gate is one command.

``deployer`` on the package index is an unrelated project, so ``pip install
deployer`` installs the wrong thing (docs/explanation/decisions.md). Every
``pip``/``pipx install`` in README.md, CONTRIBUTING.md and docs/**/*.md
installs either ``sshreach-deployer`` or a local checkout (``.``, a path, a
wheel file). And the README's test command is exactly the command .ci/run
runs, so what a developer runs is what CI runs.
"""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DIST = "sshreach-deployer"
# `pip install`, `.venv/bin/pip install`, `python3 -m pip install`, `pipx install`: the rest of
# the command, up to the end of the line, a closing backtick or the next `&&`/`;`/`|`
INSTALL = re.compile(r"\b(pipx|pip3?)\s+install\b([^`\n&;|]*)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _installs(text: str) -> list[tuple[str, list[str]]]:
    """Each install command in ``text`` with the targets it names (options dropped)."""
    found = []
    for m in INSTALL.finditer(text):
        words = [w.strip("'\"") for w in m.group(2).split()]
        found.append((m.group(0).strip(), [w for w in words if w and not w.startswith("-")]))
    return found


def _is_local(target: str) -> bool:
    return target.startswith((".", "/", "~", "$")) or target.endswith((".whl", ".tar.gz"))


def _name(target: str) -> str:
    return re.split(r"[\[<>=!~;@ ]", target, maxsplit=1)[0].lower().replace("_", "-")


def test_every_install_instruction_names_the_distribution():
    wrong = []
    for page in _pages():
        for command, targets in _installs(page.read_text(encoding="utf-8")):
            names = [_name(t) for t in targets if not _is_local(t)]
            if "deployer" in names or (names and DIST not in names):
                wrong.append(f"{page.relative_to(ROOT)}: {command}")
    assert wrong == [], "install the distribution sshreach-deployer, not deployer:\n" + "\n".join(
        wrong
    )


def test_the_install_pages_show_pip_and_pipx():
    def commands(rel: str) -> list[str]:
        return [c for c, t in _installs((ROOT / rel).read_text()) if DIST in map(_name, t)]

    assert any(c.startswith("pipx") for c in commands("README.md"))
    assert any(c.startswith("pip") and not c.startswith("pipx") for c in commands("README.md"))
    assert commands("docs/tutorial/quickstart.md")
    assert commands("CONTRIBUTING.md")


@pytest.mark.parametrize(
    ("command", "targets"),
    [
        ("$ pip install deployer", ["deployer"]),
        ("run `pipx install sshreach-deployer` now", ["sshreach-deployer"]),
        (".venv/bin/pip install -q -e '.[test,docs]' && x", [".[test,docs]"]),
        ("python3 -m pip install -U 'Deployer>=0.3'", ["Deployer>=0.3"]),
        ("from `pip install` to a release", []),
    ],
)
def test_install_commands_are_found_with_their_targets(command, targets):
    assert [t for _, t in _installs(command)] == [targets]


def test_the_wrong_name_would_be_caught():
    for t in ("deployer", "Deployer>=0.3", "deployer[test]"):
        assert _name(t) == "deployer"
    assert _name("sshreach_deployer==0.1.0") == DIST


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1]
    block = re.search(r"```sh\n(.*?)\n```", section, flags=re.S)
    assert block, "README: no ```sh block under '## Run the tests'"
    return block.group(1).strip()


def _ci_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")][-1].strip()


def test_readme_test_command_is_what_ci_runs():
    command = _readme_test_command()
    assert "\n" not in command
    assert command == _ci_command()
    assert command.endswith("&& bash .ci/release-check")


def test_contributing_gives_the_same_gate_command():
    assert _readme_test_command() in (ROOT / "CONTRIBUTING.md").read_text()
