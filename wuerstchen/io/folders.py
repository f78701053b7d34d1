"""Whole pipelines ↔ diffusers-format folders, local or on the Hugging Face hub.

Two layouts are read:
- combined (`WuerstchenCombinedPipeline.save_pretrained`): `prior_prior/`, `prior_text_encoder/`,
  `prior_tokenizer/`, `prior_scheduler/`, `decoder/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
  `vqgan/` — the layout `save_pipeline` writes;
- the official two repos: a decoder folder (`warp-ai/wuerstchen`: `decoder/`, `text_encoder/`,
  `tokenizer/`, `scheduler/`, `vqgan/`) and a prior folder (`warp-ai/wuerstchen-prior`: `prior/`,
  `text_encoder/`, `tokenizer/`, `scheduler/`), each with its settings in `model_index.json`.

Stable Cascade (v3) uses the same layouts (`stabilityai/stable-cascade` + `stabilityai/stable-cascade-prior`,
or `StableCascadeCombinedPipeline`'s combined folder), with `decoder_lite/` and `prior_lite/` beside
the full models (`lite=True`), the prior's CLIP image encoder in `image_encoder/` +
`feature_extractor/`, and `variant="bf16"` files. The generation is read from the models' configs
(`_class_name`), never from a folder's name.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..assets import SHIPPED_MODEL_NAME, shipped_model
from ..hardware import resolve_dtype
from ..models.config import check_field, config_from_dict
from ..models.stage_a import StageA
from ..models.stage_b import StageB
from ..models.stage_c import StageC
from ..parts import INDEX_NAMES, PipelineSettings
from ..quant import check_device as check_quantize

if TYPE_CHECKING:  # the pipeline class comes in as an argument: the pipeline module imports this one
    from ..pipeline import WuerstchenPipeline
from ..errors import UserError
from .checkpoint import load_model, read_json, save_model, write_json

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]
OFFICIAL_PRIOR = {
    "warp-ai/wuerstchen": "warp-ai/wuerstchen-prior",
    "stabilityai/stable-cascade": "stabilityai/stable-cascade-prior",
}
# The Stable Cascade repos also hold the lite models, bf16 copies and the official single files
# (tens of GB): only the folders and files one pipeline needs are downloaded from them.
CASCADE_REPOS = ("stabilityai/stable-cascade", "stabilityai/stable-cascade-prior")
EFFNET_FILE = "effnet_encoder.safetensors"  # Stable Cascade's semantic compressor, at the repo's root
CASCADE_FOLDERS = ("text_encoder", "tokenizer", "scheduler", "vqgan", "image_encoder", "feature_extractor")


def hub_patterns(repo_id: str, lite: bool = False, variant: str | None = None) -> tuple[list[str], list[str]]:
    """What `resolve_folder` downloads of a hub repo, as (allow, ignore) patterns: everything of a v2
    repo; of a Stable Cascade repo the index, the shared folders and one decoder/prior (full or
    lite), in one variant (diffusers' file names: `model.bf16.safetensors`, `….bf16-00001-of-00002…`)."""
    if repo_id not in CASCADE_REPOS:
        return HUB_PATTERNS, []
    model = ("prior" if repo_id.endswith("-prior") else "decoder") + ("_lite" if lite else "")
    weights = [f"*.{variant}.safetensors", f"*.{variant}-*.safetensors"] if variant else ["*.safetensors"]
    allow = ["model_index.json"] + ([] if repo_id.endswith("-prior") else [EFFNET_FILE])  # image inputs
    for sub in (model, *CASCADE_FOLDERS):
        allow += [f"{sub}/*.json", f"{sub}/*.txt"] + [f"{sub}/{w}" for w in weights]
    other_variants = [f"*.{v}{tail}" for v in ("bf16", "fp16") for tail in (".safetensors", "-*.safetensors")]
    ignore = [] if variant else other_variants
    return allow, ignore


def _looks_like_hub_id(name: str) -> bool:
    """`owner/name`, and not a path someone meant locally: `./x`, `/x`, `~/x`, or `runs/x` where
    `runs/` exists here."""
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or "\\" in name or name.startswith((".", "/", "~")):
        return False
    return not Path(parts[0]).is_dir()


def download_advice(name: str) -> str:
    """The command that the installed huggingface_hub provides to fetch `name`, into a folder that
    does not shadow the `wuerstchen` package (a `./wuerstchen` folder would, for scripts run there)."""
    import huggingface_hub

    major, minor = (int(x) for x in huggingface_hub.__version__.split(".")[:2])
    cli = "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
    repos = [name] + ([OFFICIAL_PRIOR[name]] if name in OFFICIAL_PRIOR else [])
    steps = " && ".join(f"{cli} {r} --local-dir models/{r.split('/')[1]}" for r in repos)
    folders = f"models/{repos[0].split('/')[1]}"
    if len(repos) > 1:
        folders += f" (and models/{repos[1].split('/')[1]} as the prior: --prior, or prior=)"
    return f"on a machine with a network run `{steps}` and pass {folders} instead"


def resolve_folder(path_or_id: str | Path, lite: bool = False, variant: str | None = None) -> Path:
    """A local folder as is; `shipped-small` (unless a folder of that name is here) the model that
    ships inside the package; a hub id (`owner/name`) downloaded through huggingface_hub's cache
    (`hub_patterns`)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_id) == SHIPPED_MODEL_NAME:
        return shipped_model()
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model folder (or `wuerstchen convert` it first)")
    name = str(path_or_id)
    if not _looks_like_hub_id(name):
        raise FileNotFoundError(f"no model folder at {name} (a hub id has the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        allow, ignore = hub_patterns(name, lite, variant)
        return Path(snapshot_download(name, allow_patterns=allow, ignore_patterns=ignore or None))
    except Exception as e:  # offline, unknown repo, network error: one actionable message
        raise OSError(
            f"cannot get {name} from the Hugging Face hub ({type(e).__name__}) and there is no folder {name} here: "
            + download_advice(name)
        ) from e


# The transformers classes a folder may name (model_index.json, tokenizer_config.json): never a
# class looked up by an arbitrary name from a file, never code from the folder (`auto_map`).
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
IMAGE_ENCODER_CLASSES = ("CLIPVisionModelWithProjection",)
IMAGE_PROCESSOR_CLASSES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend")


def _allowed(name: str | None, allowed: tuple[str, ...], default: str, what: str, folder: Path) -> str:
    name = name or default
    if name not in allowed:
        raise UserError(f"{folder}: {what} class {name!r} is not supported (one of: {', '.join(allowed)})")
    return name


def _from_pretrained(cls: type, folder: Path, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder)`, local files only and no code from the folder; whatever is
    wrong in the folder's files (bad JSON, a list where an object belongs, cut weights) becomes a
    one-line error naming the folder, not transformers' or safetensors' traceback."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no {what} folder here; is this a complete model folder?")
    try:
        return cls.from_pretrained(folder, trust_remote_code=False, local_files_only=True, **kwargs)
    except MemoryError:
        raise
    except Exception as e:  # any of a dozen types, from transformers, tokenizers, safetensors or json
        first = (str(e).strip().splitlines() or [""])[0][:300]
        problem = f"{folder}: its {what} files do not load ({type(e).__name__}: {first})"
        raise UserError(f"{problem}; replace them with the published ones") from e


def load_text_encoder(folder: Path, class_name: str | None, dtype: torch.dtype | None, variant: str | None = None):
    import transformers

    name = _allowed(class_name, TEXT_ENCODER_CLASSES, "CLIPTextModel", "text encoder", folder)
    model = _from_pretrained(getattr(transformers, name), folder, "text encoder", dtype=dtype,
                             variant=_has_variant(folder, variant))  # fmt: skip
    return model.eval().requires_grad_(False)


def load_image_encoder(folder: Path, class_name: str | None, dtype: torch.dtype | None, variant: str | None = None):
    """Stable Cascade's CLIP ViT-L/14 image tower (image variations)."""
    import transformers

    name = _allowed(class_name, IMAGE_ENCODER_CLASSES, IMAGE_ENCODER_CLASSES[0], "image encoder", folder)
    model = _from_pretrained(getattr(transformers, name), folder, "image encoder", dtype=dtype,
                             variant=_has_variant(folder, variant))  # fmt: skip
    return model.eval().requires_grad_(False)


def load_image_processor(folder: Path, class_name: str | None):
    import transformers

    name = _allowed(class_name, IMAGE_PROCESSOR_CLASSES, IMAGE_PROCESSOR_CLASSES[0], "feature extractor", folder)
    return _from_pretrained(getattr(transformers, name), folder, "feature extractor")


def _has_variant(folder: Path, variant: str | None) -> str | None:
    """`variant` where the folder has its files (`model.bf16.safetensors`, shards), else None: as
    for our models, a component without that variant loads its plain files."""
    if variant is None or any(folder.glob(f"*.{variant}.safetensors")) or any(folder.glob(f"*.{variant}-*")):
        return variant
    return None


def load_tokenizer(folder: Path, class_name: str | None):
    """The tokenizer class itself, not AutoTokenizer: the same result without importing transformers'
    auto machinery (about a second of a CLI start) and without honouring a config's `auto_map`."""
    import transformers

    if class_name is None:
        config = folder / "tokenizer_config.json"
        class_name = read_json(config).get("tokenizer_class") if config.is_file() else None
    name = _allowed(class_name, TOKENIZER_CLASSES, "CLIPTokenizer", "tokenizer", folder)
    return _from_pretrained(getattr(transformers, name), folder, "tokenizer")


def _class_of(index: dict[str, Any], name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def _has(folder: Path, name: str) -> bool:
    return (folder / name).is_dir() or (folder / f"{name}_lite").is_dir()


def _sub(folder: Path, name: str, lite: bool) -> str:
    """`prior`/`decoder`, or Stable Cascade's `prior_lite`/`decoder_lite` with `lite`."""
    if lite and (folder / f"{name}_lite").is_dir():
        return f"{name}_lite"
    if lite and (folder / name).is_dir():
        raise FileNotFoundError(f"{folder}: no {name}_lite/ folder (lite=True); this folder holds only {name}/")
    if not lite and not (folder / name).is_dir():
        raise FileNotFoundError(f"{folder}: no {name}/ folder, only {name}_lite/: pass lite=True (--lite)")
    return name


def _model_class(folder: Path, stage: str) -> type:
    """Our class for the model in `folder`, from its config's `_class_name` (never from the path)."""
    config = folder / "config.json"
    name = read_json(config).get("_class_name") if config.is_file() else None
    if name == "StableCascadeUNet":
        from ..models.cascade import CascadeUNet

        return CascadeUNet
    return StageC if stage == "prior" else StageB


def _scheduler_s(folder: Path) -> float | None:
    config = folder / "scheduler_config.json"
    if not config.exists():
        return None
    s = read_json(config).get("s", 0.008)
    check_field("s", s, float, 0.008, str(config))
    return float(s)


def load_pipeline(
    cls: type[WuerstchenPipeline],
    path_or_id: str | Path,
    prior: str | Path | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    lite: bool = False,
    variant: str | None = None,
    quantize: str | None = None,
) -> WuerstchenPipeline:
    """Load a combined folder, or a decoder folder (+ `prior`), or a prior folder alone, as a `cls`
    (`WuerstchenPipeline.from_pretrained` passes itself).

    With the official decoder repo id and no `prior`, the official prior repo is used. The dtype is
    float32 unless asked (as diffusers, whatever the files hold); `"auto"` picks the precision the
    hardware computes fastest: bfloat16 where `device` (default: the best available) has it natively,
    float32 elsewhere (`wuerstchen.hardware`). `lite`: Stable Cascade's `prior_lite/` and
    `decoder_lite/`; `variant`: files such as `diffusion_pytorch_model.bf16.safetensors`;
    `quantize`: "int8" or "int8-weights" (`wuerstchen.quant`; a saved quantized folder is int8 as saved).
    """
    if quantize is not None:
        check_quantize(quantize, device)
    dtype = resolve_dtype(dtype or torch_dtype or torch.float32, device)
    root = resolve_folder(path_or_id, lite, variant)
    index = read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    settings: dict[str, Any] = {}
    parts: dict[str, Any] = {}

    def take_settings(idx: dict[str, Any]) -> None:
        for name in ("latent_scale", "latent_shift", "resolution_multiple", "latent_dim_scale", "default_size"):
            if (key := INDEX_NAMES.get(name, name)) in idx:
                settings[name] = idx[key]

    def load_prior_part(folder: Path, prefix: str, idx: dict[str, Any]) -> None:
        model_dir = folder / ("prior_prior" if prefix else _sub(folder, "prior", lite))
        parts["prior"] = load_model(_model_class(model_dir, "prior"), model_dir, dtype, variant=variant)
        parts["prior_text_encoder"] = load_text_encoder(
            folder / f"{prefix}text_encoder", _class_of(idx, f"{prefix}text_encoder"), dtype, variant
        )
        parts["prior_tokenizer"] = load_tokenizer(folder / f"{prefix}tokenizer", _class_of(idx, f"{prefix}tokenizer"))
        if (folder / f"{prefix}image_encoder").is_dir():  # Stable Cascade: image variations
            name = f"{prefix}image_encoder"
            parts["image_encoder"] = load_image_encoder(folder / name, _class_of(idx, name), dtype, variant)
            name = f"{prefix}feature_extractor"
            parts["feature_extractor"] = load_image_processor(folder / name, _class_of(idx, name))

    def load_decoder_part(folder: Path, idx: dict[str, Any]) -> None:
        model_dir = folder / _sub(folder, "decoder", lite)
        parts["decoder"] = load_model(_model_class(model_dir, "decoder"), model_dir, dtype, variant=variant)
        parts["vqgan"] = load_model(StageA, folder / "vqgan", dtype, variant=variant)
        parts["text_encoder"] = load_text_encoder(
            folder / "text_encoder", _class_of(idx, "text_encoder"), dtype, variant
        )
        parts["tokenizer"] = load_tokenizer(folder / "tokenizer", _class_of(idx, "tokenizer"))
        if (s := _scheduler_s(folder / "scheduler")) is not None:
            settings["s"] = s

    take_settings(index)
    if (root / "prior_prior").is_dir():
        load_prior_part(root, "prior_", index)
        load_decoder_part(root, index)
    elif _has(root, "decoder"):
        load_decoder_part(root, index)
        if prior is None and str(path_or_id) in OFFICIAL_PRIOR:
            prior = OFFICIAL_PRIOR[str(path_or_id)]
        if prior is not None:
            prior_root = resolve_folder(prior, lite, variant)
            prior_index = (
                read_json(prior_root / "model_index.json") if (prior_root / "model_index.json").exists() else {}
            )
            if not _has(prior_root, "prior"):
                raise FileNotFoundError(
                    f"{prior_root}: no prior/ folder; expected a prior folder like warp-ai/wuerstchen-prior"
                )
            load_prior_part(prior_root, "", prior_index)
            take_settings(prior_index)
        else:
            logger.info("%s has no prior: decoder-only pipeline (pass prior=... to generate from text)", root)
    elif _has(root, "prior"):
        load_prior_part(root, "", index)
    elif (root / "vqgan").is_dir():
        # The parts of a model being trained from scratch, before it has a decoder (see save_pipeline).
        parts["vqgan"] = load_model(StageA, root / "vqgan", dtype)
        for prefix in ("prior_", ""):
            enc, tok = f"{prefix}text_encoder", f"{prefix}tokenizer"
            if (root / enc).is_dir():
                parts[enc] = load_text_encoder(root / enc, _class_of(index, enc), dtype)
                parts[tok] = load_tokenizer(root / tok, _class_of(index, tok))
    else:
        raise FileNotFoundError(
            f"{root}: not a Würstchen pipeline folder (expected prior_prior/ and decoder/, or decoder/, or prior/)"
        )
    if (root / "previewer").is_dir():  # ours: Stable Cascade's official previewer, as `convert` writes it
        from ..models.previewer import Previewer

        parts["previewer"] = load_model(Previewer, root / "previewer", dtype)
    if (root / "semantic").is_dir():
        from ..models.semantic import SemanticCompressor

        parts["semantic"] = load_model(SemanticCompressor, root / "semantic", dtype)
    elif (root / EFFNET_FILE).is_file():  # the stabilityai/stable-cascade repo's own file, beside its folders
        from ..models.semantic import SEMANTIC_PRESETS, SemanticCompressor
        from .checkpoint import build_from_state, load_tensors

        state, preset = load_tensors(root / EFFNET_FILE), SEMANTIC_PRESETS["stable-cascade"]
        parts["semantic"] = build_from_state(SemanticCompressor, preset, state, str(root / EFFNET_FILE), dtype)
    known = {f for f in PipelineSettings.__dataclass_fields__}
    pipe = cls(
        prior=parts.get("prior"),
        prior_text_encoder=parts.get("prior_text_encoder"),
        prior_tokenizer=parts.get("prior_tokenizer"),
        decoder=parts.get("decoder"),
        text_encoder=parts.get("text_encoder"),
        tokenizer=parts.get("tokenizer"),
        vqgan=parts.get("vqgan"),
        semantic=parts.get("semantic"),
        image_encoder=parts.get("image_encoder"),
        feature_extractor=parts.get("feature_extractor"),
        previewer=parts.get("previewer"),
        settings=config_from_dict(PipelineSettings, {k: v for k, v in settings.items() if k in known},
                                  f"{root / 'model_index.json'}"),  # fmt: skip
    )
    if quantize is not None:
        pipe.quantize(quantize)
    if device is not None:
        pipe.to(device)
    return pipe


def _scheduler_config(s: float) -> dict[str, Any]:
    return {"_class_name": "DDPMWuerstchenScheduler", "_diffusers_version": "0.42.1", "s": s, "scaler": 1.0}


def save_pipeline(pipe: WuerstchenPipeline, folder: str | Path) -> None:
    """Write the combined diffusers layout. The folder appears whole or not at all: everything is
    written to a temporary folder beside it that is then renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        index: dict[str, Any] = {"_class_name": pipe.prior_part.combined_class, "_diffusers_version": "0.42.1"}
        st = pipe.settings
        for name in ("latent_scale", "latent_shift", "resolution_multiple", "latent_dim_scale", "default_size"):
            index[INDEX_NAMES.get(name, name)] = getattr(st, name)
        for name, model in (("prior_prior", pipe.prior), ("decoder", pipe.decoder), ("vqgan", pipe.vqgan)):
            if model is not None:
                save_model(model, tmp / name)
                index[name] = ["diffusers", model.diffusers_class]
        for prefix, encoder, tokenizer in (
            ("prior_", pipe.prior_text_encoder, pipe.prior_tokenizer),
            ("", pipe.text_encoder, pipe.tokenizer),
        ):
            if encoder is not None:
                encoder.save_pretrained(tmp / f"{prefix}text_encoder", safe_serialization=True)
                index[f"{prefix}text_encoder"] = ["transformers", type(encoder).__name__]
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / f"{prefix}tokenizer")
                index[f"{prefix}tokenizer"] = ["transformers", type(tokenizer).__name__]
            write_json(_scheduler_config(st.s), tmp / f"{prefix}scheduler" / "scheduler_config.json")
            index[f"{prefix}scheduler"] = ["diffusers", "DDPMWuerstchenScheduler"]
        for name, part in (
            ("prior_image_encoder", pipe.image_encoder),
            ("prior_feature_extractor", pipe.feature_extractor),
        ):
            if part is not None:  # Stable Cascade's image variations
                part.save_pretrained(tmp / name)
                index[name] = ["transformers", type(part).__name__]
        for name in ("semantic", "previewer"):  # ours; not diffusers components
            if getattr(pipe, name) is not None:
                save_model(getattr(pipe, name), tmp / name)
        write_json(index, tmp / "model_index.json")
        os.chmod(tmp, 0o755)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
