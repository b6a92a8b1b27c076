"""`deployer init`: the starter files, their contents, and the refusal to overwrite."""

from __future__ import annotations

import dataclasses
import stat
import sys
from importlib.resources import files

import pytest

from deployer.cli.init import STARTER_ENV
from deployer.inventory import PROVIDER_DEFAULTS, SETTING_TYPES, load_inventory
from deployer.model import HostConfig, ServiceConfig
from tests.cli import run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.cli

ENV = {
    "SSHREACH_USER_ID": "user-7f3a9c2e",
    "PI01_DBID": "dbid-5b81d0aa",
    "PI01_HOST_UUID": "20sldd20-20sz-aa20-aa02-aa0salskd82a",
    "SSHREACH_POLL_URL": "https://poll.example/cgi",
    "SSHREACH_FORWARDING_USER": "acct-7f3a",
}
# starter keys that deliberately differ from the built-in default (a recommendation)
RECOMMENDED = {"validate", "vars", "service.ready"}


def run_init(cwd, *global_options: str) -> tuple[int, str, str]:
    res = run(*global_options, "init", cwd=cwd)
    return res.code, res.stdout, res.stderr


def test_init_writes_inventory_and_template(tmp_path):
    code, out, _ = run_init(tmp_path)

    assert code == 0
    assert "wrote deployer.toml" in out and "wrote templates/client.py.j2" in out
    shipped = files("deployer.templates").joinpath("client.py.j2").read_text(encoding="utf-8")
    assert (tmp_path / "templates" / "client.py.j2").read_text(encoding="utf-8") == shipped
    assert set(STARTER_ENV) == set(ENV)


def test_starter_inventory_loads_once_env_is_set(tmp_path):
    run_init(tmp_path)

    inventory = load_inventory(tmp_path / "deployer.toml", env=ENV)

    host = inventory.hosts["pi-01"]
    assert host.dbid.reveal() == ENV["PI01_DBID"]
    assert inventory.provider.user_id.reveal() == ENV["SSHREACH_USER_ID"]
    assert host.template == (tmp_path / "templates" / "client.py.j2").resolve()
    assert inventory.groups == {"lab": ("pi-01",)}


def test_starter_inventory_names_the_missing_env_var(tmp_path):
    from deployer.errors import InventoryError

    run_init(tmp_path)
    env = {k: v for k, v in ENV.items() if k != "PI01_DBID"}

    with pytest.raises(InventoryError, match="PI01_DBID is not set"):
        load_inventory(tmp_path / "deployer.toml", env=env)


def test_starter_inventory_holds_no_literal_credentials(tmp_path):
    run_init(tmp_path)
    doc = tomllib.loads((tmp_path / "deployer.toml").read_text(encoding="utf-8"))

    assert doc["provider"]["user_id"].startswith("${")
    for host in doc["hosts"].values():
        assert host["dbid"].startswith("${") and host["host_uuid"].startswith("${")


def test_starter_values_are_the_builtin_defaults(tmp_path):
    """The starter shows the defaults; it must not drift from the model."""
    run_init(tmp_path)
    doc = tomllib.loads((tmp_path / "deployer.toml").read_text(encoding="utf-8"))
    defaults = {f.name: f.default for f in dataclasses.fields(HostConfig)}
    service_defaults = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}

    drift = {
        key: (value, defaults[key])
        for key, value in doc["defaults"].items()
        if key in SETTING_TYPES
        and key not in ("service", "vars", *RECOMMENDED)
        and value != (str(defaults[key]) if key == "template" else defaults[key])
    }
    drift.update(
        {
            f"service.{key}": (value, service_defaults[key])
            for key, value in doc["defaults"]["service"].items()
            if value != service_defaults[key] and f"service.{key}" not in RECOMMENDED
        }
    )
    drift.update(
        {
            f"provider.{key}": (doc["provider"][key], value)
            for key, value in PROVIDER_DEFAULTS.items()
            if doc["provider"][key] != value
        }
    )
    assert drift == {}


def test_init_writes_owner_only_files_and_dirs(tmp_path, open_umask):
    """The inventory may come to hold literal credentials: it starts private."""
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    assert run_init(project, "-i", "fleet/prod.toml")[0] == 0

    def mode(path):
        return stat.S_IMODE((project / path).stat().st_mode)

    assert mode("fleet/prod.toml") == 0o600
    assert mode("fleet/templates/client.py.j2") == 0o600
    assert (mode("fleet"), mode("fleet/templates")) == (0o700, 0o700)
    assert mode(".") == 0o755  # a directory that was there is left as it is


def test_the_starter_inventory_loads_after_the_user_writes_a_literal_credential(tmp_path):
    """init's 0600 is what lets an edited starter with literal ids load at all."""
    run_init(tmp_path)
    path = tmp_path / "deployer.toml"
    path.write_text(path.read_text().replace('"${PI01_DBID}"', '"dbid-5b81d0aa"'))
    assert load_inventory(path, env=ENV).hosts["pi-01"].dbid.reveal() == "dbid-5b81d0aa"


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "client.py.j2").write_text("mine\n", encoding="utf-8")

    code, out, err = run_init(tmp_path)

    assert code == 2
    assert "templates/client.py.j2 already exists" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "deployer.toml").exists()
    assert (tmp_path / "templates" / "client.py.j2").read_text(encoding="utf-8") == "mine\n"


def test_init_twice_refuses_the_second_time(tmp_path):
    assert run_init(tmp_path)[0] == 0
    before = (tmp_path / "deployer.toml").read_bytes()

    code, _, err = run_init(tmp_path)

    assert code == 2 and "deployer.toml already exists" in err
    assert (tmp_path / "deployer.toml").read_bytes() == before


def test_init_with_inventory_option_writes_there_and_templates_beside_it(tmp_path):
    code, out, _ = run_init(tmp_path, "-i", "fleet/prod.toml")

    assert code == 0
    assert "deployer -i fleet/prod.toml hosts" in out
    assert not (tmp_path / "deployer.toml").exists()
    inventory = load_inventory(tmp_path / "fleet" / "prod.toml", env=ENV)
    assert inventory.hosts["pi-01"].template == (tmp_path / "fleet/templates/client.py.j2")


def test_the_starter_renders_the_shipped_client_once_env_is_set(tmp_path, monkeypatch):
    """init then render: the starter gives the shipped client every var it needs."""
    run_init(tmp_path)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    res = run("-i", str(tmp_path / "deployer.toml"), "render", "pi-01", cwd=tmp_path)
    assert res.code == 0, res.stderr
    assert 'POLL_URL = "https://poll.example/cgi"' in res.stdout
    assert 'FORWARDING_USER = "acct-7f3a"' in res.stdout
