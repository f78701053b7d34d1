"""Model configs ↔ JSON, in the `config.json` format of diffusers' model folders.

Each stage's config is a frozen dataclass whose field names are diffusers' constructor arguments,
so a folder written here loads in diffusers' classes and the reverse.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from ..errors import UserError

T = TypeVar("T")


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
    fields = {f.name for f in dataclasses.fields(cls)}
    body = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(body) - fields)
    if unknown:
        raise UserError(f"{source}: unknown {cls.__name__} field(s) {unknown}; is this the right model folder?")
    return cls(**{k: _freeze(v) for k, v in body.items()})


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
