"""Command-line targets (deployer.targets): names, @group, globs and all."""

from __future__ import annotations

import pytest

from deployer.errors import UsageError
from deployer.targets import select_hosts
from tests.inventories import BASE, load

pytestmark = pytest.mark.unit


@pytest.fixture
def fleet(tmp_path):
    text = BASE
    for number in (3, 4):
        text += (
            f'\n[hosts.web-{number}]\ndbid = "d{number}xxxx"\nhost_uuid = "u{number}xxxx"\n'
            f'ports_id = {number}\nssh_port = {20000 + number}\ngroups = ["edge"]\n'
        )
    return load(tmp_path, text)


def names(hosts) -> list[str]:
    return [h.name for h in hosts]


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["pi-02"], ["pi-02"]),
        (["all"], ["pi-01", "pi-02", "web-3", "web-4"]),
        (["@lab"], ["pi-01", "pi-02"]),
        (["@edge"], ["pi-02", "web-3", "web-4"]),
        (["web-*"], ["web-3", "web-4"]),
        (["*-0?"], ["pi-01", "pi-02"]),
        (["web-[4]"], ["web-4"]),
        (["@e*"], ["pi-02", "web-3", "web-4"]),
        (["web-4", "pi-01", "@lab", "pi-01"], ["pi-01", "pi-02", "web-4"]),  # file order, no dups
    ],
)
def test_select_hosts(fleet, targets, expected):
    assert names(select_hosts(fleet, targets)) == expected


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("pi-1", "target 'pi-1' matches no host or group; did you mean 'pi-01'?"),
        ("@labs", "target '@labs' matches no host or group; did you mean '@lab'?"),
        ("db-*", "target 'db-*' matches no host or group"),
        ("PI-01", "did you mean 'pi-01'?"),
    ],
)
def test_unmatched_target_is_a_usage_error(fleet, target, fragment):
    with pytest.raises(UsageError) as caught:
        select_hosts(fleet, ["pi-01", target])
    assert fragment in str(caught.value)
    assert caught.value.exit_code == 2


def test_empty_group_and_no_targets_are_usage_errors(tmp_path):
    inventory = load(tmp_path, BASE + "\n[groups.empty]\n")
    with pytest.raises(UsageError, match="group 'empty' has no hosts"):
        select_hosts(inventory, ["@empty"])
    with pytest.raises(UsageError, match="no targets given"):
        select_hosts(inventory, [])
