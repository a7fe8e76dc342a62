"""The Python API for stack components and stacks; the CLI is a thin layer over it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from stepflow._config import options
from stepflow._plugins import registry
from stepflow._plugins.registry import KIND_LABELS, FlavorEntry, kind_from_label
from stepflow._store import keys
from stepflow._store import secrets as secret_store
from stepflow._store.sqlite import Store
from stepflow.errors import ConfigError, NotFoundError, PluginError, StoreError
from stepflow.interfaces.flavor import ENTRY_POINT_GROUPS, Flavor

DEFAULT_STACK = "default"
#: Components of the default stack, created on first use of a store.
DEFAULT_COMPONENTS = (("artifact_store", "default", "local"), ("step_operator", "local", "local"))
#: Kinds a stack holds at most one of; the others (step operators, event sinks) may repeat.
SINGLE_KINDS = ("artifact_store", "container_registry", "image_builder")
MULTI_KINDS = ("step_operator", "event_sink")


@attrs.frozen
class ComponentModel:
    """A registered component: kind, name, flavor and the options given (not defaults).

    ``config`` is the stored form: secret values are sealed (``enc:v1:...``) until
    :meth:`Client.instantiate` opens them; ``{{env.VAR}}`` references stay as typed.
    """

    kind: str
    name: str
    flavor: str
    config: dict[str, Any]
    created_at: float
    updated_at: float

    @property
    def label(self) -> str:
        """``step-operator 'sagemaker'`` for messages."""
        return f"{KIND_LABELS[self.kind]} '{self.name}'"


@attrs.frozen
class StackModel:
    """A registered stack: which component of each kind it uses."""

    name: str
    artifact_store: str
    container_registry: str | None = None
    image_builder: str | None = None
    step_operators: tuple[str, ...] = ()
    event_sinks: tuple[str, ...] = ()
    is_active: bool = False
    #: ``(alias, component)``: steps naming the alias run on that step operator of this stack, so
    #: one pipeline moves between stacks (``-s trainer=sagemaker`` here, ``-s trainer=vertex`` there).
    operator_aliases: tuple[tuple[str, str], ...] = ()

    @property
    def aliases(self) -> dict[str, str]:
        """Alias -> step operator component."""
        return dict(self.operator_aliases)

    def members(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of every component in the stack."""
        out = [("artifact_store", self.artifact_store)]
        if self.container_registry:
            out.append(("container_registry", self.container_registry))
        if self.image_builder:
            out.append(("image_builder", self.image_builder))
        out += [("step_operator", n) for n in self.step_operators]
        out += [("event_sink", n) for n in self.event_sinks]
        return out


class Client:
    """Register, inspect and combine stack components; choose the active stack.

    Everything is persisted in the SQLite store under ``home`` (default ``$STEPFLOW_HOME``,
    else ``~/.stepflow``). A ``default`` stack (local artifact store ``default`` and local
    step operator ``local``) exists from the first use and is active until another is set.
    """

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.store = Store(home)
        self._bootstrapped = False

    # -- plumbing ----------------------------------------------------------------------
    def _db(self) -> Store:
        if not self._bootstrapped:
            self._bootstrap()
        return self.store

    def _bootstrap(self) -> None:
        # Check with a read first: once bootstrapped, read-only calls (list, describe, run) must
        # not take the write lock, or they would queue behind (and time out on) any writer.
        state = {r["key"]: r["value"] for r in self.store.read(
            "SELECT key, value FROM meta WHERE key IN ('bootstrapped', ?)", (secret_store.MIGRATION_KEY,))}
        if secret_store.migration_pending(state.get(secret_store.MIGRATION_KEY)):
            # Secrets stored in plain text by an older version: sealed on the first open that can
            # load their flavors (which say what is secret); a broken plugin only delays its own.
            secret_store.encrypt_plaintext(self.store, self._secret_options_of)
        if "bootstrapped" in state:
            self._bootstrapped = True
            return
        now = Store.now()
        with self.store.write() as db:
            if db.execute("SELECT 1 FROM meta WHERE key = 'bootstrapped'").fetchone() is None:
                for kind, name, flavor in DEFAULT_COMPONENTS:
                    db.execute("INSERT OR IGNORE INTO components VALUES (?, ?, ?, '{}', ?, ?)",
                               (kind, name, flavor, now, now))
                db.execute("INSERT OR IGNORE INTO stacks VALUES (?, ?, ?)", (DEFAULT_STACK, now, now))
                for pos, (kind, name, _) in enumerate(DEFAULT_COMPONENTS):
                    db.execute("INSERT OR IGNORE INTO stack_members (stack, kind, component, position) "
                               "VALUES (?, ?, ?, ?)",
                               (DEFAULT_STACK, kind, name, pos))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('active_stack', ?)", (DEFAULT_STACK,))
                db.execute("INSERT INTO meta VALUES ('bootstrapped', '1')")
        self._bootstrapped = True

    @staticmethod
    def _kind(kind: str) -> str:
        return kind_from_label(kind)

    # -- flavors -----------------------------------------------------------------------
    def flavor_entries(self, kind: str | None = None) -> list[FlavorEntry]:
        """Discovered flavors (nothing imported), sorted by kind then name."""
        kinds = [self._kind(kind)] if kind else list(ENTRY_POINT_GROUPS)
        return [e for k in kinds for _, e in sorted(registry.entries(k).items())]

    def flavor(self, kind: str, name: str) -> Flavor:
        """Load one flavor (imports its light module)."""
        return registry.load(self._kind(kind), name)

    def _secret_options_of(self, kind: str, flavor: str) -> set[str]:
        return _secret_names(self.flavor(kind, flavor))

    def key_location(self) -> str:
        """Where the master key sealing this home's component secrets is kept (a path, the keyring ...)."""
        return keys.key_location(self.store.home)

    # -- components --------------------------------------------------------------------
    def register_component(self, kind: str, name: str, flavor: str,
                           config: Mapping[str, Any] | None = None) -> ComponentModel:
        """Register a component after validating ``config`` against the flavor's options."""
        kind = self._kind(kind)
        _check_name(name, KIND_LABELS[kind])
        fl = self.flavor(kind, flavor)
        given = {options.normalize_key(k): v for k, v in (config or {}).items()}
        instance = options.build(fl.config_class, given,
                                 what=f"{KIND_LABELS[kind]} '{name}' (flavor {flavor})")
        stored = secret_store.seal(self.store.home, kind, name, options.to_jsonable(instance, only=set(given)),
                                   _secret_names(fl))
        now = Store.now()
        with self._db().write() as db:
            if db.execute("SELECT 1 FROM components WHERE kind = ? AND name = ?", (kind, name)).fetchone():
                raise ConfigError(
                    f"a {KIND_LABELS[kind]} named '{name}' already exists; pick another name, or "
                    f"change it with `stepflow {KIND_LABELS[kind]} update {name} --OPTION=VALUE`"
                )
            db.execute("INSERT INTO components VALUES (?, ?, ?, ?, ?, ?)",
                       (kind, name, flavor, Store.dumps(stored), now, now))
        return ComponentModel(kind, name, flavor, stored, now, now)

    def get_component(self, kind: str, name: str) -> ComponentModel:
        """One registered component (NotFoundError listing the registered names)."""
        kind = self._kind(kind)
        rows = self._db().read("SELECT * FROM components WHERE kind = ? AND name = ?", (kind, name))
        if not rows:
            names = [c.name for c in self.list_components(kind)]
            raise NotFoundError(
                f"no {KIND_LABELS[kind]} named '{name}'; registered: {', '.join(names) or 'none'}"
            )
        return _component(rows[0])

    def list_components(self, kind: str | None = None) -> list[ComponentModel]:
        """Registered components, of one kind or all."""
        if kind is None:
            rows = self._db().read("SELECT * FROM components ORDER BY kind, name")
        else:
            rows = self._db().read("SELECT * FROM components WHERE kind = ? ORDER BY name",
                                   (self._kind(kind),))
        return [_component(r) for r in rows]

    def update_component(self, kind: str, name: str, config: Mapping[str, Any]) -> ComponentModel:
        """Change some options of a component (validated with the others it already has).

        Sealed secrets not being changed are stored again exactly as they were; new secret values
        are sealed. The kept ones are opened only to validate the whole config.
        """
        current = self.get_component(kind, name)
        fl = self.flavor(current.kind, current.flavor)
        changes = {options.normalize_key(k): v for k, v in config.items()}
        kept = {k: v for k, v in current.config.items() if k not in changes and secret_store.is_encrypted(v)}
        opened, failed = secret_store.reveal(self.store.home, current.kind, name, current.config, only=set(kept))
        if failed:
            raise self._undecryptable(current, failed, in_update=True)
        merged = {**opened, **changes}
        instance = options.build(fl.config_class, merged,
                                 what=f"{current.label} (flavor {current.flavor})")
        stored = secret_store.seal(self.store.home, current.kind, name,
                                   options.to_jsonable(instance, only=set(merged)), _secret_names(fl), kept)
        now = Store.now()
        with self._db().write() as db:
            db.execute("UPDATE components SET config = ?, updated_at = ? WHERE kind = ? AND name = ?",
                       (Store.dumps(stored), now, current.kind, name))
        return attrs.evolve(current, config=stored, updated_at=now)

    def delete_component(self, kind: str, name: str) -> None:
        """Delete a component; refused while any stack uses it."""
        current = self.get_component(kind, name)
        with self._db().write() as db:
            users = [r["stack"] for r in db.execute(
                "SELECT DISTINCT stack FROM stack_members WHERE kind = ? AND component = ? ORDER BY stack",
                (current.kind, name))]
            if users:
                raise ConfigError(
                    f"{current.label} is used by stack{'s' if len(users) > 1 else ''} "
                    f"{', '.join(repr(u) for u in users)}; remove it from "
                    f"{'those stacks' if len(users) > 1 else 'that stack'} first (`stepflow stack update` or "
                    "`stepflow stack delete`)"
                )
            db.execute("DELETE FROM components WHERE kind = ? AND name = ?", (current.kind, name))

    def describe_component(self, kind: str, name: str) -> dict[str, Any]:
        """Everything about a component with secrets redacted, defaults filled in."""
        comp = self.get_component(kind, name)
        out: dict[str, Any] = {"kind": KIND_LABELS[comp.kind], "name": comp.name, "flavor": comp.flavor,
                               "stacks": [s.name for s in self.list_stacks()
                                          if (comp.kind, comp.name) in s.members()]}
        try:
            fl = self.flavor(comp.kind, comp.flavor)
        except (PluginError, ConfigError) as exc:
            out["config"] = {k: options.REDACTED for k in comp.config}
            out["secrets"] = self._secret_storage(comp, [k for k, v in comp.config.items()
                                                         if secret_store.is_encrypted(v)])
            out["error"] = str(exc)
            return out
        full = {s.name: comp.config.get(s.name, s.default) for s in options.specs(fl.config_class)}
        out["config"] = options.redact(fl.config_class, full)
        out["secrets"] = self._secret_storage(comp, [s.name for s in options.specs(fl.config_class) if s.secret])
        return out

    def _secret_storage(self, comp: ComponentModel, names: Iterable[str]) -> dict[str, str]:
        """How each secret option is kept, for ``describe`` (never the value)."""
        out: dict[str, str] = {}
        for option in names:
            value = comp.config.get(option)
            if secret_store.is_encrypted(value):
                out[option] = f"encrypted (key: {self.key_location()})"
            elif isinstance(value, str) and options.is_env_ref(value):
                out[option] = f"environment reference {value.strip()}"
            elif value in (None, ""):
                out[option] = "not set"
            else:  # left by an older version whose flavor could not be loaded since
                out[option] = (f"plain text: encrypt it by setting it again (`stepflow {KIND_LABELS[comp.kind]} "
                               f"update {comp.name} --{option}=...`)")
        return out

    def _undecryptable(self, comp: ComponentModel, failed: Sequence[str], in_update: bool = False) -> ConfigError:
        label = KIND_LABELS[comp.kind]
        many = len(failed) > 1
        names = ", ".join(f"'{o}'" for o in failed)
        again = " ".join(f"--{o}=..." for o in failed)
        how = "give them again in this update" if in_update and many else \
            "give it again in this update" if in_update else "set them again" if many else "set it again"
        return ConfigError(
            f"{comp.label} (flavor {comp.flavor}): cannot decrypt secret option{'s' if many else ''} {names}: "
            f"the master key at {self.key_location()} does not match the key {'they were' if many else 'it was'} "
            f"encrypted with (the key was replaced or lost, or the store was copied without it). Restore the "
            f"original master key, or {how}: `stepflow {label} update {comp.name} {again}` (a value written as "
            "'{{env.VAR}}' is read from the environment instead of being stored)"
        )

    def instantiate(self, kind: str, name: str) -> Any:
        """Create the live component: load its flavor, open its secrets, resolve ``{{env.VAR}}``, construct it.

        References are resolved before the config is built, so conversion and the config class's
        validators check the values the component will use, not the references.
        """
        comp = self.get_component(kind, name)
        fl = self.flavor(comp.kind, comp.flavor)
        what = f"{comp.label} (flavor {comp.flavor})"
        values, failed = secret_store.reveal(self.store.home, comp.kind, comp.name, comp.config)
        if failed:
            raise self._undecryptable(comp, failed)
        values = options.resolve_env_values(fl.config_class, values, what=what)
        instance = options.build(fl.config_class, values, what=what, keep_env_refs=False)
        try:
            component = fl.create(comp.name, instance)
        except (ConfigError, PluginError):
            raise
        except Exception as exc:
            raise PluginError(f"{what} failed to start: {type(exc).__name__}: {exc}") from exc
        if getattr(component, "name", None) in (None, ""):
            component.name = comp.name
        if fl.settings_class is not None and getattr(component, "settings_class", None) is None:
            component.settings_class = fl.settings_class
        return component

    # -- stacks ------------------------------------------------------------------------
    def register_stack(self, name: str, *, artifact_store: str, container_registry: str | None = None,
                       step_operators: Sequence[str] = (), image_builder: str | None = None,
                       event_sinks: Sequence[str] = ()) -> StackModel:
        """Register a stack after checking its components exist and fit together."""
        _check_name(name, "stack")
        operators, aliases = _split_aliases(step_operators)
        stack = StackModel(name, artifact_store, container_registry, image_builder, operators,
                           tuple(dict.fromkeys(event_sinks)), operator_aliases=aliases)
        self._validate_stack(stack)
        now = Store.now()
        with self._db().write() as db:
            if db.execute("SELECT 1 FROM stacks WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"a stack named '{name}' already exists; pick another name or "
                                  f"change it with `stepflow stack update {name}`")
            db.execute("INSERT INTO stacks VALUES (?, ?, ?)", (name, now, now))
            _write_members(db, stack)
        return stack

    def update_stack(self, name: str, **changes: Any) -> StackModel:
        """Replace some of a stack's components (same keywords as :meth:`register_stack`)."""
        current = self.get_stack(name)
        valid = {"artifact_store", "container_registry", "image_builder", "step_operators", "event_sinks"}
        unknown = set(changes) - valid
        if unknown:
            raise ConfigError(f"unknown stack field(s) {', '.join(sorted(unknown))}; valid: "
                              f"{', '.join(sorted(valid))}")
        if "step_operators" in changes:
            changes["step_operators"], changes["operator_aliases"] = _split_aliases(changes["step_operators"])
        if "event_sinks" in changes:
            changes["event_sinks"] = tuple(dict.fromkeys(changes["event_sinks"]))
        stack = attrs.evolve(current, **changes)
        self._validate_stack(stack)
        with self._db().write() as db:
            if db.execute("SELECT 1 FROM stacks WHERE name = ?", (name,)).fetchone() is None:
                raise NotFoundError(f"stack '{name}' was deleted meanwhile")
            db.execute("DELETE FROM stack_members WHERE stack = ?", (name,))
            _write_members(db, stack)
            db.execute("UPDATE stacks SET updated_at = ? WHERE name = ?", (Store.now(), name))
        return stack

    def delete_stack(self, name: str) -> None:
        """Delete a stack (not the default one, nor the active one)."""
        self.get_stack(name)
        if name == DEFAULT_STACK:
            raise ConfigError("the default stack cannot be deleted")
        with self._db().write() as db:
            # Checked under the write lock so a concurrent `stack set` cannot activate it meanwhile.
            active = db.execute("SELECT value FROM meta WHERE key = 'active_stack'").fetchone()
            if active is not None and active["value"] == name:
                raise ConfigError(f"stack '{name}' is active; `stepflow stack set default` first")
            db.execute("DELETE FROM stacks WHERE name = ?", (name,))

    def get_stack(self, name: str) -> StackModel:
        """One stack (NotFoundError listing the registered stacks)."""
        db = self._db()
        if not db.read("SELECT 1 FROM stacks WHERE name = ?", (name,)):
            names = [r["name"] for r in db.read("SELECT name FROM stacks ORDER BY name")]
            raise NotFoundError(f"no stack named '{name}'; registered stacks: {', '.join(names)}")
        rows = db.read("SELECT kind, component, alias FROM stack_members WHERE stack = ? ORDER BY position",
                       (name,))
        fields: dict[str, Any] = {"step_operators": [], "event_sinks": []}
        aliases = []
        for r in rows:
            if r["kind"] in SINGLE_KINDS:
                fields[r["kind"]] = r["component"]
            else:
                fields[r["kind"] + "s"].append(r["component"])
            if r["alias"]:
                aliases.append((r["alias"], r["component"]))
        return StackModel(name, fields.get("artifact_store", ""), fields.get("container_registry"),
                          fields.get("image_builder"), tuple(fields["step_operators"]),
                          tuple(fields["event_sinks"]), is_active=name == self.active_stack_name(),
                          operator_aliases=tuple(aliases))

    def list_stacks(self) -> list[StackModel]:
        """Every stack, by name."""
        names = [r["name"] for r in self._db().read("SELECT name FROM stacks ORDER BY name")]
        return [self.get_stack(n) for n in names]

    def active_stack_name(self) -> str:
        """Name of the active stack."""
        return self._db().get_meta("active_stack") or DEFAULT_STACK

    def set_active_stack(self, name: str) -> StackModel:
        """Make ``name`` the active stack."""
        stack = self.get_stack(name)
        with self._db().write() as db:
            # Re-checked under the write lock: the stack may have been deleted since get_stack.
            if db.execute("SELECT 1 FROM stacks WHERE name = ?", (name,)).fetchone() is None:
                raise NotFoundError(f"stack '{name}' was deleted meanwhile")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('active_stack', ?)", (name,))
        return attrs.evolve(stack, is_active=True)

    def _validate_stack(self, stack: StackModel) -> None:
        problems: list[str] = []
        if not stack.artifact_store:
            problems.append("a stack needs an artifact store (-a NAME)")
        components: dict[tuple[str, str], ComponentModel] = {}
        for kind, name in stack.members():
            if not name:
                continue
            try:
                components[(kind, name)] = self.get_component(kind, name)
            except NotFoundError as exc:
                problems.append(str(exc))
        flavors: dict[tuple[str, str], Flavor] = {}
        for key, comp in components.items():
            try:
                flavors[key] = self.flavor(comp.kind, comp.flavor)
            except (PluginError, ConfigError) as exc:
                problems.append(f"{comp.label}: {exc}")
        store_flavor = flavors.get(("artifact_store", stack.artifact_store))
        for (kind, name), fl in flavors.items():
            if kind != "step_operator":
                continue
            if fl.requires_container_registry and not stack.container_registry:
                regs = [c.name for c in self.list_components("container_registry")]
                problems.append(
                    f"step-operator '{name}' (flavor {fl.name}) needs a container registry to push "
                    f"step images to: add one with -c NAME (registered: {', '.join(regs) or 'none'}; "
                    "register one with `stepflow container-registry register`)"
                )
            if fl.requires_remote_artifact_store and store_flavor is not None and not store_flavor.is_remote:
                problems.append(
                    f"step-operator '{name}' (flavor {fl.name}) runs steps on other machines, which "
                    f"cannot reach the {store_flavor.name} artifact store '{stack.artifact_store}': "
                    "use a remote one (e.g. --type=s3, gcs or azure)"
                )
            view = {**attrs.asdict(stack), "components": {
                f"{k}:{n}": {"flavor": c.flavor, "config": dict(c.config)} for (k, n), c in components.items()}}
            problems.extend(fl.validate_stack(view))
        if problems:
            raise ConfigError(f"stack '{stack.name}' is invalid: " + "; ".join(problems))


def _component(row: Any) -> ComponentModel:
    return ComponentModel(row["kind"], row["name"], row["flavor"], Store.loads(row["config"]),
                          row["created_at"], row["updated_at"])


def _write_members(db: Any, stack: StackModel) -> None:
    # Re-checked inside the write transaction: a concurrent delete_component may have removed a
    # member since _validate_stack, and a stack must never point at a missing component.
    gone = [f"{KIND_LABELS[k]} '{c}'" for k, c in stack.members()
            if db.execute("SELECT 1 FROM components WHERE kind = ? AND name = ?", (k, c)).fetchone() is None]
    if gone:
        raise NotFoundError(f"stack '{stack.name}': {', '.join(gone)} no longer exist(s) (deleted meanwhile)")
    alias_of = {comp: alias for alias, comp in stack.operator_aliases}
    for pos, (kind, comp) in enumerate(stack.members()):
        alias = alias_of.get(comp) if kind == "step_operator" else None
        db.execute("INSERT INTO stack_members (stack, kind, component, position, alias) VALUES (?, ?, ?, ?, ?)",
                   (stack.name, kind, comp, pos, alias))


def _split_aliases(entries: Sequence[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """``["trainer=vertex", "local"]`` -> components ``("vertex", "local")``, aliases ``(("trainer", "vertex"),)``."""
    components: list[str] = []
    aliases: list[tuple[str, str]] = []
    for entry in entries:
        alias, sep, component = str(entry).partition("=")
        if not sep:
            alias, component = "", alias
        component, alias = component.strip(), alias.strip()
        if sep:
            _check_name(alias, "step operator alias")
            if any(a == alias for a, _ in aliases):
                raise ConfigError(f"step operator alias '{alias}' is given twice")
            aliases.append((alias, component))
        if component not in components:
            components.append(component)
    taken = [a for a, _ in aliases if a in components]
    if taken:
        raise ConfigError(f"alias '{taken[0]}' is also the name of a step operator of the stack: give the alias "
                          "another name")
    return tuple(components), tuple(aliases)


def _check_name(name: str, what: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name or ""):
        raise ConfigError(f"invalid {what} name {name!r}: use 1-63 letters, digits, '_', '-' or '.', "
                          "starting with a letter or digit")


def _secret_names(flavor: Flavor) -> set[str]:
    return {s.name for s in options.specs(flavor.config_class) if s.secret}


def redacted_config(kind: str, flavor: Flavor, values: Mapping[str, Any]) -> dict[str, Any]:
    """Secrets masked, for display."""
    return options.redact(flavor.config_class, dict(values))


def stack_summary(stack: StackModel) -> Iterable[tuple[str, str]]:
    """``(kind label, component names)`` rows for display."""
    for kind in (*SINGLE_KINDS, *MULTI_KINDS):
        if kind in SINGLE_KINDS:
            value = getattr(stack, kind) or "-"
        else:
            names = getattr(stack, kind + "s")
            if kind == "step_operator":
                alias_of = {comp: alias for alias, comp in stack.operator_aliases}
                names = [f"{alias_of[n]}={n}" if n in alias_of else n for n in names]
            value = ", ".join(names) or "-"
        yield KIND_LABELS[kind], value


__all__ = ["Client", "ComponentModel", "StackModel", "StoreError"]
