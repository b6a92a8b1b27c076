"""The test inventory that the loader, renderer and CLI tests share: a two-host
fleet (``BASE``) with literal and environment credentials, its writer and
loader, and the malformed variants every one-line error is checked against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from deployer.inventory import load_inventory

CLIENT_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "client.py.j2"

USER_ID = "USERID-SECRET-1111"
DBID = "DBID-SECRET-2222"
UUID = "UUID-SECRET-3333"
SECRETS = (USER_ID, DBID, UUID, "DBID-SECRET-4444", "UUID-SECRET-5555")
ENV = {"TEST_USER_ID": USER_ID, "PI01_DBID": DBID}

BASE = """\
[provider]
api_url = "https://sshreach.example/init/api/{call}"
ssh_host = "fw1.example"
user_id = "${TEST_USER_ID}"
rate_limit = 5.0
timeout = 10.0

[defaults]
ssh_user = "pi"
template = "client.py.j2"
script_path = "/opt/sshreach/client.py"
mode = "0755"
host_key_policy = "accept-new"
stable_for = 30
vars = { release = "1", region = "none" }

[defaults.service]
kind = "systemd"
unit = "sshreach-client"

[groups.lab]
vars = { region = "eu" }

[groups.edge]
ssh_user = "edge"
stable_for = 5

[hosts.pi-01]
dbid = "${PI01_DBID}"
host_uuid = "UUID-SECRET-3333"
ports_id = 1234
ssh_port = 12345
groups = ["lab"]
vars = { location = "Berlin" }

[hosts.pi-02]
dbid = "DBID-SECRET-4444"
host_uuid = "UUID-SECRET-5555"
ports_id = 1235
ssh_port = 12346
groups = ["lab", "edge"]
"""


def write(tmp_path: Path, text: str, name: str = "deployer.toml", mode: int = 0o600) -> Path:
    """The inventory file; private by default, since BASE holds literal credentials."""
    shutil.copy(CLIENT_TEMPLATE, tmp_path / "client.py.j2")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def load(tmp_path: Path, text: str = BASE, overrides=None, env=None):
    return load_inventory(
        write(tmp_path, text), overrides=overrides, env=ENV if env is None else env
    )


def swap(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (id, inventory text, fragment of the one-line message, line it points at or None)
MALFORMED = [
    (
        "unknown-host-key",
        swap("ports_id = 1234", "ports_id = 1234\nssh_prot = 1"),
        "[hosts.pi-01] ssh_prot: unknown key; did you mean 'ssh_port'?",
        32,
    ),
    (
        "unknown-top-level",
        BASE + "\n[hostz.x]\n",
        "[hostz]: unknown top-level key; did you mean 'hosts'?",
        43,
    ),
    (
        "unknown-service-key",
        swap('unit = "sshreach-client"', 'unti = "x"'),
        "[defaults.service] unti: unknown key; did you mean 'unit'?",
        19,
    ),
    (
        "unknown-provider-key",
        swap("timeout = 10.0", "timeuot = 10.0"),
        "[provider] timeuot: unknown key; did you mean 'timeout'?",
        6,
    ),
    (
        "ports-id-string",
        swap("ports_id = 1234", 'ports_id = "1234"'),
        "ports_id: must be an integer, got a string",
        31,
    ),
    (
        "ssh-port-range",
        swap("ssh_port = 12345", "ssh_port = 70000"),
        "ssh_port: 70000 is out of range; use a port in 1..65535",
        32,
    ),
    ("ssh-port-zero", swap("ssh_port = 12345", "ssh_port = 0"), "use a port in 1..65535", 32),
    (
        "host-key-policy",
        swap('host_key_policy = "accept-new"', 'host_key_policy = "yolo"'),
        "host_key_policy: 'yolo' is not allowed; use one of 'strict', 'accept-new'",
        13,
    ),
    (
        "service-kind",
        swap('kind = "systemd"', 'kind = "docker"'),
        "unknown service kind 'docker'; use one of 'systemd', 'pidfile', 'command'",
        18,
    ),
    (
        "pidfile-needs-run",
        swap('kind = "systemd"', 'kind = "pidfile"\npidfile = "/run/c.pid"'),
        "service kind 'pidfile' needs service.run",
        None,
    ),
    (
        "command-needs-check",
        swap('kind = "systemd"', 'kind = "command"\nstart = "a"\nstop = "b"'),
        "service kind 'command' needs service.check",
        None,
    ),
    (
        "script-path-relative",
        swap('script_path = "/opt/sshreach/client.py"', 'script_path = "c.py"'),
        "script_path: 'c.py' is not an absolute path",
        11,
    ),
    (
        "mode-integer",
        swap('mode = "0755"', "mode = 755"),
        'must be a string, got an integer; quote it as an octal string, e.g. mode = "0700"',
        12,
    ),
    (
        "mode-not-octal",
        swap('mode = "0755"', 'mode = "0999"'),
        "'0999' is not an octal file mode",
        12,
    ),
    (
        "sudo-string",
        swap('ssh_user = "pi"', 'ssh_user = "pi"\nsudo = "yes"'),
        "[defaults] sudo: must be true or false, got a string",
        10,
    ),
    (
        "timeout-string",
        swap("stable_for = 30", 'stable_for = "30"'),
        "[defaults] stable_for: must be a number, got a string",
        14,
    ),
    (
        "keep-backups-float",
        swap("stable_for = 30", "stable_for = 30\nkeep_backups = 2.5"),
        "keep_backups: must be an integer, got a number",
        15,
    ),
    (
        "rate-limit-zero",
        swap("rate_limit = 5.0", "rate_limit = 0"),
        "[provider] rate_limit: 0 is out of range; use a value > 0",
        5,
    ),
    ("api-url-no-call", swap("api/{call}", "api/connect"), "has no '{call}' placeholder", 2),
    ("api-url-scheme", swap("https://sshreach", "ftp://sshreach"), "not an http(s) URL", 2),
    (
        "unknown-group",
        swap('groups = ["lab"]', 'groups = ["labb"]'),
        "[hosts.pi-01] groups: unknown group 'labb'; did you mean 'lab'?",
        33,
    ),
    (
        "no-hosts",
        BASE.split("[hosts.pi-01]")[0],
        "no hosts defined; add at least one [hosts.NAME]",
        None,
    ),
    ("syntax-error", swap("ports_id = 1234", "ports_id = = 1234"), "TOML syntax error", 31),
    (
        "missing-env",
        swap("${PI01_DBID}", "${NOPE_DBID}"),
        "[hosts.pi-01] dbid: environment variable NOPE_DBID is not set",
        29,
    ),
    ("malformed-env", swap("${PI01_DBID}", "${PI01 DBID}"), "malformed '${'", 29),
    (
        "template-missing",
        swap('template = "client.py.j2"', 'template = "nope.j2"'),
        "[defaults] template: template 'nope.j2' not found",
        10,
    ),
    (
        "host-only-in-defaults",
        swap('ssh_user = "pi"', 'ssh_user = "pi"\ndbid = "DBID-SECRET-2222"'),
        "[defaults] dbid: a host-only key; move it to a [hosts.NAME] table",
        10,
    ),
    (
        "missing-dbid",
        swap('dbid = "DBID-SECRET-4444"\n', ""),
        "[hosts.pi-02]: missing key 'dbid'",
        36,
    ),
    (
        "missing-provider",
        BASE.split("[defaults]")[1].join(["[defaults]", ""]),
        "no [provider] table",
        None,
    ),
    (
        "duplicate-ssh-port",
        swap("ssh_port = 12346", "ssh_port = 12345"),
        "port 12345 is also the tunnel port of host 'pi-01'",
        40,
    ),
    (
        "var-name",
        swap('vars = { location = "Berlin" }', 'vars = { "bad-name" = 1 }'),
        "vars.bad-name: a var name must be an identifier",
        34,
    ),
    (
        "reserved-host-name",
        swap("[hosts.pi-02]", "[hosts.all]"),
        "'all' is not a valid host name",
        36,
    ),
    (
        "dbid-wrong-type",
        swap('dbid = "DBID-SECRET-4444"', "dbid = 4444"),
        "[hosts.pi-02] dbid: must be a string, got an integer",
        37,
    ),
]


def toml_str(value: object) -> str:
    """A TOML basic string (its escapes are JSON's for these values)."""
    return json.dumps(str(value), ensure_ascii=False)
