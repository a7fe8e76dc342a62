"""Running a prepared runner with the live display (or line output), signals and a summary."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio

from stepflow._cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, fail
from stepflow.errors import StepflowError


async def execute_with_display(prepare: Any, events_file: str | None, progress: bool | None,
                               log_format: str, verb: str) -> int:
    """Prepare a runner on a fresh bus, run it with the live display or line output, summarize."""
    from rich.live import Live

    from stepflow._bus.bus import EventBus
    from stepflow._bus.sinks import ConsoleSink, JsonlSink
    from stepflow._cli.progress import LinePrinter, RunView, make_console, print_summary

    console = make_console()
    interactive = console.is_terminal if progress is None else progress
    bus = EventBus()
    if events_file:
        bus.add_sink(JsonlSink(events_file))
    if not interactive and log_format == "structlog":
        bus.add_sink(ConsoleSink())
    try:
        runner = prepare(bus)
    except StepflowError as exc:
        fail(str(exc))
    pipeline = runner.pipeline
    console.print(f"{verb} [bold]{pipeline.name}[/] ({len(pipeline.nodes)} steps) as run "
                  f"[bold]{runner.run_id}[/] on stack [bold]{runner.stack}[/]")
    view = RunView(pipeline.name, runner.run_id, len(pipeline.nodes), runner.stack)
    printer = LinePrinter(console) if not interactive and log_format == "lines" else None
    interrupted = 0

    async def consume(sub: Any) -> None:
        async for ev in sub:
            view.handle(ev)
            if printer is not None:
                printer.handle(ev)

    signal_scope = anyio.CancelScope()

    async def watch_signals() -> None:
        nonlocal interrupted
        with signal_scope, anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                interrupted += 1
                if interrupted == 1:
                    console.print("[magenta]interrupted: cancelling running steps "
                                  "(press Ctrl-C again to exit at once)[/]")
                    runner.cancel()
                else:
                    os._exit(EXIT_INTERRUPTED)

    async with bus.subscribe(overflow="drop_oldest", buffer=100_000) as sub, \
            anyio.create_task_group() as tg:
        tg.start_soon(consume, sub)
        tg.start_soon(watch_signals)
        try:
            if interactive:
                with Live(get_renderable=view.render, console=console, refresh_per_second=8,
                          transient=True):
                    result = await runner.execute()
            else:
                result = await runner.execute()
        except StepflowError as exc:
            sub.close()
            signal_scope.cancel()
            fail(str(exc))
        sub.close()  # the consumer drains what is buffered, then ends
        signal_scope.cancel()
    await bus.aclose()
    print_summary(console, result)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.status == "succeeded" else EXIT_FAILED
