"""Field metadata and type checks shared by the configuration dataclasses that
``HfArgumentParser`` reads (``WAvgConfig``, ``SafetyConfig``); no heavy imports, so the leaf
``safety/`` may use it too."""

from __future__ import annotations

import math
from functools import cache
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def help_text(text: str) -> dict[str, Any]:
    """``field(metadata=...)`` carrying the ``--help`` text of a command-line flag."""
    return {"help": text}


@cache
def field_types(config_class: type) -> dict[str, Any]:
    """A config class's resolved field annotations (read once per class: every config checks them)."""
    return get_type_hints(config_class)


def literal_fields(config_class: type) -> dict[str, tuple[str, ...]]:
    """The fields typed as a ``Literal``, with their choices."""
    return {name: get_args(hint) for name, hint in field_types(config_class).items() if get_origin(hint) is Literal}


def _value_types(hint: Any) -> tuple[set[Any], bool]:
    """The types a field accepts (a Literal's as ``str``, ``list[str]`` as ``list``) and
    whether it may be None."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    kinds = {str if get_origin(option) is Literal else get_origin(option) or option for option in options}
    return kinds - {type(None)}, type(None) in kinds


def _list_item_type(hint: Any) -> tuple[type, ...]:
    """The item types a ``list[X]`` option of ``hint`` accepts (a float list takes ints too)."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    listed = next(option for option in options if get_origin(option) is list)
    item = (get_args(listed) or (object,))[0]
    return (int, float) if item is float else (item,)


def type_error(config: Any, name: str, hint: Any) -> str | None:
    """What field ``name`` of ``config`` must be, when its value is of the wrong type (None
    when it is right): a JSON or YAML "false" is a string, truthy in Python, and PyYAML reads
    9e-1 as a string too."""
    value = getattr(config, name)
    kinds, optional = _value_types(hint)
    if value is None and optional:
        return None
    if bool in kinds:
        return None if isinstance(value, bool) else "true or false (a boolean, not a string)"
    if float in kinds:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "a number (in YAML, write 0.9 or 9.0e-1: PyYAML reads 9e-1 as a string)"
        return None if math.isfinite(value) else "a finite number"
    # int fields: each config checks them with their range ("an integer >= 1").
    if list in kinds:
        item = _list_item_type(hint)
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value)
        return None if ok else f"a list of {'strings' if item == (str,) else 'numbers'}"
    if str in kinds:
        return None if isinstance(value, str) else "a string"
    return None


def is_integer_at_least(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool, not a string) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_field_types(config: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``config`` whose value has the wrong type."""
    for name, hint in field_types(type(config)).items():  # type: ignore[arg-type]  # classes are hashable
        allowed = type_error(config, name, hint)
        if allowed is not None:
            raise ValueError(f"{type(config).__name__}.{name} must be {allowed}; got {getattr(config, name)!r}")
