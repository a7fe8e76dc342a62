"""The ``stepflow`` command line."""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import click

from stepflow._cli.common import fail
from stepflow._cli.components import register_commands
from stepflow._cli.image import register_image_commands
from stepflow._cli.runs import register_run_commands
from stepflow._version import __version__
from stepflow.errors import StepflowError


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
@click.option("--debug", is_flag=True, help="Show failures with every traceback frame (stepflow's included).")
def run_cmd(target: str, params: tuple[str, ...], events_file: str | None,
            max_concurrency: int | None, fail_fast: bool, run_id: str | None, stack: str | None,
            progress: bool | None, log_format: str, debug: bool) -> None:
    """Run the pipeline MODULE:PIPELINE, e.g. `stepflow run examples.quickstart.pipeline:training`.

    MODULE is a dotted module importable from the current directory, or a path to a .py
    file. PIPELINE is a @pipeline function (called with the --param values) or a Pipeline
    object. Exit status: 0 when every step succeeded, 1 when the run failed, 2 on bad
    input, 130 when interrupted with Ctrl-C (running steps are cancelled first).
    """
    from stepflow._dsl.pipeline import PipelineDef
    from stepflow._engine.loader import load_target, parse_params

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
                     fail_fast, run_id, stack, progress, log_format, debug)
    sys.exit(code)


async def _run_pipeline(pipeline: Any, target: str | None, events_file: str | None, max_concurrency: int | None,
                        fail_fast: bool, run_id: str | None, stack: str | None,
                        progress: bool | None, log_format: str, debug: bool) -> int:
    from stepflow._engine.run import prepare_runner

    def prepare(bus: Any) -> Any:
        return prepare_runner(pipeline, event_bus=bus, run_id=run_id, stack=stack, persist=True,
                              target=target, max_concurrency=max_concurrency, fail_fast=fail_fast)

    from stepflow._cli.execute import execute_with_display

    return await execute_with_display(prepare, events_file, progress, log_format, "running", debug)


register_commands(cli)
register_run_commands(cli)
register_image_commands(cli)


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
