"""The inventory keys of ``source = "provider"`` and pinning (SPEC 2): ``source``,
``client_id``, ``[provider] api_key``, ``expect_sha256``; their one-line errors
with line numbers, and the new credentials masked in every form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployer.errors import InventoryError
from deployer.inventory import load_inventory
from deployer.render import host_context, mask_secrets
from deployer.secrets import Secret, scrub, secret_forms

pytestmark = pytest.mark.unit

API_KEY = "APIKEY/SECRET+5555"
CLIENT_ID = "CLIENT-SECRET-4444"
ENV = {"TEST_API_KEY": API_KEY}
SHA = "ab" * 32

BASE = """\
[provider]
api_url = "https://sshreach.example/init/api/{call}"
ssh_host = "fw1.example"
user_id = "USERID-SECRET-1111"
api_key = "${TEST_API_KEY}"

[defaults]
source = "provider"
template = "no-such-template.j2"

[groups.lab]
expect_sha256 = "ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB"

[hosts.pi-01]
dbid = "DBID-SECRET-2222"
host_uuid = "UUID-SECRET-3333"
client_id = "CLIENT-SECRET-4444"
ports_id = 1234
ssh_port = 12345
groups = ["lab"]

[hosts.pi-02]
dbid = "DBID-SECRET-6666"
host_uuid = "UUID-SECRET-7777"
client_id = "CLIENT-SECRET-8888"
ports_id = 1235
ssh_port = 12346
source = "template"
template = "client.py.j2"
"""


def load(tmp_path: Path, text: str = BASE, env=None):
    (tmp_path / "client.py.j2").write_text("# {{ host }}\n")
    path = tmp_path / "deployer.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # literal credentials: a private file
    return load_inventory(path, env=ENV if env is None else env)


def swap(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_provider_source_keys_load(tmp_path):
    inv = load(tmp_path)
    pi01, pi02 = inv.hosts["pi-01"], inv.hosts["pi-02"]
    assert (pi01.source, pi02.source) == ("provider", "template")
    assert pi01.client_id == Secret(CLIENT_ID) and inv.provider.api_key == Secret(API_KEY)
    assert pi01.expect_sha256 == SHA  # from the group, lower-cased
    assert pi02.expect_sha256 == ""
    # a provider host needs no template file: the default one need not exist
    assert not pi01.template.exists()


def test_template_is_the_default_source_and_needs_no_api_key(tmp_path):
    text = swap('api_key = "${TEST_API_KEY}"\n', "", swap('source = "provider"\n', ""))
    text = swap('template = "no-such-template.j2"', 'template = "client.py.j2"', text)
    inv = load(tmp_path, text)
    assert {h.source for h in inv.hosts.values()} == {"template"}
    assert inv.provider.api_key is None


# (id, inventory text, fragment of the one-line message, line it points at)
MALFORMED = [
    (
        "provider-without-client-id",
        swap('client_id = "CLIENT-SECRET-4444"\n', ""),
        '[hosts.pi-01]: source = "provider" needs the host\'s client_id; add client_id = "..."'
        " (its client's id at the provider) to [hosts.pi-01]",
        14,
    ),
    (
        "provider-without-api-key",
        swap('api_key = "${TEST_API_KEY}"\n', ""),
        "[provider]: missing key 'api_key' (host pi-01 has source = \"provider\"); add "
        'api_key = "${SSHREACH_API_KEY}" and export SSHREACH_API_KEY',
        1,
    ),
    (
        "unknown-source",
        swap('source = "provider"', 'source = "git"'),
        "[defaults] source: 'git' is not allowed; use one of 'template', 'provider'",
        8,
    ),
    (
        "source-typo",
        swap('source = "provider"', 'sourse = "provider"'),
        "[defaults] sourse: unknown key; did you mean 'source'?",
        8,
    ),
    (
        "client-id-in-a-group",
        swap("[groups.lab]\n", '[groups.lab]\nclient_id = "CLIENT-SECRET-4444"\n'),
        "[groups.lab] client_id: a host-only key; move it to a [hosts.NAME] table",
        12,
    ),
    (
        "client-id-empty",
        swap('client_id = "CLIENT-SECRET-4444"', 'client_id = " "'),
        "[hosts.pi-01] client_id: must not be empty",
        17,
    ),
    (
        "api-key-empty",
        swap('api_key = "${TEST_API_KEY}"', 'api_key = ""'),
        "[provider] api_key: must not be empty",
        5,
    ),
    (
        "api-key-typo",
        swap("api_key =", "apikey ="),
        "[provider] apikey: unknown key; did you mean 'api_key'?",
        5,
    ),
    (
        "expect-sha256-short",
        swap('expect_sha256 = "ABAB', 'expect_sha256 = "AB'),
        "[groups.lab] expect_sha256: 'ABABAB",
        12,
    ),
    (
        "expect-sha256-not-hex",
        swap('expect_sha256 = "AB', 'expect_sha256 = "ZZ'),
        "is not a sha256 (64 hex digits); write the hex digest of the reviewed script",
        12,
    ),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_provider_source_gives_one_line_error(tmp_path, case):
    _, text, fragment, line = case
    with pytest.raises(InventoryError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert fragment in message, message
    assert f"deployer.toml:{line}:" in message, message
    for secret in (API_KEY, CLIENT_ID, "USERID-SECRET-1111", "DBID-SECRET-2222"):
        assert secret not in message


def test_a_missing_api_key_variable_names_the_variable_not_a_value(tmp_path):
    with pytest.raises(InventoryError) as info:
        load(tmp_path, env={})
    assert "[provider] api_key: environment variable TEST_API_KEY is not set" in str(info.value)


def test_an_inventory_error_masks_a_literal_api_key_and_client_id(tmp_path):
    text = swap('api_key = "${TEST_API_KEY}"', f'api_key = "{API_KEY}"')
    text = swap("ports_id = 1234", "ports_id = 1234\nbogus = 1", text)
    with pytest.raises(InventoryError) as info:
        load(tmp_path, text)
    assert API_KEY not in str(info.value) and CLIENT_ID not in str(info.value)


# --- masking the new credentials -----------------------------------------------------------


def test_secret_values_hold_the_api_key_and_client_ids(tmp_path):
    inv = load(tmp_path)
    values = inv.secret_values()
    for raw in (API_KEY, CLIENT_ID, "CLIENT-SECRET-8888"):
        assert raw in values
    assert "APIKEY%2FSECRET%2B5555" in values  # URL-encoded too


def test_reprs_hold_no_api_key_or_client_id(tmp_path):
    inv = load(tmp_path)
    for text in (repr(inv), repr(inv.provider), repr(inv.hosts["pi-01"]), str(inv.provider)):
        assert API_KEY not in text and CLIENT_ID not in text


@pytest.mark.parametrize(
    "raw",
    ["plain-CLIENT-id-1234", "it's-ID\\9999", 'say "hi"-8888', "ünïcode-id-7777", "tab\there-66"],
)
@pytest.mark.parametrize(
    "quoting",
    [
        lambda v: v,
        repr,
        ascii,
        json.dumps,
        lambda v: json.dumps(v, ensure_ascii=False),
        lambda v: "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'",
        lambda v: '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"',
    ],
    ids=["raw", "repr", "ascii", "json", "json-utf8", "single", "double"],
)
def test_scrub_with_secret_forms_masks_an_id_in_any_python_or_json_quoting(raw, quoting):
    literal = quoting(raw)
    line = f"CLIENT_ID = {literal}\n"
    masked = scrub(line, secret_forms([raw]))
    inner = literal[1:-1] if literal[:1] in "'\"" else literal
    assert inner not in masked and raw[:6] not in masked, masked


def test_render_context_and_mask_know_the_client_id(tmp_path):
    inv = load(tmp_path)
    context = host_context(inv, inv.hosts["pi-01"])
    assert context["client_id"] == CLIENT_ID and context["source"] == "provider"
    assert "api_key" not in context["provider"]  # the account key is not the client's
    text = f"A = '{API_KEY}'\nC = \"{CLIENT_ID}\"\n"
    masked = mask_secrets(text, inv)
    assert API_KEY not in masked and CLIENT_ID not in masked
