"""Stable Cascade (v3) training at tiny sizes: each stage's loss falls, Stage C resumes bit-exactly
(adaptive loss weights included), the outputs load, LoRA trains only its factors and its ComfyUI
file reproduces the in-memory LoRA's image through our loader, the official trainer's LoRA layout
converts exactly, and the GDF objective is the one the docstring of `wuerstchen/train/cascade.py` states.

pytest -q tests/test_train_cascade.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import QUIET, losses_of, make_data

from wuerstchen.train.config import build_config
from wuerstchen.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("cascade-data")
    return {size: make_data(root / f"squares{size}", n=8, size=size) for size in (64, 128)}


def stage_c(data: dict, folder: Path, out: Path, **changes) -> dict:
    """Fine-tune the tiny Stable Cascade prior at 128 px (3×3 latents) from its pipeline folder."""
    return QUIET | dict(
        data=str(data[128]), init_from=str(folder), semantic="tiny", image_size=128, batch_size=4, lr=1e-3,
        ema_every=2, ema_start=3, output_dir=str(out), image_embed_rate=0.5,
    ) | changes  # fmt: skip


@pytest.mark.parametrize(
    "stage, values",
    [
        ("c", dict(model="tiny-c", image_size=128)),  # from scratch (official init), 8 images, every step all
        ("b", dict(model="tiny-b", image_size=64)),
    ],
)
def test_loss_falls(stage: str, values: dict, data: dict, tiny_cascade_folder: Path, tmp_path: Path) -> None:
    values = QUIET | values | dict(
        data=str(data[values["image_size"]]), pipeline=str(tiny_cascade_folder), semantic="tiny", batch_size=8,
        lr=3e-3, max_steps=50, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(build_config(stage, values))
    assert type(result.task).__name__ == {"c": "CascadePriorTask", "b": "CascadeDecoderTask"}[stage]
    losses = list(result.losses.values())
    # Windows of 10: t ~ U(0, 1) per sample makes single steps' losses vary by ±50%.
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert np.isfinite(losses).all() and last < 0.6 * first, (first, last)


@pytest.fixture(scope="module")
def reference_c(tmp_path_factory, data: dict, tiny_cascade_folder: Path) -> tuple[dict, Path]:
    """Stage C fine-tuning for 4 steps (checkpoints every 2), adaptive loss weights, uninterrupted."""
    out = tmp_path_factory.mktemp("cascade-ref") / "run"
    values = stage_c(data, tiny_cascade_folder, out, max_steps=4, checkpoint_every=2, loss_weighting="adaptive")
    train(build_config("c", values))
    return values, out


def test_resume_is_bit_exact(reference_c: tuple[dict, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    values, reference = reference_c
    values = values | {"output_dir": str(tmp_path / "run")}

    class Interrupt(Exception):
        pass

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(build_config("c", values), on_step=stop_at_3)
    train(build_config("c", values), resume=True)
    assert losses_of(tmp_path / "run") == losses_of(reference)  # exact, on CPU
    for name in ("model", "ema", "optimizer"):
        ours = load_file(str(tmp_path / "run" / "checkpoints" / "step-000004" / f"{name}.safetensors"))
        theirs = load_file(str(reference / "checkpoints" / "step-000004" / f"{name}.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    buckets = load_file(str(reference / "checkpoints" / "step-000004" / "model.safetensors"))
    assert (buckets["adaptive.bucket_losses"] != 1).sum() > 0  # the adaptive weights are state, and moved


def test_outputs_load(reference_c: tuple[dict, Path]) -> None:
    from diffusers import StableCascadeUNet

    from wuerstchen import WuerstchenPipeline

    _, out = reference_c
    pipe = WuerstchenPipeline.from_pretrained(out / "pipeline")
    assert pipe.prior_part.name == "Stable Cascade" and pipe.image_encoder is not None
    ref = StableCascadeUNet.from_pretrained(out / "prior")  # diffusers' own class reads our folder
    ours = pipe.prior.state_dict()
    assert ref.state_dict().keys() == ours.keys() and all(torch.equal(v, ours[k]) for k, v in ref.state_dict().items())
    image = pipe("a red square", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, seed=0)
    assert image.images[0].size == (128, 128)


def _image(pipe, prompt: str = "a blue square") -> torch.Tensor:
    args = dict(height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, seed=0, output_type="pt")
    return pipe(prompt, **args).images


def test_lora_trains_adapters_and_comfyui_file_reproduces_it(
    data: dict, tiny_cascade_folder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from wuerstchen import WuerstchenPipeline
    from wuerstchen.lora import convert_lora

    out = tmp_path / "run"
    values = stage_c(data, tiny_cascade_folder, out, max_steps=3, lora_rank=4, lora_alpha=2.0, lr=1e-2,
                     ema_beta=0.0, lora_targets="attention+resblock")  # fmt: skip
    result = train(build_config("c", values))
    base = WuerstchenPipeline.from_pretrained(tiny_cascade_folder)
    trained = {k.replace(".base_layer", ""): v for k, v in result.module.model.state_dict().items() if "lora_" not in k}
    base_state = base.prior.state_dict()
    assert trained.keys() == base_state.keys() and all(torch.equal(trained[k], base_state[k]) for k in base_state)
    comfy = load_file(str(out / "lora_comfyui.safetensors"))
    assert all(k.startswith("lora_prior_unet_") for k in comfy)
    assert "lora_prior_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight" in comfy
    assert "lora_prior_unet_up_blocks_0_0_channelwise_4.lora_up.weight" in comfy
    assert float(comfy["lora_prior_unet_down_blocks_0_2_attention_attn_out_proj.alpha"]) == 2.0
    ups = [v for k, v in comfy.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups)  # B started at zero and moved

    base_image = _image(base)
    live = WuerstchenPipeline.from_pretrained(tiny_cascade_folder)
    live.prior = result.module.model.eval()
    want = _image(live)
    assert (want - base_image).abs().max() > 1e-4  # the LoRA changes the image

    loaded = WuerstchenPipeline.from_pretrained(tiny_cascade_folder)
    loaded.load_lora_weights(out / "lora_comfyui.safetensors")
    # The same factors in the same peft layers, the same alpha/r: the same arithmetic, bit for bit.
    assert torch.equal(_image(loaded), want)
    loaded.unload_lora_weights()
    loaded.load_lora_weights(out / "lora_comfyui.safetensors", scale=0.0)
    assert torch.equal(_image(loaded), base_image)  # scale 0: the base model, bit for bit

    # ComfyUI → ours → ComfyUI gives the same tensors back.
    convert_lora(out / "lora_comfyui.safetensors", tmp_path / "ours.safetensors", "ours")
    convert_lora(tmp_path / "ours.safetensors", tmp_path / "back.safetensors", "comfyui")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == comfy.keys() and all(torch.equal(back[k], comfy[k]) for k in comfy)


def test_official_trainer_lora_converts_exactly(tiny_cascade_folder: Path, tmp_path: Path) -> None:
    """The official layout (`weights.<i>.lora_down/up`, out_proj then the stacked in_proj per attention,
    scale 1/r) loaded through the converter equals adding its ΔW to the weights directly."""
    pytest.importorskip("peft")
    from safetensors.torch import save_file

    from wuerstchen import WuerstchenPipeline
    from wuerstchen.lora import convert_lora
    from wuerstchen.models.blocks import AttnBlock

    pipe = WuerstchenPipeline.from_pretrained(tiny_cascade_folder)
    blocks = [(n, m) for n, m in pipe.prior.named_modules() if isinstance(m, AttnBlock)]
    g, rank, state = torch.Generator().manual_seed(0), 2, {}
    merged = WuerstchenPipeline.from_pretrained(tiny_cascade_folder)
    for i, (name, block) in enumerate(blocks):
        c = block.attention.to_q.in_features
        for j, rows in ((2 * i, c), (2 * i + 1, 3 * c)):
            state[f"weights.{j}.lora_down"] = torch.randn(rank, c, generator=g) * 0.3
            state[f"weights.{j}.lora_up"] = torch.randn(rows, rank, generator=g) * 0.3
        att = merged.prior.get_submodule(name).attention
        with torch.no_grad():
            att.to_out[0].weight += state[f"weights.{2 * i}.lora_up"] @ state[f"weights.{2 * i}.lora_down"] / rank
            delta = state[f"weights.{2 * i + 1}.lora_up"] @ state[f"weights.{2 * i + 1}.lora_down"] / rank
            for k, lin in enumerate((att.to_q, att.to_k, att.to_v)):
                lin.weight += delta[k * c : (k + 1) * c]
    state["embeddings.embeddings"] = torch.zeros(1, 32)  # the ReToken part: not the prior's, skipped
    save_file(state, str(tmp_path / "official.safetensors"))
    convert_lora(tmp_path / "official.safetensors", tmp_path / "ours.safetensors", "ours", model=pipe.prior)
    x, r = torch.randn(2, 16, 3, 3, generator=g), torch.tensor([0.3, 0.8])
    conds = dict(clip_text_pooled=torch.randn(2, 1, 32, generator=g), clip_text=torch.randn(2, 77, 32, generator=g),
                 clip_img=torch.randn(2, 1, 24, generator=g))  # fmt: skip
    with torch.no_grad():
        plain = pipe.prior(x, r, **conds)
        pipe.load_lora_weights(tmp_path / "ours.safetensors")
        got, want = pipe.prior(x, r, **conds), merged.prior(x, r, **conds)
    # Merged weights vs. W·x + (1/r)·B·A·x: float32 rounding of reordered sums, relative to the
    # output's scale (measured 2.7e-7); the LoRA itself moves the output by far more.
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale and (got - plain).abs().max() > 1e-2 * scale


def test_gdf_objective() -> None:
    """r is the time of the clamped ᾱ, the p2 weight is 1 − ᾱ, the adaptive weight 1 / bucket loss."""
    from wuerstchen.sampling import alpha_cumprod
    from wuerstchen.train.cascade import AdaptiveLossWeight, gdf_r

    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    r = gdf_r(alpha_cumprod(t))
    assert 0 < r[0] < 0.01 and 0.99 < r[-1] < 1  # the clamp [1e-4, 0.9999] moves the ends
    torch.testing.assert_close(r[1:3], t[1:3], atol=1e-5, rtol=0)  # float32 acos near mid-range
    weights = AdaptiveLossWeight()
    logsnr = torch.tensor([-5.0, 5.0])
    assert torch.equal(weights(logsnr), torch.ones(2))
    weights.update(logsnr, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(weights(logsnr), 1 / torch.tensor([0.99 + 0.02, 0.99 + 0.005]))


def test_mistakes_are_one_line(tmp_path: Path, capsys) -> None:
    from wuerstchen.cli import main

    for args, message in (
        (["--optimizer", "adam9bit"], "--optimizer must be adamw or adamw8bit"),
        (["--lora-targets", "everything"], "--lora-targets must be attention or attention+resblock"),
        (["--image-embed-rate", "2"], "--image-embed-rate must be in [0, 1]"),
        (["--loss-weighting", "snr"], "p2, uniform or adaptive"),
        (["--optimizer", "adamw8bit", "--model", "tiny-c", "--data", str(tmp_path), "--device", "cpu",
          "--text-encoder", "random:32", "--semantic", "tiny"], "needs a CUDA device"),
    ):  # fmt: skip
        make_data(tmp_path, n=2, size=64)
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "c", "--output-dir", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert json.loads(json.dumps({"ok": True}))


def test_cache_gives_the_same_inputs(data: dict, tiny_cascade_folder: Path, tmp_path: Path) -> None:
    """With image embeddings off, a run from the v3 cache (text states, pooled embeddings, latents)
    sees what a run from the images sees; float32 cache, so the losses agree to rounding."""
    values = stage_c(data, tiny_cascade_folder, tmp_path / "plain", max_steps=3, image_embed_rate=0.0)
    plain = train(build_config("c", values)).losses
    cached = train(build_config("c", values | {"output_dir": str(tmp_path / "cached"),
                                               "cache": str(tmp_path / "c.safetensors")})).losses  # fmt: skip
    # The same float32 tensors stored and read back, but the encoders ran on batches of other
    # compositions (cache order), so float32 rounding may differ; the bound is the v2 cache test's.
    np.testing.assert_allclose(list(cached.values()), list(plain.values()), rtol=1e-4)
