"""The inventory loader (SPEC 2): validation, precedence, interpolation."""

from __future__ import annotations

import os
import shutil

import pytest

from deployer.errors import InventoryError, UsageError
from deployer.inventory import load_inventory, parse_var_overrides
from tests.inventories import (
    BASE,
    CLIENT_TEMPLATE,
    DBID,
    ENV,
    MALFORMED,
    SECRETS,
    USER_ID,
    UUID,
    load,
    swap,
    write,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "fragment", "line"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_inventory_gives_one_line_error(tmp_path, text, fragment, line):
    with pytest.raises(InventoryError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    assert caught.value.exit_code == 2
    where = f"{tmp_path / 'deployer.toml'}:{line}:" if line else f"{tmp_path / 'deployer.toml'}"
    assert message.startswith(where), message
    for secret in SECRETS:
        assert secret not in message


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(
        InventoryError, match=r"not found; pass -i PATH or set \$DEPLOYER_INVENTORY"
    ):
        load_inventory(tmp_path / "none.toml")


def test_error_never_shows_a_credential_even_when_it_is_the_bad_value(tmp_path):
    text = swap('host_key_policy = "accept-new"', 'host_key_policy = "${TEST_USER_ID}"')
    with pytest.raises(InventoryError) as caught:
        load(tmp_path, text)
    assert USER_ID not in str(caught.value)
    assert "…1111" in str(caught.value)


def test_valid_inventory_loads_in_file_order_with_secrets_wrapped(tmp_path):
    inventory = load(tmp_path)
    assert list(inventory.hosts) == ["pi-01", "pi-02"]
    host = inventory.hosts["pi-01"]
    assert host.dbid.reveal() == DBID and DBID not in repr(host)
    assert host.host_uuid.reveal() == UUID and UUID not in repr(host)
    assert inventory.provider.user_id.reveal() == USER_ID
    assert USER_ID not in repr(inventory)
    assert host.template == (tmp_path / "client.py.j2").resolve()
    assert host.template.is_absolute()
    assert inventory.groups == {"lab": ("pi-01", "pi-02"), "edge": ("pi-02",)}
    assert inventory.path == (tmp_path / "deployer.toml").resolve()
    assert sorted(inventory.secret_values()) == sorted(SECRETS)


def test_defaults_apply_when_nothing_sets_a_key(tmp_path):
    host = load(tmp_path).hosts["pi-01"]
    assert (host.online_timeout, host.keep_backups, host.sudo) == (120.0, 3, False)
    assert host.guard_deadline is None
    assert host.validate == "" and host.health == ""
    assert host.ssh_key == "~/.ssh/id_ed25519"


def test_precedence_defaults_groups_host_overrides(tmp_path):
    text = swap("[hosts.pi-02]\n", '[hosts.pi-02]\nvars = { release = "host" }\n')
    inventory = load(tmp_path, text, overrides={"release": "cli", "extra": "x"})
    one, two = inventory.hosts["pi-01"], inventory.hosts["pi-02"]
    # defaults < group
    assert one.vars["region"] == "eu"
    assert (one.ssh_user, one.stable_for) == ("pi", 30.0)
    assert (two.ssh_user, two.stable_for) == ("edge", 5.0)
    # vars merge key by key; --var beats everything
    assert one.vars == {"release": "cli", "region": "eu", "location": "Berlin", "extra": "x"}
    assert two.vars["release"] == "cli"


def test_host_beats_groups_and_later_groups_beat_earlier(tmp_path):
    text = BASE + '\n[groups.slow]\nstable_for = 99\nssh_user = "slow"\n'
    text = swap('groups = ["lab", "edge"]', 'groups = ["edge", "slow"]\nssh_user = "mine"', text)
    text = swap('groups = ["lab"]', 'groups = ["slow", "edge"]', text)
    inventory = load(tmp_path, text)
    assert inventory.hosts["pi-02"].stable_for == 99.0  # slow listed last wins
    assert inventory.hosts["pi-02"].ssh_user == "mine"  # host beats every group
    assert inventory.hosts["pi-01"].stable_for == 5.0  # edge listed last wins


def test_service_table_merges_key_by_key(tmp_path):
    text = swap("[hosts.pi-02]\n", '[hosts.pi-02]\nservice = { unit = "other" }\n')
    inventory = load(tmp_path, text)
    assert inventory.hosts["pi-02"].service.kind == "systemd"
    assert inventory.hosts["pi-02"].service.unit == "other"
    assert inventory.hosts["pi-01"].service.unit == "sshreach-client"


def test_pidfile_service_complete_across_layers(tmp_path):
    text = swap('kind = "systemd"', 'kind = "pidfile"\npidfile = "/run/c.pid"')
    text += '\n[hosts.pi-02.service]\nrun = "python3 {{ script_path }}"\n'
    text = swap("[hosts.pi-01]\n", '[hosts.pi-01]\nservice = { run = "python3 x" }\n', text)
    inventory = load(tmp_path, text)
    service = inventory.hosts["pi-02"].service
    assert (service.kind, service.pidfile, service.run) == (
        "pidfile",
        "/run/c.pid",
        "python3 {{ script_path }}",
    )


def test_env_interpolation_everywhere_with_escape(tmp_path):
    text = swap('vars = { location = "Berlin" }', 'vars = { location = "${CITY}-${CITY}" }')
    text = swap('ssh_user = "edge"', 'ssh_user = "$${NOT_A_VAR}"', text)
    text = swap('groups = ["lab"]', 'groups = ["${GROUP}"]', text)
    inventory = load(tmp_path, text, env={**ENV, "CITY": "Bonn", "GROUP": "edge"})
    assert inventory.hosts["pi-01"].vars["location"] == "Bonn-Bonn"
    assert inventory.hosts["pi-01"].groups == ("edge",)
    assert inventory.hosts["pi-01"].ssh_user == "${NOT_A_VAR}"
    assert inventory.hosts["pi-01"].dbid.reveal() == DBID


def test_env_value_is_not_interpolated_again(tmp_path):
    inventory = load(tmp_path, env={**ENV, "PI01_DBID": "${TEST_USER_ID}"})
    assert inventory.hosts["pi-01"].dbid.reveal() == "${TEST_USER_ID}"


def test_env_defaults_to_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_USER_ID", "from-environ-9")
    monkeypatch.setenv("PI01_DBID", DBID)
    inventory = load_inventory(write(tmp_path, BASE))
    assert inventory.provider.user_id.reveal() == "from-environ-9"


def test_relative_key_paths_resolve_beside_the_inventory(tmp_path):
    text = swap('ssh_user = "pi"', 'ssh_user = "pi"\nssh_key = "keys/id"\nknown_hosts = "~/kh"')
    host = load(tmp_path, text).hosts["pi-01"]
    assert host.ssh_key == str((tmp_path / "keys" / "id").resolve())
    assert host.known_hosts == "~/kh"


# --- --var --------------------------------------------------------------------


def test_parse_var_overrides():
    assert parse_var_overrides(["a=1", "b=x=y", "c=", "a=2"]) == {"a": "2", "b": "x=y", "c": ""}


@pytest.mark.parametrize("item", ["novalue", "=v", "1x=2", "bad-name=1"])
def test_parse_var_overrides_rejects_bad_form(item):
    with pytest.raises(UsageError, match="expected NAME=VALUE"):
        parse_var_overrides([item])


def test_documented_example_loads(tmp_path):
    doc = (CLIENT_TEMPLATE.parents[1] / "docs" / "reference" / "inventory.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "templates").mkdir()
    shutil.copy(CLIENT_TEMPLATE, tmp_path / "templates" / "client.py.j2")
    path = tmp_path / "deployer.toml"
    path.write_text(example)
    env = {"SSHREACH_USER_ID": "u-12345", "PI01_DBID": "d-12345", "PI01_HOST_UUID": "h-1"}
    path.chmod(0o644)  # its credentials are all ${ENV}: it may be readable
    host = load_inventory(path, env=env).hosts["pi-01"]
    assert (host.vars, host.ssh_port, host.service.unit) == (
        {"region": "eu", "location": "Berlin"},
        12345,
        "sshreach-client",
    )
    assert host.validate == "python3 -m py_compile {{ path | quote }}"


def test_default_template_must_exist_too(tmp_path):
    text = swap('template = "client.py.j2"\n', "")
    with pytest.raises(InventoryError) as caught:
        load(tmp_path, text)
    assert "[hosts.pi-01]: template 'templates/client.py.j2' not found" in str(caught.value)
    (tmp_path / "templates").mkdir()
    shutil.copy(CLIENT_TEMPLATE, tmp_path / "templates" / "client.py.j2")
    host = load(tmp_path, text).hosts["pi-01"]
    assert host.template == (tmp_path / "templates" / "client.py.j2").resolve()


def test_error_message_stays_one_line_with_a_newline_in_the_value(tmp_path):
    text = swap('host_key_policy = "accept-new"', 'host_key_policy = "a\\nb"')
    with pytest.raises(InventoryError) as caught:
        load(tmp_path, text)
    assert "\n" not in str(caught.value)
    assert "'a\\nb' is not allowed" in str(caught.value)


# --- a file with literal credentials must be private (as ssh wants of a key) -----

ALL_ENV = swap('host_uuid = "UUID-SECRET-3333"', 'host_uuid = "${PI01_UUID}"').replace(
    'dbid = "DBID-SECRET-4444"\nhost_uuid = "UUID-SECRET-5555"',
    'dbid = "${PI02_DBID}"\nhost_uuid = "${PI02_UUID}"',
)
ALL_ENV_VALUES = {**ENV, "PI01_UUID": UUID, "PI02_DBID": "DBID-SECRET-4444"}
ALL_ENV_VALUES["PI02_UUID"] = "UUID-SECRET-5555"


def test_fixture_with_every_credential_from_the_environment():
    assert "SECRET" not in ALL_ENV  # no literal credential left: the tests below rely on it


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        (BASE, "[hosts.pi-01] host_uuid", 30),
        (swap('user_id = "${TEST_USER_ID}"', f'user_id = "{USER_ID}"'), "[provider] user_id", 4),
        (ALL_ENV.replace('"${PI02_DBID}"', '"DBID-SECRET-4444"'), "[hosts.pi-02] dbid", 37),
        (ALL_ENV.replace('"${PI02_DBID}"', '"x-${PI02_DBID}"'), "[hosts.pi-02] dbid", 37),
        (
            ALL_ENV.replace("ssh_host =", 'api_key = "KEY-SECRET-6666"\nssh_host ='),
            "[provider] api_key",
            3,
        ),
    ],
    ids=["host_uuid", "user_id", "dbid", "partly-literal", "api_key"],
)
def test_a_literal_credential_in_a_file_others_can_read_is_refused(tmp_path, text, key, line, mode):
    path = write(tmp_path, text, mode=mode)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path, env=ALL_ENV_VALUES)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: {key}: a literal credential"), message
    assert f"(mode {mode:04o})" in message
    assert f"chmod 600 {path}" in message
    assert "\n" not in message and caught.value.exit_code == 2
    for secret in (*SECRETS, "KEY-SECRET-6666"):
        assert secret not in message and secret[-4:] + "…" not in message
    assert os.stat(path).st_mode & 0o777 == mode  # nothing touched: the fix is the user's


def test_the_refusal_names_who_can_read(tmp_path):
    with pytest.raises(InventoryError, match=r"a file that group can read \(mode 0640\)"):
        load_inventory(write(tmp_path, BASE, mode=0o640), env=ENV)
    with pytest.raises(InventoryError, match=r"that group and others can read \(mode 0644\)"):
        load_inventory(write(tmp_path, BASE, mode=0o644), env=ENV)


def test_a_literal_credential_is_refused_before_a_missing_env_var(tmp_path):
    path = write(tmp_path, BASE, mode=0o644)
    with pytest.raises(InventoryError, match="chmod 600"):
        load_inventory(path, env={})


def test_the_same_file_made_private_loads(tmp_path):
    path = write(tmp_path, BASE, mode=0o644)
    with pytest.raises(InventoryError):
        load_inventory(path, env=ENV)
    path.chmod(0o600)
    assert load_inventory(path, env=ENV).hosts["pi-02"].dbid.reveal() == "DBID-SECRET-4444"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o400], ids=oct)
def test_credentials_from_the_environment_may_sit_in_a_readable_file(tmp_path, mode):
    """Literal non-credential keys (ports, paths, vars) do not make a file private."""
    inventory = load_inventory(write(tmp_path, ALL_ENV, mode=mode), env=ALL_ENV_VALUES)
    assert inventory.hosts["pi-02"].host_uuid.reveal() == "UUID-SECRET-5555"
    assert inventory.hosts["pi-01"].ports_id == 1234


def test_an_escaped_dollar_is_a_literal_credential(tmp_path):
    text = ALL_ENV.replace('"${PI02_DBID}"', '"$${PI02_DBID}"')
    with pytest.raises(InventoryError, match=r"\[hosts.pi-02\] dbid: a literal credential"):
        load_inventory(write(tmp_path, text, mode=0o644), env=ALL_ENV_VALUES)
