"""``stepflow image context``: what a step image would ship from the project, and why the rest does not."""
# ruff: noqa: D301  (click's "\\b" paragraph marker keeps the example lines of --help unwrapped)

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from stepflow._cli.common import fail
from stepflow.errors import StepflowError


def register_image_commands(cli: click.Group) -> None:
    """Attach the ``image`` group to the ``stepflow`` group."""

    @cli.group("image")
    def image_group() -> None:
        """Step images: `stepflow image context` lists what an image would ship."""

    @image_group.command("context")
    @click.argument("target", required=False, metavar="[MODULE:PIPELINE]")
    @click.option("--step", "step", default=None, metavar="NAME",
                  help="The step whose operator decides the project folder (needs MODULE:PIPELINE).")
    @click.option("--path", "path", default=None, type=click.Path(file_okay=False),
                  help="List this folder instead of the operator's project folder.")
    @click.option("--excluded/--no-excluded", default=True, show_default=True,
                  help="Also list what is left out, with the reason.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON (files, excluded, warnings).")
    def context_cmd(target: str | None, step: str | None, path: str | None, excluded: bool, as_json: bool) -> None:
        """List the project files a step image would ship, and what is left out and why.

        The project folder is the step operator's --project_root (default: the current
        directory). Always left out: the stepflow home, .env files, .git, virtualenvs, caches
        and key files; .gitignore and .stepflowignore rules apply. Files that look like secrets
        are flagged: add them to .stepflowignore.

        \b
        Examples:
          stepflow image context
          stepflow image context train.pipeline:training --step train
          stepflow image context --path ./src --json
        """
        from stepflow._store.sqlite import stepflow_home
        from stepflow.remote._context import format_listing, list_context

        try:
            root = Path(path).resolve() if path else _project_root(target, step)
            listing = list_context(root, home=stepflow_home())
        except StepflowError as exc:
            fail(str(exc))
        if as_json:
            click.echo(json.dumps({
                "root": str(listing.root), "total_bytes": listing.total_size,
                "files": [{"path": f.rel, "bytes": f.size, "executable": f.executable} for f in listing.files],
                "excluded": [{"path": e.rel, "reason": e.reason} for e in listing.excluded] if excluded else [],
                "warnings": [{"path": w.rel, "reason": w.reason, "fix": w.message} for w in listing.warnings],
            }, indent=2))
            return
        click.echo(format_listing(listing, show_excluded=excluded))


def _project_root(target: str | None, step: str | None) -> Path:
    """The project folder of ``step``'s operator (or of the active stack's first remote operator)."""
    from stepflow._stack.client import Client
    from stepflow.remote._operator import project_root

    client = Client()
    stack = client.get_stack(client.active_stack_name())
    operator: str | None = None
    if step is not None:
        if target is None:
            fail("--step needs the pipeline: stepflow image context MODULE:PIPELINE --step NAME")
        operator = _operator_of(target, step)
        if operator is None:
            fail(f"step '{step}' runs in-process: it ships in no image")
    else:
        remote = [name for name in stack.step_operators
                  if getattr(client.flavor("step_operator", client.get_component("step_operator", name).flavor),
                             "requires_container_registry", False)]
        operator = remote[0] if remote else None
    if operator is None:
        return _cwd_root()
    comp = client.get_component("step_operator", operator)
    root = project_root(_Opts(comp.config.get("project_root")))
    return root or _cwd_root()


def _operator_of(target: str, step: str) -> str | None:
    from stepflow._dsl.pipeline import PipelineDef
    from stepflow._engine.loader import load_target

    loaded = load_target(target)
    pipeline = loaded() if isinstance(loaded, PipelineDef) else loaded
    if step not in pipeline.by_name:
        fail(f"pipeline '{pipeline.name}' has no step '{step}'; its steps: {', '.join(pipeline.by_name)}")
    op: Any = pipeline.nodes[pipeline.by_name[step]].step.step_operator
    return str(op) if op else None


def _cwd_root() -> Path:
    return Path.cwd().resolve()


class _Opts:
    def __init__(self, project_root: Any) -> None:
        self.project_root = project_root
