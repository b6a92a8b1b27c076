"""Progress sinks: plain lines for CI, the live display's state, thread safety."""

from __future__ import annotations

import io
import re
import sys
import threading

import pytest

from deployer.clock import FakeClock
from deployer.events import EventSink
from deployer.progress import (
    LiveProgress,
    PlainProgress,
    ProgressState,
    format_seconds,
    host_line,
    make_progress,
)
from deployer.result import ErrorInfo, HostResult, Outcome

pytestmark = pytest.mark.unit

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def plain(total: int = 3, **kw) -> tuple[PlainProgress, io.StringIO, FakeClock]:
    stream, clock = io.StringIO(), FakeClock()
    return PlainProgress(stream, total, clock=clock, **kw), stream, clock


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- choosing the sink ------------------------------------------------------------------


def test_make_progress_picks_plain_off_a_tty_and_live_on_one():
    assert isinstance(make_progress(io.StringIO(), 3), PlainProgress)
    live = make_progress(TtyStream(), 3)
    assert isinstance(live, LiveProgress)
    live.close()
    assert isinstance(make_progress(TtyStream(), 3, tty=False), PlainProgress)
    quiet = make_progress(io.StringIO(), 3, quiet=True)
    assert type(quiet) is EventSink


def test_importing_progress_does_not_import_rich():
    import subprocess

    code = "import deployer.progress, sys; print('rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- plain lines -----------------------------------------------------------------------------


def test_plain_progress_writes_one_stamped_line_per_host_event():
    sink, stream, clock = plain(total=2)
    sink.run_started("run-1", ["sbx-03", "sbx-04"])
    sink.host_started("sbx-03")
    sink.step_started("sbx-03", "stage")  # no line: the finish says it all
    clock.advance(0.41)
    sink.step_finished("sbx-03", "stage", "ok", 0.41)
    sink.message("sbx-03", "API 22 too many calls: retry in 0.8s")
    sink.host_finished(
        HostResult("sbx-03", Outcome.UPGRADED, exposure_seconds=0.31, duration_seconds=4.2)
    )
    sink.message(None, "rollout stopped")
    out = lines(stream)
    assert all(LINE.match(line) for line in out)
    texts = [line[11:] for line in out]
    assert texts == [
        "run run-1: 2 hosts",
        "sbx-03 started",
        "sbx-03 stage ok 0.41s",
        "sbx-03 API 22 too many calls: retry in 0.8s",
        "sbx-03 upgraded in 4.2s (exposure 0.31s) [1/2]",
        "rollout stopped",
    ]


def test_plain_time_stamps_are_utc_from_the_clock():
    sink, stream, clock = plain()
    sink.message(None, "x")  # FakeClock.wall() = 1_700_001_000 = 22:30:00 UTC
    assert lines(stream) == ["[22:30:00] x"]


def test_plain_lines_for_failed_and_skipped_hosts():
    sink, stream, _ = plain(total=2)
    error = ErrorInfo("verify", "ClientOffline", "not online after 10s\ntraceback...", 24)
    sink.host_finished(HostResult("sbx-01", Outcome.ROLLED_BACK, duration_seconds=12, error=error))
    skipped = ErrorInfo(None, "RolloutStopped", "failure budget exceeded (3 > 2)")
    sink.host_finished(HostResult("sbx-02", Outcome.SKIPPED, error=skipped))
    texts = [line[11:] for line in lines(stream)]
    assert texts == [
        "sbx-01 rolled_back in 12.0s: ClientOffline at verify: not online after 10s [1/2]",
        "sbx-02 skipped: failure budget exceeded (3 > 2) [2/2]",
    ]


def test_duplicate_host_events_are_shown_once():
    sink, stream, _ = plain(total=1)
    sink.host_started("h")
    sink.host_started("h")
    sink.host_finished(HostResult("h", Outcome.UNCHANGED))
    sink.host_finished(HostResult("h", Outcome.UNCHANGED))
    assert [line[11:] for line in lines(stream)] == ["h started", "h unchanged in 0.0s [1/1]"]


def test_plain_progress_scrubs_raw_credentials():
    sink, stream, _ = plain(secrets=["SECRET-DBID-1234"])
    sink.message("h", "GET ?dbid=SECRET-DBID-1234 failed")
    assert "SECRET-DBID-1234" not in stream.getvalue()
    assert "…1234" in stream.getvalue()


def test_plain_progress_survives_a_closed_stream():
    sink, stream, _ = plain()
    stream.close()
    sink.message(None, "still fine")  # must not raise into the workflow


def test_plain_progress_is_thread_safe_whole_lines_only():
    sink, stream, _ = plain(total=400)
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(50):
            name = f"w{n}-{i}"
            sink.host_started(name)
            sink.step_finished(name, "swap", "ok", 0.1)
            sink.host_finished(HostResult(name, Outcome.UPGRADED, duration_seconds=1))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = lines(stream)
    assert len(out) == 8 * 50 * 3
    assert all(LINE.match(line) for line in out)
    assert sink.state.done == 400
    assert out[-1].endswith("[400/400]")


# --- state: stages, failures, ETA ----------------------------------------------------------------


def test_state_counts_hosts_per_stage_failures_and_eta():
    clock = FakeClock()
    state = ProgressState(4, clock)
    for name in ("a", "b", "c"):
        state.host_started(name)
    state.stage("a", "soak")
    state.stage("b", "soak")
    assert state.per_stage() == [("soak", 2), ("starting", 1)]
    assert state.eta() is None  # nothing finished yet
    clock.advance(10)
    state.host_finished(HostResult("a", Outcome.ROLLED_BACK))
    assert state.failures == 1
    assert state.eta() == pytest.approx(30.0)  # 10 s per host, 3 to go
    assert state.status_line() == "1/4 done · 1 failed · ETA 30s"
    assert state.stages_line() == "in flight: soak 1, starting 1"


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.4, "59s"), (185, "3m05s"), (3720, "1h02m")]
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_host_line_shows_exposure_only_when_the_window_opened():
    assert (
        host_line(HostResult("h", Outcome.UNCHANGED, duration_seconds=1.0)) == "h unchanged in 1.0s"
    )


# --- live display ------------------------------------------------------------------------------


def test_live_progress_renders_done_failures_stages_and_prints_finished_hosts():
    stream = TtyStream()
    clock = FakeClock()
    sink = make_progress(stream, 3, clock=clock)
    assert isinstance(sink, LiveProgress)
    try:
        sink.run_started("r", ["a", "b", "c"])
        sink.host_started("a")
        sink.host_started("b")
        sink.step_started("b", "swap")
        clock.advance(5)
        sink.host_finished(
            HostResult("a", Outcome.FAILED, error=ErrorInfo("ssh", "SshConnectError", "lost"))
        )
        from rich.console import Console

        probe = Console(file=io.StringIO(), width=100, color_system=None)
        probe.print(sink.render())
        shown = probe.file.getvalue()
        assert "1/3 done · 1 failed · ETA 10s" in shown
        assert "in flight: swap 1" in shown
    finally:
        sink.close()
        sink.close()  # idempotent
    assert "a failed in 0.0s: SshConnectError at ssh: lost" in stream.getvalue()


def test_live_progress_takes_events_from_many_threads_without_deadlock():
    sink = LiveProgress(TtyStream(), 200, clock=FakeClock())
    barrier = threading.Barrier(4)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(50):
            name = f"w{n}-{i}"
            sink.host_started(name)
            sink.step_started(name, "soak")
            sink.render()  # what the refresh thread does concurrently
            sink.host_finished(HostResult(name, Outcome.UPGRADED))

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sink.close()
    assert not any(t.is_alive() for t in threads)
    assert sink.state.done == 200
