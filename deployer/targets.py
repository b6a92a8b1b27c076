"""Command-line targets: which inventory hosts ``deployer upgrade pi-01 @lab
'web-*' all`` names.

A target is a host name, ``@group``, a glob over host names (``web-*``) or
group names (``@e*``), or ``all``; the hosts come back in inventory file order,
each once. A target that matches nothing is a :class:`~deployer.errors.UsageError`
with the closest name as a hint. The loader refuses a host or group named as a
reserved target (:data:`RESERVED_TARGETS`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from deployer.errors import UsageError, closest_name
from deployer.model import HostConfig, Inventory

#: target words that are not names: no host or group may be called so
RESERVED_TARGETS = frozenset({"all"})
GLOB_CHARS = frozenset("*?[")


def select_hosts(inventory: Inventory, targets: Sequence[str]) -> list[HostConfig]:
    """Hosts named by ``targets`` (names, ``@group``, ``all``, globs), in file order."""
    if not targets:
        raise UsageError("no targets given; name hosts, @group, a glob like 'pi-*', or all")
    wanted: set[str] = set()
    for target in targets:
        matched = _match_target(inventory, target)
        if not matched:
            raise UsageError(_unmatched_message(inventory, target))
        wanted.update(matched)
    return [host for name, host in inventory.hosts.items() if name in wanted]


def _match_target(inventory: Inventory, target: str) -> list[str]:
    if target == "all":
        return list(inventory.hosts)
    if target.startswith("@"):
        pattern = target[1:]
        groups = [g for g in inventory.groups if _matches(g, pattern)]
        return [h for g in groups for h in inventory.groups[g]]
    return [h for h in inventory.hosts if _matches(h, target)]


def _matches(name: str, pattern: str) -> bool:
    if GLOB_CHARS.intersection(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern


def _unmatched_message(inventory: Inventory, target: str) -> str:
    if target.startswith("@") and target[1:] in inventory.groups:
        return f"target '{target}': group '{target[1:]}' has no hosts; add it to a host's groups"
    candidates = [*inventory.hosts, *(f"@{g}" for g in inventory.groups)]
    closest = closest_name(target, candidates)
    hint = f"did you mean '{closest}'?" if closest else "see `deployer hosts` for the names"
    return f"target '{target}' matches no host or group; {hint}"
