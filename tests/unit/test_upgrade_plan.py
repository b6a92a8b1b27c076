"""plan_all: the short-soak warning (SPEC 4: stable_for must exceed offline detection)."""

import logging
from pathlib import Path

import pytest

from deployer.inventory import load_inventory
from deployer.upgrade import UpgradeRequest, plan_all

pytestmark = pytest.mark.unit

INVENTORY = """
[provider]
api_url = "http://127.0.0.1:9/api/{{call}}"
ssh_host = "127.0.0.1"
user_id = "u-123456789"
offline_detection = {detection}

[defaults]
template = "t.j2"
stable_for = 5

[defaults.service]
kind = "systemd"

[hosts.a]
dbid = "d-1"
host_uuid = "h-1"
ports_id = 1
ssh_port = 2201

[hosts.b]
dbid = "d-2"
host_uuid = "h-2"
ports_id = 2
ssh_port = 2202
stable_for = 60
"""


def _plans(tmp_path: Path, detection: float):
    (tmp_path / "t.j2").write_text("print({{ host | tojson }})\n")
    inv_path = tmp_path / "deployer.toml"
    inv_path.write_text(INVENTORY.format(detection=detection))
    inv_path.chmod(0o600)  # it holds literal credentials: private, or deployer refuses it
    inv = load_inventory(inv_path)
    request = UpgradeRequest(inventory=inv, hosts=list(inv.hosts.values()), state_dir=tmp_path)
    return plan_all(request, "run-1")


def test_a_soak_shorter_than_offline_detection_is_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="deployer.upgrade")
    plans = _plans(tmp_path, 30.0)
    assert [p.name for p in plans] == ["a", "b"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "stable_for 5s does not exceed" in warnings[0] and "1 host(s), e.g. a" in warnings[0]


def test_no_warning_when_every_soak_is_long_enough(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="deployer.upgrade")
    _plans(tmp_path, 1.5)
    assert caplog.records == []
