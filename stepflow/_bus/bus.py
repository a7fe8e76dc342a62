"""The event bus: non-blocking fan-out of events to handlers, subscribers and sinks."""

from __future__ import annotations

import collections
import contextvars
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import asyncio

from stepflow.events import Event, SinkFailed, SubscriberFailed
from stepflow.interfaces.sink import EventSink

log = logging.getLogger("stepflow.bus")

Overflow = Literal["drop_oldest", "drop_newest"]
EventFilter = type[Event] | tuple[type[Event], ...] | Callable[[Event], bool] | None
HandlerFn = Callable[[Any], Any]  # Any: a handler may take a specific event class
_F = TypeVar("_F", bound=Callable[..., Any])


class Subscription:
    """A bounded stream of events for one subscriber; iterate it with ``async for``.

    Overflow policy: the buffer holds at most ``buffer`` events. When a slow subscriber lets it
    fill up, ``drop_oldest`` (default) discards the oldest buffered event to make room and
    ``drop_newest`` discards the incoming one. Either way the publisher never waits and
    :attr:`dropped` counts what this subscriber lost. Iteration ends once the subscription is
    closed and its buffer drained.

    Error isolation: code in your own ``async for`` loop runs in your task. If it raises, the
    exception goes to your task group, which cancels its other tasks, ``run()`` included when
    it lives there. :meth:`consume` (or an :meth:`EventBus.on` handler) contains the error.
    """

    __slots__ = ("_buf", "_bus", "_closed", "_filter", "_run_id", "_waiter", "buffer", "dropped", "name",
                 "overflow")

    def __init__(self, flt: EventFilter, run_id: str | None, buffer: int, overflow: Overflow,
                 bus: EventBus | None = None) -> None:
        _check_options(buffer, overflow)
        self._filter = _compile_filter(flt)
        self._bus = bus
        #: Used in logs and in :class:`~stepflow.events.SubscriberFailed` reports.
        self.name = f"subscription({_describe(flt)})"
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

    async def consume(self, fn: HandlerFn, *, name: str | None = None) -> Exception | None:
        """Call ``fn`` (sync or async) on each event until the subscription is closed and drained.

        Unlike a bare ``async for`` loop, an exception from ``fn`` never reaches the calling task:
        it is logged and reported as :class:`~stepflow.events.SubscriberFailed`, the subscription
        is closed and the exception is returned (``None`` after a normal end). Cancellation still
        propagates. ``fn`` runs in the calling task, so it should not block the event loop.
        """
        async for event in self:
            try:
                result = fn(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                label = name or _name_of(fn)
                if self._bus is not None:
                    self._bus._subscriber_failed(label, exc, event, self)
                else:
                    log.warning("subscriber %s raised %r; it stops", label, exc, exc_info=exc)
                    self.close()
                return exc
        return None


class EventHandler:
    """A function called on every matching event, in a task the bus owns.

    Created by :meth:`EventBus.on` or :meth:`EventBus.add_handler`. Events wait in the handler's
    own buffer (same overflow policy as :class:`Subscription`, losses counted in :attr:`dropped`)
    and are handled one at a time, in publication order; ``publish`` never waits for it. An
    async handler is awaited on the event loop; a sync one is called there too, so it must be
    quick (hand blocking work to a thread). If the handler raises, it is detached, the error is
    logged and published as :class:`~stepflow.events.SubscriberFailed`, and kept in :attr:`error`.
    The handler runs in a copy of the context it was registered in.
    """

    __slots__ = ("_buf", "_bus", "_closed", "_context", "_drainers", "_filter", "_run_id", "_task", "_waiter",
                 "buffer", "dropped", "error", "fn", "handled", "name", "overflow")

    def __init__(self, bus: EventBus, fn: HandlerFn, flt: EventFilter, run_id: str | None, buffer: int,
                 overflow: Overflow, name: str | None) -> None:
        if not callable(fn):
            raise TypeError(f"an event handler must be callable, got {fn!r}")
        _check_options(buffer, overflow)
        self._bus = bus
        self._filter = _compile_filter(flt)
        self._run_id = run_id
        self._buf: collections.deque[Event] = collections.deque()
        self._closed = False
        self._context = contextvars.copy_context()
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drainers: list[asyncio.Future[None]] = []
        self.fn = fn
        self.name = name or _name_of(fn)
        self.buffer = buffer
        self.overflow: Overflow = overflow
        #: Number of events this handler lost to overflow.
        self.dropped = 0
        #: Number of events it handled without raising.
        self.handled = 0
        #: The exception that detached it, if any.
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<EventHandler {self.name} {state} handled={self.handled} dropped={self.dropped}>"

    @property
    def active(self) -> bool:
        """True until the handler is removed or detached after raising."""
        return not self._closed

    def remove(self) -> None:
        """Stop delivery: buffered events are discarded and the handler is not called again.

        A call already in progress is not interrupted.
        """
        self._bus.remove_handler(self)

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
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self._task is None:
            self._start()

    def _start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        import asyncio

        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # published outside a loop: the events wait for the next start
                return
        # Created on the loop, outside any task group: the caller's cancel scopes never reach it.
        self._task = loop.create_task(self._work(), name=f"stepflow event handler {self.name}",
                                      context=self._context)

    async def _work(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        buf = self._buf
        try:
            while not self._closed:
                if not buf:
                    self._settle()
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                event = buf.popleft()
                try:
                    result = self.fn(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    self._bus._subscriber_failed(self.name, exc, event, self)
                    return
                except asyncio.CancelledError as exc:
                    if me is not None and me.cancelling():
                        raise  # the bus (or loop shutdown) cancelled us
                    self._bus._subscriber_failed(self.name, exc, event, self)  # raised by the handler itself
                    return
                self.handled += 1
        finally:
            if self._task is me:
                self._task = None
            self._waiter = None
            self._settle()

    def _idle(self) -> bool:
        return not self._buf and (self._task is None or self._waiter is not None)

    def _settle(self) -> None:
        """Release every ``flush`` waiting for this handler to go idle."""
        drainers, self._drainers = self._drainers, []
        for fut in drainers:
            if not fut.done():
                fut.set_result(None)

    def _close(self) -> None:
        self._closed = True
        self._buf.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            try:
                waiter.set_result(None)
            except RuntimeError:  # its loop is closed; the task is gone with it
                self._waiter = None
                self._task = None


def _check_options(buffer: int, overflow: Overflow) -> None:
    if buffer < 1:
        raise ValueError(f"subscription buffer must be >= 1, got {buffer}")
    if overflow not in ("drop_oldest", "drop_newest"):
        raise ValueError(f"overflow must be 'drop_oldest' or 'drop_newest', got {overflow!r}")


def _name_of(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else repr(fn)


def _describe(flt: EventFilter) -> str:
    if flt is None:
        return "all"
    if isinstance(flt, type):
        return flt.__name__
    if isinstance(flt, tuple):
        return ", ".join(getattr(t, "__name__", repr(t)) for t in flt)
    return _name_of(flt)


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
    """Publishes events to handlers and subscribers (bounded, may drop) and sinks (lossless).

    ``publish`` is synchronous and never waits: the scheduler calls it inline. Handlers, filters
    and sinks that raise are detached and reported, never propagated to the run.
    ``drain_timeout`` bounds how long :meth:`flush` (awaited at the end of every run) and
    :meth:`aclose` wait for handlers to work through their buffers.
    """

    def __init__(self, sinks: Iterable[EventSink] = (), *, drain_timeout: float = 5.0) -> None:
        # Subscriptions and handlers share one list so that publish stays a single loop.
        self._subs: list[Subscription | EventHandler] = []
        self._sinks: list[EventSink] = list(sinks)
        self._active = bool(self._sinks)
        self.drain_timeout = drain_timeout

    @property
    def active(self) -> bool:
        """True when anyone listens; publishers may skip building events otherwise."""
        return self._active

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        """The sinks currently attached."""
        return tuple(self._sinks)

    @property
    def handlers(self) -> tuple[EventHandler, ...]:
        """The handlers currently attached."""
        return tuple(h for h in self._subs if isinstance(h, EventHandler))

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

    # -- handlers ------------------------------------------------------------------------
    def on(
        self,
        filter: EventFilter = None,
        *,
        run_id: str | None = None,
        buffer: int = 10_000,
        overflow: Overflow = "drop_oldest",
        name: str | None = None,
    ) -> Callable[[_F], _F]:
        """Decorator form of :meth:`add_handler`; returns the function unchanged.

        Always call it: ``@bus.on(StepFailed)``, or ``@bus.on()`` for every event. Remove the
        handler with :meth:`remove_handler`.
        """

        def register(fn: _F) -> _F:
            self.add_handler(fn, filter, run_id=run_id, buffer=buffer, overflow=overflow, name=name)
            return fn

        return register

    def add_handler(
        self,
        fn: HandlerFn,
        filter: EventFilter = None,
        *,
        run_id: str | None = None,
        buffer: int = 10_000,
        overflow: Overflow = "drop_oldest",
        name: str | None = None,
    ) -> EventHandler:
        """Call ``fn(event)`` (sync or async) for every matching event, isolated from the run.

        ``filter`` and ``run_id`` select events as for :meth:`subscribe`. ``fn`` runs in a task
        the bus owns, never in the publisher's or the caller's task group; an exception from it
        detaches the handler and is reported as :class:`~stepflow.events.SubscriberFailed`.
        ``name`` (default: the function's qualified name) labels those reports. See
        :class:`EventHandler` for buffering and ordering.
        """
        handler = EventHandler(self, fn, filter, run_id, buffer, overflow, name)
        self._subs.append(handler)
        self._active = True
        return handler

    def remove_handler(self, handler: EventHandler | HandlerFn) -> None:
        """Remove a handler, given its :class:`EventHandler` or its function (all registrations)."""
        for h in list(self._subs):
            if isinstance(h, EventHandler) and (h is handler or h.fn is handler):
                self._detach_handler(h)

    def _detach_handler(self, handler: EventHandler) -> None:
        handler._close()
        if handler in self._subs:
            self._subs.remove(handler)
        self._refresh()

    # -- subscriptions -------------------------------------------------------------------
    def open_subscription(
        self,
        filter: EventFilter = None,
        *,
        run_id: str | None = None,
        buffer: int = 10_000,
        overflow: Overflow = "drop_oldest",
    ) -> Subscription:
        """Create a subscription without a context manager; call :meth:`close_subscription`."""
        sub = Subscription(filter, run_id, buffer, overflow, self)
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
        one run's events. See :class:`Subscription` for the overflow policy, and for who owns an
        exception raised while iterating it.
        """
        sub = self.open_subscription(filter, run_id=run_id, buffer=buffer, overflow=overflow)
        try:
            yield sub
        finally:
            self.close_subscription(sub)

    # -- publishing ----------------------------------------------------------------------
    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every sink, handler and subscriber without waiting."""
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
            self._subscriber_failed(sub.name, error, event, sub)
        for sink, error in failed_sinks or ():
            self._sink_failed(sink, error, event)

    def _subscriber_failed(self, name: str, exc: BaseException, event: Event,
                           listener: Subscription | EventHandler) -> None:
        """Detach a handler or subscription that raised, log it and publish SubscriberFailed."""
        if isinstance(listener, EventHandler):
            listener.error = exc
            self._detach_handler(listener)
        else:
            self.close_subscription(listener)
        log.warning("subscriber %s raised on %s; detached, the run goes on", name, type(event).__name__,
                    exc_info=exc)
        tb = "".join(traceback.format_exception(exc))
        self.publish(SubscriberFailed(event.run_id, 0, time.time(), subscriber=name, error=repr(exc),
                                      event=type(event).__name__, event_seq=event.seq, traceback=tb))

    def _sink_failed(self, sink: EventSink, exc: BaseException, event: Event) -> None:
        name = sink.name or type(sink).__name__
        log.warning("event sink %s raised %r; detached, the run goes on", name, exc)
        if sink in self._sinks:
            self._sinks.remove(sink)
        self._refresh()
        self.publish(SinkFailed(event.run_id, event.seq, event.ts, sink=name, error=repr(exc)))

    # -- flushing ------------------------------------------------------------------------
    async def _drain(self, timeout: float | None) -> list[EventHandler]:
        """Wait until every handler has handled its buffer; return those still busy at the timeout."""
        import asyncio

        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        waiting: dict[asyncio.Future[None], EventHandler] = {}
        for h in self.handlers:
            task = h._task
            if task is not None and task is me:  # a handler flushing the bus cannot wait for itself
                continue
            if task is not None and task.get_loop() is not loop:  # left behind by an earlier loop
                h._task = h._waiter = None
            if h._idle():
                continue
            if h._task is None:
                h._start(loop)
            fut: asyncio.Future[None] = loop.create_future()
            h._drainers.append(fut)
            waiting[fut] = h
        if not waiting:
            return []
        wait = None if timeout is None or timeout == float("inf") else max(timeout, 0.0)
        _, pending = await asyncio.wait(waiting, timeout=wait)
        late = []
        for fut in pending:
            h = waiting[fut]
            if fut in h._drainers:
                h._drainers.remove(fut)
            late.append(h)
            log.warning("event handler %s still has %d events after %.1f s; they are handled in the background",
                        h.name, len(h._buf), timeout)
        return late

    async def flush(self, *, timeout: float | None = None) -> None:
        """Let handlers work through their buffers, then flush every sink.

        Waits at most ``timeout`` seconds for handlers (default: :attr:`drain_timeout`; ``inf``
        waits for good); what is left is handled in the background. A sink that fails to
        flush is detached.
        """
        await self._drain(self.drain_timeout if timeout is None else timeout)
        for sink in list(self._sinks):
            try:
                await sink.flush()
            except Exception as exc:
                log.warning("event sink %s failed to flush: %r", sink.name or type(sink), exc)
                self._sinks.remove(sink)
        self._refresh()

    async def aclose(self) -> None:
        """Drain and remove every handler, close every subscription and sink.

        Handlers still busy after :attr:`drain_timeout` are cancelled.
        """
        import asyncio

        late = await self._drain(self.drain_timeout)
        tasks = [h._task for h in late if h._task is not None and h._task is not asyncio.current_task()]
        for h in self.handlers:
            self._detach_handler(h)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.drain_timeout)
        for sub in list(self._subs):
            if isinstance(sub, Subscription):
                self.close_subscription(sub)
        for sink in list(self._sinks):
            try:
                await sink.aclose()
            except Exception as exc:
                log.warning("event sink %s failed to close: %r", sink.name or type(sink), exc)
        self._sinks.clear()
        self._refresh()
