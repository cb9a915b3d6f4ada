"""Which fields of a config.json a model class cannot take, for the errors that name them.

A config is never refused by these checks alone: real configs give lists where a signature says
``int`` (SD2's ``attention_head_dim``), zero counts, and fields newer than the installed library. They
run once building the model from the config has failed, or the model built from it does not fit its
weights, to say which field is at fault instead of leaving the user with torch's message.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ._model import family_of, init_config

_EMPTY = inspect.Parameter.empty

F = TypeVar("F", bound=Callable[..., list[str]])


def _diagnosis(function: F) -> F:
    """These run while an error is being raised: a failure of theirs must not replace that error."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> list[str]:
        try:
            return function(*args, **kwargs)
        except Exception:
            return []

    return guarded  # type: ignore[return-value]


@dataclass(frozen=True)
class _Field:
    name: str
    annotation: Any  # the resolved type, or _EMPTY when the signature gives none that resolves
    spelling: str  # the type as the signature writes it ("" without one)
    default: Any


@dataclass(frozen=True)
class _Signature:
    owner: str  # what takes the fields: the model class, or a transformers model's config class
    fields: dict[str, _Field]
    takes_any_field: bool  # **kwargs, or a builder that ignores unknown fields (diffusers' from_config)


def _signature(model_cls: type[torch.nn.Module]) -> _Signature | None:
    family = family_of(model_cls)
    target: Any = model_cls
    if family.name == "transformers":
        target = getattr(model_cls, "config_class", None)
        if target is None:
            return None
    init = target.__init__
    try:
        signature = inspect.signature(init)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # a forward reference the class's module cannot resolve: judge by defaults only
        hints = {}
    fields: dict[str, _Field] = {}
    takes_any = family.name == "diffusers"
    for index, p in enumerate(signature.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            takes_any = True
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or (index == 0 and p.name == "self"):
            continue
        spelling = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        spelling = "" if p.annotation is _EMPTY else spelling
        fields[p.name] = _Field(p.name, hints.get(p.name, _EMPTY), spelling, p.default)
    return _Signature(target.__name__, fields, takes_any)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a JSON ``value`` can be what ``annotation`` asks for; True for types JSON cannot hold."""
    if annotation is _EMPTY or annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation is None or annotation is type(None):
        return value is None
    if annotation in (int, bool):
        return isinstance(value, int)  # JSON true is 1, and 0/1 for a flag is common
    if annotation is float:
        return isinstance(value, (int, float))
    if annotation is str:
        return isinstance(value, str)
    sequence_types = (list, tuple, collections.abc.Sequence, typing.List, typing.Tuple)  # noqa: UP006
    if annotation in sequence_types or origin in sequence_types:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(args[0], v) for v in value)
        if origin is tuple and args:
            return len(args) != len(value) or all(map(_accepts, args, value))
        return not args or all(_accepts(args[0], v) for v in value)
    if annotation in (dict, Mapping, collections.abc.Mapping) or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _json(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=True)  # checkpoint text: escapes reach no terminal raw
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shown(value: Any) -> str:
    """``value`` as config.json spells it, with its kind where the spelling does not say it."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a floating-point number", str: "a string"}
    kinds.update({list: "a list", tuple: "a list", dict: "an object"})
    return f"{_json(value)} ({kinds.get(type(value), type(value).__name__)})"


def _is_size(default: Any) -> bool:
    return type(default) is int and default > 0


def _default(field: _Field) -> str:
    return "" if field.default is _EMPTY else f", default {_json(field.default)}"


def _fields(
    model_cls: type[torch.nn.Module], config: Mapping[str, Any]
) -> Iterator[tuple[str, Any, _Field | None, _Signature]]:
    """Each field of ``config`` with the constructor argument it fills (``None`` where there is none);
    nothing when the class's signature cannot be read."""
    signature = _signature(model_cls)
    if signature is None:
        return
    for name, value in init_config(config).items():
        yield name, value, signature.fields.get(name), signature


@_diagnosis
def config_faults(
    model_cls: type[torch.nn.Module], config: Mapping[str, Any], *, max_size: int | None = None
) -> list[str]:
    """The fields of ``config`` the class's constructor cannot take, each described: a value of a
    type its annotation (or default) excludes, a non-finite number, a non-positive value where the
    default is a positive integer (a size or count), an integer above ``max_size``, a field the
    constructor has no argument for."""
    faults = []
    for name, value, field, signature in _fields(model_cls, config):
        if field is None:
            if not signature.takes_any_field:
                faults.append(f"{name!r} is not an argument of {signature.owner}")
            continue
        expected = field.annotation
        if expected is _EMPTY and field.default is not _EMPTY and field.default is not None:
            expected = type(field.default)
        spelling = field.spelling or (
            "any value" if expected is _EMPTY else getattr(expected, "__name__", str(expected))
        )
        where = f"{signature.owner} takes {spelling}{_default(field)}"
        if not _accepts(expected, value):
            faults.append(f"{name!r} is {_shown(value)}, where {where}")
        elif isinstance(value, float) and not math.isfinite(value):
            faults.append(f"{name!r} is {_json(value)}, not a finite number ({where})")
        else:
            faults += _size_faults(field, value, signature.owner, max_size)
    return faults


def _size_faults(field: _Field, value: Any, owner: str, max_size: int | None) -> list[str]:
    if type(value) is not int:
        return []
    if _is_size(field.default) and value <= 0:
        return [f"{field.name!r} is {value}, where {owner} takes a positive size, default {field.default}"]
    if max_size is not None and value > max_size:
        return [f"{field.name!r} is {value}, more than the {max_size:,} values its checkpoint can fill"]
    return []


@_diagnosis
def size_faults(model_cls: type[torch.nn.Module], config: Mapping[str, Any]) -> list[str]:
    """The integer fields of ``config`` that are zero or negative where the class's default is a positive
    integer: a model built from them has parts missing or empty, so its weights do not fit it."""
    faults = []
    for _, value, field, signature in _fields(model_cls, config):
        if field is not None:
            faults += _size_faults(field, value, signature.owner, None)
    return faults


@_diagnosis
def differently_typed(model_cls: type[torch.nn.Module], config: Mapping[str, Any]) -> list[str]:
    """The fields of ``config`` whose JSON type differs from their default's (a list for a tuple
    counts as the same): the suspects when no field is plainly wrong."""
    faults = []
    for name, value, field, signature in _fields(model_cls, config):
        if field is None or field.default is _EMPTY or field.default is None:
            continue
        sequences = (list, tuple)
        same = type(value) is type(field.default) or (
            isinstance(value, sequences) and isinstance(field.default, sequences)
        )
        if not same:
            faults.append(
                f"{name!r} is {_shown(value)}, where {signature.owner}'s default is {_shown(field.default)}"
            )
    return faults
