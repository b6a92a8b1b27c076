"""What the e2e tests ask of a sandbox after a CLI run: the one host's JSON
report (with no credential in deployer's output), the script deployer would
install and the one installed, and the simulator's view of a host once its
client runs (the window shut). Shared by test_upgrade, test_hostile and
test_provider_source."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from tests.sandbox_fixture import Sandbox

END_STATE_WAIT = 15.0  # seconds for the running client's next polls to reach the simulator


def run_json(sb: Sandbox, command: str, host: str, *args: str) -> tuple[int, dict, str]:
    """``deployer COMMAND HOST --json ARGS…`` -> (exit code, its one host's report, stderr)."""
    code, out, err = sb.run_cli(command, host, "--json", *args)
    assert out.strip(), f"no JSON report on stdout (exit {code}); stderr:\n{err}"
    assert_no_credentials(sb, out + err)
    report = json.loads(out)
    assert [h["host"] for h in report["hosts"]] == [host], report
    return code, report["hosts"][0], err


def credentials(sb: Sandbox) -> list[str]:
    """user_id, and every host's dbid and host_uuid, from the sandbox inventory."""
    inv = tomllib.loads(sb.inventory.read_text())
    found = [inv["provider"]["user_id"]]
    for host in inv["hosts"].values():
        found += [host["dbid"], host["host_uuid"]]
    return found


def assert_no_credentials(sb: Sandbox, text: str) -> None:
    leaked = [c[-4:] for c in credentials(sb) if c in text]
    assert not leaked, f"credentials ending {leaked} in deployer's output"


def rendered(sb: Sandbox, host: str, *var_args: str) -> bytes:
    """The exact script deployer would install (``deployer render --output``, SPEC 3)."""
    out = sb.dir / f"rendered-{host}.py"
    code, stdout, err = sb.run_cli("render", host, "--output", str(out), *var_args)
    assert code == 0, err
    data = out.read_bytes()
    out.unlink()
    assert stdout.split()[0] == hashlib.sha256(data).hexdigest(), stdout
    return data


def rendered_sha(sb: Sandbox, host: str, *var_args: str) -> str:
    return hashlib.sha256(rendered(sb, host, *var_args)).hexdigest()


def installed_sha(sb: Sandbox, host: str) -> str:
    return hashlib.sha256((sb.host_dir(host) / "client.py").read_bytes()).hexdigest()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def wait_running(sb: Sandbox, host: str, sha: str) -> dict[str, Any]:
    """The simulator's host state once a client running ``sha`` polls, online (the
    ``sha256`` its polls report; fails after a while)."""
    sb.client.wait_for(
        [host],
        lambda h: h["online"] and h["script_sha256"] == sha,
        END_STATE_WAIT,
        f"running {sha[:12]}",
    )
    return sb.host(host)


def assert_window_shut(state: dict[str, Any]) -> None:
    """allow-clientless false, every exposure interval closed, our tunnel closed."""
    assert state["allow_clientless"] is False, state
    assert all(t_close is not None for _, t_close in state["exposures"]), state["exposures"]
    assert state["tunnel_open"] is False, state
