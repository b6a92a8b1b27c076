"""A fleet inventory on this machine whose script may come from the provider
(``source = "provider"``, SPEC 1b): literal ids with a quote and a backslash in
one, the api_key from the environment, the pidfile kind. Shared by the source
tests and the wait-offline tests of a whole run."""

from __future__ import annotations

from pathlib import Path

from tests.doubles import CLIENT_TEMPLATE, PYTHON
from tests.inventories import toml_str

USER_ID = "USERID-SECRET-1111"
DBID = 'DB"ID\\SECRET-2222'  # a quote and a backslash: the provider's quoting escapes them
HOST_UUID = "UUID-SECRET-3333"
CLIENT_ID = "CLIENT-SECRET-4444"
API_KEY = "APIKEY-SECRET-5555"
SECRETS = (USER_ID, DBID, HOST_UUID, CLIENT_ID, API_KEY)
ENV = {"TEST_API_KEY": API_KEY}


HOST_TABLE = """
[hosts.{name}]
dbid = {dbid}
host_uuid = "{uuid}"
client_id = "{client}"
ports_id = {n}
ssh_port = {port}
"""


def write_inventory(
    root: Path, *, hosts: int = 1, source: str = "provider", extra: str = ""
) -> Path:
    script = root / "opt" / "client.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    (root / "client.py.j2").write_text(CLIENT_TEMPLATE)
    text = f"""\
[provider]
api_url = "http://127.0.0.1:9/api/{{call}}"
ssh_host = "127.0.0.1"
user_id = "{USER_ID}"
api_key = "${{TEST_API_KEY}}"
offline_detection = 0.2

[defaults]
source = "{source}"
template = "client.py.j2"
script_path = {toml_str(script)}
python = {toml_str(PYTHON)}
online_timeout = 3
stable_for = 0.5
validate = "{{{{ python }}}} -m py_compile {{{{ path | quote }}}}"
vars = {{ release = "1", fail = "", die_after = "1" }}
{extra}
[defaults.service]
kind = "pidfile"
pidfile = {toml_str(script.parent / "client.pid")}
run = {toml_str(PYTHON + " {{ script_path | quote }}")}
"""
    for i in range(1, hosts + 1):
        text += HOST_TABLE.format(
            name=f"pi-{i:02d}",
            dbid=toml_str(DBID if i == 1 else f"DBID-{i}"),
            uuid=HOST_UUID if i == 1 else f"UUID-{i}",
            client=CLIENT_ID if i == 1 else f"CLIENT-{i}",
            n=1233 + i,
            port=12344 + i,
        )
    path = root / "deployer.toml"
    path.write_text(text)
    path.chmod(0o600)  # literal credentials: a private file
    return path
