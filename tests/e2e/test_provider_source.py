"""``source = "provider"`` end to end on the sandbox: a fleet upgraded to the
script the provider generated for each client (SPEC 1b ``get_client_script``).

The sandbox's simulator serves ``get_client_script`` from ``DIR/provider/
CLIENT_ID.py`` and writes ``api_key`` and each host's ``client_id`` into
``DIR/sandbox.json`` (and its inventory); the test writes a provider-source
inventory beside the sandbox's own (same hosts, ``source = "provider"``, the
``api_key`` from the environment) and judges by the simulator's
``/sandbox/state``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e.sandbox_checks import assert_window_shut, delta, installed_sha, wait_running
from tests.sandbox_fixture import Sandbox

pytestmark = pytest.mark.e2e

KEY_ENV = "E2E_SSHREACH_API_KEY"


def provider_inventory(sb: Sandbox) -> Path:
    """DIR/provider.toml: the sandbox inventory with every host on source = "provider"
    and the api_key taken from the environment (so a test can pass a wrong one)."""
    doc = sb.document
    text = sb.inventory.read_text()
    key_line = f'api_key = "${{{KEY_ENV}}}"\n'
    text, found = re.subn(r"(?m)^api_key = .*\n", lambda m: key_line, text, count=1)
    if not found:
        text = text.replace("[provider]\n", "[provider]\n" + key_line, 1)
    text = text.replace("[defaults]\n", '[defaults]\nsource = "provider"\n', 1)
    for name, host in doc["hosts"].items():
        header = f"[hosts.{name}]\n"
        assert header in text, header
        if f'client_id = "{host["client_id"]}"' not in text:
            text = text.replace(header, f'{header}client_id = "{host["client_id"]}"\n', 1)
    path = sb.dir / "provider.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def run_json(
    sb: Sandbox, inventory: Path, *args: str, api_key: str | None = None
) -> tuple[int, dict, str]:
    env = {**os.environ, KEY_ENV: sb.document["api_key"] if api_key is None else api_key}
    code, out, err = sb.run_cli("-i", str(inventory), *args, "--json", env=env)
    assert out.strip(), f"no JSON report on stdout (exit {code}); stderr:\n{err}"
    assert_no_credentials(sb, out + err)
    return code, json.loads(out), err


def assert_no_credentials(sb: Sandbox, text: str) -> None:
    doc = sb.document
    secrets = [doc["api_key"]]
    for host in doc["hosts"].values():
        secrets += [host["user_id"], host["dbid"], host["host_uuid"], host["client_id"]]
    leaked = [s[-4:] for s in secrets if s in text]
    assert not leaked, f"credentials ending {leaked} in deployer's output"


def provider_script(sb: Sandbox, name: str) -> bytes:
    client_id = sb.document["hosts"][name]["client_id"]
    return (sb.dir / "provider" / f"{client_id}.py").read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fleet(sandbox_factory) -> Sandbox:
    return sandbox_factory(hosts=3)


def test_a_provider_fleet_upgrades_to_each_clients_own_script(fleet):
    inventory = provider_inventory(fleet)
    names = fleet.hosts
    wanted = {name: sha(provider_script(fleet, name)) for name in names}
    before = {name: fleet.host(name) for name in names}
    assert all(before[n]["script_sha256"] != wanted[n] for n in names)

    # dry run: the diff of the provider's script, every id masked
    code, out, err = fleet.run_cli(
        "-i", str(inventory), "upgrade", names[0], "--dry-run",
        env={**os.environ, KEY_ENV: fleet.document["api_key"]},
    )  # fmt: skip
    assert code == 0, err
    assert "(new)" in out and re.search(r"^\+.*provider-1", out, re.M), out
    assert_no_credentials(fleet, out + err)

    # the pipeline reviews the script it will install (render -o) and pins it
    reviewed = fleet.dir / "reviewed.py"
    code, out, err = fleet.run_cli(
        "-i", str(inventory), "render", names[0], "-o", str(reviewed),
        env={**os.environ, KEY_ENV: fleet.document["api_key"]},
    )  # fmt: skip
    assert code == 0, err
    assert reviewed.read_bytes() == provider_script(fleet, names[0])
    assert out.split()[0] == wanted[names[0]]

    code, report, err = run_json(
        fleet, inventory, "upgrade", names[0], "--expect-sha256", wanted[names[0]]
    )
    assert code == 0, err
    (host,) = report["hosts"]
    assert (host["result"], host["new_sha256"]) == ("upgraded", wanted[names[0]]), host

    code, report, err = run_json(fleet, inventory, "upgrade", "all", "--parallel", "2")
    assert code == 0, err
    results = {h["host"]: (h["result"], h["new_sha256"]) for h in report["hosts"]}
    assert results[names[0]] == ("unchanged", wanted[names[0]])
    for name in names[1:]:
        assert results[name] == ("upgraded", wanted[name]), report
    for name in names:
        state = wait_running(fleet, name, wanted[name])
        assert_window_shut(state)
        assert installed_sha(fleet, name) == wanted[name]
        assert state["tunnel_cuts"] == 0
        made = delta(before[name]["api_calls"], state["api_calls"])
        # one fetch per command that needed the script: dry run, render, pinned, fleet
        assert made["get_client_script"] == (4 if name == names[0] else 1), made


def test_refused_scripts_and_a_wrong_key_touch_nothing(fleet):
    inventory = provider_inventory(fleet)
    names = fleet.hosts
    before = {name: fleet.host(name) for name in names}

    # a wrong api_key: 32 on the first fetch stops the run before any host starts
    code, report, err = run_json(fleet, inventory, "upgrade", "all", api_key="0" * 32)
    assert code == 1, err
    assert [h["result"] for h in report["hosts"]] == ["failed", "skipped", "skipped"]
    assert report["hosts"][0]["error"]["api_error_code"] == 32

    # a script that is not Python fails its host only; a pin mismatch fails its host
    broken = names[0]
    client_id = fleet.document["hosts"][broken]["client_id"]
    (fleet.dir / "provider" / f"{client_id}.py").write_text("def client(:\n")
    code, report, err = run_json(
        fleet, inventory, "upgrade", broken, names[1], "--expect-sha256", "ab" * 32
    )
    assert code == 1, err
    hosts = {h["host"]: h for h in report["hosts"]}
    assert hosts[broken]["error"]["type"] == "InvalidScript", hosts[broken]
    assert hosts[names[1]]["error"]["type"] == "PinMismatch", hosts[names[1]]
    assert "ab" * 32 in hosts[names[1]]["error"]["message"]

    for name in names:
        after = fleet.host(name)
        made = delta(before[name]["api_calls"], after["api_calls"])
        assert {k: v for k, v in made.items() if v and k != "get_client_script"} == {}, made
        assert after["script_sha256"] == before[name]["script_sha256"]
        assert_window_shut(after)
