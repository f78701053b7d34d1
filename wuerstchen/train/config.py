"""Typed training configs: one frozen dataclass per stage over a shared base.

A config is read from a JSON, TOML or YAML file and overridden field by field on the command line;
the options of `wuerstchen train {a,b,c}` are generated from these fields, so `--help` lists every
one with its default. Every run writes the resolved config as `OUTPUT/config.json`.

    cfg = load_config("c", "run.json", {"batch_size": "8", "lr": "3e-5"})
    cfg = StageCTrainConfig(data="photos/", init_from="wuerstchen-v2", output_dir="runs/prior-ft")
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its command-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """What every stage's training shares. `batch_size` is per process and micro-batch: a step sees
    batch_size × grad_accum × world_size images."""

    # data
    data: str | None = opt(None, "image folder (cat.png + cat.txt) or webdataset shard URLs (shards-{000..099}.tar)")
    image_size: int = opt(1024, "training side in px (the area of each bucket with --bucket-multiple)")
    bucket_multiple: int | None = opt(None, "aspect-ratio buckets, sides a multiple of this (e.g. 128); off: square")
    random_crop: bool = opt(False, "random instead of centre crops (exact resume needs --num-workers 0 then)")
    flip: bool = opt(False, "random horizontal flips (captions saying left/right become wrong)")
    holdout: int = opt(0, "hold the last N images of the folder out of training, for samples and evaluation")
    eval_data: str | None = opt(None, "image folder for samples and evaluation (instead of --holdout)")
    num_workers: int = opt(2, "DataLoader worker processes per rank")
    # optimisation
    batch_size: int = opt(4, "images per process per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-4, "AdamW learning rate (after warm-up)")
    warmup_steps: int | None = opt(
        None,
        "linear learning-rate warm-up steps (default: 5%% of --max-steps, at most 1000; the official prior used 10000)",
    )
    weight_decay: float = opt(0.01, "AdamW weight decay")
    max_steps: int = opt(10000, "optimizer steps to train for (resuming continues up to it)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)")
    ema_beta: float = opt(0.9, "EMA decay per EMA update (0: no EMA)")
    ema_every: int = opt(100, "update the EMA every N steps")
    ema_start: int = opt(5000, "before this step the EMA copies the weights (β = 0)")
    bf16: bool | None = opt(None, "bfloat16 autocast (default: on for CUDA, off for CPU)")
    gradient_checkpointing: bool = opt(False, "recompute block activations in the backward pass (less memory)")
    seed: int = opt(0, "seed of weights, data order, noise and timesteps")
    # model
    model: str | dict | None = opt(
        None,
        "preset (v2: tiny, medium, official-v2; Stable Cascade: tiny-c/-b, medium-c/-b, stage-c[-lite], "
        "stage-b[-lite]), a config.json path, or a JSON object",
    )
    init_from: str | None = opt(
        None,
        "pipeline folder or hub id to fine-tune from (frozen parts come from it too), or an official Stable "
        "Cascade single file (stage_c*.safetensors, stage_b*.safetensors; frozen parts from --pipeline)",
    )
    pipeline: str | None = opt(None, "pipeline folder or hub id for the frozen parts only (text encoders, VQGAN, ...)")
    settings: str | dict | None = opt(
        None,
        "how the stages fit together, for a model trained from scratch: a JSON object over the pipeline's "
        '(e.g. {"resolution_multiple": 16, "latent_dim_scale": 4}); it overrides those of --pipeline/--init-from',
    )
    lora_rank: int = opt(0, "train LoRA adapters of this rank on the attention layers (0: full fine-tune)")
    lora_alpha: float | None = opt(None, "LoRA alpha (default: the rank)")
    lora_targets: str = opt(
        "attention", "LoRA layers: attention (to_q/k/v/out), or attention+resblock (also the ResBlocks' two Linears)"
    )
    optimizer: str = opt("adamw", "adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW: CUDA only, less memory)")
    # scale
    strategy: str = opt("ddp", "under torchrun: ddp or fsdp")
    fsdp_sharding: str = opt("shard_grad_op", "FSDP: shard_grad_op (keep params gathered in the step) or full_shard")
    device: str | None = opt(None, "cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when available, else cpu)")
    # outputs
    output_dir: str = opt("runs/train", "folder for checkpoints, metrics, samples and the exported model")
    checkpoint_every: int = opt(1000, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(3, "keep the newest N checkpoints")
    export_on_checkpoint: bool = opt(False, "also refresh the exported model/pipeline folders at each checkpoint")
    sample_every: int = opt(1000, "write sample images (and evaluate) every N steps (0: off)")
    sample_steps: int = opt(20, "sampling steps for the samples")
    sample_prompts: tuple[str, ...] = opt((), "prompts for samples (default: captions of evaluation images)")
    log_every: int = opt(10, "append metrics to metrics.jsonl every N steps")
    progress: bool = opt(True, "show a progress bar")

    stage = "?"  # a class attribute, not a field

    def model_presets(self) -> dict[str, Any]:
        """Named model configs `--model` accepts."""
        return {}

    def __post_init__(self) -> None:
        if self.warmup_steps is None:  # resolved here, so OUTPUT/config.json (and a resume) keeps the number
            object.__setattr__(self, "warmup_steps", min(1000, self.max_steps // 20))
        positive = ("image_size", "batch_size", "grad_accum", "ema_every", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "checkpoint_every", "sample_every", "holdout", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if self.sample_steps < 1:
            raise UserError("--sample-steps must be at least 1")
        if not 0 <= self.ema_beta < 1:
            raise UserError(f"--ema-beta must be in [0, 1), got {self.ema_beta}")
        if self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("--lr must be positive; --grad-clip and --weight-decay must not be negative")
        if self.strategy not in ("ddp", "fsdp"):
            raise UserError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.fsdp_sharding not in ("shard_grad_op", "full_shard"):
            raise UserError(f"--fsdp-sharding must be shard_grad_op or full_shard, got {self.fsdp_sharding!r}")
        if isinstance(self.settings, str):
            raise UserError(f"--settings must be a JSON object, got {self.settings!r}")
        if self.settings is not None:
            from ..parts import INDEX_NAMES, PipelineSettings

            # model_index.json's names (latent_mean, latent_std) are accepted for ours.
            ours = {v: k for k, v in INDEX_NAMES.items()}
            object.__setattr__(self, "settings", {ours.get(k, k): v for k, v in self.settings.items()})
            unknown = sorted(set(self.settings) - set(PipelineSettings.__dataclass_fields__))
            if unknown:
                known = ", ".join(PipelineSettings.__dataclass_fields__)
                raise UserError(f"--settings: unknown key(s) {unknown}; known: {known}")
        if self.lora_rank < 0:
            raise UserError("--lora-rank must not be negative")
        if self.lora_targets not in ("attention", "attention+resblock"):
            raise UserError(f"--lora-targets must be attention or attention+resblock, got {self.lora_targets!r}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise UserError(f"--optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if self.lora_rank and self.strategy == "fsdp":
            raise UserError("LoRA with --strategy fsdp is not supported: use ddp (LoRA weights are small)")
        if self.lora_rank and not self.init_from:
            raise UserError("LoRA fine-tunes existing weights: give --init-from PIPELINE")
        if isinstance(self.model, str) and not self.model.startswith("{") and self.model not in self.model_presets():
            if not Path(self.model).is_file():
                names = ", ".join(self.model_presets())
                raise UserError(f"--model {self.model!r} is neither a preset ({names}) nor a file")

    def to_dict(self) -> dict[str, Any]:
        body = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"stage": self.stage, **body}


@dataclass(frozen=True)
class DiffusionTrainConfig(TrainConfig):
    """Fields Stage B and Stage C share: text conditioning and the semantic compressor."""

    text_encoder: str | None = opt(
        None, "text encoder folder, or random:WIDTH for a smoke test (default: from --init-from/--pipeline)"
    )
    semantic: str | None = opt(
        None, "semantic compressor: model folder, or a preset (tiny, official-v2: random init) (default: pipeline's)"
    )
    caption_drop: float = opt(0.05, "probability of training on the empty caption (for classifier-free guidance)")
    loss_weighting: str = opt(
        "p2",
        "weight of each sample's ε loss: p2 (official: 1 − ᾱ, little weight on low noise), uniform "
        "(plain ε MSE: more weight on low noise, where a small model learns sharp detail) or, for Stable "
        "Cascade, adaptive (GDF's AdaptiveLossWeight: 1 / the running loss of the sample's log-SNR bucket, "
        "the official full fine-tunes' setting)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.caption_drop <= 1:
            raise UserError(f"--caption-drop must be in [0, 1], got {self.caption_drop}")
        if self.loss_weighting not in ("p2", "uniform", "adaptive"):
            raise UserError(f"--loss-weighting must be p2, uniform or adaptive, got {self.loss_weighting!r}")


@dataclass(frozen=True)
class StageCTrainConfig(DiffusionTrainConfig):
    """The prior: text → semantic latent `(x + 1) / 42`."""

    output_dir: str = opt("runs/stage-c", "folder for checkpoints, metrics, samples and the exported model")
    cache: str | None = opt(None, "safetensors cache of text states + semantic latents (built first if missing)")
    cache_dtype: str = opt("float32", "dtype of a new cache: float32 or bfloat16 (half the size)")
    image_embed_rate: float = opt(
        0.1,
        "Stable Cascade: share of samples conditioned on their CLIP image embedding, the rest on zeros "
        "(official: 10%%); needs the sources' image_encoder/, else every sample gets zeros",
    )
    x0_weight: float = opt(
        0.0,
        "add this times the x0 error to the ε loss (e.g. 0.1): a signal for E[x0 | text] near t = 1, "
        "which the ε loss weighs ~1e-4 there (README: Why relations fail). 0: the official loss",
    )

    stage = "c"

    def model_presets(self) -> dict[str, Any]:
        from ..models.stage_c import STAGE_C_PRESETS

        return STAGE_C_PRESETS | _cascade_presets("c")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache and (self.random_crop or self.flip):
            raise UserError("--cache stores one crop per image: it cannot be used with --random-crop or --flip")
        if self.cache_dtype not in ("float32", "bfloat16"):
            raise UserError(f"--cache-dtype must be float32 or bfloat16, got {self.cache_dtype!r}")
        if not 0 <= self.image_embed_rate <= 1:
            raise UserError(f"--image-embed-rate must be in [0, 1], got {self.image_embed_rate}")
        if not 0 <= self.x0_weight <= 100:
            raise UserError(f"--x0-weight must be in [0, 100], got {self.x0_weight}")


@dataclass(frozen=True)
class StageBTrainConfig(DiffusionTrainConfig):
    """The decoder: Stage A latent, conditioned on the semantic latent of a randomly downscaled image."""

    output_dir: str = opt("runs/stage-b", "folder for checkpoints, metrics, samples and the exported model")
    train_semantic: bool = opt(False, "train the semantic compressor jointly (v1) instead of freezing it (v2)")
    semantic_drop: float = opt(0.1, "probability of zeroing the semantic condition (official: 5-10%%)")
    semantic_scale_min: float = opt(0.5, "the semantic compressor sees the image downscaled by U(this, 1)")
    semantic_recon: float = opt(
        0.0,
        "with --train-semantic: weight of a reconstruction loss that makes the compressor's latent carry "
        "the image (a small head decodes the VQGAN latent from it; training only). 0: off",
    )

    stage = "b"

    def model_presets(self) -> dict[str, Any]:
        from ..models.stage_b import STAGE_B_PRESETS

        return STAGE_B_PRESETS | _cascade_presets("b")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.semantic_drop <= 1:
            raise UserError(f"--semantic-drop must be in [0, 1], got {self.semantic_drop}")
        if not 0 < self.semantic_scale_min <= 1:
            raise UserError(f"--semantic-scale-min must be in (0, 1], got {self.semantic_scale_min}")
        if self.semantic_recon < 0 or (self.semantic_recon > 0 and not self.train_semantic):
            raise UserError(
                "--semantic-recon must be ≥ 0 and needs --train-semantic (a frozen compressor learns nothing)"
            )


@dataclass(frozen=True)
class StageATrainConfig(TrainConfig):
    """The VQGAN: reconstruction + codebook/commitment (+ optional adversarial) loss."""

    output_dir: str = opt("runs/stage-a", "folder for checkpoints, metrics, samples and the exported model")
    holdout: int = opt(4, "hold the last N images of the folder out of training, for PSNR and samples")
    recon_loss: str = opt("mse", "reconstruction loss: mse or l1")
    vq_weight: float = opt(1.0, "weight of the codebook + commitment loss")
    adversarial: bool = opt(False, "add a patch discriminator (hinge loss)")
    adv_weight: float = opt(0.1, "weight of the generator's adversarial loss")
    adv_start: int = opt(0, "step from which the generator gets the adversarial loss (the discriminator trains from 0)")

    stage = "a"

    def model_presets(self) -> dict[str, Any]:
        from ..models.stage_a import STAGE_A_PRESETS

        return STAGE_A_PRESETS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank:
            raise UserError("LoRA targets attention layers and Stage A has none: use --lora-rank 0")
        if self.recon_loss not in ("mse", "l1"):
            raise UserError(f"--recon-loss must be mse or l1, got {self.recon_loss!r}")


def _cascade_presets(stage: str) -> dict[str, Any]:
    """Stable Cascade's U-Net presets of a stage: stage-c, stage-c-lite, medium-c, tiny-c (or -b)."""
    from ..models.cascade import CASCADE_PRESETS

    return {k: v for k, v in CASCADE_PRESETS.items() if k.endswith(f"-{stage}") or f"-{stage}-" in k}


CONFIGS: dict[str, type[TrainConfig]] = {"a": StageATrainConfig, "b": StageBTrainConfig, "c": StageCTrainConfig}


# ----------------------------------------------------------------------------- reading and parsing


def _flag(name: str) -> str:
    return name.replace("_", "-")


def config_fields(cls: type[TrainConfig]) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every option, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def coerce(name: str, tp: Any, value: Any) -> Any:
    """A value from a file or the command line → the field's type; a bad value is a one-line error."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        if dict in options and isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise UserError(f"--{_flag(name)}: not a JSON object ({e})") from None
        if dict in options and isinstance(value, dict):
            return value
        return coerce(name, options[0], value)
    if typing.get_origin(tp) is tuple:
        items = [value] if isinstance(value, str) else list(value)
        return tuple(str(v) for v in items)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return text in ("true", "1", "yes", "on")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{_flag(name)}: expected {tp.__name__}, got {value!r}") from None
    return str(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON, TOML or YAML file of {field: value} (a top-level `stage` key is checked, not a field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml  # PyYAML, optional

        return yaml.safe_load(text) or {}
    return json.loads(text)


def build_config(stage: str, values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Typed config of `stage` from raw values (strings from the command line are parsed)."""
    cls = CONFIGS[stage]
    values = dict(values)
    given_stage = values.pop("stage", stage)
    if given_stage != stage:
        raise UserError(f"{source} is a Stage {str(given_stage).upper()} config, not Stage {stage.upper()}")
    types_by_name = {f.name: tp for f, tp in config_fields(cls)}
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise UserError(f"{source}: unknown option(s) {unknown} for Stage {stage.upper()}")
    return cls(**{k: coerce(k, types_by_name[k], v) for k, v in values.items()})


def load_config(stage: str, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < the file at `path` < `overrides` (e.g. the command line)."""
    values = read_config_file(path) if path else {}
    values.update(overrides or {})
    return build_config(stage, values, source=str(path or "config"))
