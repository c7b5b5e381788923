"""What every config section shares: value checks with messages that name the key, the value and
what is accepted, and building a (nested) section from a plain dict.

Used by :mod:`memstack.config` (the stack's sections) and :mod:`memstack.train.config` (a training
run's sections and their command-line form).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """Reject non-ints (bools included: ``True`` is an int in Python) and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")


def _check_number(name: str, value: Any, accepted: str, ok: typing.Callable[[float], bool]) -> None:
    """Reject non-numbers (bools included), NaN and infinities, and values ``ok`` refuses."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _reject_bool_ints(obj: Any, section: str) -> None:
    """``True`` passes ``isinstance(x, int)``: refuse a bool wherever an int is declared."""
    for f in dataclasses.fields(obj):
        hint = typing.get_type_hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        if isinstance(value, bool) and (hint is int or hint == int | None):
            raise ValueError(f"{section}.{f.name} must be an int, got {value!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    upgrade = getattr(cls, "_upgrade_legacy", None)  # a section that reads an older format
    if upgrade is not None:
        data = upgrade(data)
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _section_type(cls, name)
        if sub is not None and value is not None:
            kwargs[name] = _from_dict(sub, value, prefix=f"{prefix}{name}.")
        elif isinstance(value, list) and name == "betas":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass a field holds, for ``X`` and ``X | None`` fields (None for plain values)."""
    t = typing.get_type_hints(cls)[name]
    if dataclasses.is_dataclass(t):
        return t
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None
