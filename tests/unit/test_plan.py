"""Stage 1, plan: timings, rendered commands, the guard's config and its injection."""

from __future__ import annotations

import ast
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from deployer.errors import EXIT_USAGE, TemplateError
from deployer.inventory import load_inventory
from deployer.plan import (
    GO_DEADLINE,
    GUARD_EXTRA,
    SOAK_MARGIN,
    effective_timings,
    guard_config,
    guard_source,
    plan_host,
    render_guard,
)
from deployer.secrets import Secret

pytestmark = pytest.mark.unit

USER_ID = "USERID-SECRET-1111"
DBID = "DBID-SECRET-2222"
UUID = "UUID-SECRET-3333"

INVENTORY = """\
[provider]
api_url = "https://sshreach.example/init/api/{{call}}"
ssh_host = "fw1.example"
user_id = "USERID-SECRET-1111"
timeout = 7.0

[defaults]
template = "client.py.j2"
script_path = {script}
validate = {validate}
health = {health}
vars = {{ region = "eu" }}
{extra}

[defaults.service]
{service}

[hosts.pi-01]
dbid = "DBID-SECRET-2222"
host_uuid = "UUID-SECRET-3333"
ports_id = 1234
ssh_port = 12345
"""

PIDFILE_SERVICE = """\
kind = "pidfile"
pidfile = "/run/{{ host }}.pid"
run = "python3 {{ script_path | quote }}"
"""


def inventory(
    tmp_path: Path,
    *,
    script: str = "/opt/sshreach/client.py",
    service: str = PIDFILE_SERVICE,
    extra: str = "",
    template: str = "# {{ host }} {{ region }}\n",
    validate: str = "python3 -m py_compile {{ path | quote }}",
    health: str = "test -f {{ script_path | quote }} && echo {{ region }}",
):
    (tmp_path / "client.py.j2").write_text(template)
    path = tmp_path / "deployer.toml"
    path.write_text(
        INVENTORY.format(
            script=json.dumps(script, ensure_ascii=False),
            service=service,
            extra=extra,
            validate=json.dumps(validate),
            health=json.dumps(health),
        )
    )
    path.chmod(0o600)  # it holds literal credentials: private, or deployer refuses it
    return load_inventory(path)


def plan(tmp_path, **kw):
    inv = inventory(tmp_path, **kw)
    return inv, plan_host(inv, inv.hosts["pi-01"], "RUN1")


# --- timings -----------------------------------------------------------------------


def test_guard_deadline_defaults_to_online_timeout_plus_stable_for_plus_60(tmp_path):
    inv = inventory(tmp_path)
    host = inv.hosts["pi-01"]
    assert effective_timings(host, None, None) == (120.0, 30.0, 120.0 + 30.0 + 60.0)
    assert GUARD_EXTRA == 60.0
    assert effective_timings(host, 5.0, 1.0) == (5.0, 1.0, 66.0)


def test_explicit_guard_deadline_is_kept_but_never_below_online_plus_stable(tmp_path):
    host = inventory(tmp_path).hosts["pi-01"]
    assert effective_timings(replace(host, guard_deadline=500.0), None, None)[2] == 500.0
    # a deadline shorter than the first life plus the soak would revert good upgrades
    assert effective_timings(replace(host, guard_deadline=10.0), 4.0, 2.0)[2] == 11.0


def test_plan_uses_the_overridden_timings(tmp_path):
    inv = inventory(tmp_path)
    p = plan_host(inv, inv.hosts["pi-01"], "R", online_timeout=3.0, stable_for=0.5)
    # without a ready probe the deadline also holds the offline detection (30 s)
    assert (p.online_timeout, p.stable_for, p.guard_deadline) == (3.0, 0.5, 93.5)


# --- rendering -----------------------------------------------------------------------


def test_plan_renders_script_and_hash(tmp_path):
    import hashlib

    _, p = plan(tmp_path)
    assert p.script == b"# pi-01 eu\n"
    assert p.sha256 == hashlib.sha256(b"# pi-01 eu\n").hexdigest()
    assert p.name == "pi-01"
    assert p.paths.run_id == "RUN1"


def test_validate_gets_the_staged_path_quoted(tmp_path):
    script = "/opt/my dir/it's/client.py"
    _, p = plan(tmp_path, script=script)
    assert p.paths.script_path == script
    assert shlex.split(p.validate) == ["python3", "-m", "py_compile", p.paths.staged]
    assert p.paths.staged.startswith("/opt/my dir/it's/.client.py.deployer/runs/RUN1/")


def test_health_is_rendered_with_the_host_context(tmp_path):
    _, p = plan(tmp_path, script="/opt/a b/client.py")
    assert p.health == "test -f '/opt/a b/client.py' && echo eu"


def test_pidfile_service_is_rendered(tmp_path):
    _, p = plan(tmp_path, script="/opt/a b/client.py")
    assert p.service == {
        "kind": "pidfile",
        "pidfile": "/run/pi-01.pid",
        "run": "python3 '/opt/a b/client.py'",
        "log": "/opt/a b/.client.py.deployer/client.log",
        "ready": "",
    }


def test_systemd_unit_is_quoted(tmp_path):
    _, p = plan(tmp_path, service='kind = "systemd"\nunit = "my unit; touch x"')
    assert p.service == {"kind": "systemd", "unit_q": "'my unit; touch x'", "ready": ""}


def test_rollback_plan_renders_no_script(tmp_path):
    inv = inventory(tmp_path, template="{{ undefined_name }}")
    p = plan_host(inv, inv.hosts["pi-01"], "R", render=False)
    assert p.script is None and p.sha256 is None
    assert p.service["kind"] == "pidfile"


@pytest.mark.parametrize(
    "kw",
    [
        {"template": "{{ build_id }}\n"},
        {"template": "{% if %}\n"},
        {"validate": "check {{ nope }}"},
        {"health": "check {% for %}"},
        {"service": 'kind = "pidfile"\npidfile = "/run/x.pid"\nrun = "{{ missing }}"'},
        {"service": 'kind = "command"\nstart = "a"\nstop = "b"\ncheck = "{{ missing }}"'},
    ],
    ids=["script-undefined", "script-syntax", "validate", "health", "pidfile-run", "check"],
)
def test_template_errors_are_local_input_errors(tmp_path, kw):
    with pytest.raises(TemplateError) as info:
        plan(tmp_path, **kw)
    assert info.value.exit_code == EXIT_USAGE == 2
    assert "\n" not in str(info.value)
    for secret in (USER_ID, DBID, UUID):
        assert secret not in str(info.value)


def test_plan_repr_shows_no_credentials(tmp_path):
    inv, p = plan(tmp_path)
    text = repr(p)
    for secret in (USER_ID, DBID, UUID):
        assert secret not in text


# --- the guard's config ---------------------------------------------------------------


def test_guard_config(tmp_path):
    inv, p = plan(tmp_path)
    cfg = guard_config(p, inv, "/opt/sshreach/.client.py.deployer/backups/b1")
    assert cfg["run_dir"] == p.paths.run_dir
    assert cfg["script_path"] == "/opt/sshreach/client.py"
    assert cfg["staged_path"] == p.paths.staged
    assert cfg["backup_path"] == "/opt/sshreach/.client.py.deployer/backups/b1"
    assert cfg["service"] == p.service
    assert cfg["deadline"] == p.guard_deadline == 240.0  # 120 + 30 (offline detection) + 30 + 60
    # after first life: stable_for + margin + room for two retried API timeouts
    assert cfg["soak_deadline"] == 30.0 + SOAK_MARGIN + 2 * 7.0
    assert cfg["soak_deadline"] < cfg["deadline"]
    assert cfg["go_deadline"] == min(240.0, GO_DEADLINE)
    # SPEC 4 steps 9 and the guard paragraph: evidence, and the tunnel deployer opened
    assert cfg["ready"] == ""
    assert cfg["offline_detection"] == 30.0
    assert cfg["revert_online_wait"] == 2 * 30.0 + 10.0
    assert cfg["tunnel_opened"] is False
    assert guard_config(p, inv, "/b", tunnel_opened=True)["tunnel_opened"] is True
    # reaching the host again after the swap must not read as a vanished deployer
    assert cfg["silence_limit"] >= inv.provider.tunnel_timeout + 15.0
    assert cfg["api"] == {
        "url": "https://sshreach.example/init/api/{call}",
        "timeout": 7.0,
        "params": {"user_id": USER_ID, "dbid": DBID, "host_uuid": UUID, "ports_id": "1234"},
    }


HOSTILE_VALUES = [
    "it's",
    'say "hi"',
    "'''",
    '"""',
    "back\\slash\\n\\",
    "new\nline\r\n",
    "tab\there",
    "$(touch pwned) `id`",
    "ünï ✓ \u2028 \U0001f600",
    "\x00nul",
    "')); import os; os.system('touch pwned'); ((",
    '"); import os; os.system("touch pwned"); ("',
]


def load_config(source: bytes) -> dict:
    """Execute the rendered guard's module level (not main) and return CONFIG."""
    namespace: dict = {"__name__": "rendered_guard"}
    exec(compile(source, "guard.py", "exec"), namespace)  # noqa: S102 - our own program
    return namespace["CONFIG"]


def test_render_guard_injects_the_config_as_a_literal_that_round_trips(tmp_path):
    cfg = {
        "run_dir": "/r",
        "script_path": HOSTILE_VALUES,
        "nested": {v: v for v in HOSTILE_VALUES},
        "deadline": 12.5,
        "api": None,
    }
    source = render_guard(cfg)
    assert load_config(source) == cfg
    assert not list(Path.cwd().glob("pwned")) and not list(tmp_path.glob("pwned"))
    # only the marker line changed: the rest is guard.py as shipped
    lines = source.decode("utf-8").splitlines()
    original = guard_source().splitlines()
    assert len(lines) == len(original)
    changed = [i for i, (a, b) in enumerate(zip(lines, original, strict=True)) if a != b]
    assert len(changed) == 1 and lines[changed[0]].startswith("CONFIG = json.loads(")


def test_render_guard_of_a_real_plan_round_trips(tmp_path):
    inv, p = plan(tmp_path, script="/opt/x \"y\" 'z'\\/client.py")
    cfg = guard_config(p, inv, p.paths.backup_for(None, 0.0))
    assert load_config(render_guard(cfg)) == cfg


def test_guard_is_stdlib_only():
    tree = ast.parse(guard_source())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert modules and modules <= set(sys.stdlib_module_names)


def test_credentials_in_plan_are_secrets(tmp_path):
    inv, p = plan(tmp_path)
    assert isinstance(p.host.dbid, Secret) and isinstance(inv.provider.user_id, Secret)


READY = 'test -n "$(find {{ script_path | quote }}.poll -newer "$DEPLOYER_SWAP_MARK")"'


def test_ready_probe_is_rendered_for_the_guard(tmp_path):
    _, p = plan(
        tmp_path,
        script="/opt/a b/client.py",
        service=PIDFILE_SERVICE + f"ready = {json.dumps(READY)}\n",
    )
    assert p.service["ready"] == (
        'test -n "$(find \'/opt/a b/client.py\'.poll -newer "$DEPLOYER_SWAP_MARK")"'
    )


def test_a_ready_probe_spares_the_guard_deadline_the_offline_detection(tmp_path):
    without = plan(tmp_path)[1]
    with_probe = plan(tmp_path, service=PIDFILE_SERVICE + f"ready = {json.dumps(READY)}\n")[1]
    assert with_probe.guard_deadline == 120.0 + 30.0 + 60.0
    assert without.guard_deadline == 120.0 + 30.0 + 30.0 + 60.0


def test_a_bad_ready_probe_is_a_plan_error(tmp_path):
    from deployer.errors import TemplateError

    with pytest.raises(TemplateError, match="ready"):
        plan(tmp_path, service=PIDFILE_SERVICE + 'ready = "{{ nope }}"\n')


def test_go_deadline_never_exceeds_the_guard_deadline(tmp_path):
    inv = inventory(tmp_path)
    p = plan_host(inv, inv.hosts["pi-01"], "R", online_timeout=3.0, stable_for=0.5)
    p = replace(p, guard_deadline=20.0)
    assert guard_config(p, inv, "/b")["go_deadline"] == 20.0
