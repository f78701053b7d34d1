"""Stable Cascade's U-Net against diffusers' `StableCascadeUNet`: the released configs (built on the
meta device, no memory) with the same state-dict keys, shapes and parameter counts; the tiny ones
with the same outputs on random weights; the precomputed conditioning and gradient checkpointing
against the plain forward."""

from __future__ import annotations

import pytest
import torch
from tiny import kwargs_of
from tolerance import rel_err

from wuerstchen.models.cascade import CASCADE_PRESETS, CascadeUNet, CascadeUNetConfig
from wuerstchen.models.config import config_from_dict, config_to_dict
from wuerstchen.testing import randomize

# Advertised sizes (Stable Cascade's model card / announcement), in billions of parameters.
RELEASED = {"stage-c": 3.6, "stage-c-lite": 1.0, "stage-b": 1.5, "stage-b-lite": 0.7}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_match_diffusers_on_the_meta_device(name):
    from diffusers import StableCascadeUNet

    config = CASCADE_PRESETS[name]
    with torch.device("meta"):
        ours, ref = CascadeUNet(config), StableCascadeUNet(**kwargs_of(config))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert abs(count / 1e9 - RELEASED[name]) / RELEASED[name] < 0.1  # measured 3.59, 1.03, 1.56, 0.70


def _inputs(name: str, b: int = 2) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(3)
    if name == "tiny-c":  # a non-square latent with an odd side
        x = torch.randn(b, 16, 3, 5, generator=g)
        cond = dict(clip_text=torch.randn(b, 7, 32, generator=g), clip_img=torch.randn(b, 2, 24, generator=g))
    else:
        x = torch.randn(b, 4, 32, 24, generator=g)
        cond = dict(effnet=torch.randn(b, 16, 3, 2, generator=g))
    return x, dict(clip_text_pooled=torch.randn(b, 1, 32, generator=g), **cond)


@pytest.mark.parametrize("name", ["tiny-c", "tiny-b"])
def test_same_output_as_diffusers(name):
    from diffusers import StableCascadeUNet

    ref = randomize(StableCascadeUNet(**kwargs_of(CASCADE_PRESETS[name])), seed=1)
    ours = CascadeUNet(CASCADE_PRESETS[name]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, cond = _inputs(name)
    r = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        want = ref(x, r, **cond).sample
        got = ours(x, r, **cond)
        precomputed = ours(x, r, cond=ours.condition(**cond, size=tuple(x.shape[-2:])))
    # float32 in other orders (channels-last, our attention); measured ≤ 3.9e-7 relative here.
    assert rel_err(got, want) <= 1e-5
    assert torch.equal(precomputed, got)  # the same arithmetic, computed ahead


def test_config_round_trips_through_diffusers_json():
    from diffusers import StableCascadeUNet

    for name in ("stage-c", "stage-b-lite", "tiny-b"):
        config = CASCADE_PRESETS[name]
        data = config_to_dict(config, "StableCascadeUNet")
        assert config_from_dict(CascadeUNetConfig, data) == config
        with torch.device("meta"):
            ref = StableCascadeUNet.from_config(data)
        assert config_from_dict(CascadeUNetConfig, dict(ref.config)) == config


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(CascadeUNet(CASCADE_PRESETS["tiny-b"]), seed=2).train().requires_grad_(True)
    x, cond = _inputs("tiny-b")

    def grads():
        model.zero_grad()
        model(x, torch.tensor([0.5, 0.2]), **cond).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    again = grads()
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))  # the same ops recomputed


def test_a_condition_for_another_size_is_refused():
    model = CascadeUNet(CASCADE_PRESETS["tiny-b"]).eval()
    x, cond = _inputs("tiny-b")
    with pytest.raises(ValueError, match="size"):
        model(x[..., :16], torch.tensor([0.5, 0.5]), cond=model.condition(**cond, size=(32, 24)))
