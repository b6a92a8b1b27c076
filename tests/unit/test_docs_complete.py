"""The reference docs cannot drift from the code.

* every key the inventory loader accepts has a row in
  docs/reference/inventory.md, in the right table, with the built-in default;
  and no row documents a key the loader would refuse;
* every command and option of the click tree (walked through
  ``LazyGroup.get_command``, so every lazily imported module loads) appears
  in the CLI reference as the site renders it: docs/reference/cli.md through
  the same mkdocs-click Markdown extension that ``mkdocs build`` runs;
* every exit code constant has a row in docs/reference/exit-codes.md.

Each check fails with the list of the missing names.
"""

from __future__ import annotations

import dataclasses
import html
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from deployer import errors
from deployer import inventory as inv
from deployer.model import HostConfig, ServiceConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
INVENTORY_DOC = DOCS / "reference" / "inventory.md"
CLI_DOC = DOCS / "reference" / "cli.md"
EXIT_DOC = DOCS / "reference" / "exit-codes.md"

# --- inventory keys ---------------------------------------------------------------

REQUIRED = "required"
UNSET = "unset"
ANY = object()  # documented elsewhere on the page (the service table)

# heading of the section in inventory.md -> the keys its table must list
INVENTORY_TABLES: dict[str, frozenset[str]] = {
    "`[provider]`": frozenset(inv.PROVIDER_TYPES),
    "Host settings": frozenset(inv.SETTING_TYPES),
    "`service`": frozenset(inv.SERVICE_TYPES),
    "Host-only keys": frozenset(inv.HOST_ONLY_TYPES),
}


def expected_defaults() -> dict[str, dict[str, Any]]:
    """Per table: key -> the default the docs must show (from the code)."""
    host = {f.name: f.default for f in dataclasses.fields(HostConfig)}
    provider = {k: REQUIRED for k in inv.PROVIDER_REQUIRED} | dict(inv.PROVIDER_DEFAULTS)
    provider |= {k: UNSET for k in inv.PROVIDER_TYPES if k not in provider}  # api_key
    settings = {k: host.get(k, ANY) for k in inv.SETTING_TYPES if k not in ("service", "vars")}
    settings |= {"template": str(host["template"]), "vars": {}, "service": ANY}
    settings["guard_deadline"] = UNSET if host["guard_deadline"] is None else settings
    host_only = {k: REQUIRED for k in inv.HOST_REQUIRED} | {"groups": list(host["groups"])}
    host_only |= {k: UNSET for k in inv.HOST_ONLY_TYPES if host.get(k, ANY) is None}  # client_id
    service = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}
    service |= {k: ANY for k in inv.SERVICE_TYPES if k not in service}
    return {
        "`[provider]`": provider,
        "Host settings": settings,
        "`service`": service,
        "Host-only keys": host_only,
    }


def markdown_sections(text: str) -> dict[str, list[str]]:
    """Heading text (without #) -> the lines under it, up to the next heading."""
    sections: dict[str, list[str]] = {}
    current: list[str] = sections.setdefault("", [])
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"^#{1,6} ", line):
            current = sections.setdefault(line.lstrip("#").strip(), [])
            continue
        current.append(line)
    return sections


def table_rows(lines: list[str]) -> dict[str, dict[str, str]]:
    """Rows of the first table whose first cell is a `key`: key -> {column: cell}."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            header = []
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not header:
            header = [c.lower() for c in cells]
        elif not set(line) <= set("|-: "):
            match = re.fullmatch(r"`([^`]+)`", cells[0])
            if match:
                rows[match.group(1)] = dict(zip(header, cells, strict=False))
    return rows


def parse_default(cell: str) -> Any:
    """A documented default: a TOML value in backticks, or a word."""
    match = re.fullmatch(r"`(.*)`", cell.strip())
    if not match:
        return cell.strip().lower()
    try:
        return tomllib.loads(f"v = {match.group(1)}")["v"]
    except tomllib.TOMLDecodeError:
        return cell.strip()


def inventory_doc_problems(text: str) -> list[str]:
    """Every undocumented, wrongly defaulted or unknown key, as readable lines."""
    sections = markdown_sections(text)
    defaults = expected_defaults()
    problems = [
        f"top-level table [{name}] not mentioned"
        for name in inv.TOP_LEVEL_KEYS
        if f"`[{name}" not in text
    ]
    for heading, keys in INVENTORY_TABLES.items():
        if heading not in sections:
            problems.append(f"no section '{heading}' (the table of {', '.join(sorted(keys))})")
            continue
        rows = table_rows(sections[heading])
        problems += [f"{heading}: key '{k}' undocumented" for k in sorted(keys - set(rows))]
        problems += [f"{heading}: key '{k}' is not accepted" for k in sorted(set(rows) - keys)]
        for key in sorted(keys & set(rows)):
            want = defaults[heading][key]
            got = parse_default(rows[key].get("default", ""))
            if want is not ANY and got != want:
                problems.append(f"{heading}: '{key}' default documented {got!r}, code has {want!r}")
    return problems


def test_every_inventory_key_is_documented_with_its_default():
    problems = inventory_doc_problems(INVENTORY_DOC.read_text(encoding="utf-8"))

    assert not problems, "docs/reference/inventory.md is out of date:\n" + "\n".join(problems)


def test_the_inventory_check_catches_a_missing_key_and_a_wrong_default():
    text = INVENTORY_DOC.read_text(encoding="utf-8")
    text = re.sub(r"^\| `ssh_port` \|.*\n", "", text, flags=re.M)
    text = re.sub(r"^(\| `stable_for` \| [^|]+ \| )`30`", r"\1`20`", text, flags=re.M)

    problems = inventory_doc_problems(text)

    assert "Host-only keys: key 'ssh_port' undocumented" in problems
    assert any(p.startswith("Host settings: 'stable_for' default documented 20") for p in problems)


# --- CLI commands and options ---------------------------------------------------------


def walk_commands(
    command: click.Command, path: tuple[str, ...], ctx: click.Context, problems: list[str]
) -> Iterator[tuple[tuple[str, ...], click.Context]]:
    """Every (path, context) of the tree; commands that fail to load go to ``problems``."""
    yield path, ctx
    if not isinstance(command, click.Group):
        return
    for name in command.list_commands(ctx):
        try:
            sub = command.get_command(ctx, name)
        except Exception as exc:  # noqa: BLE001 - report every broken entry, not just the first
            problems.append(f"{' '.join((*path, name))}: cannot load ({type(exc).__name__}: {exc})")
            continue
        if sub is None:
            problems.append(f"{' '.join((*path, name))}: listed but get_command returns None")
            continue
        if sub.name != name:
            problems.append(f"{' '.join((*path, name))}: the command calls itself '{sub.name}'")
        sub_ctx = click.Context(sub, parent=ctx, info_name=name)
        yield from walk_commands(sub, (*path, name), sub_ctx, problems)


def cli_tree() -> tuple[list[tuple[tuple[str, ...], click.Context]], list[str]]:
    from deployer.cli.main import cli

    problems: list[str] = []
    ctx = click.Context(cli, info_name="deployer")
    return list(walk_commands(cli, ("deployer",), ctx, problems)), problems


def site_markdown_extensions() -> tuple[list[str], dict[str, dict]]:
    """The Markdown extensions (and their settings) that mkdocs.yml gives the site."""
    yaml = pytest.importorskip("yaml", reason="install the docs extra: pip install -e .[docs]")
    pytest.importorskip("mkdocs_click", reason="install the docs extra: pip install -e .[docs]")

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    names, settings = [], {}
    for entry in config.get("markdown_extensions", []):
        name, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        names.append(name)
        settings[name] = options or {}
    return names, settings


def rendered_cli_sections(markdown_text: str) -> dict[str, str]:
    """The CLI page as the site renders it: heading text -> the text under it."""
    names, settings = site_markdown_extensions()
    import markdown

    page = markdown.markdown(markdown_text, extensions=names, extension_configs=settings)
    parts = re.split(r"<h[1-6][^>]*>(.*?)</h[1-6]>", page, flags=re.S)
    sections = {}
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        heading = re.sub(r'<a class="headerlink".*?</a>', "", heading)
        title = html.unescape(re.sub(r"<[^>]+>", "", heading)).strip()
        sections[title] = html.unescape(re.sub(r"<[^>]+>", " ", body))
    return sections


def cli_doc_problems(markdown_text: str) -> list[str]:
    commands, problems = cli_tree()
    sections = rendered_cli_sections(markdown_text)
    for path, ctx in commands:
        title = " ".join(path)
        if title not in sections:
            problems.append(f"command '{title}' undocumented")
            continue
        body = sections[title]
        for param in ctx.command.params:
            if getattr(param, "hidden", False):
                continue
            if isinstance(param, click.Option):
                names = [*param.opts, *param.secondary_opts]
            else:  # an argument: as the usage line shows it (TARGETS..., or its choices)
                names = [piece.rstrip(".") for piece in param.get_usage_pieces(ctx)]
            problems += [
                f"'{title}': {name} undocumented"
                for name in names
                if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", body)
            ]
    return problems


def test_every_cli_command_and_option_is_in_the_rendered_reference():
    problems = cli_doc_problems(CLI_DOC.read_text(encoding="utf-8"))

    assert not problems, "the CLI reference misses:\n" + "\n".join(problems)


def test_the_cli_check_catches_a_page_without_the_generated_reference():
    problems = cli_doc_problems("# Command-line reference\n\n## deployer upgrade\n\n`--force`\n")

    assert "command 'deployer status' undocumented" in problems
    assert "'deployer upgrade': --dry-run undocumented" in problems
    assert "'deployer upgrade': --force undocumented" not in problems


def test_the_site_renders_the_cli_reference_with_mkdocs_click():
    names, _ = site_markdown_extensions()

    assert "mkdocs-click" in names, "mkdocs.yml lacks the mkdocs-click extension"
    assert "reference/cli.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert ":module: deployer.cli.main" in CLI_DOC.read_text(encoding="utf-8")


# --- exit codes ---------------------------------------------------------------------------


def test_every_exit_code_is_documented():
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}
    lines = markdown_sections(EXIT_DOC.read_text(encoding="utf-8"))["Exit codes"]
    documented = {int(m.group(1)) for line in lines if (m := re.match(r"^\| (\d+) \|", line))}

    assert sorted(codes - documented) == [], "exit codes without a row in exit-codes.md"


# --- shell completion, as docs/reference/cli.md documents it ---------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_documented_completion_lines_work(shell):
    import os
    import subprocess

    doc = CLI_DOC.read_text(encoding="utf-8")
    assert f"_DEPLOYER_COMPLETE={shell}_source deployer" in doc
    env = {**os.environ, "_DEPLOYER_COMPLETE": f"{shell}_source"}

    script = subprocess.run(
        [sys.executable, "-m", "deployer"], env=env, capture_output=True, text=True, timeout=30
    )

    assert script.returncode == 0 and "_DEPLOYER_COMPLETE" in script.stdout


def test_completion_offers_lazy_subcommands_and_their_options():
    import os
    import subprocess

    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_DEPLOYER_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        out = subprocess.run(
            [sys.executable, "-m", "deployer"], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        return [line.split(",", 1)[1] for line in out.splitlines()]

    assert complete("deployer up") == ["upgrade"]
    assert complete("deployer sandbox u") == ["up"]
    assert "--dry-run" in complete("deployer upgrade --d")
