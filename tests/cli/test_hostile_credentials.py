"""`deployer render` with credentials that hold ``& ' < > " \\``: every form the
template gives them (tojson, quote, urlencode, e) is masked on stdout
(issue 11, item 5); --output still writes them exactly."""

from __future__ import annotations

import pytest

from deployer.inventory import load_inventory
from deployer.render import render_script
from tests.cli import run
from tests.hostile_inventory import DBID, USER_ID, leaked, write_inventory

pytestmark = pytest.mark.cli


def test_render_masks_every_form_of_hostile_credentials(tmp_path):
    inventory = write_inventory(tmp_path)
    result = run("-i", str(inventory), "render", "pi-01")
    assert result.code == 0, result.stderr
    assert "SHELL = " in result.stdout and "…2222" in result.stdout
    assert leaked(result.stdout) == [], result.stdout
    assert leaked(result.stderr) == [], result.stderr


def test_render_output_file_keeps_the_hostile_credentials_exact(tmp_path):
    inventory = write_inventory(tmp_path)
    out = tmp_path / "client.py"
    result = run("-i", str(inventory), "render", "pi-01", "--output", str(out))
    assert result.code == 0, result.stderr
    loaded = load_inventory(inventory)
    assert out.read_text() == render_script(loaded, loaded.hosts["pi-01"]).text
    assert DBID in out.read_text() and USER_ID in out.read_text()
    assert leaked(result.stdout + result.stderr) == []
