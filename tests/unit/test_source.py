"""deployer.source: the provider's script as a source (SPEC 1b), its checks, the
sha256 pin, and the plan phase of a run (``upgrade.run_upgrade`` with a FakeApi
and LocalRemotes: the fetched script goes through the same stages)."""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from pathlib import Path

import pytest

from deployer import workflow
from deployer.errors import (
    ForwardingServerUnreachable,
    InvalidApiKey,
    InvalidRegion,
    InvalidScript,
    PinMismatch,
    UsageError,
)
from deployer.inventory import load_inventory
from deployer.remote import sha256_hex
from deployer.result import Outcome
from deployer.rollout import RolloutPolicy
from deployer.secrets import secret_forms
from deployer.source import (
    PROVIDER_ORIGIN,
    ProviderSource,
    Script,
    TemplateSource,
    check_pin,
    check_template_option,
    fetch_all,
    provider_script,
    settle_scripts,
    source_for,
)
from deployer.upgrade import UpgradeRequest, plan_all, run_upgrade
from deployer.workflow import UpgradeOptions
from tests.doubles import (
    FakeApi,
    ProcessReaper,
    Recorder,
    RemoteFactory,
    client_source,
    pidfile_alive,
    read_pid,
    start_client,
)
from tests.provider_inventory import (
    API_KEY,
    CLIENT_ID,
    DBID,
    ENV,
    HOST_UUID,
    SECRETS,
    USER_ID,
    write_inventory,
)

pytestmark = pytest.mark.unit


def leaks(text: str) -> list[str]:
    """Any form of a credential (raw, quoted, URL-encoded) or a long prefix in ``text``."""
    return [f for s in SECRETS for f in [*secret_forms([s]), s[:8]] if f in text]


def provider_text(release: str = "2") -> str:
    """What a provider generates: a working client with the ids as constants."""
    ids = (
        f"USER_ID = {USER_ID!r}\nDBID = {json.dumps(DBID)}\nHOST_UUID = '{HOST_UUID}'\n"
        f'CLIENT_ID = "{CLIENT_ID}"\n'
    )
    return ids + client_source(release).decode()


def load(root: Path, **kw):
    return load_inventory(write_inventory(root, **kw), env=ENV)


# --- checking a fetched script ------------------------------------------------------


def test_a_valid_script_is_taken_exactly_with_its_sha256():
    text = provider_text()
    script = provider_script("pi-01", text)
    assert script.text == text and script.data == text.encode("utf-8")
    assert script.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert script.origin == PROVIDER_ORIGIN
    assert leaks(repr(script)) == []


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "is empty"),
        ("  \n\t\n", "is empty"),
        (None, "is empty"),
        ("x = '\ud800'\n", "is not valid UTF-8 text"),
        (f"DBID = {json.dumps(DBID)}\nif True print(1)\n", "is not valid Python (invalid syntax"),
        (f"X = '{CLIENT_ID}\n", "is not valid Python (unterminated string literal"),
        ("x = 1\0\n", "is not valid Python"),
        ("<html>502 Bad Gateway</html>\n", "is not valid Python"),
    ],
    ids=["empty", "blank", "none", "surrogate", "syntax", "unterminated", "nul", "html"],
)
def test_a_bad_script_is_refused_with_a_clear_credential_free_message(text, problem):
    with pytest.raises(InvalidScript) as info:
        provider_script("pi-01", text, SECRETS)
    message = str(info.value)
    assert message.startswith(f"host pi-01: the provider's script {problem}")
    assert "nothing was touched" in message and "get_client_script pi-01" in message
    assert info.value.step == "fetch" and info.value.host == "pi-01"
    assert leaks(message) == []


def test_compiling_prints_no_warning_that_would_quote_the_script(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a SyntaxWarning would raise here
        provider_script("pi-01", f"X = '\\d{CLIENT_ID}'\n")
    assert capsys.readouterr() == ("", "")


def test_a_script_is_compiled_not_run(tmp_path):
    marker = tmp_path / "ran"
    provider_script("pi-01", f"open({str(marker)!r}, 'w').write('x')\n")
    assert not marker.exists()


# --- the pin ------------------------------------------------------------------------------


def test_the_pin_passes_on_the_same_hash_in_any_case_and_without_a_pin():
    sha = sha256_hex(b"x")
    check_pin("pi-01", sha, sha)
    check_pin("pi-01", sha, sha.upper())
    check_pin("pi-01", sha, None)
    check_pin("pi-01", sha, "")


def test_a_pin_mismatch_names_both_hashes():
    got, pinned = sha256_hex(b"new"), sha256_hex(b"reviewed")
    with pytest.raises(PinMismatch) as info:
        check_pin("pi-01", got, pinned)
    message = str(info.value)
    assert got in message and pinned in message and "pi-01" in message
    assert "nothing was touched" in message and info.value.step == "pin"


# --- the sources ----------------------------------------------------------------------------


def test_source_for_picks_the_hosts_source(tmp_path):
    inv = load(tmp_path, hosts=1)
    host = inv.hosts["pi-01"]
    api = FakeApi()
    api.scripts["pi-01"] = provider_text()
    source = source_for(inv, host, api)
    assert isinstance(source, ProviderSource)
    assert source.script_for(host).text == provider_text()
    assert api.calls == [("get_client_script", "pi-01", None)]

    template_inv = load(tmp_path / "t", hosts=1, source="template")
    template_host = template_inv.hosts["pi-01"]
    source = source_for(template_inv, template_host, None)
    assert isinstance(source, TemplateSource)
    script = source.script_for(template_host)
    assert script.data == client_source("1") and script.origin.endswith("client.py.j2")


def test_template_option_is_refused_for_a_provider_host(tmp_path):
    inv = load(tmp_path, hosts=1)
    with pytest.raises(UsageError, match='host pi-01 has source = "provider"'):
        check_template_option(list(inv.hosts.values()), tmp_path / "client.py.j2")
    check_template_option(list(inv.hosts.values()), None)  # no --template: fine


def test_fetch_all_stops_at_the_first_invalid_api_key(tmp_path):
    inv = load(tmp_path, hosts=4)
    api = FakeApi()
    api.scripts = {name: provider_text() for name in inv.hosts}
    api.inject("get_client_script", lambda: InvalidApiKey("bad key", call="x", code=32), at=2)
    fetched = fetch_all(api, list(inv.hosts.values()), parallel=1)
    assert fetched.stopped_by == "pi-02"
    assert set(fetched.texts) == {"pi-01"} and set(fetched.errors) == {"pi-02"}
    assert api.count("get_client_script") == 2  # pi-03 and pi-04 were never asked


def test_fetch_all_goes_on_after_a_host_error(tmp_path):
    inv = load(tmp_path, hosts=3)
    api = FakeApi()
    api.scripts = {name: provider_text() for name in inv.hosts}
    api.inject("get_client_script", lambda: InvalidRegion("region", call="x", code=41))
    fetched = fetch_all(api, list(inv.hosts.values()), parallel=2)
    assert fetched.stopped_by is None and len(fetched.errors) == 1
    assert len(fetched.texts) == 2


# --- settle_scripts: the plan phase of a run -----------------------------------------------


def settle(inv, api, **kw):
    request = UpgradeRequest(inventory=inv, hosts=list(inv.hosts.values()), state_dir=Path("."))
    plans = {p.name: p for p in plan_all(request, "run-1")}
    return plans, settle_scripts(plans, api, inv, **kw)


def test_provider_plans_get_the_fetched_script_and_its_hash(tmp_path):
    inv = load(tmp_path, hosts=2)
    api = FakeApi()
    api.scripts = {"pi-01": provider_text("2"), "pi-02": provider_text("3")}
    plans, settled = settle(inv, api)
    assert plans["pi-01"].script is None  # plan_all renders no template for them
    assert settled.refused == {}
    for name, release in (("pi-01", "2"), ("pi-02", "3")):
        plan = settled.plans[name]
        assert plan.script == provider_text(release).encode()
        assert plan.sha256 == sha256_hex(plan.script) and plan.template == PROVIDER_ORIGIN


def test_a_refused_script_fails_only_its_host(tmp_path):
    inv = load(tmp_path, hosts=3)
    api = FakeApi()
    api.scripts = {"pi-01": provider_text(), "pi-02": "def broken(:\n", "pi-03": provider_text()}
    api.inject("get_client_script", lambda: InvalidRegion("region", call="x", code=41), at=3)
    _, settled = settle(inv, api)
    assert set(settled.refused) == {"pi-02", "pi-03"}
    bad = settled.refused["pi-02"]
    assert bad.result is Outcome.FAILED and bad.error.type == "InvalidScript"
    assert bad.error.step == "fetch" and [s.step for s in bad.steps] == ["fetch"]
    assert bad.api_calls == 1
    assert settled.refused["pi-03"].error.api_error_code == 41


def test_an_invalid_api_key_refuses_every_host(tmp_path):
    inv = load(tmp_path, hosts=3)
    api = FakeApi()
    api.scripts = {name: provider_text() for name in inv.hosts}
    api.inject("get_client_script", lambda: InvalidApiKey("bad key", call="x", code=32), at=2)
    _, settled = settle(inv, api)
    results = {name: r.result.value for name, r in settled.refused.items()}
    assert results == {"pi-01": "skipped", "pi-02": "failed", "pi-03": "skipped"}
    assert "API code 32 on pi-02" in settled.refused["pi-01"].error.message


def test_pins_hold_for_both_sources_and_the_option_beats_the_inventory(tmp_path):
    reviewed = sha256_hex(client_source("1"))
    wrong = "ab" * 32
    inv = load(tmp_path, hosts=2, source="template", extra=f'expect_sha256 = "{wrong}"')
    _, settled = settle(inv, FakeApi())
    assert set(settled.refused) == {"pi-01", "pi-02"}
    error = settled.refused["pi-01"].error
    assert (error.type, error.step) == ("PinMismatch", "pin")
    assert wrong in error.message and reviewed in error.message
    assert settled.refused["pi-01"].new_sha256 == reviewed

    inv = load(tmp_path / "p", hosts=1)
    api = FakeApi()
    api.scripts["pi-01"] = provider_text()
    _, settled = settle(inv, api, expect_sha256=sha256_hex(provider_text().encode()))
    assert settled.refused == {}
    _, settled = settle(inv, api, expect_sha256=wrong)
    assert settled.refused["pi-01"].error.type == "PinMismatch"


# --- run_upgrade with a provider source (LocalRemote, the real guard) ----------------------


class Fleet:
    """One local provider-source host, its old client running, and the run's doubles."""

    def __init__(self, root: Path, hosts: int = 1):
        self.root = root
        self.inv = load(root, hosts=hosts)
        self.script = Path(self.inv.hosts["pi-01"].script_path)
        self.pidfile = self.script.parent / "client.pid"
        self.old = client_source("0")
        self.script.write_bytes(self.old)
        start_client(self.script, self.pidfile, root / "old.log")
        self.api = FakeApi(online=lambda: pidfile_alive(self.pidfile))
        self.factory = RemoteFactory()
        self.events = Recorder()

    def run(self, options: UpgradeOptions | None = None, **kw):
        request = UpgradeRequest(
            inventory=self.inv,
            hosts=list(self.inv.hosts.values()),
            state_dir=self.root / "state",
            options=options or UpgradeOptions(),
            policy=RolloutPolicy(),
            **kw,
        )
        return run_upgrade(request, self.events, remote_factory=self.factory, api=self.api)

    def calls(self) -> list[str]:
        return [call for call, _, _ in self.api.calls]


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    real = workflow.guard_config
    # the guard's own provider calls are off in unit tests (as in test_workflow)
    monkeypatch.setattr(workflow, "guard_config", lambda *a, **k: {**real(*a, **k), "api": None})
    reaper = ProcessReaper(tmp_path)
    yield Fleet(tmp_path)
    reaper.kill_all()


def test_a_provider_host_is_upgraded_through_every_stage(fleet):
    fleet.api.scripts["pi-01"] = provider_text("2")
    old_pid = read_pid(fleet.pidfile)
    run = fleet.run()
    host = run.hosts[0]
    assert host.result is Outcome.UPGRADED, host.error
    assert fleet.script.read_text() == provider_text("2")
    assert host.new_sha256 == sha256_hex(provider_text("2").encode())
    assert fleet.calls()[0] == "get_client_script"  # fetched before the host started
    assert host.api_calls == len(fleet.api.calls)
    assert read_pid(fleet.pidfile) != old_pid and pidfile_alive(fleet.pidfile)
    assert not fleet.api.window_open and run.exit_code() == 0


def test_the_same_script_as_installed_is_unchanged(fleet):
    fleet.script.write_text(provider_text("2"))
    fleet.api.scripts["pi-01"] = provider_text("2")
    host = fleet.run().hosts[0]
    assert host.result is Outcome.UNCHANGED
    assert "set_allow_clientless" not in fleet.calls()


def test_an_invalid_fetched_script_fails_the_host_with_nothing_touched(fleet):
    fleet.api.scripts["pi-01"] = f"DBID = {json.dumps(DBID)}\nwhile True print('x')\n"
    run = fleet.run()
    host = run.hosts[0]
    assert host.result is Outcome.FAILED and run.exit_code() == 1
    assert host.error.type == "InvalidScript" and host.error.step == "fetch"
    assert "not valid Python" in host.error.message and leaks(host.error.message) == []
    # nothing touched: no other API call, no SSH session, the old script still runs
    assert fleet.calls() == ["get_client_script"]
    assert fleet.factory.made == []
    assert fleet.script.read_bytes() == fleet.old and pidfile_alive(fleet.pidfile)
    # the progress sinks and the journal heard of it
    assert fleet.events.started == ["fetch"] and fleet.events.finished == [("fetch", "failed")]


def test_a_pin_mismatch_fails_the_host_with_nothing_touched(fleet):
    fleet.api.scripts["pi-01"] = provider_text("2")
    run = fleet.run(expect_sha256="0" * 64)
    host = run.hosts[0]
    assert host.result is Outcome.FAILED and host.error.type == "PinMismatch"
    assert sha256_hex(provider_text("2").encode()) in host.error.message
    assert fleet.calls() == ["get_client_script"] and fleet.factory.made == []


def test_dry_run_diffs_the_fetched_script_with_every_credential_masked(fleet):
    fleet.api.scripts["pi-01"] = provider_text("2")
    host = fleet.run(UpgradeOptions(dry_run=True)).hosts[0]
    assert host.result is Outcome.PLANNED
    assert "+# test client, release 2" in host.diff and "-# test client, release 0" in host.diff
    assert "+DBID = " in host.diff and "+CLIENT_ID = " in host.diff
    assert leaks(host.diff) == [], host.diff
    assert fleet.script.read_bytes() == fleet.old
    assert "set_allow_clientless" not in fleet.calls()


def test_an_invalid_api_key_stops_the_run_before_any_host_is_touched(tmp_path):
    fleet = Fleet(tmp_path, hosts=3)
    try:
        fleet.api.scripts = {name: provider_text() for name in fleet.inv.hosts}
        fleet.api.inject(
            "get_client_script", lambda: InvalidApiKey("invalid api key", call="x", code=32)
        )
        run = fleet.run()
    finally:
        ProcessReaper(tmp_path).kill_all()
    assert [h.result.value for h in run.hosts] == ["failed", "skipped", "skipped"]
    assert run.hosts[0].error.api_error_code == 32
    assert fleet.calls() == ["get_client_script"] and fleet.factory.made == []
    assert run.exit_code() == 1


def test_a_transient_fetch_failure_fails_that_host_only(tmp_path, monkeypatch):
    real = workflow.guard_config
    monkeypatch.setattr(workflow, "guard_config", lambda *a, **k: {**real(*a, **k), "api": None})
    fleet = Fleet(tmp_path, hosts=2)
    try:
        fleet.api.scripts = {"pi-01": provider_text("2"), "pi-02": provider_text("2")}
        fleet.api.inject(
            "get_client_script",
            lambda: ForwardingServerUnreachable("gave up", call="x", code=40),
            at=2,
        )
        # pi-02 shares nothing on disk with pi-01 in this test: it never starts
        run = fleet.run(UpgradeOptions(dry_run=True))
    finally:
        ProcessReaper(tmp_path).kill_all()
    assert [h.result.value for h in run.hosts] == ["planned", "failed"]
    assert run.hosts[1].error.api_error_code == 40


def test_fetches_run_before_any_host_starts(tmp_path):
    fleet = Fleet(tmp_path, hosts=2)
    seen: list[str] = []
    lock = threading.Lock()

    def on_call(call, allow):
        with lock:
            seen.append(call)

    try:
        fleet.api.scripts = {"pi-01": provider_text("0"), "pi-02": provider_text("0")}
        fleet.api.on_call = on_call
        fleet.run(UpgradeOptions(dry_run=True))
    finally:
        ProcessReaper(tmp_path).kill_all()
    assert seen[:2] == ["get_client_script", "get_client_script"]
    assert "get_client_script" not in seen[2:]


def test_script_dataclass_repr_hides_the_text():
    script = Script(text=f"DBID = '{DBID}'", sha256="0" * 64, origin=PROVIDER_ORIGIN)
    assert leaks(repr(script)) == []


def test_a_fetch_error_that_quotes_the_ids_is_masked_in_result_and_journal(tmp_path):
    fleet = Fleet(tmp_path, hosts=1)
    try:
        fleet.api.inject(
            "get_client_script",
            lambda: InvalidRegion(f"no region for {CLIENT_ID} with {API_KEY}", call="x", code=41),
        )
        run = fleet.run()
    finally:
        ProcessReaper(tmp_path).kill_all()
    (host,) = run.hosts
    assert host.result is Outcome.FAILED and host.error.api_error_code == 41
    assert leaks(host.error.message) == [] and "…4444" in host.error.message
    journal = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir() if p.is_file())
    assert b"InvalidRegion" in journal
    assert [f for f in (CLIENT_ID, API_KEY) if f.encode() in journal] == []
