"""The list-filter language of Google APIs (AIP-160, and Cloud Logging's dialect of it), on given fields.

    expression := sequence { "AND" sequence }
    sequence   := factor { factor }              # juxtaposition is AND too
    factor     := term { "OR" term }             # OR binds tighter than AND, as in both services
    term       := ("NOT" | "-") term | "(" expression ")" | FIELD OP VALUE
    OP         := "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"

VALUE is a double-quoted string or a bare word. Each service names its fields and their kinds
(:class:`Fields`); a filter on any other field is INVALID_ARGUMENT, as is a comparison its kind
does not support. ``:`` is "has": a key's existence (``labels.k:*``), a ``*`` wildcard match or a
case-insensitive substring.
"""

from __future__ import annotations

import calendar
import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .validation import ApiError, invalid

Predicate = Callable[[Any], bool]
COMPARATORS = ("<=", ">=", "!=", "=", "<", ">", ":")
_FIELD = re.compile(r"[A-Za-z_][\w.\-/]*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_BARE = re.compile(r"[^\s()]+")
_KEYWORDS = ("AND", "OR", "NOT")
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})")


@dataclass(frozen=True)
class Comparison:
    """``field op value`` as written."""

    field: str
    op: str
    value: str


@dataclass(frozen=True)
class Node:
    """``and`` / ``or`` of children, or ``not`` of one."""

    kind: str
    children: tuple[Any, ...]


@dataclass(frozen=True)
class Field:
    """A filterable field: its kind (string, enum, timestamp, severity, map) and how to read it off a record.

    ``values`` lists an enum's or a severity's names (a severity's in increasing order, with their levels).
    """

    kind: str
    get: Callable[[Any], Any]
    values: Mapping[str, int] | None = None


class Fields:
    """The fields a service filters on: exact names, and map prefixes (``labels.`` then any key)."""

    def __init__(self, exact: Mapping[str, Field], maps: Mapping[str, Field] | None = None) -> None:
        self.exact, self.maps = dict(exact), dict(maps or {})

    def resolve(self, name: str) -> tuple[Field, str | None]:
        """The field of ``name`` and, for a map field, the key."""
        if name in self.exact:
            return self.exact[name], None
        for prefix, found in self.maps.items():
            if name.startswith(prefix + ".") and len(name) > len(prefix) + 1:
                key = name[len(prefix) + 1:]
                if len(key) > 1 and key[0] == key[-1] == '"':
                    key = key[1:-1]
                return found, key
        supported = sorted([*self.exact, *(f"{p}.KEY" for p in self.maps)])
        raise invalid(f'Unsupported filter field "{name}": supported fields are {", ".join(supported)}.')


# ------------------------------------------------------------------------ parsing
class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, what: str) -> ApiError:
        return invalid(f'Invalid filter "{self.text}": {what} at position {self.pos}.')

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def keyword(self, word: str) -> bool:
        """Consume ``word`` when it is next as a whole word."""
        self.skip()
        end = self.pos + len(word)
        if self.text.startswith(word, self.pos) and (end == len(self.text) or not _is_word_char(self.text[end])):
            self.pos = end
            return True
        return False

    def at_end_of_sequence(self) -> bool:
        self.skip()
        if self.pos >= len(self.text) or self.text[self.pos] == ")":
            return True
        rest = self.text[self.pos:]
        return any(rest.startswith(k) and (len(rest) == len(k) or not _is_word_char(rest[len(k)]))
                   for k in ("AND", "OR"))

    def expression(self) -> Any:
        parts = [self.sequence()]
        while self.keyword("AND"):
            parts.append(self.sequence())
        return _all(parts)

    def sequence(self) -> Any:
        parts = [self.factor()]
        while not self.at_end_of_sequence():
            parts.append(self.factor())
        return _all(parts)

    def factor(self) -> Any:
        parts = [self.term()]
        while self.keyword("OR"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else Node("or", tuple(parts))

    def term(self) -> Any:
        self.skip()
        if self.keyword("NOT"):
            return Node("not", (self.term(),))
        if self.text.startswith("-", self.pos):
            self.pos += 1
            return Node("not", (self.term(),))
        if self.text.startswith("(", self.pos):
            self.pos += 1
            inner = self.expression()
            self.skip()
            if not self.text.startswith(")", self.pos):
                raise self.error('expected ")"')
            self.pos += 1
            return inner
        return self.comparison()

    def comparison(self) -> Comparison:
        self.skip()
        match = _FIELD.match(self.text, self.pos)
        if match is None:
            raise self.error("expected a field name")
        name = match.group()
        if name in _KEYWORDS:
            raise self.error(f"unexpected {name}")
        self.pos = match.end()
        if self.text.startswith('"', self.pos) and name.endswith("."):  # labels."a key"
            quoted = _QUOTED.match(self.text, self.pos)
            if quoted is None:
                raise self.error("unterminated string")
            name += quoted.group()
            self.pos = quoted.end()
        self.skip()
        op = next((c for c in COMPARATORS if self.text.startswith(c, self.pos)), None)
        if op is None:
            raise self.error(f'expected a comparison after "{name}"')
        self.pos += len(op)
        self.skip()
        quoted = _QUOTED.match(self.text, self.pos)
        if quoted is not None:
            self.pos = quoted.end()
            return Comparison(name, op, re.sub(r"\\(.)", r"\1", quoted.group(1)))
        if self.text.startswith('"', self.pos):
            raise self.error("unterminated string")
        bare = _BARE.match(self.text, self.pos)
        if bare is None:
            raise self.error(f'expected a value after "{name}{op}"')
        self.pos = bare.end()
        return Comparison(name, op, bare.group())


def _all(parts: list[Any]) -> Any:
    """The AND of ``parts``, flat: nested ANDs are merged."""
    flat: list[Any] = []
    for part in parts:
        flat.extend(part.children if isinstance(part, Node) and part.kind == "and" else (part,))
    return flat[0] if len(flat) == 1 else Node("and", tuple(flat))


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c in "_.-"


def parse(text: str) -> Any:
    """The syntax tree of a filter (None for an empty one); INVALID_ARGUMENT when it does not parse."""
    if not text.strip():
        return None
    parser = _Parser(text)
    tree = parser.expression()
    parser.skip()
    if parser.pos != len(text):
        raise parser.error("unexpected text")
    return tree


# ------------------------------------------------------------------------ evaluation
def compile_filter(text: str, fields: Fields) -> Predicate:
    """A predicate over records, checking every field and value up front."""
    tree = parse(text)
    if tree is None:
        return lambda record: True
    return _compile(tree, fields)


def _compile(node: Any, fields: Fields) -> Predicate:
    if isinstance(node, Node):
        parts = [_compile(child, fields) for child in node.children]
        if node.kind == "not":
            return lambda r: not parts[0](r)
        if node.kind == "or":
            return lambda r: any(p(r) for p in parts)
        return lambda r: all(p(r) for p in parts)
    return _comparison(node, fields)


def _comparison(cmp: Comparison, fields: Fields) -> Predicate:
    found, key = fields.resolve(cmp.field)
    op, value = cmp.op, cmp.value
    where = f'in "{cmp.field}{op}{value}"'
    if found.kind == "map":
        assert key is not None

        def get(r: Any) -> Any:
            return found.get(r).get(key)

        if op == ":" and value == "*":
            return lambda r: get(r) is not None
        if op in ("=", "!=", ":"):
            return _strings(get, op, value)
        raise invalid(f"Unsupported comparison {op} {where}: map values support =, != and :.")
    if found.kind == "string":
        if op in ("=", "!=", ":"):
            return _strings(found.get, op, value)
        raise invalid(f"Unsupported comparison {op} {where}: this field supports =, != and :.")
    if found.kind in ("enum", "severity"):
        names = found.values or {}
        if value not in names:
            raise invalid(f'Unknown value "{value}" {where}: expected one of {", ".join(names)}.')
        level = names[value]
        if found.kind == "enum" and op not in ("=", "!="):
            raise invalid(f"Unsupported comparison {op} {where}: this field supports = and !=.")
        return _ordered(found.get, op, level, where)
    if found.kind == "timestamp":
        return _ordered(found.get, op, rfc3339_ns(value, where), where)
    raise AssertionError(found.kind)


def _strings(get: Callable[[Any], Any], op: str, value: str) -> Predicate:
    if op == "=":
        return lambda r: get(r) == value
    if op == "!=":
        return lambda r: get(r) != value
    if "*" in value:
        return lambda r: get(r) is not None and fnmatch.fnmatchcase(str(get(r)), value)
    lowered = value.lower()
    return lambda r: get(r) is not None and lowered in str(get(r)).lower()


def _ordered(get: Callable[[Any], Any], op: str, bound: int, where: str) -> Predicate:
    tests: dict[str, Callable[[int], bool]] = {
        "=": lambda x: x == bound, "!=": lambda x: x != bound, "<": lambda x: x < bound,
        "<=": lambda x: x <= bound, ">": lambda x: x > bound, ">=": lambda x: x >= bound}
    test = tests.get(op)
    if test is None:
        raise invalid(f"Unsupported comparison {op} {where}.")
    return lambda r: get(r) is not None and test(get(r))


def rfc3339_ns(text: str, where: str = "") -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp (any precision, Z or an offset)."""
    where = f" {where}" if where else ""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        raise invalid(f'Invalid timestamp "{text}"{where}: expected RFC 3339, e.g. "2024-05-01T12:00:00.5Z".')
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zone = match.group(7) or "", match.group(8)
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        raise invalid(f'Invalid timestamp "{text}"{where}.') from None
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise invalid(f'Invalid timestamp "{text}"{where}.')
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int(fraction.ljust(9, "0") or 0)


def equalities(text: str) -> dict[str, str]:
    """``field = value`` terms every match must satisfy (the filter's top-level AND), for indexed lookups."""
    tree = parse(text)
    if tree is None:
        return {}
    terms = tree.children if isinstance(tree, Node) and tree.kind == "and" else (tree,)
    return {t.field: t.value for t in terms if isinstance(t, Comparison) and t.op == "="}
