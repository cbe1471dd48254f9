"""Typed config checks: every value's type, range and allowed set, checked once, before any work.

An experiment describes its config as a nested mapping of *fields* that mirrors ``config.yaml``
(``{"train": {"lr": real(gt=0), ...}, ...}``) and calls :func:`check` on the resolved config.
The first impossible value stops with one line naming the key, what it must be and what it got::

    error: train.lr must be a number > 0, got 'fast'

Fields are small callables: ``integer``, ``real``, ``choice``, ``boolean``, ``text``, ``items``
(a list), ``per_cycle`` (one value, or one per cycle), ``nullable``. A key written with
``optional(...)`` may be absent (keys another branch adds later, or left out of older run
configs); every other key must be present. Checks that relate several values (``top_k`` <=
``d_sae``) follow :func:`check` in the experiment's own validation.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UserError, require


class Invalid(Exception):
    """A field's complaint about one value (the key is added by :func:`check`)."""


Field = Callable[[Any], None]


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(what: str, ge=None, gt=None, le=None, lt=None) -> tuple[str, Callable[[Any], bool]]:
    parts, tests = [], []
    for bound, op, test in ((ge, ">=", lambda v, b: v >= b), (gt, ">", lambda v, b: v > b),
                            (le, "<=", lambda v, b: v <= b), (lt, "<", lambda v, b: v < b)):
        if bound is not None:
            parts.append(f"{op} {bound}")
            tests.append((test, bound))
    return (f"{what} {' and '.join(parts)}" if parts else what), lambda v: all(t(v, b) for t, b in tests)


def integer(ge=None, gt=None, le=None, lt=None) -> Field:
    """An int (not a bool, not 2.0), within the given bounds."""
    described, inside = _bounds("an integer", ge, gt, le, lt)

    def field(value):
        if not (isinstance(value, int) and not isinstance(value, bool) and inside(value)):
            raise Invalid(f"must be {described}, got {_show(value)}")
    field.describes = described
    return field


def real(ge=None, gt=None, le=None, lt=None) -> Field:
    """An int or float within the given bounds (YAML reads 1e-3 as a string; the override parser does not)."""
    described, inside = _bounds("a number", ge, gt, le, lt)

    def field(value):
        if not (_is_number(value) and value == value and inside(value)):
            raise Invalid(f"must be {described}, got {_show(value)}")
    field.describes = described
    return field


def choice(*options: Any) -> Field:
    def field(value):
        # True == 1 in Python: a bool matches only a bool option
        if value not in options or (isinstance(value, bool) and not any(o is value for o in options)):
            raise Invalid(f"must be one of {', '.join(_show(o) for o in options)}, got {_show(value)}")
    field.describes = f"one of {', '.join(_show(o) for o in options)}"
    return field


def boolean() -> Field:
    def field(value):
        if not isinstance(value, bool):
            raise Invalid(f"must be true or false, got {_show(value)}")
    field.describes = "true or false"
    return field


def text(nonempty: bool = True) -> Field:
    def field(value):
        if not isinstance(value, str) or (nonempty and not value):
            raise Invalid(f"must be {'a non-empty' if nonempty else 'a'} string, got {_show(value)}")
    field.describes = "a string"
    return field


def items(of: Field, nonempty: bool = True, min_len: int | None = None) -> Field:
    """A list whose every element is ``of``."""
    least = min_len if min_len is not None else (1 if nonempty else 0)

    def field(value):
        if not isinstance(value, list) or len(value) < least:
            raise Invalid(f"must be a list of at least {least} value(s), each {of.describes}, got {_show(value)}")
        for i, element in enumerate(value):
            try:
                of(element)
            except Invalid as err:
                raise Invalid(f"[{i}] {err}") from None
    field.describes = f"a list of {of.describes}"
    return field


def per_cycle(of: Field) -> Field:
    """One value for every cycle, or a list of one value per cycle (its length checked by the caller)."""
    def field(value):
        if isinstance(value, list):
            items(of)(value)
        else:
            try:
                of(value)
            except Invalid:
                raise Invalid(f"must be {of.describes}, or a list of such values (one per cycle), "
                              f"got {_show(value)}") from None
    field.describes = f"{of.describes} or a per-cycle list"
    return field


def nullable(of: Field) -> Field:
    def field(value):
        if value is not None:
            try:
                of(value)
            except Invalid:
                raise Invalid(f"must be {of.describes} or null, got {_show(value)}") from None
    field.describes = f"{of.describes} or null"
    return field


def anything() -> Field:
    def field(value):
        return None
    field.describes = "any value"
    return field


@dataclass(frozen=True)
class optional:
    """A key that may be absent; when present, ``field`` checks it."""
    field: Any


def check(cfg: Any, schema: dict, prefix: str = "") -> None:
    """Check ``cfg`` against ``schema`` (nested mapping of fields); raise one UserError for the first bad value."""
    require(isinstance(cfg, Mapping), f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {_show(cfg)}")
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        may_miss = isinstance(spec, optional)
        spec = spec.field if may_miss else spec
        if key not in cfg:
            if may_miss:
                continue
            raise UserError(f"the config lacks the key '{name}'")
        value = cfg[key]
        if isinstance(spec, dict):
            check(value, spec, f"{name}.")
            continue
        try:
            spec(value)
        except Invalid as err:
            message = str(err)
            raise UserError(f"{name}{'' if message.startswith('[') else ' '}{message}") from None
