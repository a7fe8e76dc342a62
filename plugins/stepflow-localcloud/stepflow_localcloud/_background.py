"""A control plane running on its own event loop in a daemon thread (shared by every cloud's)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Generic, Self, TypeVar

S = TypeVar("S")


class BackgroundServer(Generic[S]):
    """Runs ``server_class(**options)`` (an async context manager) on a loop in a daemon thread.

    For synchronous code and session-scoped pytest fixtures; its methods are thread-safe.
    Subclasses set ``server_class`` and ``label`` and add their own accessors.
    """

    server_class: Any = None
    label = "the local control plane"

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.backend: S | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=self.label, daemon=True)

    def _started(self) -> S:
        assert self.backend is not None, f"{self.label} is not started"
        return self.backend

    def start(self, timeout: float = 30.0) -> Self:
        """Start the thread and wait until the server listens."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.label} did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"{self.label} did not start: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the jobs and the server, and join the thread."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def call(self, fn: Any, timeout: float = 60.0) -> Any:
        """Run ``fn(server)`` on the server's loop (awaiting it when it returns an awaitable)."""
        backend = self._started()
        assert self._loop is not None

        async def run() -> Any:
            result = fn(backend)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stats(self) -> dict[str, Any]:
        """The server's counters (see its ``stats``)."""
        return dict(self.call(lambda b: b.stats()))

    def configure(self, **faults: Any) -> None:
        """Change the server's fault injection (see its ``configure``)."""
        self.call(lambda b: b.configure(**faults))

    def reset(self, *, jobs: bool = False) -> None:
        """Reset counters (and forget jobs) (see its ``reset``)."""
        self.call(lambda b: b.reset(jobs=jobs))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with self.server_class(**self.options) as backend:
                    self.backend = backend
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._ready.set()

        with contextlib.suppress(BaseException):
            asyncio.run(serve())
