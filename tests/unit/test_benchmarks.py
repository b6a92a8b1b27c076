"""The arithmetic of the benchmarks' figures (benchmarks/), apart from any run."""

from __future__ import annotations

import os

import pytest

from benchmarks import fleet

pytestmark = pytest.mark.unit


def test_the_cpu_floor_spreads_the_added_work_over_the_cores_the_idle_fleet_leaves(
    monkeypatch,
):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    floor = fleet.cpu_floor(busy=160.0, idle_share=0.25, wall=80.0, hosts=200)
    # the idle fleet keeps 0.5 cores busy: 40 CPU-s of the 160 over 80 s; the
    # other 120 CPU-s are the upgrade's, on the 1.5 cores left: 80 s at best
    assert floor == {
        "idle_cores": 0.5,
        "work_cpu_seconds": 120.0,
        "work_cpu_seconds_per_host": 0.6,
        "seconds": 80.0,
    }


def test_no_cpu_floor_when_the_idle_fleet_fills_the_machine(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert fleet.cpu_floor(busy=100.0, idle_share=1.0, wall=50.0, hosts=10)["seconds"] is None
