"""The event sink interface: a persistent consumer that must see every event."""

from __future__ import annotations

import abc

from stepflow.events import Event


class EventSink(abc.ABC):
    """Receives every event published on a bus, in order, with no drops.

    ``emit`` is called on the event loop for each event and must not block: buffer and write
    later (``flush`` is awaited at the end of every run and when the bus closes). A sink that
    raises is detached and reported with a :class:`~stepflow.events.SinkFailed` event; the run
    goes on.
    """

    #: Name used in error reports; defaults to the class name.
    name: str = ""

    @abc.abstractmethod
    def emit(self, event: Event) -> None:
        """Accept one event. Must be fast and must not block the loop."""

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Persist whatever is buffered."""

    async def aclose(self) -> None:
        """Flush and release resources."""
        await self.flush()
