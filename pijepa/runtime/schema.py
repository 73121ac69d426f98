"""Config fields that carry their own bounds, and the one generic check of them.

A section's bounds are declared with the field, in its dataclasses metadata, so that the field's
type (a `Literal` for a choice), default, bounds and comment sit on one line:

    batch_size: int = bounded(32, min=1)                      # expected "a positive number"
    num_workers: int = bounded(2, min=0)                      # expected "0 or more"
    zero_stage: int = bounded(-1, min=-1, max=3, expected="-1 (use the JSON's stage), 0, 1, 2 or 3")
    crop_scale: tuple[float, float] = span((0.3, 1.0), lo_above=0)

`check_fields` checks one built section against its Literal choices and bounds (pijepa.config runs
it while building each section from YAML, defaults included). Checks that read several fields stay
in pijepa.config.validate. Every refusal is one line: `<source>: <key> = <value> is not allowed;
expected <what>`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pijepa.runtime.errors import ConfigError

T = TypeVar("T")
CHECKS = "pijepa.checks"  # the metadata key of a field's checks


def not_allowed(source: str, key: str, value: Any, expected: str) -> ConfigError:
    """The one-line refusal of a value; a pair is shown as the YAML list it was written as."""
    shown = list(value) if isinstance(value, tuple) else value
    return ConfigError(f"{source}: {key} = {shown!r} is not allowed; expected {expected}")


@dataclass(frozen=True)
class Bound:
    """min <= value <= max and value > above, each where given; of value[index] when index is set.
    `expected` may name the section's other fields as {name} (filled in with their values)."""

    expected: str
    min: float | None = None
    max: float | None = None
    above: float | None = None
    index: int | None = None

    def allows(self, value: Any) -> bool:
        v = value if self.index is None else value[self.index]
        return ((self.min is None or v >= self.min) and (self.max is None or v <= self.max)
                and (self.above is None or v > self.above))


@dataclass(frozen=True)
class Span:
    """A [lo, hi] pair with low <= lo <= hi <= high."""

    low: float = 0.0
    high: float = 1.0

    @property
    def expected(self) -> str:
        return f"[lo, hi] with {self.low} <= lo <= hi <= {self.high}"

    def allows(self, value: Any) -> bool:
        lo, hi = value
        return bool(self.low <= lo <= hi <= self.high)


Check = Bound | Span


def bounded(default: T, *, min: float | None = None, max: float | None = None,
            above: float | None = None, expected: str | None = None) -> T:
    """A number field with bounds. Without `expected` the text follows the bounds: above=0 (or
    min=1 on an int) "a positive number", min=n "n or more", min and max "min..max"."""
    text = expected or _describe(default, min, max, above)
    return field(default=default, metadata={CHECKS: (Bound(text, min, max, above),)})


def span(default: tuple[float, float], *, low: float = 0.0, high: float = 1.0,
         lo_above: float | None = None) -> tuple[float, float]:
    """A [lo, hi] field within [low, high]; lo_above also refuses lo <= lo_above."""
    checks: list[Check] = [Span(low, high)]
    if lo_above is not None:
        checks.append(Bound(f"a lower bound above {lo_above}", above=lo_above, index=0))
    return field(default=default, metadata={CHECKS: tuple(checks)})


def _describe(default: Any, low: float | None, high: float | None, above: float | None) -> str:
    if above == 0 and low is None and high is None:
        return "a positive number"
    if low is not None and high is None and above is None:
        is_int = isinstance(default, int) and not isinstance(default, bool)
        return "a positive number" if low == 1 and is_int else f"{low} or more"
    if low is not None and high is not None and above is None:
        return f"{low}..{high}"
    raise TypeError("give `expected` for this combination of bounds")


def checks_of(f: dataclasses.Field) -> tuple[Check, ...]:
    return tuple(f.metadata.get(CHECKS, ()))


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The allowed values of a Literal hint (also inside `X | None`); () for any other hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(hint) for c in literal_choices(a))
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


def choices_text(choices: tuple[Any, ...]) -> str:
    return "one of " + ", ".join(str(c) for c in choices)


def check_fields(section: Any, source_of: Callable[[str], str], prefix: str = "") -> None:
    """Checks each field of one dataclass instance against its Literal choices and its bounds
    (nested sections are not entered). `source_of(key)` names where the key's value came from;
    `prefix` ("data.") makes the key as the user writes it."""
    hints = typing.get_type_hints(type(section))
    fields = dataclasses.fields(section)
    values = {f.name: getattr(section, f.name) for f in fields}
    for f in fields:
        value, key = values[f.name], prefix + f.name
        choices = literal_choices(hints[f.name])
        if choices and value not in choices and not (value is None and _optional(hints[f.name])) \
                and not _of_other_member(value, hints[f.name]):
            raise not_allowed(source_of(key), key, value, choices_text(choices))
        for check in checks_of(f):
            if value in choices:  # a word of the field's union, e.g. "auto": no numeric bound applies
                continue
            if not check.allows(value):
                raise not_allowed(source_of(key), key, value, check.expected.format(**values))


def _of_other_member(value: Any, hint: Any) -> bool:
    """`value` is an instance of a plain type of a union such as `bool | Literal["auto"]`."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return False
    plain = [a for a in typing.get_args(hint) if isinstance(a, type) and a is not type(None)]
    return any(isinstance(value, t) for t in plain)


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """A YAML value as the field's type (`hint`), or a one-line refusal naming `source` and `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        words = literal_choices(hint)  # e.g. "auto" in `bool | Literal["auto"]`
        if value in words:
            return value
        (inner,) = [a for a in args if a is not type(None) and typing.get_origin(a) is not typing.Literal]
        if words and not isinstance(value, inner):
            raise not_allowed(source, key, value, f"{inner.__name__} or {choices_text(words)}")
        return coerce(value, inner, source, key)
    if origin is typing.Literal:
        if value in args:
            return value
        raise not_allowed(source, key, value, choices_text(args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a list of {len(args)} numbers")
        return tuple(coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise ConfigError(f"{source}: {key} = {value!r}: expected {hint.__name__}, got {type(value).__name__}")
