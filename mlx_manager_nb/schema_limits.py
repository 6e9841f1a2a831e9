"""Bounds on the work a request's JSON schemas ask for: sizes checked before any library sees them,
numbers llguidance can take, a meta-schema check in linear time, and a time budget.

:data:`LIMITS` holds the caps (OpenAI's documented limits for structured outputs are a guide: its
5,000 properties and 1,000 enum values per schema; these are at least as generous). A request's
checks run inside a :class:`Budget` (see :func:`budget`): its schemas count together against the
request's totals, and its checks stop, as a 400 naming the field, once its time is spent, or
quietly once its client is gone (see :mod:`mlx_manager_nb.server.checks`). Error messages quote at
most :data:`QUOTE` characters of what a client sent.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from .errors import InvalidParameterError

QUOTE = 200  # characters of a client's input an error message may quote
I64 = 2**63  # llguidance takes numbers and bounds within +-2**63 (integers as i64/u64)
U64 = 2**64
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@dataclass
class SchemaLimits:
    """Caps on untrusted schemas; change them on :data:`LIMITS` (``schema_limits.LIMITS.max_properties = ...``)."""

    max_bytes: int = 1_000_000  # one schema, as compact JSON
    max_properties: int = 5_000  # property names across one schema (OpenAI: 5,000)
    max_enum_values: int = 5_000  # enum and const values across one schema (OpenAI: 1,000)
    request_bytes: int = 4_000_000  # every schema of one request together (tools and format)
    request_properties: int = 10_000
    check_seconds: float = 10.0  # CPU time of one request's schema checks and grammar compiles together
    per_client: int = 2  # a client's requests whose schemas are checked at once (server)


LIMITS = SchemaLimits()


class Abandoned(Exception):
    """The client of the request being checked is gone: its checks stop."""


@dataclass
class Budget:
    """One request's checks: a deadline in the checking thread's CPU time (what other work on the
    machine takes does not count), a flag its server sets when the client leaves, and totals."""

    seconds: float
    deadline: float = 0.0  # time.thread_time() of the checking thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    bytes: int = 0
    properties: int = 0
    param: str = ""  # the field being checked, named if the time runs out

    def tick(self) -> None:
        """Raise if the request's client is gone or its time is spent."""
        if self.cancelled.is_set():
            raise Abandoned()
        if time.thread_time() > self.deadline:
            raise InvalidParameterError(self.param, f"{self.param} took more than {self.seconds:g} s to check: "
                                                    "simplify the schema")


_current = threading.local()


@contextlib.contextmanager
def budget(b: Budget | None = None) -> Iterator[Budget]:
    """Run this thread's checks within ``b`` (a new one of :data:`LIMITS`'s seconds if None)."""
    b = b or Budget(LIMITS.check_seconds)
    b.deadline = time.thread_time() + b.seconds
    previous = getattr(_current, "budget", None)
    _current.budget = b
    try:
        yield b
    finally:
        _current.budget = previous


def tick(param: str | None = None) -> None:
    """Check the current request's budget (nothing outside one: the Python API's own schemas)."""
    b = getattr(_current, "budget", None)
    if b is not None:
        if param is not None:
            b.param = param
        b.tick()


def quote(value: Any) -> str:
    """``value`` as an error message may show it: its first line, at most :data:`QUOTE` characters
    (llguidance's errors say why first, then list the grammar)."""
    text = (value if isinstance(value, str) else repr(value)).strip()
    line = text.split("\n", 1)[0]
    return line if len(line) <= QUOTE and line == text else line[:QUOTE - 3] + "..."


def check_size(schema: dict, param: str) -> None:
    """Refuse a schema over :data:`LIMITS`, or holding a number llguidance cannot take, naming ``param``
    (and where inside it); counted against the current request's totals. Walks without recursing."""
    tick(param)
    try:
        size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError) as e:  # a Python caller's dict holding what JSON cannot
        raise InvalidParameterError(param, f"{param} is not JSON: {quote(str(e))}") from None
    if size > LIMITS.max_bytes:
        raise InvalidParameterError(param, f"{param} is {size:,} bytes as JSON; at most {LIMITS.max_bytes:,}")
    properties = enums = 0
    stack: list[tuple[str, Any]] = [(param, schema)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            props = v.get("properties")
            properties += len(props) if isinstance(props, dict) else 0
            enum = v.get("enum")
            enums += (len(enum) if isinstance(enum, list) else 0) + ("const" in v)
            for key in BOUNDS:
                bound = v.get(key)
                if isinstance(bound, (int, float)) and not isinstance(bound, bool) and abs(bound) >= I64:
                    raise InvalidParameterError(param, f"{quote(path)}.{key} is {quote(bound)}: bounds must lie "
                                                       "within +-2**63")
            stack.extend((f"{path}.{k}", item) for k, item in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
        elif isinstance(v, int) and not isinstance(v, bool) and not -I64 <= v < U64:
            raise InvalidParameterError(param, f"{quote(path)} is {quote(v)}: integers must lie within -2**63 and "
                                               "2**64 - 1")
    if properties > LIMITS.max_properties:
        raise InvalidParameterError(param, f"{param} has {properties:,} properties; at most "
                                           f"{LIMITS.max_properties:,}")
    if enums > LIMITS.max_enum_values:
        raise InvalidParameterError(param, f"{param} has {enums:,} enum and const values; at most "
                                           f"{LIMITS.max_enum_values:,}")
    b = getattr(_current, "budget", None)
    if b is not None:
        b.bytes += size
        b.properties += properties
        if b.bytes > LIMITS.request_bytes:
            raise InvalidParameterError(param, f"the request's schemas are {b.bytes:,} bytes as JSON together (with "
                                               f"{param}); at most {LIMITS.request_bytes:,}")
        if b.properties > LIMITS.request_properties:
            raise InvalidParameterError(param, f"the request's schemas have {b.properties:,} properties together "
                                               f"(with {param}); at most {LIMITS.request_properties:,}")


def check_meta(schema: dict, param: str) -> None:
    """Check ``schema`` against its JSON Schema meta-schema, as ``check_schema`` does, in linear time; a
    failure is an InvalidParameterError naming ``param`` and quoting little.

    jsonschema compares the values of an ``enum`` pairwise when they cannot be sorted (mixed types:
    7,000 took 10 s); here they are compared by hashing first, and the meta-schema sees an ``enum`` of
    as many distinct numbers instead (the meta-schema asks nothing else of its values)."""
    tick(param)
    cls = jsonschema.validators.validator_for(schema)
    meta = jsonschema.validators.validator_for(cls.META_SCHEMA, default=cls)
    validator = meta(cls.META_SCHEMA, format_checker=meta.FORMAT_CHECKER)
    error = next(iter(validator.iter_errors(_enums_checked(schema, param))), None)
    tick(param)
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise InvalidParameterError(param, f"{param} is not a valid JSON schema: {quote(error.message)}"
                                           + (f" (at {quote(param + where)})" if where else ""))


def _enums_checked(schema: dict, param: str) -> dict:
    """A copy of ``schema`` whose ``enum`` lists are ``[0, 1, ...]``, once each is known to hold distinct values."""
    out = dict(schema)
    stack: list[tuple[str, Any]] = [(param, out)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if k == "enum" and isinstance(item, list):
                    _check_distinct(item, f"{path}.enum", param)
                    v[k] = list(range(len(item)))
                elif isinstance(item, (dict, list)):
                    v[k] = copy = dict(item) if isinstance(item, dict) else list(item)
                    stack.append((f"{path}.{k}", copy))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, (dict, list)):
                    v[i] = copy = dict(item) if isinstance(item, dict) else list(item)
                    stack.append((f"{path}[{i}]", copy))
    return out


def _check_distinct(values: list, path: str, param: str) -> None:
    seen: set = set()
    for item in values:
        key = _canonical(item)
        if key in seen:
            raise InvalidParameterError(param, f"{param} is not a valid JSON schema: {quote(path)} holds "
                                               f"{quote(item)} twice")
        seen.add(key)


def _canonical(value: Any) -> Any:
    """A hashable key equal for values JSON Schema calls equal (1 == 1.0, true != 1, objects unordered)."""
    if isinstance(value, bool) or value is None:
        return ("b", value)
    if isinstance(value, dict):
        return ("o", frozenset((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("a", tuple(_canonical(v) for v in value))
    return ("s", value) if isinstance(value, str) else ("n", value)
