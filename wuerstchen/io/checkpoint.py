"""One model ↔ one diffusers-format folder: `config.json` + `diffusion_pytorch_model.safetensors`.

Models are built on the meta device and filled straight from the memory-mapped safetensors file
(`assign=True`), so loading makes no second copy. Loading is strict: a missing, unexpected or
mis-shaped tensor is an error that names it. Writes go to a temporary file that is renamed into
place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..models.config import config_from_dict, config_to_dict, read_json
from ..quant import CONFIG_KEY as QUANT_KEY
from ..quant import MODES, cast_state, quantize_model

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(data: dict[str, Any], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (memory-mapped); a truncated or corrupt file is a clear error, and
    only a regular file is read (a FIFO would block forever)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: not a regular file" if Path(path).exists() else f"{path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"{path}: cannot read the safetensors file ({e}); it may be truncated or corrupt") from e


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(expected, state, source, type(model).__name__)


def check_shapes(
    expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], source: str, target: str, hint: str = ""
) -> None:
    """`check_state_dict` against a table of key → shape (a model not built); `hint` ends the message."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if missing:
        problems.append(f"missing {missing[:8]}{' …' if len(missing) > 8 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''} ({len(unexpected)})")
    if shapes:
        problems.append(f"wrong shape: {shapes[:8]}")
    if problems:
        raise UserError(f"{source}: weights do not fit {target}: " + "; ".join(problems) + hint)


def build_from_state(
    cls: type[nn.Module],
    config: Any,
    state: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantization: str | None = None,
) -> nn.Module:
    """Build `cls(config)` on the meta device and assign the tensors (cast to `dtype`) into it;
    `quantization` (a saved int8 model's mode): with its int8 layers (`wuerstchen.quant`)."""
    with torch.device("meta"):
        model = cls(config)
        if quantization is not None:
            quantize_model(model, quantization)
    check_state_dict(model, state, source)
    if dtype is not None:
        state = cast_state(state, dtype)
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_model(model: nn.Module, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    config = config_to_dict(model.config, model.diffusers_class)
    if getattr(model, "quantization", None):
        config[QUANT_KEY] = model.quantization
    write_json(config, folder / CONFIG_NAME)


def _read_state(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    single, index = folder / WEIGHTS_NAME, folder / f"{WEIGHTS_NAME}.index.json"
    if variant is not None:  # diffusers' names: diffusion_pytorch_model.bf16.safetensors (+ .index.bf16.json)
        v_single = folder / WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")
        v_index = folder / f"{WEIGHTS_NAME}.index.{variant}.json"
        if v_single.exists() or v_index.exists():
            single, index = v_single, v_index
        else:  # as diffusers: a component without that variant loads its plain files
            logger.info("%s has no %s files; loading %s", folder, variant, WEIGHTS_NAME)
    if single.exists():
        return load_tensors(single)
    if index.exists():  # sharded: {"weight_map": {key: file}}
        state: dict[str, torch.Tensor] = {}
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: no weight_map of tensor names to file names")
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # a file beside the index, never a path elsewhere
                raise UserError(f"{index}: shard {shard!r} is not a file name in {folder}")
            state.update(load_tensors(folder / shard))
        return state
    legacy = folder / "diffusion_pytorch_model.bin"
    if legacy.exists():  # old diffusers folders; a pickle, so only plain tensors are allowed
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (nor a sharded index or .bin) in this folder")


def load_model(
    cls: type[nn.Module],
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
) -> nn.Module:
    """Load a diffusers-format model folder into our class `cls` (StageA/B/C, CascadeUNet)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; expected a diffusers-format model folder")
    data = read_json(folder / CONFIG_NAME)
    name = data.get("_class_name")
    if name not in (None, cls.diffusers_class, cls.__name__):
        raise UserError(f"{folder}: holds a {name}, expected a {cls.diffusers_class}")
    config = config_from_dict(cls.config_class, data, source=str(folder / CONFIG_NAME))
    mode = data.get(QUANT_KEY)
    if mode is not None and mode not in MODES:
        raise UserError(f"{folder / CONFIG_NAME}: unknown {QUANT_KEY} {mode!r} (one of: {', '.join(MODES)})")
    return build_from_state(cls, config, _read_state(folder, variant), str(folder), dtype, device, mode)
