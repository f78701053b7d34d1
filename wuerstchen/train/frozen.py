"""The frozen parts of training: what a task reads but does not train, loaded in one place.

    parts = load_frozen_parts(cfg, device, trains="prior", text=("prior_", ""), semantic=True)
    parts.text_encoder, parts.semantic, parts.settings, parts.others["decoder"]

Each part comes from its own option first (`--text-encoder FOLDER | random:WIDTH`, `--semantic FOLDER
| PRESET`), then from `--init-from`, then from `--pipeline`. The settings (how the stages fit
together) are `--pipeline`'s, else `--init-from`'s, else the defaults at `--image-size`, with
`--settings` over them. The component a task trains is taken out of `--init-from` as `init_model`
and is never one of the frozen parts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io.checkpoint import load_model
from ..models.semantic import SEMANTIC_PRESETS, SemanticCompressor
from ..models.stage_a import StageA
from ..pipeline import PipelineSettings, WuerstchenPipeline
from .config import DiffusionTrainConfig, TrainConfig

# The pipeline components the sources can supply (for the pipelines a task samples with and exports).
PIPELINE_PARTS = ("prior", "prior_text_encoder", "prior_tokenizer", "decoder", "text_encoder", "tokenizer", "vqgan",
                  "semantic", "image_encoder", "feature_extractor")  # fmt: skip
# What an official Stable Cascade single file must hold to give the component a task trains.
_FILE_KINDS = {"prior": "stage_c", "decoder": "stage_b"}


@dataclasses.dataclass(frozen=True)
class FrozenParts:
    """What `load_frozen_parts` found. The networks asked for are on the device, in eval mode, frozen."""

    settings: PipelineSettings
    init_model: nn.Module | None = None  # the trained component's weights in --init-from, to fine-tune
    others: dict[str, Any] = dataclasses.field(default_factory=dict)  # the sources' components (PIPELINE_PARTS)
    tokenizer: Any = None
    text_encoder: nn.Module | None = None
    semantic: SemanticCompressor | None = None
    semantic_shipped: bool = False  # the compressor came with weights (a folder), not from a random preset
    vqgan: StageA | None = None


def load_frozen_parts(
    cfg: TrainConfig,
    device: torch.device,
    trains: str,
    *,
    text: tuple[str, ...] = (),
    semantic: bool = False,
    vqgan: bool = False,
) -> FrozenParts:
    """Load the sources (--init-from, --pipeline) and the parts a task needs: a tokenizer and text
    encoder (`text`: the pipeline prefixes to take them from, in order; none: not needed), the
    semantic compressor, the VQGAN. `trains` is the pipeline attribute the task trains (prior,
    decoder, vqgan). A part that is needed and found nowhere is a UserError."""
    single_file = bool(cfg.init_from) and Path(cfg.init_from).is_file()
    init_pipe = WuerstchenPipeline.from_pretrained(cfg.init_from) if cfg.init_from and not single_file else None
    parts_pipe = WuerstchenPipeline.from_pretrained(cfg.pipeline) if cfg.pipeline else None
    source = parts_pipe or init_pipe
    settings = source.settings if source else PipelineSettings(default_size=cfg.image_size)
    init_model = getattr(init_pipe, trains) if init_pipe else None  # ours to train, not a frozen part
    if single_file:
        init_model = _from_single_file(Path(cfg.init_from), trains)
    others: dict[str, Any] = {}
    for pipe in (parts_pipe, init_pipe):  # --init-from's parts win over --pipeline's
        if pipe is not None:
            others |= {n: m for n in PIPELINE_PARTS if (m := getattr(pipe, n)) is not None and m is not init_model}
    # The order matters: random:WIDTH and a semantic preset reseed the global RNG, whose state after
    # loading decides a from-scratch model's initial weights.
    tokenizer = encoder = frozen_vqgan = compressor = None
    shipped = False
    if text:
        tokenizer, encoder = _load_text(cfg, others, text)  # type: ignore[arg-type]
        encoder = encoder.to(device).eval().requires_grad_(False)
    if vqgan:
        if others.get("vqgan") is None:
            raise UserError(f"Stage {cfg.stage.upper()} trains on the VQGAN's latents: give --init-from/--pipeline "
                            "with a vqgan/")  # fmt: skip
        frozen_vqgan = others["vqgan"].to(device).eval().requires_grad_(False)
    if semantic:
        compressor, shipped = _load_semantic(cfg, others.get("semantic"), device)  # type: ignore[arg-type]
    return FrozenParts(
        dataclasses.replace(settings, **(cfg.settings or {})), init_model, others, tokenizer=tokenizer,
        text_encoder=encoder, semantic=compressor, semantic_shipped=shipped, vqgan=frozen_vqgan,
    )  # fmt: skip


def _from_single_file(path: Path, trains: str) -> nn.Module:
    """The trained component from an official Stable Cascade file (or a ComfyUI bundle holding it)."""
    from ..io.cascade_files import load_official_file

    kind = _FILE_KINDS.get(trains)
    if kind is None:
        raise UserError(f"--init-from {path}: a single file gives a Stable Cascade prior or decoder, not a {trains}")
    found = load_official_file(path)
    found = next((p for p in found.parts.values() if p.kind == kind), found)
    if found.kind != kind:
        raise UserError(f"--init-from {path} holds {found.describe()}, not {kind.replace('_', ' ')}: pick the "
                        f"{kind}*.safetensors file (frozen parts come from --pipeline)")  # fmt: skip
    return found.model(torch.float32)


def _load_text(cfg: DiffusionTrainConfig, others: dict[str, Any], prefixes: tuple[str, ...]) -> tuple[Any, nn.Module]:
    """Tokenizer and text model: --text-encoder, else the sources' under the first prefix that has both."""
    spec = cfg.text_encoder
    if spec and spec.startswith("random:"):
        return _random_text(spec)
    if spec:
        return _text_from_folder(Path(spec), prefixes)
    for prefix in prefixes:
        tokenizer, encoder = others.get(f"{prefix}tokenizer"), others.get(f"{prefix}text_encoder")
        if encoder is not None and tokenizer is not None:
            return tokenizer, encoder
    raise UserError(
        f"Stage {cfg.stage.upper()} needs a text encoder: give --init-from/--pipeline PIPELINE or "
        "--text-encoder FOLDER (random:WIDTH for a smoke test)"
    )


def _random_text(spec: str) -> tuple[Any, nn.Module]:
    from ..testing import char_tokenizer, clip_text_model

    try:
        width = int(spec.split(":", 1)[1])
    except ValueError:
        raise UserError(f"--text-encoder {spec!r}: expected random:WIDTH, e.g. random:32") from None
    return char_tokenizer(), clip_text_model(0, width=width, heads=2 if width % 2 == 0 else 1)


def _text_from_folder(folder: Path, prefixes: tuple[str, ...]) -> tuple[Any, nn.Module]:
    """A pipeline folder (its `{prefix}text_encoder/`), a folder with `text_encoder/` + `tokenizer/`,
    or a CLIP text model folder that holds its tokenizer files too."""
    from ..io.folders import load_text_encoder, load_tokenizer

    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist")
    for prefix in prefixes:
        if (folder / f"{prefix}text_encoder").is_dir():
            model_dir, tok_dir = folder / f"{prefix}text_encoder", folder / f"{prefix}tokenizer"
            break
    else:
        model_dir = tok_dir = folder
    if not tok_dir.is_dir():
        tok_dir = model_dir
    return load_tokenizer(tok_dir, None), load_text_encoder(model_dir, None, None)


def _load_semantic(
    cfg: DiffusionTrainConfig, from_sources: SemanticCompressor | None, device: torch.device
) -> tuple[SemanticCompressor, bool]:
    """The semantic compressor (--semantic, else the sources') and whether it came with weights."""
    spec = cfg.semantic
    if spec in SEMANTIC_PRESETS:
        torch.manual_seed(cfg.seed + 1)
        return SemanticCompressor(SEMANTIC_PRESETS[spec]).eval().requires_grad_(False).to(device), False
    if spec:
        folder = Path(spec)
        if (folder / "semantic").is_dir():
            folder = folder / "semantic"
        if not folder.is_dir():
            raise FileNotFoundError(f"--semantic {spec}: no such preset ({', '.join(SEMANTIC_PRESETS)}) or folder")
        return load_model(SemanticCompressor, folder).to(device), True
    if from_sources is None:
        raise UserError(
            f"Stage {cfg.stage.upper()} needs the semantic compressor: give --semantic FOLDER (e.g. converted "
            "from the official checkpoint), a pipeline folder with semantic/, or a preset for a smoke test"
        )
    return from_sources.to(device).eval().requires_grad_(False), True
