"""LoRA on the prior through peft: training leaves the base weights alone, files round-trip into
a fresh pipeline at any scale, scale 0 and unloading give the base image bit for bit, and the
files are diffusers' format (checked by loading ours into diffusers and theirs into ours)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from tolerance import max_abs, rel_err

from wuerstchen.io.checkpoint import load_tensors, save_tensors
from wuerstchen.lora import apply_lora, load_lora_weights, lora_state_dict, save_lora, set_lora_scale, unload_lora
from wuerstchen.testing import random_pipeline

pytest.importorskip("peft")

FAST = dict(height=128, width=128, prior_num_inference_steps=4, num_inference_steps=2, output_type="pt", seed=0)
PROMPT = "a red circle"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ATTN_BLOCKS = (2, 5)  # the AttnBlocks of the tiny prior (depth 2: ResBlock, TimestepBlock, AttnBlock, ...)


def toy_batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x (2, 16, 4, 4), r (2,), text states (2, 5, 32), and a regression target shaped like x."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 16, 4, 4, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 5, 32, generator=g),
        torch.randn(2, 16, 4, 4, generator=g),
    )


def image(pipe) -> torch.Tensor:
    return pipe(PROMPT, **FAST).images


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    # Mean, not max: the tiny random model's images are mostly saturated at 0 or 1.
    return (a - b).abs().mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pipeline whose prior got a rank-4 LoRA and three Adam steps on a toy loss, saved."""
    pipe = random_pipeline("tiny")
    base_image = image(pipe)
    base_state = {k: v.clone() for k, v in pipe.prior.state_dict().items()}
    apply_lora(pipe.prior, rank=4, alpha=8)
    pipe.prior.train()
    optimizer = torch.optim.Adam([p for p in pipe.prior.parameters() if p.requires_grad], lr=1e-2)
    x, r, clip, target = toy_batch()
    for _ in range(3):
        loss = (pipe.prior(x, r, clip) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe.prior.eval()
    path = save_lora(pipe.prior, tmp_path_factory.mktemp("lora") / "style.safetensors", metadata={"steps": 3})
    return SimpleNamespace(pipe=pipe, base_image=base_image, base_state=base_state, image=image(pipe), path=path)


def test_apply_lora_leaves_the_model_unchanged_at_init():
    prior = random_pipeline("tiny").prior
    x, r, clip, _ = toy_batch()
    with torch.no_grad():
        before = prior(x, r, clip)
        apply_lora(prior, rank=4)
        after = prior(x, r, clip)
    assert torch.equal(before, after)
    assert type(prior).__name__ == "StageC" and prior.config.c == 32  # still our module, attributes intact
    assert len(prior.condition(clip)) == len(ATTN_BLOCKS)
    assert all(torch.count_nonzero(p) == 0 for n, p in prior.named_parameters() if "lora_B" in n)


def test_only_lora_parameters_require_grad():
    prior = apply_lora(random_pipeline("tiny").prior, rank=2, dropout=0.1)
    trainable = {n for n, p in prior.named_parameters() if p.requires_grad}
    want = {f"blocks.{i}.attention.{t}.lora_{f}.default.weight" for i in ATTN_BLOCKS for t in TARGETS for f in "AB"}
    assert trainable == want
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(prior, rank=2)


def test_training_changes_only_the_lora_parameters(trained):
    state = trained.pipe.prior.state_dict()
    lora = {k for k in state if ".lora_" in k}
    # peft keeps each wrapped Linear as `….to_q.base_layer`: the same tensors under a longer name.
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if k not in lora}
    assert base.keys() == trained.base_state.keys()
    assert all(torch.equal(base[k], trained.base_state[k]) for k in base)  # bit-identical
    assert all(torch.count_nonzero(state[k]) > 0 for k in lora if ".lora_B." in k)  # B has moved off zero
    assert distance(trained.image, trained.base_image) > 1e-4


def test_file_uses_diffusers_keys_and_stores_the_config(trained):
    want = {f"prior.blocks.{i}.attention.{t}.lora_{f}.weight" for i in ATTN_BLOCKS for t in TARGETS for f in "AB"}
    assert set(load_tensors(trained.path)) == want == set(lora_state_dict(trained.pipe.prior))
    with safe_open(str(trained.path), framework="pt") as f:
        header = f.metadata()
    config = json.loads(header["lora_adapter_metadata"])
    assert (config["prior.r"], config["prior.lora_alpha"]) == (4, 8)
    assert config["prior.target_modules"] == sorted(TARGETS)
    assert header["format"] == "pt" and header["steps"] == "3"
    assert not list(trained.path.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_loaded_lora_at_scales_0_half_1_and_unload(trained):
    pipe = random_pipeline("tiny")  # the same seeded base weights as `trained` had before training
    load_lora_weights(pipe, trained.path, scale=0.0)
    assert torch.equal(image(pipe), trained.base_image)
    set_lora_scale(pipe, 1.0)
    full = image(pipe)
    assert max_abs(full, trained.image) <= 1e-5  # images in [0, 1]; the same weights from a file: measured 0
    set_lora_scale(pipe, 0.5)
    half = image(pipe)
    span = distance(full, trained.base_image)
    assert 0 < distance(half, trained.base_image) < span and 0 < distance(half, full) < span
    assert not any(p.requires_grad for p in pipe.prior.parameters())
    unload_lora(pipe)
    assert torch.equal(image(pipe), trained.base_image)
    assert not any(".lora_" in k for k in pipe.prior.state_dict())
    assert {k: v.shape for k, v in pipe.prior.state_dict().items()} == {
        k: v.shape for k, v in trained.base_state.items()
    }


def test_named_adapters_add_up_and_unload_one_at_a_time(trained):
    x, r, clip, _ = toy_batch(1)
    once, twice = random_pipeline("tiny"), random_pipeline("tiny")
    load_lora_weights(once, trained.path, scale=1.0)
    load_lora_weights(twice, trained.path, scale=0.5, adapter_name="a")
    load_lora_weights(twice, trained.path, scale=0.5, adapter_name="b")
    with pytest.raises(ValueError, match="already loaded"):
        load_lora_weights(twice, trained.path, adapter_name="b")
    with torch.no_grad():
        # Two adapters at 0.5 against one at 1: float32 rounding of the sum, measured 1.3e-7 (of a max ~4).
        assert rel_err(twice.prior(x, r, clip), once.prior(x, r, clip)) <= 1e-5
        unload_lora(twice, "b")
        set_lora_scale(once, 0.5)
        assert rel_err(twice.prior(x, r, clip), once.prior(x, r, clip)) <= 1e-6  # one adapter each: measured 0


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.update({"prior.blocks.7.attention.to_q.lora_A.weight": torch.zeros(4, 32)}), "blocks.7"),
        (lambda s: s.update({"prior.blocks.2.attention.to_q.lora_A.weight": torch.zeros(4, 64)}), "(4, 64)"),
        (lambda s: s.pop("prior.blocks.5.attention.to_v.lora_B.weight"), "blocks.5.attention.to_v"),
        (lambda s: s.update({"text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 32)}), "text_encoder"),
    ],
    ids=["unknown module", "wrong shape", "missing factor", "other component"],
)
def test_a_file_that_does_not_fit_is_a_clear_error(trained, tmp_path, edit, named):
    state = load_tensors(trained.path)
    edit(state)
    save_tensors(state, tmp_path / "bad.safetensors")
    pipe = random_pipeline("tiny")
    with pytest.raises(ValueError, match="do not fit") as error:
        load_lora_weights(pipe, tmp_path / "bad.safetensors")
    assert named in str(error.value)
    assert not hasattr(pipe.prior, "peft_config")  # refused before anything changed
    assert not any(".lora_" in k for k in pipe.prior.state_dict())


def test_files_go_both_ways_with_diffusers(trained, tmp_path):
    """Our file loads into diffusers' WuerstchenPriorPipeline (a folder with its file name), and
    a LoRA diffusers saves loads into ours: the same prior outputs either way."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior, WuerstchenPriorPipeline
    from peft import get_peft_model_state_dict
    from tiny import kwargs_of

    from wuerstchen.models.stage_c import STAGE_C_PRESETS
    from wuerstchen.testing import char_tokenizer, clip_text_model

    ours = random_pipeline("tiny")
    reference = WuerstchenPrior(**kwargs_of(STAGE_C_PRESETS["tiny"])).eval()
    reference.load_state_dict(ours.prior.state_dict())
    theirs = WuerstchenPriorPipeline(
        tokenizer=char_tokenizer(),
        text_encoder=clip_text_model(0),
        prior=reference,
        scheduler=DDPMWuerstchenScheduler(),
    )
    save_lora(trained.pipe.prior, tmp_path)  # a folder → pytorch_lora_weights.safetensors inside
    theirs.load_lora_weights(tmp_path, adapter_name="style")
    x, r, clip, _ = toy_batch(2)
    with torch.no_grad():
        want = trained.pipe.prior(x, r, clip)
        assert rel_err(reference(x, r, clip), want) <= 1e-5  # diffusers' prior and peft: measured 1.2e-7
        WuerstchenPriorPipeline.save_lora_weights(
            tmp_path / "diffusers",
            unet_lora_layers=get_peft_model_state_dict(reference, adapter_name="style"),
            unet_lora_adapter_metadata=reference.peft_config["style"].to_dict(),
        )
        load_lora_weights(ours, tmp_path / "diffusers")
        assert torch.equal(ours.prior(x, r, clip), want)
