"""An inventory whose credentials hold ``& ' < > " \\`` (issue 11, item 5), a
template that gives them in every form, and the fragments that judge a leak:
shared by the unit and CLI tests of their masking."""

from __future__ import annotations

from pathlib import Path

from tests.doubles import PYTHON
from tests.inventories import toml_str

# each carries two fragments (A1b2/C3d4, E5f6/G7h8) that any form of it shows verbatim
DBID = "dbid-A1b2'&\"<>\\C3d4-2222"
USER_ID = "uid-E5f6&<'>\"\\G7h8 1111"
FRAGMENTS = ("A1b2", "C3d4", "E5f6", "G7h8")

# every form a template or a command template can give a credential
FORMS_TEMPLATE = """\
# client for {{ host }}
DBID = {{ dbid | tojson }}
USER_ID = {{ provider.user_id | tojson }}
PLAIN = "{{ dbid }} {{ provider.user_id }}"
SHELL = {{ dbid | quote }} {{ provider.user_id | quote }}
URL = "{{ provider.api_url }}?uid={{ provider.user_id | urlencode }}&dbid={{ dbid | urlencode }}"
HTML = "{{ dbid | e }} {{ provider.user_id | e }}"
ASCII = {{ {"d": dbid, "u": provider.user_id} | tojson }}
"""

# a validate command that fails and prints the credentials in several quotings
VALIDATE = (
    "printf '%s\\n' {{ dbid | quote }} {{ dbid | tojson | quote }} "
    "{{ provider.user_id | urlencode | quote }} {{ provider.user_id | tojson | quote }}; "
    "{{ python | quote }} -c 'import json, sys; print(repr(sys.argv[1:]), "
    "json.dumps(sys.argv[1:]))' {{ dbid | quote }} {{ provider.user_id | quote }}; exit 1"
)

INVENTORY = """\
[provider]
api_url = "http://127.0.0.1:9/api/{{call}}"
ssh_host = "127.0.0.1"
user_id = {user_id}
offline_detection = 0.3

[defaults]
template = "forms.py.j2"
python = {python}
online_timeout = 3
stable_for = 0.5
validate = {validate}

[defaults.service]
kind = "pidfile"
pidfile = {pidfile}
run = "true"

[hosts.pi-01]
dbid = {dbid}
host_uuid = "UUID-SECRET-3333"
ports_id = 1234
ssh_port = 12345
script_path = {script}
"""


def write_inventory(root: Path) -> Path:
    script = root / "opt" / "client.py"
    script.parent.mkdir(parents=True)
    script.write_text("# the old client\n")
    (root / "forms.py.j2").write_text(FORMS_TEMPLATE)
    path = root / "deployer.toml"
    path.write_text(
        INVENTORY.format(
            user_id=toml_str(USER_ID),
            dbid=toml_str(DBID),
            python=toml_str(PYTHON),
            validate=toml_str(VALIDATE),
            pidfile=toml_str(root / "client.pid"),
            script=toml_str(script),
        )
    )
    path.chmod(0o600)
    return path


def leaked(text: str) -> list[str]:
    return [f for f in FRAGMENTS if f in text]
