"""The template renderer (SPEC 3): context, StrictUndefined, hostile values, masking."""

from __future__ import annotations

import hashlib
import shlex

import pytest

from deployer.errors import InventoryError, TemplateError
from deployer.render import host_context, mask_secrets, render_command, render_script
from tests.inventories import DBID, ENV, SECRETS, USER_ID, UUID, swap
from tests.inventories import load as load_inventory_text

pytestmark = pytest.mark.unit

HOSTILE = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "; rm -rf x",
    'it\'s "quoted" \'\'\'triple\'\'\' """triple"""',
    "line one\nline two\r\n\ttab",
    "back\\slash \\n \\u0041 \\x00",
    "Grüße ✓ 🚀 \u2028 \u00a0 𝔘",
    "{{ 7 * 7 }} {% if true %}x{% endif %} ${HOME}",
    "</script><!-- & -->",
    "",
]


# the two vars the shipped client needs (SPEC 1b: the account's poll URL and user)
CLIENT_VARS = {"poll_url": "https://poll.example/cgi", "forwarding_user": "acct"}


def load(tmp_path, text=None, overrides=None, env=None):
    """The test inventory, with the shipped client's required vars given as --var."""
    args = {} if text is None else {"text": text}
    return load_inventory_text(
        tmp_path, overrides={**CLIENT_VARS, **(overrides or {})}, env=env, **args
    )


def run_client(text: str) -> dict:
    """Execute the rendered client module body (not its main) and return its globals."""
    code = compile(text, "client.py", "exec")
    namespace: dict = {"__name__": "rendered_client"}
    exec(code, namespace)
    return namespace


@pytest.fixture
def inventory(tmp_path):
    return load(tmp_path)


def test_context_has_settings_provider_and_vars(inventory):
    context = host_context(inventory, inventory.hosts["pi-01"])
    assert context["host"] == "pi-01"
    assert (context["dbid"], context["host_uuid"]) == (DBID, UUID)
    assert (context["ports_id"], context["ssh_port"]) == (1234, 12345)
    assert context["script_path"] == "/opt/sshreach/client.py"
    assert context["groups"] == ["lab"]
    assert context["service"]["unit"] == "sshreach-client"
    assert context["provider"]["user_id"] == USER_ID
    assert context["provider"]["ssh_host"] == "fw1.example"
    assert context["provider"]["api_url"].endswith("/{call}")
    assert (context["region"], context["location"], context["release"]) == ("eu", "Berlin", "1")
    assert context["vars"]["location"] == "Berlin"


def test_var_may_not_shadow_a_builtin_name(tmp_path):
    inventory = load(tmp_path, overrides={"dbid": "x"})
    with pytest.raises(InventoryError, match="var 'dbid' shadows the built-in template name"):
        host_context(inventory, inventory.hosts["pi-01"])


def test_shipped_client_renders_compiles_and_carries_the_ids(inventory):
    rendered = render_script(inventory, inventory.hosts["pi-01"])
    module = run_client(rendered.text)
    assert (module["DBID"], module["HOST_UUID"], module["USER_ID"]) == (DBID, UUID, USER_ID)
    assert module["PORTS_ID"] == 1234
    assert (module["POLL_URL"], module["FORWARDING_USER"]) == ("https://poll.example/cgi", "acct")
    assert module["RELEASE"] == "1"
    assert rendered.sha256 == hashlib.sha256(rendered.text.encode("utf-8")).hexdigest()
    assert rendered.template == inventory.hosts["pi-01"].template
    assert rendered.text.endswith("\n")


def test_rendered_repr_hides_the_credentials(inventory):
    rendered = render_script(inventory, inventory.hosts["pi-01"])
    assert DBID in rendered.text
    for secret in (DBID, UUID, USER_ID):
        assert secret not in repr(rendered)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_var_values_stay_literal(tmp_path, value):
    value = value.replace("PWNED", str(tmp_path / "pwned"))
    inventory = load(tmp_path, overrides={"release": value, "client_version": value})
    rendered = render_script(inventory, inventory.hosts["pi-02"])
    module = run_client(rendered.text)
    assert module["RELEASE"] == value
    assert module["CLIENT_VERSION"] == value
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("value", HOSTILE[:-1], ids=range(len(HOSTILE) - 1))
def test_hostile_credentials_stay_literal(tmp_path, value):
    value = value.replace("PWNED", str(tmp_path / "pwned"))
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    escaped = escaped.replace("\r", "\\r").replace("\t", "\\t").replace("${", "$${")
    text = swap('host_uuid = "UUID-SECRET-5555"', f'host_uuid = "{escaped}"')
    inventory = load(tmp_path, text, env={**ENV, "PI01_DBID": value})
    assert inventory.hosts["pi-02"].host_uuid.reveal() == value
    module = run_client(render_script(inventory, inventory.hosts["pi-02"]).text)
    assert module["HOST_UUID"] == value
    assert run_client(render_script(inventory, inventory.hosts["pi-01"]).text)["DBID"] == value


def test_var_changes_the_version(tmp_path):
    one = load(tmp_path)
    two = load(tmp_path, overrides={"release": "2"})
    first = render_script(one, one.hosts["pi-01"])
    second = render_script(two, two.hosts["pi-01"])
    assert first.sha256 != second.sha256
    assert render_script(one, one.hosts["pi-01"]).sha256 == first.sha256  # deterministic


def test_undefined_name_names_file_line_and_fix(tmp_path, inventory):
    template = tmp_path / "bad.j2"
    template.write_text("one = 1\ntwo = {{ host }}\nthree = {{ missing_thing }}\n")
    with pytest.raises(TemplateError) as caught:
        render_script(inventory, inventory.hosts["pi-01"], template)
    message = str(caught.value)
    assert message.startswith(f"{template}:3: undefined name 'missing_thing'")
    assert "pass --var missing_thing=VALUE or set vars.missing_thing" in message
    assert caught.value.exit_code == 2


def test_undefined_inside_an_included_template_points_at_it(tmp_path, inventory):
    (tmp_path / "part.j2").write_text("\n\n{{ nope }}\n")
    template = tmp_path / "main.j2"
    template.write_text("x\n{% include 'part.j2' %}\n")
    with pytest.raises(TemplateError, match=r"part\.j2:3: undefined name 'nope'"):
        render_script(inventory, inventory.hosts["pi-01"], template)


def test_syntax_error_names_file_and_line(tmp_path, inventory):
    template = tmp_path / "bad.j2"
    template.write_text("ok\n{% if %}\n")
    with pytest.raises(TemplateError, match=r"bad\.j2:2: syntax error"):
        render_script(inventory, inventory.hosts["pi-01"], template)


def test_missing_template_is_a_template_error(tmp_path, inventory):
    with pytest.raises(TemplateError, match="template not found"):
        render_script(inventory, inventory.hosts["pi-01"], tmp_path / "nope.j2")


def test_template_error_message_never_shows_a_credential(tmp_path, inventory):
    template = tmp_path / "bad.j2"
    template.write_text("{{ dbid.nope() }}\n")
    with pytest.raises(TemplateError) as caught:
        render_script(inventory, inventory.hosts["pi-01"], template)
    for secret in SECRETS:
        assert secret not in str(caught.value)


def test_default_filter_and_trailing_newline(tmp_path, inventory):
    template = tmp_path / "t.j2"
    template.write_text('{{ optional | default("d") }} {{ host | quote }}\n\n')
    text = render_script(inventory, inventory.hosts["pi-01"], template).text
    assert text == "d pi-01\n\n"


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_quote_filter_makes_one_shell_word(value):
    command = render_command(
        "python3 -m py_compile {{ path | quote }}", {"path": value}, "validate"
    )
    assert shlex.split(command) == ["python3", "-m", "py_compile", value]


def test_render_command_undefined_names_what(inventory):
    with pytest.raises(TemplateError, match=r"service\.start: undefined name 'nope'"):
        render_command("run {{ nope }}", {"host": "x"}, "service.start")
    with pytest.raises(TemplateError, match=r"health: syntax error"):
        render_command("run {{ ", {}, "health")


def test_render_command_with_host_context(inventory):
    host = inventory.hosts["pi-01"]
    context = host_context(inventory, host)
    command = render_command(
        "python3 {{ script_path | quote }} --at {{ location }}", context, "run"
    )
    assert command == "python3 /opt/sshreach/client.py --at Berlin"


def test_mask_secrets_replaces_every_credential(inventory):
    text = render_script(inventory, inventory.hosts["pi-01"]).text + DBID + " " + USER_ID
    masked = mask_secrets(text, inventory)
    for secret in SECRETS:
        assert secret not in masked
    assert "…2222" in masked and "…1111" in masked and "…3333" in masked
