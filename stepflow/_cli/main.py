"""The ``stepflow`` command line."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import anyio
import click

from stepflow._version import __version__
from stepflow.errors import StepflowError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print an error for the user (no traceback) and exit."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="stepflow")
def cli() -> None:
    """stepflow: run ML pipelines as async DAGs, any step on any compute backend.

    Run a pipeline with `stepflow run MODULE:PIPELINE`. Every command has --help.
    """


@cli.command("run")
@click.argument("target", metavar="MODULE:PIPELINE")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Pipeline parameter, converted with the parameter's type hint "
                   "(JSON for lists and dicts). Repeat for several.")
@click.option("--events", "events_file", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE.jsonl", help="Append every event of the run to FILE as JSON Lines.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help="Most steps running at once (default: no limit).")
@click.option("--fail-fast", is_flag=True,
              help="On the first failed step, cancel running steps and skip the rest "
                   "(default: skip only its descendants and let other branches finish).")
@click.option("--run-id", default=None, help="Use this run id instead of a generated one.")
@click.option("--stack", "stack", default=None, metavar="NAME",
              help="Run on this stack instead of the active one (see `stepflow stack list`).")
@click.option("--progress/--no-progress", default=None,
              help="Live progress display (default: on when the output is a terminal; "
                   "otherwise one line per step event).")
@click.option("--log-format", type=click.Choice(["lines", "structlog"]), default="lines",
              show_default=True, help="Format of the non-interactive output.")
def run_cmd(target: str, params: tuple[str, ...], events_file: str | None,
            max_concurrency: int | None, fail_fast: bool, run_id: str | None, stack: str | None,
            progress: bool | None, log_format: str) -> None:
    """Run the pipeline MODULE:PIPELINE, e.g. `stepflow run examples.quickstart.pipeline:training`.

    MODULE is a dotted module importable from the current directory, or a path to a .py
    file. PIPELINE is a @pipeline function (called with the --param values) or a Pipeline
    object. Exit status: 0 when every step succeeded, 1 when the run failed, 2 on bad
    input, 130 when interrupted with Ctrl-C (running steps are cancelled first).
    """
    from stepflow._cli.loader import load_target, parse_params
    from stepflow._dsl.pipeline import PipelineDef

    try:
        loaded = load_target(target)
        if isinstance(loaded, PipelineDef):
            pipeline = loaded(**parse_params(loaded, params))
        else:
            if params:
                fail(f"'{target}' is an already-built pipeline; it takes no --param")
            pipeline = loaded
    except StepflowError as exc:
        fail(str(exc))
    code = anyio.run(_run_pipeline, pipeline, _stable_target(target), events_file, max_concurrency,
                     fail_fast, run_id, stack, progress, log_format)
    sys.exit(code)


async def _run_pipeline(pipeline: Any, target: str | None, events_file: str | None, max_concurrency: int | None,
                        fail_fast: bool, run_id: str | None, stack: str | None,
                        progress: bool | None, log_format: str) -> int:
    from stepflow._engine.run import prepare_runner

    def prepare(bus: Any) -> Any:
        return prepare_runner(pipeline, event_bus=bus, run_id=run_id, stack=stack, persist=True,
                              target=target, max_concurrency=max_concurrency, fail_fast=fail_fast)

    return await execute_with_display(prepare, events_file, progress, log_format, "running")


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


from stepflow._cli.components import register_commands  # noqa: E402  (needs `cli` and `fail` above)
from stepflow._cli.runs import register_run_commands  # noqa: E402

register_commands(cli)
register_run_commands(cli)


def _stable_target(ref: str) -> str:
    """The reference as `stepflow resume` will need it (file paths made absolute)."""
    module, _, attr = ref.rpartition(":")
    if module.endswith(".py") or "/" in module:
        return f"{os.path.abspath(module)}:{attr}"
    return ref


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="stepflow")


if __name__ == "__main__":
    main()
