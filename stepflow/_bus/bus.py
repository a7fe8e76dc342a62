"""The event bus: non-blocking fan-out of events to subscribers and sinks."""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import asyncio

from stepflow.events import Event, SinkFailed
from stepflow.interfaces.sink import EventSink

log = logging.getLogger("stepflow.bus")

Overflow = Literal["drop_oldest", "drop_newest"]
EventFilter = type[Event] | tuple[type[Event], ...] | Callable[[Event], bool] | None


class Subscription:
    """A bounded stream of events for one subscriber; iterate it with ``async for``.

    Overflow policy: the buffer holds at most ``buffer`` events. When a slow subscriber lets it
    fill up, ``drop_oldest`` (default) discards the oldest buffered event to make room and
    ``drop_newest`` discards the incoming one. Either way the publisher never waits and
    :attr:`dropped` counts what this subscriber lost. Iteration ends once the subscription is
    closed and its buffer drained.
    """

    __slots__ = ("_buf", "_closed", "_filter", "_run_id", "_waiter", "buffer", "dropped", "overflow")

    def __init__(self, flt: EventFilter, run_id: str | None, buffer: int, overflow: Overflow) -> None:
        if buffer < 1:
            raise ValueError(f"subscription buffer must be >= 1, got {buffer}")
        if overflow not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"overflow must be 'drop_oldest' or 'drop_newest', got {overflow!r}")
        self._filter = _compile_filter(flt)
        self._run_id = run_id
        self._buf: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.buffer = buffer
        self.overflow: Overflow = overflow
        #: Number of events this subscriber lost to overflow.
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        if self._run_id is not None and event.run_id != self._run_id:
            return
        if self._filter is not None and not self._filter(event):
            return
        buf = self._buf
        if len(buf) >= self.buffer:
            self.dropped += 1
            if self.overflow == "drop_newest":
                return
            buf.popleft()
        buf.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Stop receiving; iteration ends after the buffered events."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._buf:
            if self._closed:
                raise StopAsyncIteration
            import asyncio  # deferred: keeps `import stepflow` light

            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buf.popleft()

    async def receive(self) -> Event:
        """Return the next event; raise ``EOFError`` once closed and drained."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise EOFError("subscription closed") from None

    def pending(self) -> list[Event]:
        """Take every buffered event without waiting."""
        items = list(self._buf)
        self._buf.clear()
        return items


def _compile_filter(flt: EventFilter) -> Callable[[Event], bool] | None:
    if flt is None:
        return None
    if isinstance(flt, type) or (isinstance(flt, tuple) and all(isinstance(t, type) for t in flt)):
        types = flt
        return lambda ev: isinstance(ev, types)
    if callable(flt):
        return flt
    raise TypeError(f"event filter must be an Event class, a tuple of them or a predicate, got {flt!r}")


class EventBus:
    """Publishes events to subscribers (bounded, may drop) and sinks (lossless).

    ``publish`` is synchronous and never waits: the scheduler calls it inline. Subscriber
    filters and sinks that raise are detached and reported, never propagated to the run.
    """

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self._subs: list[Subscription] = []
        self._sinks: list[EventSink] = list(sinks)
        self._active = bool(self._sinks)

    @property
    def active(self) -> bool:
        """True when anyone listens; publishers may skip building events otherwise."""
        return self._active

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        """The sinks currently attached."""
        return tuple(self._sinks)

    def add_sink(self, sink: EventSink) -> None:
        """Attach a sink; it sees every event published from now on."""
        self._sinks.append(sink)
        self._active = True

    def remove_sink(self, sink: EventSink) -> None:
        """Detach a sink (it is not flushed)."""
        self._sinks.remove(sink)
        self._refresh()

    def _refresh(self) -> None:
        self._active = bool(self._subs or self._sinks)

    def open_subscription(
        self,
        filter: EventFilter = None,
        *,
        run_id: str | None = None,
        buffer: int = 10_000,
        overflow: Overflow = "drop_oldest",
    ) -> Subscription:
        """Create a subscription without a context manager; call :meth:`close_subscription`."""
        sub = Subscription(filter, run_id, buffer, overflow)
        self._subs.append(sub)
        self._active = True
        return sub

    def close_subscription(self, sub: Subscription) -> None:
        """Close ``sub`` and stop delivering to it."""
        sub.close()
        if sub in self._subs:
            self._subs.remove(sub)
        self._refresh()

    @asynccontextmanager
    async def subscribe(
        self,
        filter: EventFilter = None,
        *,
        run_id: str | None = None,
        buffer: int = 10_000,
        overflow: Overflow = "drop_oldest",
    ) -> AsyncIterator[Subscription]:
        """Subscribe for the duration of the ``async with`` block.

        ``filter`` is an event class, a tuple of classes, or a predicate; ``run_id`` keeps only
        one run's events. See :class:`Subscription` for the overflow policy.
        """
        sub = self.open_subscription(filter, run_id=run_id, buffer=buffer, overflow=overflow)
        try:
            yield sub
        finally:
            self.close_subscription(sub)

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every sink and subscriber without waiting."""
        failed_sinks = None
        for sink in self._sinks:
            try:
                sink.emit(event)
            except Exception as exc:
                failed_sinks = [*(failed_sinks or ()), (sink, exc)]
        failed_subs = None
        for sub in self._subs:
            try:
                sub._offer(event)
            except Exception as exc:
                failed_subs = [*(failed_subs or ()), (sub, exc)]
        for sub, error in failed_subs or ():
            log.warning("detaching subscriber whose filter raised: %r", error)
            self.close_subscription(sub)
        for sink, error in failed_sinks or ():
            self._sink_failed(sink, error, event)

    def _sink_failed(self, sink: EventSink, exc: BaseException, event: Event) -> None:
        name = sink.name or type(sink).__name__
        log.warning("event sink %s raised %r; detached, the run goes on", name, exc)
        if sink in self._sinks:
            self._sinks.remove(sink)
        self._refresh()
        self.publish(SinkFailed(event.run_id, event.seq, event.ts, sink=name, error=repr(exc)))

    async def flush(self) -> None:
        """Flush every sink (a sink that fails here is detached and reported)."""
        for sink in list(self._sinks):
            try:
                await sink.flush()
            except Exception as exc:
                log.warning("event sink %s failed to flush: %r", sink.name or type(sink), exc)
                self._sinks.remove(sink)
        self._refresh()

    async def aclose(self) -> None:
        """Close every subscription and sink."""
        for sub in list(self._subs):
            self.close_subscription(sub)
        for sink in list(self._sinks):
            try:
                await sink.aclose()
            except Exception as exc:
                log.warning("event sink %s failed to close: %r", sink.name or type(sink), exc)
        self._sinks.clear()
        self._refresh()
