"""An asyncio event loop in a background thread, for the sandbox's embedded
servers (asyncssh) that the runner's other threads (the HTTP simulator) must
be able to call into: :meth:`LoopThread.call` runs a coroutine on the loop
and waits for its result."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
START_TIMEOUT = 10.0


class LoopThread:
    """One daemon thread running one event loop until :meth:`stop`."""

    def __init__(self, name: str):
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(
        self, setup: Callable[[], Coroutine[Any, Any, T]], timeout: float = START_TIMEOUT
    ) -> T:
        """Start the thread, run ``setup()`` on its loop and return its result
        (or raise its error, and leave no thread behind)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name}: event loop did not start")
        try:
            return self.call(setup(), timeout)
        except BaseException:
            self.stop()
            raise

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop from another thread; wait up to ``timeout``."""
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def running(self) -> bool:
        return self.loop is not None and self.loop.is_running()

    def stop(
        self, shutdown: Callable[[], Coroutine[Any, Any, Any]] | None = None, timeout=5.0
    ) -> None:
        """Run ``shutdown()`` (best effort), then stop the loop and join the thread."""
        loop = self.loop
        if loop is None or not loop.is_running():
            return
        if shutdown is not None:
            try:
                self.call(shutdown(), timeout)
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("%s: shutdown", self.name)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
