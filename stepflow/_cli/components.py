"""``stepflow <kind> ...``, ``stepflow stack ...`` and ``stepflow flavor list``.

A thin layer over :class:`stepflow._stack.client.Client`: parse what the user typed, call the
client, print the result. Validation and messages live in the client; every StepflowError is
shown as ``error: <message>`` with exit status 2. Heavy modules (rich, the client) are imported
inside the commands so that ``stepflow --help`` and ``stepflow run`` stay fast.
"""

# ruff: noqa: D301  (click's "\b" paragraph marker keeps the example lines of --help unwrapped)
from __future__ import annotations

import functools
import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click

from stepflow.errors import StepflowError
from stepflow.interfaces.flavor import ENTRY_POINT_GROUPS

if TYPE_CHECKING:
    from rich.console import Console

    from stepflow._stack.client import Client, StackModel

P = ParamSpec("P")
R = TypeVar("R")

#: Let flavor options (``--instance_type=x``) reach the command instead of being rejected.
_EXTRA_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True}
_NEGATIVE_NUMBER = re.compile(r"-\.?\d")

_EXAMPLES = {
    "step_operator": "stepflow step-operator register sagemaker --type=sagemaker \\\n"
                     "    --role=arn:aws:iam::123456789012:role/sm --instance_type=ml.m5.large\n"
                     "stepflow step-operator register threads --type=local --max-threads 8",
    "artifact_store": "stepflow artifact-store register s3-store --type=s3 --path=s3://bucket/prefix\n"
                      "stepflow artifact-store register scratch --type=local --path=/data/artifacts",
    "container_registry": "stepflow container-registry register ecr --type=default "
                          "--uri=123.dkr.ecr.us-east-1.amazonaws.com\n"
                          "stepflow container-registry register reg --type=default --uri=127.0.0.1:5000 "
                          "--password='{{env.REG_TOKEN}}'",
    "image_builder": "stepflow image-builder register builder --type=FLAVOR --OPTION=VALUE",
    "event_sink": "stepflow event-sink register audit --type=jsonl --path=/var/log/stepflow/events.jsonl",
}


def _label(kind: str) -> str:
    return kind.replace("_", "-")


def _plural(kind: str) -> str:
    label = _label(kind)
    return label[:-1] + "ies" if label.endswith("y") else label + "s"


def _fail(message: str) -> NoReturn:
    from stepflow._cli.common import fail

    fail(message)
    raise SystemExit(2)  # not reached: fail() exits


def _guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn stepflow errors into ``error: ...`` + exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except StepflowError as exc:
            _fail(str(exc))
        except sqlite3.Error as exc:  # safety net: the store translates the errors it expects
            _fail(f"stepflow store: {exc}")

    return wrapper


def _client() -> Client:
    from stepflow._stack.client import Client

    return Client()


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    # soft_wrap: long values (URIs, messages) stay on one line, so they can be copied and grepped.
    return Console(highlight=False, soft_wrap=True, stderr=stderr)


def _esc(value: Any) -> str:
    from rich.markup import escape

    return escape(_fmt(value))


def _fmt(value: Any) -> str:
    """A config value as the user would type it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _note(message: str) -> None:
    _console(stderr=True).print(f"[dim]note:[/] {message}")


def parse_flavor_options(tokens: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Split extra command-line tokens into positional arguments and flavor options.

    Accepts ``--key=value``, ``--key value`` and a bare ``--flag`` (followed by another option
    or the end) meaning true. ``-`` in keys becomes ``_``; a repeated option keeps the last value.

    >>> parse_flavor_options(["--instance-type", "ml.m5", "--use_spot", "--role=r"])
    ([], {'instance_type': 'ml.m5', 'use_spot': True, 'role': 'r'})
    """
    positionals: list[str] = []
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            positionals.extend(tokens[i:])
            break
        if not token.startswith("-") or token == "-" or _NEGATIVE_NUMBER.match(token):
            positionals.append(token)
            continue
        key, sep, value = token.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not key:
            raise click.UsageError(f"'{token}' is not an option: use --OPTION=VALUE")
        if sep:
            values[key] = value
        elif i < len(tokens) and (not tokens[i].startswith("-") or _NEGATIVE_NUMBER.match(tokens[i])):
            values[key] = tokens[i]
            i += 1
        else:
            values[key] = True
    return positionals, values


def _name_and_options(kind: str, name: str, extra: Sequence[str]) -> tuple[str, dict[str, Any]]:
    # click hands the first free token to NAME even when it is a flavor option typed before it.
    tokens = [name, *extra] if name.startswith("-") else list(extra)
    positionals, values = parse_flavor_options(tokens)
    if name.startswith("-"):
        if not positionals:
            raise click.UsageError(f"missing the {_label(kind)} NAME: stepflow {_label(kind)} "
                                   "register NAME --type=FLAVOR [--OPTION=VALUE ...]")
        name = positionals.pop(0)
    if positionals:
        raise click.UsageError(f"unexpected argument(s) {' '.join(positionals)!r}: flavor options "
                               "are given as --OPTION=VALUE")
    return name, values


def _note_encrypted(client: Client, kind: str, name: str, stored: dict[str, Any], given: dict[str, Any]) -> None:
    """Say which secrets just given were encrypted, and recommend environment references."""
    from stepflow._config.options import normalize_key
    from stepflow._store.secrets import is_encrypted

    sealed = [k for k in dict.fromkeys(map(normalize_key, given)) if is_encrypted(stored.get(k))]
    if not sealed:
        return
    names = ", ".join(sealed)
    _note(f"{_esc(names)} stored encrypted (master key: {_esc(client.key_location())}); to keep "
          f"{'them' if len(sealed) > 1 else 'it'} out of the store entirely, use an environment reference: "
          f"`stepflow {_label(kind)} update {_esc(name)} --{_esc(sealed[0])}='{{{{env.VAR}}}}'`")


def _stacks_using(stacks: Iterable[StackModel]) -> dict[tuple[str, str], list[str]]:
    users: dict[tuple[str, str], list[str]] = {}
    for stack in stacks:
        for member in stack.members():
            users.setdefault(member, []).append(stack.name)
    return users


# -- components ------------------------------------------------------------------------------
def _component_group(kind: str) -> click.Group:
    label, labels = _label(kind), _plural(kind)
    example = _EXAMPLES[kind]

    @click.group(label, help=f"""Register and inspect {labels} (components of a stack).

    Each {label} has a flavor (--type) that decides its options; see them with
    `stepflow flavor list {label}`. Combine components with `stepflow stack register`.

    \b
    Examples:
      {example.replace(chr(10), chr(10) + "      ")}
      stepflow {label} list
    """)
    def group() -> None:
        pass

    @group.command("register", context_settings=_EXTRA_ARGS, help=f"""Register a {label}.

    NAME is yours to choose; --type (-t) is the flavor. Flavor options may be written
    --instance_type=x, --instance-type=x or --instance-type x; an option given without a value
    means true (e.g. --use_spot). Secret options are never printed and are stored encrypted with
    the home's master key (kept outside the store); better, write '{{{{env.VAR}}}}' to keep them
    out of the store entirely (resolved from the environment when a run starts).

    \b
    Examples:
      {example.replace(chr(10), chr(10) + "      ")}
    """)
    @click.argument("name", metavar="NAME --type=FLAVOR [--OPTION=VALUE]...")
    @click.option("-t", "--type", "flavor", metavar="FLAVOR", help="The flavor (see `stepflow flavor list`).")
    @click.pass_context
    @_guarded
    def register(ctx: click.Context, name: str, flavor: str | None) -> None:
        client = _client()
        name, values = _name_and_options(kind, name, ctx.args)
        if not flavor:
            available = ", ".join(e.name for e in client.flavor_entries(kind)) or "none installed"
            _fail(f"--type FLAVOR is required: the flavor of the {label} (available: {available})")
        comp = client.register_component(kind, name, flavor, values)
        _console().print(f"registered {_esc(comp.label)} (flavor {_esc(flavor)})")
        _note_encrypted(client, kind, comp.name, comp.config, values)

    @group.command("list", help=f"""List the registered {labels}: name, flavor and stacks using each.

    \b
    Example:
      stepflow {label} list
    """)
    @_guarded
    def list_() -> None:
        from rich.table import Table

        client = _client()
        components = client.list_components(kind)
        if not components:
            _console().print(f"no {labels} registered; add one with "
                             f"`stepflow {label} register NAME --type=FLAVOR`")
            return
        users = _stacks_using(client.list_stacks())
        table = Table("name", "flavor", "stacks")
        for comp in components:
            table.add_row(_esc(comp.name), _esc(comp.flavor),
                          _esc(", ".join(users.get((kind, comp.name), [])) or "-"))
        _console().print(table)

    @group.command("describe", help=f"""Show a {label}: flavor, stacks using it and every option.

    Options not given at registration show their default; secrets show as ********, and
    under "secrets" how each is kept: encrypted (and where the key is) or an environment
    reference.

    \b
    Example:
      stepflow {label} describe NAME
    """)
    @click.argument("name")
    @_guarded
    def describe(name: str) -> None:
        client = _client()
        info = client.describe_component(kind, name)
        given = client.get_component(kind, name).config
        console = _console()
        console.print(f"{label} [bold]{_esc(name)}[/]")
        console.print(f"  flavor  {_esc(info['flavor'])}")
        console.print(f"  stacks  {_esc(', '.join(info['stacks']) or '-')}")
        if "error" in info:
            console.print(f"  [red]flavor failed to load:[/] {_esc(info['error'])}")
        config: dict[str, Any] = info["config"]
        if not config:
            console.print("  options -")
        else:
            console.print("  options")
            width = max(map(len, config))
            for key, value in config.items():
                default = "" if key in given else "  [dim](default)[/]"
                console.print(f"    {_esc(key.ljust(width))}  {_esc(value)}{default}")
        kept: dict[str, str] = info.get("secrets") or {}
        if kept:
            console.print("  secrets")
            width = max(map(len, kept))
            for key, how in kept.items():
                console.print(f"    {_esc(key.ljust(width))}  {_esc(how)}")

    @group.command("update", context_settings=_EXTRA_ARGS, help=f"""Change options of a {label}.

    Options not given keep their values; the new ones are validated against the flavor
    together with them. Stacks using the {label} see the change at their next run.

    \b
    Example:
      stepflow {label} update NAME --OPTION=VALUE
    """)
    @click.argument("name", metavar="NAME [--OPTION=VALUE]...")
    @click.pass_context
    @_guarded
    def update(ctx: click.Context, name: str) -> None:
        name, values = _name_and_options(kind, name, ctx.args)
        if not values:
            _fail(f"nothing to update: give the options to change as --OPTION=VALUE (see "
                  f"`stepflow {label} describe {name}`)")
        client = _client()
        comp = client.update_component(kind, name, values)
        # Only the option names: a value may be a secret.
        _console().print(f"updated {_esc(comp.label)}: {_esc(', '.join(sorted(values)))}")
        _note_encrypted(client, kind, comp.name, comp.config, values)

    @group.command("delete", help=f"""Delete a {label}; refused while a stack uses it.

    \b
    Example:
      stepflow {label} delete NAME
    """)
    @click.argument("name")
    @_guarded
    def delete(name: str) -> None:
        _client().delete_component(kind, name)
        _console().print(f"deleted {label} '{_esc(name)}'")

    return group


# -- stacks ----------------------------------------------------------------------------------
@click.group("stack")
def stack_group() -> None:
    """Combine components into stacks and choose the active one.

    A stack has one artifact store, optionally a container registry and an image builder,
    and any number of step operators and event sinks. `stepflow run` uses the active stack
    (or --stack NAME). A `default` stack (local artifact store, local step operator) always
    exists.

    \b
    Example:
      stepflow stack register sm_stack -a s3-store -c ecr -s sagemaker
      stepflow stack set sm_stack
      stepflow stack list
    """


def _stack_options(register: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The component options shared by ``stack register`` and ``stack update``."""
    empty = "" if register else " An empty value removes it."
    clear = "" if register else " Replaces the stack's list; an empty value clears it."
    decorators = [
        click.option("-a", "--artifact-store", metavar="NAME",
                     help="Artifact store" + (" (required)." if register else ".")),
        click.option("-c", "--container-registry", metavar="NAME", help="Container registry." + empty),
        click.option("-s", "--step-operator", "step_operators", metavar="[ALIAS=]NAME", multiple=True,
                     help="Step operator (repeat for several). ALIAS=NAME lets steps that name ALIAS run on NAME in "
                          "this stack, so one pipeline moves between stacks unchanged." + clear),
        click.option("-i", "--image-builder", metavar="NAME", help="Image builder." + empty),
        click.option("-e", "--event-sink", "event_sinks", metavar="NAME", multiple=True,
                     help="Event sink (repeat for several)." + clear),
        click.option("-o", "--orchestrator", metavar="NAME",
                     help="Accepted for ZenML compatibility and ignored: the orchestrator is built in."),
        click.option("-m", "--metadata-store", metavar="NAME",
                     help="Accepted for ZenML compatibility and ignored: metadata lives in the "
                          "stepflow store."),
    ]

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def _ignored_notes(orchestrator: str | None, metadata_store: str | None) -> None:
    if orchestrator is not None:
        _note(f"stepflow's orchestrator is built in (its async scheduler); "
              f"-o {_esc(orchestrator)} is ignored")
    if metadata_store is not None:
        _note(f"stepflow keeps run metadata in its own store ($STEPFLOW_HOME); "
              f"-m {_esc(metadata_store)} is ignored")


def _names(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(v for v in values if v)


@stack_group.command("register")
@click.argument("name")
@_stack_options(register=True)
@click.option("--set", "activate", is_flag=True, help="Also make it the active stack.")
@_guarded
def stack_register(name: str, artifact_store: str | None, container_registry: str | None,
                   step_operators: tuple[str, ...], image_builder: str | None,
                   event_sinks: tuple[str, ...], orchestrator: str | None,
                   metadata_store: str | None, activate: bool) -> None:
    """Register a stack from registered components.

    \b
    Example:
      stepflow stack register sm_stack -a s3-store -c ecr -s sagemaker -e audit
    """
    _ignored_notes(orchestrator, metadata_store)
    client = _client()
    client.register_stack(name, artifact_store=artifact_store or "",
                          container_registry=container_registry or None,
                          step_operators=_names(step_operators), image_builder=image_builder or None,
                          event_sinks=_names(event_sinks))
    console = _console()
    console.print(f"registered stack '{_esc(name)}'")
    if activate:
        client.set_active_stack(name)
        console.print(f"stack '{_esc(name)}' is now active")


@stack_group.command("update")
@click.argument("name")
@_stack_options(register=False)
@_guarded
def stack_update(name: str, artifact_store: str | None, container_registry: str | None,
                 step_operators: tuple[str, ...], image_builder: str | None,
                 event_sinks: tuple[str, ...], orchestrator: str | None,
                 metadata_store: str | None) -> None:
    """Replace some components of a stack; the ones not given are kept.

    \b
    Examples:
      stepflow stack update sm_stack -s sagemaker -s local   # step operators become these two
      stepflow stack update sm_stack -c ''                  # remove the container registry
    """
    _ignored_notes(orchestrator, metadata_store)
    changes: dict[str, Any] = {}
    if artifact_store is not None:
        changes["artifact_store"] = artifact_store
    if container_registry is not None:
        changes["container_registry"] = container_registry or None
    if image_builder is not None:
        changes["image_builder"] = image_builder or None
    if step_operators:
        changes["step_operators"] = _names(step_operators)
    if event_sinks:
        changes["event_sinks"] = _names(event_sinks)
    if not changes:
        _fail("nothing to update: give -a, -c, -s, -i or -e (see `stepflow stack update --help`)")
    _client().update_stack(name, **changes)
    _console().print(f"updated stack '{_esc(name)}': {', '.join(k.replace('_', '-') for k in changes)}")


@stack_group.command("set")
@click.argument("name")
@_guarded
def stack_set(name: str) -> None:
    """Make NAME the active stack (used by `stepflow run` without --stack).

    \b
    Example:
      stepflow stack set sm_stack
    """
    _client().set_active_stack(name)
    _console().print(f"stack '{_esc(name)}' is now active")


@stack_group.command("list")
@_guarded
def stack_list() -> None:
    """List the stacks and their components; * marks the active one.

    \b
    Example:
      stepflow stack list
    """
    from rich.table import Table

    from stepflow._stack.client import stack_summary

    table = Table("active", "name", "artifact-store", "container-registry", "image-builder",
                  "step-operators", "event-sinks")
    for stack in _client().list_stacks():
        table.add_row("*" if stack.is_active else "", _esc(stack.name),
                      *(_esc(value) for _, value in stack_summary(stack)))
    _console().print(table)


def _print_stack(client: Client, stack: StackModel, details: bool) -> None:
    from stepflow._stack.client import stack_summary

    console = _console()
    if not details:  # `stack current`: the bare name first, for scripts
        console.print(_esc(stack.name))
        for label, value in stack_summary(stack):
            console.print(f"  {label:<19} {_esc(value)}")
        return
    console.print(f"stack [bold]{_esc(stack.name)}[/]{' (active)' if stack.is_active else ''}")
    alias_of = {comp: alias for alias, comp in stack.operator_aliases}
    for kind, name in stack.members():
        info = client.describe_component(kind, name)
        alias = f" as {_esc(alias_of[name])}" if kind == "step_operator" and name in alias_of else ""
        console.print(f"  {_label(kind):<19} [bold]{_esc(name)}[/]{alias} (flavor {_esc(info['flavor'])})")
        if "error" in info:
            console.print(f"      [red]flavor failed to load:[/] {_esc(info['error'])}")
        for key, value in info["config"].items():
            console.print(f"      {_esc(key)} = {_esc(value)}")


@stack_group.command("describe")
@click.argument("name", required=False)
@_guarded
def stack_describe(name: str | None) -> None:
    """Show a stack (default: the active one) with each component's flavor and options.

    Secrets show as ********.

    \b
    Example:
      stepflow stack describe sm_stack
    """
    client = _client()
    _print_stack(client, client.get_stack(name or client.active_stack_name()), details=True)


@stack_group.command("current")
@_guarded
def stack_current() -> None:
    """Print the active stack's name (first line) and its components.

    \b
    Example:
      stepflow stack current
    """
    client = _client()
    _print_stack(client, client.get_stack(client.active_stack_name()), details=False)


@stack_group.command("delete")
@click.argument("name")
@_guarded
def stack_delete(name: str) -> None:
    """Delete a stack (its components stay registered). Not the default or the active one.

    \b
    Example:
      stepflow stack delete sm_stack
    """
    _client().delete_stack(name)
    _console().print(f"deleted stack '{_esc(name)}'")


# -- flavors ---------------------------------------------------------------------------------
@click.group("flavor")
def flavor_group() -> None:
    """Inspect the installed flavors (from stepflow and plugin distributions).

    \b
    Example:
      stepflow flavor list step-operator
    """


def _print_options(console: Console, title: str, cls: type) -> None:
    from rich.padding import Padding
    from rich.table import Table

    from stepflow._config.options import specs

    rows = specs(cls)
    console.print(f"    {title}:{'' if rows else ' none'}")
    if not rows:
        return
    table = Table("option", "type", "default", "required", "secret", "doc")
    for spec in rows:
        table.add_row(_esc(spec.name), _esc(spec.type_name), "" if spec.required else _esc(spec.default),
                      "yes" if spec.required else "", "yes" if spec.secret else "", _esc(spec.doc))
    console.print(Padding(table, (0, 0, 0, 4), expand=False))


@flavor_group.command("list")
@click.argument("kind", required=False, metavar="[KIND]")
@_guarded
def flavor_list(kind: str | None) -> None:
    """List every installed flavor, by kind, with its options.

    KIND limits the list to one kind: step-operator, artifact-store, container-registry,
    image-builder or event-sink. A flavor whose plugin fails to load is shown with the error
    and the distribution to fix; the others are still listed.

    \b
    Examples:
      stepflow flavor list
      stepflow flavor list step-operator
    """
    from stepflow._plugins.registry import kind_from_label

    client = _client()
    console = _console()
    entries = client.flavor_entries(kind)
    kinds = [kind_from_label(kind)] if kind else list(ENTRY_POINT_GROUPS)
    for k in kinds:
        console.print(f"[bold]{_label(k)}[/]")
        found = [e for e in entries if e.kind == k]
        if not found:
            console.print("  (none installed)")
        for entry in found:
            try:
                flavor = client.flavor(k, entry.name)
            except StepflowError as exc:  # one broken plugin must not hide the others
                console.print(f"  [bold]{_esc(entry.name)}[/] (from {_esc(entry.distribution)}) "
                              "[red]failed to load[/]")
                for line in str(exc).splitlines():
                    console.print(f"      {_esc(line)}")
                continue
            console.print(f"  [bold]{_esc(entry.name)}[/] (from {_esc(entry.distribution)}): "
                          f"{_esc(flavor.description)}")
            _print_options(console, "options", flavor.config_class)
            if flavor.settings_class is not None:
                _print_options(console, "per-step settings", flavor.settings_class)
        console.print()


def register_commands(cli: click.Group) -> None:
    """Add the component, stack and flavor command groups to the ``stepflow`` group."""
    for kind in ENTRY_POINT_GROUPS:
        cli.add_command(_component_group(kind))
    cli.add_command(stack_group)
    cli.add_command(flavor_group)
