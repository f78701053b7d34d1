"""The original Würstchen checkpoint files (dome272/Wuerstchen) → our models.

- `vqgan_f4_v1_500k.pt`: `{'state_dict'}`; the codebook is `vquantizer.codebook.weight`.
- `model_v2_stage_b.pt`: `{'state_dict', 'effnet_state_dict'}` (decoder + semantic compressor).
- `model_v2_stage_c*.pt`: `{'ema_state_dict', ...}` (the EMA weights are the ones to use).
Attention there is `nn.MultiheadAttention`: `attention.attn.in_proj_weight` (q, k, v stacked),
`in_proj_bias`, `out_proj`. All other keys are the same as diffusers'. The files are pickles, so
they are read with `weights_only=True`: plain tensors only, no code runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..models.stage_a import STAGE_A_PRESETS, StageA, StageAConfig
from ..models.stage_b import STAGE_B_PRESETS, StageB, StageBConfig
from ..models.stage_c import STAGE_C_PRESETS, StageC, StageCConfig
from .checkpoint import build_from_state


def read_original(path: str | Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read this checkpoint with weights_only=True ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a dict of state dicts, got {type(data).__name__}")
    return data


def convert_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`attention.attn.in_proj_*` → `attention.to_{q,k,v}.*`; `attention.attn.out_proj` → `to_out.0`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, sep, tail = key.rpartition("attn.")
        if sep and tail in ("in_proj_weight", "in_proj_bias"):
            kind = tail.removeprefix("in_proj_")
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"{head}{name}.{kind}"] = part
        elif sep and tail.startswith("out_proj."):
            out[f"{head}to_out.0.{tail.removeprefix('out_proj.')}"] = value
        else:
            out[key] = value
    return out


def convert_stage_a_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VQGAN's codebook `vquantizer.codebook.weight` (torchtools' VectorQuantize, in the original
    v2 file and Stable Cascade's `stage_a.safetensors`) → `vquantizer.embedding.weight`; the other
    keys are already diffusers' (`PaellaVQModel`) and ours."""
    out = dict(state)
    if "vquantizer.codebook.weight" in out:
        out["vquantizer.embedding.weight"] = out.pop("vquantizer.codebook.weight")
    return out


def _pick(data: dict, keys: tuple[str, ...], path: str | Path) -> dict[str, torch.Tensor]:
    for key in keys:
        if key in data and isinstance(data[key], dict):
            return data[key]
    if all(isinstance(v, torch.Tensor) for v in data.values()):
        return data  # a bare state dict
    raise UserError(f"{path}: none of {list(keys)} in this checkpoint (has {sorted(data)[:6]})")


def load_original_stage_c(
    path: str | Path, config: StageCConfig = STAGE_C_PRESETS["official-v2"], dtype: torch.dtype | None = None
) -> StageC:
    state = _pick(read_original(path), ("ema_state_dict", "state_dict"), path)
    return build_from_state(StageC, config, convert_attention_keys(state), str(path), dtype)


def load_original_stage_b(
    path: str | Path, config: StageBConfig = STAGE_B_PRESETS["official-v2"], dtype: torch.dtype | None = None
) -> tuple[StageB, dict[str, torch.Tensor] | None]:
    """→ (decoder, the semantic compressor's state dict if the file carries one)."""
    data = read_original(path)
    state = _pick(data, ("ema_state_dict", "state_dict"), path)
    decoder = build_from_state(StageB, config, convert_attention_keys(state), str(path), dtype)
    return decoder, data.get("effnet_state_dict")


def load_original_stage_a(
    path: str | Path, config: StageAConfig = STAGE_A_PRESETS["official-v2"], dtype: torch.dtype | None = None
) -> StageA:
    state = convert_stage_a_keys(_pick(read_original(path), ("state_dict",), path))
    return build_from_state(StageA, config, state, str(path), dtype)


def convert_original_files(
    out: str | Path,
    stage_a: str | Path,
    stage_b: str | Path,
    stage_c: str | Path,
    prior_text_encoder: str | Path,
    text_encoder: str | Path,
    preset: str = "official-v2",
    dtype: torch.dtype | None = None,
) -> Path:
    """Original `.pt` files + CLIP text models (folders or hub ids) → a combined diffusers folder."""
    from ..pipeline import WuerstchenPipeline
    from .folders import load_text_encoder, load_tokenizer, resolve_folder

    for presets in (STAGE_A_PRESETS, STAGE_B_PRESETS, STAGE_C_PRESETS):
        if preset not in presets:
            raise UserError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    decoder, effnet_state = load_original_stage_b(stage_b, STAGE_B_PRESETS[preset], dtype)
    semantic = None
    if effnet_state is not None:
        from ..models.semantic import SEMANTIC_PRESETS, SemanticCompressor

        semantic = build_from_state(SemanticCompressor, SEMANTIC_PRESETS[preset], effnet_state, f"{stage_b}", dtype)
    prior_text = resolve_folder(prior_text_encoder)
    decoder_text = resolve_folder(text_encoder)
    pipe = WuerstchenPipeline(
        prior=load_original_stage_c(stage_c, STAGE_C_PRESETS[preset], dtype),
        prior_text_encoder=load_text_encoder(prior_text, None, dtype),
        prior_tokenizer=load_tokenizer(prior_text, None),
        decoder=decoder,
        text_encoder=load_text_encoder(decoder_text, None, dtype),
        tokenizer=load_tokenizer(decoder_text, None),
        vqgan=load_original_stage_a(stage_a, STAGE_A_PRESETS[preset], dtype),
        semantic=semantic,
    )
    pipe.save_pretrained(out)
    return Path(out)
