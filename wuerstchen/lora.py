"""LoRA on the prior's (Stage C's) attention, through `peft`, in the file format diffusers uses.

Training (the shared loop calls exactly this)::

    from wuerstchen.lora import apply_lora, save_lora

    apply_lora(pipe.prior, rank=8)  # peft LoRA on to_q/to_k/to_v/to_out.0; everything else frozen
    optimizer = torch.optim.AdamW([p for p in pipe.prior.parameters() if p.requires_grad], lr=1e-4)
    ...
    save_lora(pipe.prior, "out/my-style.safetensors", metadata={"steps": 1000})

Inference::

    from wuerstchen.lora import load_lora_weights, set_lora_scale, unload_lora

    load_lora_weights(pipe, "out/my-style.safetensors", scale=0.8)
    set_lora_scale(pipe, 0.5)  # change the strength without reloading
    unload_lora(pipe)  # the prior is exactly the base model again

**File format.** One safetensors file; keys are `prior.<module path>.lora_A.weight` (rank × in) and
`prior.<module path>.lora_B.weight` (out × rank), e.g. `prior.blocks.2.attention.to_q.lora_A.weight`.
That is what diffusers' `WuerstchenPriorPipeline.save_lora_weights` writes (its `unet_name` is
"prior", and peft names the factors `lora_A`/`lora_B` without the adapter name), and our module
paths are those of diffusers' `WuerstchenPrior`, so files go both ways between the two libraries.
The header metadata holds `format: pt` and, under diffusers' key `lora_adapter_metadata`, a JSON of
the `LoraConfig` fields that matter (`prior.r`, `prior.lora_alpha`, `prior.target_modules`, ...);
caller metadata is stored beside them as plain strings. A folder path means the file
`pytorch_lora_weights.safetensors` inside it (diffusers' name).

**Other tools' files** (Stable Cascade's prior): ComfyUI's and kohya-style trainers' keys
`lora_prior_unet_<module path, dots as _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, over
the official module names (`….attention.attn.to_q`, `….attention.attn.out_proj`; ComfyUI's
`comfy/lora.py` maps them so), are read as the same A/B factors with their per-layer alpha.
Layers that are not Linear (convolutions) or keys that name no layer are an error naming them.

**Inference semantics.** Adapters are never merged into the base weights: each targeted Linear
computes `W·x + scale·(alpha/r)·B·A·x` (alpha/√r with rsLoRA), so `unload_lora` gives back the very
same base modules and tensors. An adapter at scale 0 is deactivated, not multiplied by zero, so
its output is the base model's bit for bit. Several adapters can be loaded under different names;
their updates add up.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .errors import UserError
from .io.checkpoint import load_tensors, save_tensors

if TYPE_CHECKING:
    from .pipeline import WuerstchenPipeline

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RESBLOCK_TARGETS = ("channelwise.0", "channelwise.4")  # the two Linears of every ResBlock's MLP
TARGET_SETS = {"attention": DEFAULT_TARGETS, "attention+resblock": DEFAULT_TARGETS + RESBLOCK_TARGETS}
COMFY_PREFIX = "lora_prior_unet_"  # ComfyUI's (comfy/lora.py `model_lora_keys_unet`) Stable Cascade prior keys
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name inside a LoRA folder
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the LoraConfig JSON
PREFIX = "prior"  # the component name in the keys (diffusers' WuerstchenPriorPipeline.unet_name)
TRAIN_ADAPTER = "default"  # the adapter `apply_lora` creates and `save_lora` writes (peft's default)
_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<factor>[AB])\.weight")
_KOHYA = re.compile(r"lora_prior_unet_(?P<name>\w+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
# The LoraConfig fields written to (and read from) the header: those that change what the weights mean.
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern")


def _peft() -> Any:
    try:
        import peft  # imported on use: it is an optional dependency and takes seconds to import
    except ImportError as e:
        raise ImportError("LoRA needs the `peft` package: pip install peft (or wuerstchen[train])") from e
    return peft


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adapters(model: nn.Module) -> dict[str, Any]:
    return getattr(model, "peft_config", {})


def _refresh(model: nn.Module) -> None:
    """Activate, in every LoRA layer, exactly the adapters whose scale is not 0, and freeze them
    (inference). peft's `set_adapter` would make them trainable, so grads are turned off after."""
    for _, layer in _lora_layers(model):
        layer.set_adapter([name for name in layer.lora_A if layer.scaling[name] != 0])
        for factors in (layer.lora_A, layer.lora_B):
            factors.requires_grad_(False)


# ----------------------------------------------------------------------------- training


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> nn.Module:
    """Wrap the Linear layers named by `targets` (suffixes of module paths, peft's
    `target_modules`) with trainable peft LoRA layers, in place, and freeze everything else.

    `alpha` defaults to `rank` (an update scale alpha/r of 1). B starts at zero, so the model's
    outputs are unchanged until the first optimizer step. The model keeps its class, forward and
    attributes (`model.config`, `model.condition(...)`); only the targeted modules are replaced.
    Returns `model`. Example: `apply_lora(pipe.prior, rank=8)`.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be an integer ≥ 1, got {rank!r}")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    peft = _peft()
    if _adapters(model):
        raise UserError(
            f"{type(model).__name__} already has LoRA adapters {sorted(_adapters(model))}: remove them first "
            "(wuerstchen.lora.remove_lora)"
        )
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        init_lora_weights=True,  # A: Kaiming-uniform, B: zeros (so B·A = 0 at the start)
    )
    peft.inject_adapter_in_model(config, model, adapter_name=TRAIN_ADAPTER)
    model.requires_grad_(False)
    for _, layer in _lora_layers(model):
        layer.lora_A[TRAIN_ADAPTER].requires_grad_(True)
        layer.lora_B[TRAIN_ADAPTER].requires_grad_(True)
    model.train(model.training)  # peft's new modules start in train mode whatever the model's mode
    return model


def lora_state_dict(model: nn.Module, prefix: str = PREFIX) -> dict[str, Tensor]:
    """The trained LoRA factors under the file's keys (`prior.<path>.lora_{A,B}.weight`), as
    detached copies, so a checkpoint taken mid-training is not changed by the next step."""
    if TRAIN_ADAPTER not in _adapters(model):
        raise UserError(f"{type(model).__name__} has no LoRA adapter to save: call apply_lora first")
    state = _peft().get_peft_model_state_dict(model, adapter_name=TRAIN_ADAPTER)
    return {f"{prefix}.{k}": v.detach().clone() for k, v in state.items()}


def save_lora(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None, prefix: str = PREFIX) -> Path:
    """Write the LoRA of `model` (see `apply_lora`) to a safetensors file, atomically, with its
    rank/alpha/targets in the header; `metadata` is stored beside them (non-strings as JSON).
    `path` may be an existing folder (the file is then `pytorch_lora_weights.safetensors` in it).
    Returns the file written. Example: `save_lora(pipe.prior, "style.safetensors", {"steps": 500})`.
    """
    state = lora_state_dict(model, prefix)
    config = _adapters(model)[TRAIN_ADAPTER]
    summary = {f"{prefix}.{field}": getattr(config, field) for field in _CONFIG_FIELDS}
    targets = summary[f"{prefix}.target_modules"]
    summary[f"{prefix}.target_modules"] = targets if isinstance(targets, str) else sorted(targets)
    header = {"format": "pt", METADATA_KEY: json.dumps(summary, sort_keys=True)}
    for key, value in (metadata or {}).items():
        if key in header:
            raise UserError(f"metadata key {key!r} is reserved for the LoRA file format")
        header[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    save_tensors(state, path, metadata=header)
    return path


def remove_lora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one adapter (or, with None, all): a layer left with no adapter is replaced by the
    very base Linear it wrapped, so the model is exactly the one before `apply_lora`/loading
    (the `requires_grad` flags that `apply_lora` turned off stay off). Remaining adapters are
    left frozen."""
    if adapter_name is not None and adapter_name not in _adapters(model):
        raise UserError(f"no LoRA adapter {adapter_name!r} is loaded (loaded: {sorted(_adapters(model))})")
    for name, layer in _lora_layers(model):
        if adapter_name is None or set(layer.lora_A) <= {adapter_name}:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
        elif adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
    configs = _adapters(model)
    for name in [adapter_name] if adapter_name is not None else list(configs):
        configs.pop(name, None)
    if not configs and hasattr(model, "peft_config"):
        del model.peft_config
    _refresh(model)
    return model


# ----------------------------------------------------------------------------- inference


def _lora_file(path: str | Path) -> Path:
    path = Path(path)
    return path / LORA_WEIGHTS_NAME if path.is_dir() else path


def _header(path: Path) -> dict[str, Any]:
    """The LoraConfig fields from the header, without their `prior.` prefix ({} when absent)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the `{METADATA_KEY}` header is not valid JSON ({e})") from e
    return {k[len(PREFIX) + 1 :]: v for k, v in data.items() if k.startswith(PREFIX + ".")}


def _check_fit(model: nn.Module, state: dict[str, Tensor], source: str) -> dict[str, int]:
    """Module path → rank for a file that fits `model`; otherwise one error naming every bad key."""
    # Paths of the model's own modules: a LoRA layer's insides (`….to_q.base_layer`) are not targets.
    wrapped = tuple(f"{name}." for name, _ in _lora_layers(model))
    modules = {name: m for name, m in model.named_modules() if not name.startswith(wrapped)}
    linears: dict[str, nn.Linear] = {}
    factors: dict[str, dict[str, Tensor]] = {}
    problems = []
    for key, tensor in sorted(state.items()):
        match = _KEY.fullmatch(key.removeprefix(PREFIX + ".")) if key.startswith(PREFIX + ".") else None
        if match is None:
            problems.append(f"{key} (not a `{PREFIX}.<module>.lora_A/B.weight` key)")
            continue
        path, module = match["path"], modules.get(match["path"])
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, nn.Linear):
            problems.append(f"{key} (the prior has no Linear layer `{path}`)")
            continue
        linears[path] = base
        factors.setdefault(path, {})[match["factor"]] = tensor
    ranks = {}
    for path, pair in factors.items():
        a, b, n_in, n_out = pair.get("A"), pair.get("B"), linears[path].in_features, linears[path].out_features
        if a is None or b is None:
            problems.append(f"{PREFIX}.{path}: lora_{'A' if a is None else 'B'}.weight is missing")
        elif a.dim() == 2 and a.shape[1] == n_in and tuple(b.shape) == (n_out, a.shape[0]):
            ranks[path] = a.shape[0]
        else:
            problems.append(
                f"{PREFIX}.{path}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its Linear {n_in} → {n_out} "
                f"(want A (r, {n_in}) and B ({n_out}, r))"
            )
    if not state:
        problems.append("the file holds no tensors")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … ({len(problems)} problems)" if len(problems) > 8 else "")
        raise UserError(f"{source}: the LoRA weights do not fit this {type(model).__name__}: {shown}")
    return ranks


def _official_path(path: str) -> str:
    """Our (diffusers') module path → the official Stable Cascade one, which ComfyUI's keys follow."""
    return path.replace(".attention.to_out.0", ".attention.attn.out_proj").replace(
        ".attention.to_", ".attention.attn.to_"
    )


def from_kohya(model: nn.Module, state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A `lora_prior_unet_*` file (ComfyUI, kohya-style) → our keys and the header fields its alphas
    make (`lora_alpha`, `alpha_pattern`); a key that names no Linear layer of `model` is an error."""
    names = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names[_official_path(path).replace(".", "_")] = path
            names.setdefault(path.replace(".", "_"), path)
    out, alphas, unknown = {}, {}, []
    for key, tensor in state.items():
        match = _KOHYA.fullmatch(key)
        path = names.get(match["name"]) if match else None
        if path is None:
            unknown.append(key)
        elif match["part"] == "alpha":
            alphas[path] = float(tensor)
        else:
            out[f"{PREFIX}.{path}.lora_{'A' if match['part'].startswith('lora_down') else 'B'}.weight"] = tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" … ({len(unknown)})" if len(unknown) > 8 else "")
        raise UserError(f"{source}: LoRA keys that name no Linear layer of this prior: {shown}")
    suffix = ".lora_A.weight"
    ranks = {k[len(PREFIX) + 1 : -len(suffix)]: t.shape[0] for k, t in out.items() if k.endswith(suffix)}
    alphas = {p: alphas.get(p, float(r)) for p, r in ranks.items()}  # no alpha: alpha = rank (scale 1)
    common = Counter(alphas.values()).most_common(1)[0][0] if alphas else 1.0
    return out, {"lora_alpha": common, "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != common}}


def _config_for(ranks: dict[str, int], header: dict[str, Any], source: str) -> Any:
    """The LoraConfig that rebuilds exactly the file's layers: targets and ranks come from the
    tensors (so a header cannot disagree with them), alpha from the header, else alpha = rank."""
    if header.get("use_dora"):
        raise UserError(f"{source}: DoRA LoRA files are not supported")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # Full module paths as regexes (escaped dots), so each pattern matches its own module only.
    rank_pattern = {re.escape(p): r for p, r in ranks.items() if r != rank}
    if "lora_alpha" in header:
        alpha, alpha_pattern = header["lora_alpha"], header.get("alpha_pattern") or {}
    else:  # no header: alpha = rank, an update scale of 1 (what diffusers assumes too)
        alpha, alpha_pattern = rank, rank_pattern
    return _peft().LoraConfig(
        r=rank,
        lora_alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=bool(header.get("use_rslora", False)),
        target_modules=sorted(ranks),  # exact paths: only the layers that the file holds
        lora_dropout=0.0,  # inference
    )


def load_lora_weights(
    pipe: WuerstchenPipeline, path: str | Path, scale: float = 1.0, adapter_name: str = "default"
) -> None:
    """Load a LoRA file (ours or diffusers') onto `pipe.prior` at strength `scale`.

    The base weights are not touched (see the module docstring): `unload_lora(pipe)` restores
    the base model exactly, and `scale=0` gives the base model's image bit for bit. A file whose
    keys or shapes do not fit the prior is refused with an error naming them, before anything
    changes. Example: `load_lora_weights(pipe, "style.safetensors", scale=0.8)`.
    """
    prior = pipe.prior
    if prior is None:
        raise UserError("this pipeline has no prior (Stage C) to load a LoRA into")
    if adapter_name in _adapters(prior):
        raise UserError(
            f"a LoRA named {adapter_name!r} is already loaded: unload it first (unload_lora(pipe, {adapter_name!r})) "
            "or pass another adapter_name"
        )
    path = _lora_file(path)
    state, header = load_tensors(path), _header(path)
    if any(k.startswith("lora_prior_unet_") for k in state):
        state, header = from_kohya(prior, state, str(path))
    ranks = _check_fit(prior, state, str(path))
    config = _config_for(ranks, header, str(path))
    peft = _peft()
    with warnings.catch_warnings():
        # peft warns whenever a second adapter joins a model; several named adapters are intended here.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        peft.inject_adapter_in_model(config, prior, adapter_name=adapter_name)
    try:
        unprefixed = {k.removeprefix(PREFIX + "."): v for k, v in state.items()}
        result = peft.set_peft_model_state_dict(prior, unprefixed, adapter_name=adapter_name)
        if result.unexpected_keys:  # cannot happen after _check_fit; a guard against peft changes
            raise UserError(f"{path}: peft did not place {result.unexpected_keys[:8]}")
        prior.train(prior.training)  # peft's new modules start in train mode
        set_lora_scale(pipe, scale, adapter_name)
    except BaseException:
        remove_lora(prior, adapter_name)  # leave the pipeline as it was
        raise


def set_lora_scale(pipe: WuerstchenPipeline, scale: float, adapter_name: str = "default") -> None:
    """Set the strength of a loaded LoRA: the update becomes `scale·(alpha/r)·B·A` (0 turns it off)."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise UserError(f"LoRA scale must be a finite number, got {scale!r}")
    prior = pipe.prior
    if prior is None or adapter_name not in _adapters(prior):
        raise UserError(f"no LoRA adapter {adapter_name!r} is loaded on the prior")
    for _, layer in _lora_layers(prior):
        layer.set_scale(adapter_name, scale)  # from the layer's alpha and rank; no-op where absent
    _refresh(prior)


def unload_lora(pipe: WuerstchenPipeline, adapter_name: str | None = None) -> None:
    """Take one LoRA (or, with None, every LoRA) off the prior; without any, the prior is exactly
    the base model again (the same modules and tensors as before loading)."""
    if pipe.prior is not None and (adapter_name is not None or _adapters(pipe.prior)):
        remove_lora(pipe.prior, adapter_name)


# ----------------------------------------------------------------------------- other tools' formats
#
# ComfyUI (comfy/lora.py `model_lora_keys_unet`): for Stable Cascade's prior, every weight
# `diffusion_model.<path>.weight` of its U-Net is addressed as `lora_prior_unet_<path, dots as _>`,
# with kohya's `.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and `.alpha` (update scale
# alpha / r). ComfyUI's own Stable Cascade modules (comfy/ldm/cascade/) name the attention
# `attention.attn.to_q/to_k/to_v/out_proj`, which is where ours differ (`attention.to_q`, `to_out.0`).
#
# The official trainer (Stability-AI/StableCascade `train/train_c_lora.py`, `modules/lora.py`) saves
# an `nn.ModuleDict` {embeddings: ReToken, weights: ModuleList[LoRA]}: keys `weights.<i>.lora_down`
# (r, in) and `weights.<i>.lora_up` (out, r), scale alpha / r with alpha 1, one per parametrized
# tensor of the modules whose names contain a filter (its config: `.attn`), in `generator.modules()`
# order. There each attention's `nn.MultiheadAttention` gets two: its `out_proj.weight` first (the
# out_proj child comes before the `parametrizations` child the LoRA adds), then `in_proj_weight`, q, k
# and v stacked; the attention blocks in module order (down levels, then up levels), as ours.
# `embeddings.*` (new token embeddings for the text encoder) have no place in a prior LoRA.

_COMFY_PATH = re.compile(
    r"(down|up)_blocks_(\d+)_(\d+)_(attention_attn_to_[qkv]|attention_attn_out_proj|channelwise_[04])"
)
_OURS_FROM_COMFY = {"attention_attn_to_q": "attention.to_q", "attention_attn_to_k": "attention.to_k",
                    "attention_attn_to_v": "attention.to_v", "attention_attn_out_proj": "attention.to_out.0",
                    "channelwise_0": "channelwise.0", "channelwise_4": "channelwise.4"}  # fmt: skip


def _alphas(state: dict[str, Tensor], header: dict[str, Any]) -> dict[str, float]:
    """Module path → alpha for our keys: the header's alpha (and alpha_pattern), else the rank."""
    suffix = ".lora_A.weight"
    ranks = {k[len(PREFIX) + 1 : -len(suffix)]: t.shape[0] for k, t in state.items() if k.endswith(suffix)}
    pattern = header.get("alpha_pattern") or {}
    out = {}
    for path, rank in ranks.items():
        hits = [a for p, a in pattern.items() if re.fullmatch(p, path) or re.search(f"(^|\\.){p}$", path)]
        out[path] = float(hits[0] if hits else header.get("lora_alpha", rank))
    return out


def to_comfyui(state: dict[str, Tensor], header: dict[str, Any]) -> dict[str, Tensor]:
    """Our (diffusers/peft) keys `prior.<path>.lora_{A,B}.weight` → ComfyUI's `lora_prior_unet_*`
    `lora_down`/`lora_up`/`alpha` keys (a Stable Cascade prior's paths only)."""
    out: dict[str, Tensor] = {}
    for path, alpha in _alphas(state, header).items():
        name = COMFY_PREFIX + _official_path(path).replace(".", "_")
        out[f"{name}.lora_down.weight"] = state[f"{PREFIX}.{path}.lora_A.weight"].contiguous()
        out[f"{name}.lora_up.weight"] = state[f"{PREFIX}.{path}.lora_B.weight"].contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def from_comfyui(state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """ComfyUI's `lora_prior_unet_*` keys of a Stable Cascade prior → ours and the header fields
    (`lora_alpha`, `alpha_pattern`), without a model: the U-Net's paths are unambiguous."""
    mapped = {}
    for key, tensor in state.items():
        match = _KOHYA.fullmatch(key)
        path = _COMFY_PATH.fullmatch(match["name"]) if match else None
        if path is None:
            raise UserError(f"{source}: {key} is not a Stable Cascade prior LoRA key (lora_prior_unet_<block>_…)")
        level, block, index, layer = path.groups()
        mapped[(f"{level}_blocks.{block}.{index}.{_OURS_FROM_COMFY[layer]}", match["part"])] = tensor
    out, alphas = {}, {}
    for (path, part), tensor in mapped.items():
        if part == "alpha":
            alphas[path] = float(tensor)
        else:
            out[f"{PREFIX}.{path}.lora_{'A' if part.startswith('lora_down') else 'B'}.weight"] = tensor
    return _with_alphas(out, alphas)


def _with_alphas(out: dict[str, Tensor], alphas: dict[str, float]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    suffix = ".lora_A.weight"
    ranks = {k[len(PREFIX) + 1 : -len(suffix)]: t.shape[0] for k, t in out.items() if k.endswith(suffix)}
    alphas = {p: alphas.get(p, float(r)) for p, r in ranks.items()}  # no alpha: alpha = rank (scale 1)
    common = Counter(alphas.values()).most_common(1)[0][0] if alphas else 1.0
    return out, {"lora_alpha": common, "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != common}}


def from_official(model: nn.Module, state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The official trainer's `weights.<i>.lora_down/up` (attention filter `.attn`) → ours, for the
    prior `model` whose attention blocks they follow (module order, see above): out_proj → to_out.0,
    the stacked in_proj → to_q/to_k/to_v with the one shared down factor and thirds of the up factor
    (an exact split: ΔW_q = up[:c]·down, …). alpha 1, as the official LoRA."""
    from .models.blocks import AttnBlock

    attention = [name for name, m in model.named_modules() if isinstance(m, AttnBlock)]
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("weights.")})
    factor = re.compile(r"weights\.\d+\.lora_(down|up)")
    extra = sorted(k for k in state if not factor.fullmatch(k) and not k.startswith("embeddings."))
    if extra or len(indices) != 2 * len(attention) or indices != list(range(len(indices))):
        raise UserError(f"{source}: not an official Stable Cascade attention LoRA for this prior ({len(attention)} "
                        f"attention blocks want weights.0 … weights.{2 * len(attention) - 1}; found "
                        f"{len(indices)} layers{', extra keys ' + ', '.join(extra[:4]) if extra else ''})")  # fmt: skip
    out: dict[str, Tensor] = {}
    for i, block in enumerate(attention):
        down_o, up_o = state[f"weights.{2 * i}.lora_down"], state[f"weights.{2 * i}.lora_up"]
        down_in, up_in = state[f"weights.{2 * i + 1}.lora_down"], state[f"weights.{2 * i + 1}.lora_up"]
        c = up_o.shape[0]
        if up_in.shape[0] != 3 * c:
            raise UserError(f"{source}: weights.{2 * i + 1} is not a stacked q/k/v LoRA of width {c}")
        out[f"{PREFIX}.{block}.attention.to_out.0.lora_A.weight"] = down_o
        out[f"{PREFIX}.{block}.attention.to_out.0.lora_B.weight"] = up_o
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{PREFIX}.{block}.attention.{name}.lora_A.weight"] = down_in.clone()
            out[f"{PREFIX}.{block}.attention.{name}.lora_B.weight"] = up_in[j * c : (j + 1) * c].clone()
    return _with_alphas(out, {k[len(PREFIX) + 1 : -len(".lora_A.weight")]: 1.0 for k in out if "lora_A" in k})


def lora_format(state: dict[str, Tensor]) -> str:
    """"ours" (diffusers/peft keys), "comfyui" (`lora_prior_unet_*`) or "official" (`weights.<i>.…`)."""
    if state and all(k.startswith(COMFY_PREFIX) for k in state):
        return "comfyui"
    if state and any(k.startswith("weights.") for k in state):
        return "official"
    return "ours"


def convert_lora(src: str | Path, dst: str | Path, to: str, model: nn.Module | None = None) -> Path:
    """Rewrite a Stable Cascade prior LoRA file in another tool's format: `to` is "ours" (diffusers/
    peft keys, our loader and diffusers' `load_lora_weights`) or "comfyui". Reading the official
    trainer's file needs the prior `model` (its layers are numbered, not named)."""
    if to not in ("ours", "comfyui"):
        raise UserError(f"LoRA format {to!r}: write ours or comfyui")
    path = _lora_file(src)
    state, header = load_tensors(path), _header(path)
    kind = lora_format(state)
    if kind == "comfyui":
        state, header = from_comfyui(state, str(path))
    elif kind == "official":
        if model is None:
            raise UserError(f"{path}: an official-trainer LoRA numbers its layers: give the prior it was trained on")
        state, header = from_official(model, state, str(path))
    if to == "comfyui":
        save_tensors(to_comfyui(state, header), Path(dst), metadata={"format": "pt"})
    else:
        ranks = Counter(t.shape[0] for k, t in state.items() if k.endswith(".lora_A.weight"))
        summary = {f"{PREFIX}.r": ranks.most_common(1)[0][0], f"{PREFIX}.lora_alpha": header.get("lora_alpha"),
                   f"{PREFIX}.alpha_pattern": header.get("alpha_pattern") or {}}  # fmt: skip
        save_tensors(state, Path(dst), metadata={"format": "pt", METADATA_KEY: json.dumps(summary, sort_keys=True)})
    return Path(dst)
