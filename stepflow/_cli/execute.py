"""Running a prepared runner with the live display (or line output), signals and a summary."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import anyio

from stepflow._cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, fail
from stepflow.errors import StepflowError


async def execute_with_display(prepare: Any, events_file: str | None, progress: bool | None,
                               log_format: str, verb: str, debug: bool = False) -> int:
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
    # The display is an isolated handler: a bug in it is reported, it never cancels the run.
    bus.add_handler(view.handle, name="progress display", buffer=100_000)
    if printer is not None:
        bus.add_handler(printer.handle, name="line printer", buffer=100_000)
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
                    _leave_at_once(runner, console)

    error: StepflowError | None = None
    result: Any = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals)
        try:
            if interactive:
                with Live(get_renderable=view.render, console=console, refresh_per_second=8,
                          transient=True):
                    result = await runner.execute()
            else:
                result = await runner.execute()
        except StepflowError as exc:
            error = exc
        signal_scope.cancel()
    await bus.aclose()
    if error is not None:  # bad input found as the run started (e.g. an unreachable registry)
        fail(str(error))
    print_summary(console, result, debug=debug)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.status == "succeeded" else EXIT_FAILED


def _leave_at_once(runner: Any, console: Any) -> None:
    """The second Ctrl-C: mark the run interrupted (its jobs may still run) and exit now."""
    store = getattr(runner, "run_store", None)
    if store is not None:
        with contextlib.suppress(Exception):  # exiting matters more than the record
            store.finish_run(runner.run_id, "interrupted")
        console.print(f"[magenta]left at once: jobs of run {runner.run_id} may still be running; "
                      f"`stepflow runs show {runner.run_id}` lists them, `stepflow runs stop {runner.run_id}` "
                      f"stops them, `stepflow resume {runner.run_id}` finishes the run[/]")
    os._exit(EXIT_INTERRUPTED)
