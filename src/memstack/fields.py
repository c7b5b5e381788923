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


def check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """Reject non-ints (bools included: ``True`` is an int in Python) and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")


def check_number(name: str, value: Any, accepted: str, ok: typing.Callable[[float], bool]) -> None:
    """Reject non-numbers (bools included), NaN and infinities, and values ``ok`` refuses."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def reject_bool_ints(obj: Any, section: str) -> None:
    """``True`` passes ``isinstance(x, int)``: refuse a bool wherever an int is declared."""
    for f in dataclasses.fields(obj):
        hint = typing.get_type_hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        if isinstance(value, bool) and (hint is int or hint == int | None):
            raise ValueError(f"{section}.{f.name} must be an int, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys with the valid ones.

    A nested section whose class defines its own ``from_dict(data)`` classmethod (one that reads
    an older format, or sections of registered kinds) is built by it; others field by field.
    """
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = section_type(cls, name)
        if sub is not None and value is not None:
            own = sub.__dict__.get("from_dict")  # declared on the section class itself
            kwargs[name] = (
                own.__get__(None, sub)(value)
                if own is not None
                else from_dict(sub, value, prefix=f"{prefix}{name}.")
            )
        elif isinstance(value, list) and name == "betas":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def section_type(cls: type, name: str) -> type | None:
    """The dataclass a field holds, for ``X`` and ``X | None`` fields (None for plain values)."""
    t = typing.get_type_hints(cls)[name]
    if dataclasses.is_dataclass(t):
        return t
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def parse_layers(spec: str, num_layers: int | None, name: str = "layers") -> list[int]:
    """Turn a layer selection string (``stack.compressive.layers``, ``stack.store.layers``) into
    layer indices.

    Args:
        spec: ``"all"``, ``"none"``, ``"every:K"`` or ``"i,j,..."``.
        num_layers: number of decoder layers, or None to check the syntax only.
        name: the field's name in error messages.

    Returns:
        Sorted layer indices (empty when ``num_layers`` is None and the spec needs it).

    Raises:
        ValueError: if the spec is malformed or names a layer that does not exist.
    """
    accepted = 'accepted: "all", "none", "every:K", or comma-separated indices like "0,2"'
    if not isinstance(spec, str):
        raise ValueError(f"{name} must be a string such as 'all' or '0,3', got {spec!r}")
    spec = spec.strip()
    n = num_layers if num_layers is not None else 0
    if spec == "all":
        return list(range(n))
    if spec == "none":
        return []
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad {name} {spec!r}; {accepted}") from None
        if k < 1:
            raise ValueError(f"{name} every:K needs K >= 1, got {spec!r}")
        return list(range(0, n, k))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"bad {name} {spec!r}; {accepted}") from None
    if not layers:
        raise ValueError(f"{name} {spec!r} names no layer; {accepted}")
    if num_layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{name} {spec!r}: layers {bad} do not exist (model has {num_layers})")
    return layers
