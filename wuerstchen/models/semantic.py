"""The semantic compressor: images → the 16-channel semantic latent that Stage C learns to generate
and Stage B is conditioned on (training, image variation, img2img).

Network: the EfficientNetV2-S feature trunk (torchvision's `efficientnet_v2_s().features`: stride 32,
1280 channels out) → 1×1 conv without bias to 16 channels → BatchNorm2d(16), which keeps the latent
near zero mean and unit variance. Shapes: images (B, 3, H, W) in [0, 1] → (B, 16, ⌈H/32⌉, ⌈W/32⌉).

Parameter names are torchvision's (`backbone.<features key>`) plus `mapper.0`/`mapper.1`, which is
exactly the layout of `effnet_state_dict` in the official `model_v2_stage_b.pt`: it loads as it is,
with `strict=True`, so no conversion function exists. Stable Cascade's `effnet_encoder.safetensors`
has the same keys minus `mapper.1.weight/bias` (its BatchNorm has no affine): preset
"stable-cascade".

Example:
    model = SemanticCompressor(SEMANTIC_PRESETS["official-v2"]).eval()
    latent = model.encode(images)  # (B, 3, 1024, 1024) → resized to 768 px → (B, 16, 24, 24)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

# One stage of the trunk: (block, expand_ratio, kernel, stride, c_in, c_out, layers), where block is
# "fused" (FusedMBConv) or "mbconv" (MBConv). Only a stage's first layer has its stride and c_in.
Stage = tuple[str, float, int, int, int, int, int]

# torchvision's `_efficientnet_conf("efficientnet_v2_s")` (Table 4 of the EfficientNetV2 paper).
EFFICIENTNET_V2_S: tuple[Stage, ...] = (
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mbconv", 4, 3, 2, 64, 128, 6),
    ("mbconv", 6, 3, 1, 128, 160, 9),
    ("mbconv", 6, 3, 2, 160, 256, 15),
)

# torchvision's ImageNet statistics; the trunk was trained on images normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SemanticConfig:
    """Defaults are the official Würstchen v2 compressor (EfficientNetV2-S, ~20.2M parameters)."""

    stages: tuple[Stage, ...] = EFFICIENTNET_V2_S
    c_features: int = 1280  # the trunk's last 1×1 conv (torchvision's `last_channel`)
    c_out: int = 16
    norm_eps: float = 1e-3  # the trunk's BatchNorm eps (torchvision's V2 models); the mapper's is 1e-5
    mapper_affine: bool = True  # v2: BatchNorm2d(16); Stable Cascade: BatchNorm2d(16, affine=False)
    stochastic_depth_prob: float = 0.2  # training only; torchvision's default for V2-S
    # Image side / semantic latent side, as the pipeline's `resolution_multiple`: 1024 px → 24. The
    # trunk then sees 24 · 32 = 768 px, i.e. 0.75 of the image side (42.67 ≈ 32 / 0.75).
    resolution_multiple: float = 42.67

    def __post_init__(self) -> None:
        for stage in self.stages:
            if stage[0] not in ("fused", "mbconv") or stage[3] not in (1, 2):
                raise UserError(f"bad stage {stage}: block must be 'fused'/'mbconv', stride 1 or 2")

    @property
    def stride(self) -> int:
        """Total downsampling: the stride-2 stem times each stage's stride (32 for V2-S)."""
        return 2 * math.prod(stage[3] for stage in self.stages)

    def latent_size(self, image_size: int) -> int:
        """Semantic latent side for an image side: ⌈side / 42.67⌉, as Stage C's latent side."""
        return math.ceil(image_size / self.resolution_multiple)

    def input_size(self, latent_size: int) -> int:
        """The side the trunk must see to give `latent_size`: 24 → 768 px."""
        return latent_size * self.stride


SEMANTIC_PRESETS: dict[str, SemanticConfig] = {
    "official-v2": SemanticConfig(),  # 20,177,488 trunk + 20,512 mapper parameters
    "stable-cascade": SemanticConfig(mapper_affine=False),
    # Same structure and stride 32, ~55k parameters: for tests.
    "tiny": SemanticConfig(
        stages=(
            ("fused", 1, 3, 1, 8, 8, 1),
            ("fused", 4, 3, 2, 8, 16, 1),
            ("fused", 4, 3, 2, 16, 16, 1),
            ("mbconv", 4, 3, 2, 16, 24, 1),
            ("mbconv", 6, 3, 1, 24, 24, 2),
            ("mbconv", 6, 3, 2, 24, 32, 1),
        ),
        c_features=64,
    ),
    # The shipped small model's (recipes.shapes.recipe): stride 16, so a 128 px image gives the
    # 8 × 8 latent of its Stage C; ~0.2M parameters, trained jointly with Stage B.
    "small": SemanticConfig(
        stages=(
            ("fused", 1, 3, 1, 16, 16, 1),
            ("fused", 4, 3, 2, 16, 32, 2),
            ("fused", 4, 3, 2, 32, 48, 2),
            ("mbconv", 4, 3, 2, 48, 96, 3),
        ),
        c_features=256,
        stochastic_depth_prob=0.0,
        resolution_multiple=16.0,
    ),
}


def _round_channels(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: nearest multiple of 8, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(
    c_in: int, c_out: int, kernel: int, eps: float, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """torchvision's `Conv2dNormActivation`: indices 0 conv (no bias), 1 BatchNorm, 2 SiLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=eps),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gate: x · sigmoid(fc2(SiLU(fc1(mean_hw(x))))); fc1/fc2 are 1×1 convs with bias."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(F.silu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class InvertedResidual(nn.Module):
    """torchvision's MBConv / FusedMBConv; `block` indices follow theirs so keys match.

    MBConv:      [1×1 expand] → k×k depthwise (stride) → SE (squeeze = c_in // 4) → 1×1 project.
    FusedMBConv: k×k expand (stride) → 1×1 project; with expand ratio 1, a single k×k conv + SiLU.
    The expand step is left out (shifting the indices) when the expanded width equals c_in.
    With stride 1 and c_in = c_out the block is residual, with stochastic depth in training.
    """

    def __init__(
        self, fused: bool, expand: float, kernel: int, stride: int, c_in: int, c_out: int, drop: float, eps: float
    ) -> None:
        super().__init__()
        c_mid = _round_channels(c_in * expand)
        layers: list[nn.Module] = []
        if fused and c_mid == c_in:
            layers.append(_conv_bn(c_in, c_out, kernel, eps, stride))
        elif fused:
            layers.append(_conv_bn(c_in, c_mid, kernel, eps, stride))
            layers.append(_conv_bn(c_mid, c_out, 1, eps, act=False))
        else:
            if c_mid != c_in:
                layers.append(_conv_bn(c_in, c_mid, 1, eps))
            layers.append(_conv_bn(c_mid, c_mid, kernel, eps, stride, groups=c_mid))
            layers.append(SqueezeExcitation(c_mid, max(1, c_in // 4)))
            layers.append(_conv_bn(c_mid, c_out, 1, eps, act=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        if not self.residual:
            return y
        if self.training and self.drop > 0:
            # Stochastic depth, "row" mode: drop the branch per sample, rescale the kept ones.
            keep = 1.0 - self.drop
            y = y * y.new_empty(y.shape[0], 1, 1, 1).bernoulli_(keep).div_(keep)
        return x + y


class SemanticCompressor(nn.Module):
    diffusers_class = "SemanticCompressor"
    config_class = SemanticConfig

    def __init__(self, config: SemanticConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        eps = cfg.norm_eps
        trunk: list[nn.Module] = [_conv_bn(3, cfg.stages[0][4], 3, eps, stride=2)]  # stem, stride 2
        total = sum(stage[6] for stage in cfg.stages)
        index = 0
        for block, expand, kernel, stride, c_in, c_out, layers in cfg.stages:
            stage: list[nn.Module] = []
            for i in range(layers):
                # Drop probability grows linearly with block depth: p · index / total (torchvision).
                drop = cfg.stochastic_depth_prob * index / total
                first = i == 0
                stage.append(
                    InvertedResidual(
                        block == "fused",
                        expand,
                        kernel,
                        stride if first else 1,
                        c_in if first else c_out,
                        c_out,
                        drop,
                        eps,
                    )
                )
                index += 1
            trunk.append(nn.Sequential(*stage))
        trunk.append(_conv_bn(cfg.stages[-1][5], cfg.c_features, 1, eps))
        self.backbone = nn.Sequential(*trunk)
        self.mapper = nn.Sequential(
            nn.Conv2d(cfg.c_features, cfg.c_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(cfg.c_out, affine=cfg.mapper_affine),
        )
        # torchvision's init for training from scratch (a no-op cost on the meta device).
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) → semantic latent (B, c_out, ⌈H/32⌉, ⌈W/32⌉).

        The ImageNet normalisation (mean 0.485/0.456/0.406, std 0.229/0.224/0.225) happens here, so
        callers pass plain [0, 1] images. The statistics are constants, not buffers: buffers would
        either add keys the official checkpoint lacks or stay empty on a meta-built model.
        """
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self.mapper(self.backbone((images - mean) / std))

    def encode(self, images: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) → the semantic latent at the side the pipeline needs.

        `size` is the target *latent* side (an int or (h, w)), e.g. Stage C's latent side; without
        it, ⌈H / 42.67⌉ × ⌈W / 42.67⌉. The images are resized (bilinear, antialiased) to
        `size · 32` px first: a 1024² image is seen at 768² and gives 24 × 24.
        """
        if size is None:
            size = (self.config.latent_size(images.shape[-2]), self.config.latent_size(images.shape[-1]))
        elif isinstance(size, int):
            size = (size, size)
        pixels = (self.config.input_size(size[0]), self.config.input_size(size[1]))
        if tuple(images.shape[-2:]) != pixels:
            # In float32: antialiased bilinear has no bfloat16/float16 kernel on CPU.
            resized = F.interpolate(images.float(), size=pixels, mode="bilinear", antialias=True, align_corners=False)
            images = resized.to(images.dtype)
        return self(images)
