"""Configuration as validated data: the base of every stage's config model, YAML loading, and one
way to say what is wrong.

A stage declares its settings as a `ConfigModel` (typed fields, defaults, bounds, `Literal`s for
choices, validators for the rules between fields) and builds it once at its entry point with
`validate`. Whatever pydantic finds is reported as one line, "<file>: <path>: <what is wrong>":

    job.yaml: captioners[0].scheduling: must be one of ['spread', 'pack'], got 'packed'
    config c.yaml: data.shufle_buffer: unknown key (known here: shards, text_ids, ...) (did you mean 'shuffle_buffer'?)
    --image-size: must be at least 8, got 4          (a model whose keys are command-line flags)

Rules between fields raise ValueError in a validator; a validator of the whole model names in its
message the keys it relates ("loss.mode: 'o2o' needs ..."), since no single path is to blame.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration the user can fix; the message names the file and the key."""


class ConfigModel(BaseModel):
    # strict: "8" is not 8 and true is not 1 (a quoted number in YAML is a mistake to report, not
    # to guess at); forbid: a misspelt key is an error, not a silent default; frozen: loaded once
    # and passed down, never edited on the way.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _as_tuple(value: Any) -> Any:
    # YAML has lists, not tuples; a single string stands for a list of one (`shards: data/x`).
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


Strings = Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]
Numbers = Annotated[tuple[float, ...], BeforeValidator(_as_tuple)]

Model = TypeVar("Model", bound=BaseModel)


def read_yaml(path: Path, source: str) -> dict[str, Any]:
    """The mapping at the top of a YAML file (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: cannot read it (config file not found)") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: cannot read it (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {_short(data)}")
    return data


def validate(model: type[Model], data: Any, source: str | None = None, *, context: dict[str, Any] | None = None,
             error: type[Exception] = ConfigError) -> Model:
    """`model` built from `data`; a problem raises `error` with the message of `explain`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise error(explain(e, model, source)) from None


def explain(error: ValidationError, model: type[BaseModel], source: str | None = None) -> str:
    """The first problem pydantic found, as "<source>: <path>: <what is wrong>".

    One line, not pydantic's report: the user fixes the first problem, then sees the next.
    """
    e = error.errors()[0]
    path, container, field = _walk(model, e["loc"])
    return ": ".join(part for part in (source, path, _what(e, container, field)) if part)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the formatter's parts ----------------------------------------------------------------------
_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping",
             "model_type": "a mapping", "list_type": "a list", "tuple_type": "a list"}
_BOUNDS = {"greater_than": ("gt", "> "), "greater_than_equal": ("ge", "at least "),
           "less_than": ("lt", "< "), "less_than_equal": ("le", "at most ")}


def _walk(model: type[BaseModel], loc: tuple) -> tuple[str, Any, Any]:
    """The path as the user writes it, and the types of the last key's container and field."""
    path, container, field = "", None, model
    for part in loc:
        if part == "[key]":  # a mapping's key failed its own check: the key is what is wrong
            field = typing.get_args(_bare(container))[0]
            continue
        if _is_union(_bare(field)) and isinstance(part, str):
            continue  # pydantic names the member of a union it tried; the user wrote none
        container, (part, field) = field, _member(field, part)
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path, container, field


def _member(tp: Any, part: str | int) -> tuple[str | int, Any]:
    """The name the user writes for `part` of `tp` (a field's alias: a flag, say), and its type."""
    tp = _bare(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, f in tp.model_fields.items():
            if part in (name, f.alias):
                return f.alias or name, f.annotation
        return part, None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) and args:
        return part, args[0]
    if origin is dict and args:
        return part, args[1]
    return part, None


def _bare(tp: Any) -> Any:
    """The type without Annotated metadata and without `| None`."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif _is_optional(tp):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_optional(tp: Any) -> bool:
    args = typing.get_args(tp)
    return _is_union(tp) and type(None) in args and len(args) == 2


def _what(e: dict[str, Any], container: Any, field: Any) -> str:
    kind, ctx, got = e["type"], e.get("ctx", {}), _short(e.get("input"))
    or_null = " or null" if _is_optional(field) else ""
    if kind == "missing":
        return "missing (required)"
    if kind == "extra_forbidden":
        tp = _bare(container)
        known = [f.alias or name for name, f in tp.model_fields.items()] if isinstance(tp, type) else []
        return _unknown_key(str(e["loc"][-1]), known)
    if kind == "literal_error":
        allowed = list(typing.get_args(_bare(field)))
        if e["loc"][-1] == "[key]":
            return _unknown_key(str(e["input"]), [str(a) for a in allowed])
        return f"must be one of {allowed}, got {got}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # "at least 1", not "at least 1.0", for a float field too
        return f"must be {words}{bound}{or_null}, got {got}"
    if kind == "too_short":
        n = ctx["min_length"]
        return "must not be empty" if n == 1 else f"must have at least {n} items, got {got}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}{or_null}, got {got}"
    return f"{e['msg']}, got {got}"


def _unknown_key(key: str, known: list[str]) -> str:
    return f"unknown key (known here: {', '.join(known)}){did_you_mean(key, known)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
