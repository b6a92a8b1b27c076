"""The sandbox's client schedule (``deployer.sandbox.clients``) without a sandbox:
the flap rhythm, the ``/sandbox/clients`` route's checks, and events applied
in time order by the runner's thread (the process work itself is faked)."""

from __future__ import annotations

import time

import pytest

from deployer.sandbox import clients
from deployer.sandbox.clients import ClientChange, Schedule, flap_events

pytestmark = pytest.mark.unit


def test_flap_stops_and_starts_on_a_rhythm_and_leaves_the_client_running():
    events = flap_events("sbx-02", down=3, up=0.5, cycles=2, after=1)
    assert [(e["after"], e["action"]) for e in events] == [
        (1, "stop"),
        (4, "start"),
        (4.5, "stop"),
        (7.5, "start"),
    ]
    assert all(e["host"] == "sbx-02" for e in events)


@pytest.mark.parametrize(
    "kw", [{"down": 0, "up": 1}, {"down": 1, "up": 0}, {"down": 1, "up": 1, "cycles": 0}]
)
def test_flap_refuses_a_rhythm_that_is_not_one(kw):
    with pytest.raises(ValueError):
        flap_events("sbx-02", **{"cycles": 1, **kw})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "body must be a JSON object"),
        ({}, "'events'"),
        ({"events": [{"host": "sbx-09", "action": "stop"}]}, "unknown host"),
        ({"events": [{"host": "sbx-01", "action": "reboot"}]}, "action must be"),
        ({"events": [{"host": "sbx-01", "action": "stop", "after": -1}]}, "after must be"),
        ({"events": [{"host": "sbx-01", "action": "stop", "when": 1}]}, "unknown event key"),
        ({"events": [{"host": "sbx-01", "action": "stop", "with_tunnel": 1}]}, "with_tunnel"),
    ],
)
def test_the_route_refuses_bad_requests_with_400(tmp_path, body, fragment):
    schedule = Schedule(tmp_path, ["sbx-01"])
    status, reply = schedule.handle("POST", body)
    assert status == 400 and fragment in reply["error"]
    assert schedule.to_json()["pending"] == []


def test_events_are_applied_in_time_order_and_recorded(tmp_path, monkeypatch):
    applied = []

    def fake_apply(root, name, action, with_tunnel=False):
        applied.append((name, action, with_tunnel, time.monotonic()))
        return ClientChange(name, action, 4242, True)

    monkeypatch.setattr(clients, "apply", fake_apply)
    schedule = Schedule(tmp_path, ["sbx-01", "sbx-02"])
    schedule.start()
    try:
        t0 = time.monotonic()
        status, reply = schedule.handle(
            "POST",
            {
                "events": [
                    {"after": 0.2, "host": "sbx-01", "action": "start"},
                    {"after": 0.0, "host": "sbx-01", "action": "stop", "with_tunnel": True},
                    {"after": 0.1, "host": "sbx-02", "action": "stop"},
                ]
            },
        )
        assert (status, reply) == (200, {"ok": True, "added": 3})
        deadline = time.monotonic() + 5
        while len(applied) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        schedule.stop()
    assert [(n, a, w) for n, a, w, _ in applied] == [
        ("sbx-01", "stop", True),
        ("sbx-02", "stop", False),
        ("sbx-01", "start", False),
    ]
    assert applied[2][3] - t0 >= 0.2
    done = schedule.to_json()["done"]
    assert [d["pid"] for d in done] == [4242] * 3 and all(d["changed"] for d in done)


def test_clear_drops_pending_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(clients, "apply", lambda *a, **k: pytest.fail("applied"))
    schedule = Schedule(tmp_path, ["sbx-01"])
    schedule.start()
    try:
        schedule.handle("POST", {"events": [{"after": 30, "host": "sbx-01", "action": "stop"}]})
        assert len(schedule.to_json()["pending"]) == 1
        assert schedule.handle("POST", {"clear": True}) == (200, {"ok": True, "cleared": 1})
        assert schedule.to_json()["pending"] == []
    finally:
        schedule.stop()
