"""Model configs ↔ JSON, in the `config.json` format of diffusers' model folders.

Each stage's config is a frozen dataclass whose field names are diffusers' constructor arguments,
so a folder written here loads in diffusers' classes and the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ..errors import UserError

T = TypeVar("T")

# What a config read from a file may say, before anything is built: every integer within
# MAX_INT (channels, codebook and vocabulary sizes), counts of layers/blocks/levels/heads within
# MAX_COUNT, and nothing below 1 where the field's default is ≥ 1 (a default of -1 marks "none").
MAX_INT = 1 << 17
MAX_COUNT = 512
COUNT_WORDS = ("depth", "blocks", "layers", "levels", "head", "repeat", "stages")
# Floats that divide or scale a size: zero or a negative value cannot mean anything.
POSITIVE = ("resolution_multiple", "latent_dim_scale", "latent_scale", "scale_factor", "norm_eps", "s")
# Probabilities: a dropout of 1 drops everything (allowed, as torch allows it), beyond is no number.
FRACTIONS = ("dropout",)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


def config_to_dict(config: Any, class_name: str) -> dict[str, Any]:
    body = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"_class_name": class_name, "_diffusers_version": "0.42.1", **body}


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a config dict; keys starting with `_` are metadata and ignored.

    An unknown key is an error (it would mean a model we would build wrongly); a missing key takes
    the dataclass default, which is diffusers' default for that argument.
    """
    if not isinstance(data, dict):
        raise UserError(f"{source}: a config must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    body = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown {cls.__name__} field(s) {unknown}; is this the right model folder?")
    hints = typing.get_type_hints(cls)
    for name, value in body.items():
        check_field(name, _freeze(value), hints[name], fields[name].default, f"{source}: {cls.__name__}")
    try:
        return cls(**{k: _freeze(v) for k, v in body.items()})
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _conforms(value: Any, tp: Any) -> bool:
    """Whether a JSON value (lists frozen to tuples) has the annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple) or len(value) > MAX_COUNT:
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
    return isinstance(value, tp) if isinstance(tp, type) else True


def _mentions_int(tp: Any) -> bool:
    return tp is int or any(_mentions_int(a) for a in typing.get_args(tp) if a is not Ellipsis)


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    return [i for v in value for i in _ints(v)] if isinstance(value, tuple) else []


def _type_name(tp: Any) -> str:
    """`int`, `float or None`, `a list of int`: the annotation in a config writer's words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        inner = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        return f"a list of {' / '.join(dict.fromkeys(_type_name(a) for a in inner))}"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [value]
    return [n for v in value for n in _numbers(v)] if isinstance(value, tuple) else []


def check_field(name: str, value: Any, tp: Any, default: Any, where: str) -> None:
    """One field of a config from a file: its type, its integers' range, its sign (see MAX_INT)."""
    if not _conforms(value, tp):
        shown = repr(value)[:60]
        raise UserError(f"{where}.{name} = {shown}: expected {_type_name(tp)}; fix the config")
    if name in POSITIVE and isinstance(value, int | float) and not 0 < value <= MAX_INT:
        raise UserError(f"{where}.{name} = {value} must be > 0 (and at most {MAX_INT})")
    if any(w in name for w in FRACTIONS) and not all(0 <= v <= 1 for v in _numbers(value)):
        raise UserError(f"{where}.{name} = {repr(value)[:60]}: a dropout is from 0 to 1")
    if not _mentions_int(tp):  # a float written as 0 in JSON is not an integer field
        return
    ints, defaults = _ints(value), _ints(default) if default is not dataclasses.MISSING else []
    limit = MAX_COUNT if any(w in name for w in COUNT_WORDS) else MAX_INT
    low = min([0 if limit == MAX_COUNT else 1, *defaults])  # 0 heads or layers: a level without them
    bad = [i for i in ints if not low <= i <= limit]
    if bad:
        raise UserError(f"{where}.{name} = {repr(value)[:60]}: each integer must be from {low} to {limit}")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a regular file (a FIFO or a device would block or never end), with the
    file's name in every error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not a regular file" if path.exists() else f"{path} is missing")
    if path.stat().st_size > 16 << 20:
        raise UserError(f"{path}: {path.stat().st_size} bytes is too large for a config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{path}: not a config (its JSON is nested too deeply to read)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object, not a {type(data).__name__}")
    return data
