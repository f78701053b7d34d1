"""Pipeline behaviour on our own tiny random model: input checks, precision, offload, prompt
weighting, the stages run apart."""

from __future__ import annotations

import logging

import pytest
import torch
from tolerance import max_abs

from wuerstchen import WuerstchenPipeline
from wuerstchen.models.text import encode_prompts, parse_weights

FAST = dict(height=128, width=128, prior_num_inference_steps=4, num_inference_steps=2, output_type="pt")


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    return WuerstchenPipeline.from_pretrained(tiny_folder)


def test_size_not_on_the_step_is_snapped_down_with_a_warning(pipe, caplog):
    assert pipe.size_step == 128
    with caplog.at_level(logging.WARNING):
        images = pipe("a red circle", **{**FAST, "height": 200, "width": 300}, seed=0).images
    assert images.shape == (1, 3, 128, 256)
    assert "not a multiple of 128" in caplog.text


@pytest.mark.parametrize(
    "bad, error",
    [
        (dict(height=100), "too small"),
        (dict(width=0), "too small"),
        (dict(prior_num_inference_steps=0), "steps"),
        (dict(num_inference_steps=-1), "steps"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prior_timesteps=[0.0, 1.0]), "decreasing"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(negative_prompt=["a", "b"]), "negative prompts"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, bad, error):
    with pytest.raises(ValueError, match=error):
        pipe("a red circle", **{**FAST, **bad}, seed=0)


def test_wrong_types_are_refused(pipe):
    with pytest.raises(TypeError):
        pipe(42, **FAST)
    with pytest.raises(TypeError):
        pipe("a", **{**FAST, "height": 128.0})


def test_guidance_at_most_one_turns_cfg_off(pipe):
    calls = []
    pipe.prior.register_forward_hook(lambda m, a, o: calls.append((a[0].shape[0], o.shape[0])))
    try:
        off = pipe("a red circle", prior_guidance_scale=1.0, seed=3, **FAST).images
        zero = pipe("a red circle", prior_guidance_scale=0.0, seed=3, **FAST).images
        assert set(calls) == {(1, 1)}  # one pass per step, no unconditional half
        calls.clear()
        on = pipe("a red circle", prior_guidance_scale=4.0, seed=3, **FAST).images
        # CFG: conditional and unconditional in one batched pass; the latent goes in once, the
        # blocks before the first attention run once for both halves
        assert set(calls) == {(1, 2)}
    finally:
        pipe.prior._forward_hooks.clear()
    assert torch.equal(off, zero)
    assert (on - off).abs().max() > 1e-3


def test_empty_prompt_is_unconditional(pipe):
    images = pipe("", seed=1, **FAST).images
    assert images.shape == (1, 3, 128, 128) and torch.isfinite(images).all()
    assert torch.equal(pipe(None, seed=1, **FAST).images, images)


def test_output_types(pipe):
    pil = pipe("a", seed=0, **{**FAST, "output_type": "pil"}).images
    assert pil[0].size == (128, 128) and pil[0].mode == "RGB"
    arr = pipe("a", seed=0, **{**FAST, "output_type": "np"}).images
    assert arr.shape == (1, 128, 128, 3) and 0 <= arr.min() and arr.max() <= 1
    lat = pipe("a", seed=0, **{**FAST, "output_type": "latent"}).images
    assert lat.shape == (1, 4, 32, 32)
    assert isinstance(pipe("a", seed=0, return_dict=False, **FAST), tuple)


def test_prior_only_and_decoder_only(pipe, tiny_folder):
    prior = pipe.generate_prior("a red circle", num_inference_steps=4, seed=2)
    images = pipe.decode(prior.image_embeddings, "a red circle", num_inference_steps=2, generator=prior.generator,
                         output_type="pt").images  # fmt: skip
    assert torch.equal(images, pipe("a red circle", seed=2, **FAST).images)
    # A folder without the prior loads as a decoder-only pipeline.
    decoder_only = WuerstchenPipeline(None, None, None, pipe.decoder, pipe.text_encoder, pipe.tokenizer, pipe.vqgan)
    with pytest.raises(ValueError, match="no prior"):
        decoder_only("a red circle", **FAST)
    assert decoder_only.decode(prior.image_embeddings, "x", num_inference_steps=2).images[0].size == (128, 128)


def test_callback_on_step_end_can_replace_latents(pipe):
    seen = []

    def callback(_pipe, i, t, kwargs):
        seen.append((i, float(t)))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    pipe("a", seed=0, prior_callback_on_step_end=callback, **FAST)
    assert [i for i, _ in seen] == [0, 1, 2, 3] and seen[0][1] == 1.0


def test_bfloat16_runs_end_to_end_close_to_float32(tiny_folder):
    # Deterministic DDIM and a fixed seed; bfloat16 keeps 8 bits of mantissa, so the images may
    # differ by a few percent of the range: mean abs difference ≤ 0.03 (images in [0, 1]).
    f32 = WuerstchenPipeline.from_pretrained(tiny_folder)
    bf16 = WuerstchenPipeline.from_pretrained(tiny_folder, torch_dtype=torch.bfloat16)
    assert bf16.prior.projection.weight.dtype == torch.bfloat16
    args = dict(FAST, prior_num_inference_steps=10, sampler="ddim")
    a = f32("a red circle", seed=4, **args).images
    b = bf16("a red circle", seed=4, **args).images
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().mean() <= 0.03  # ≈ 8 BF16_EPS; measured 4.6e-3, natively and with emulated bfloat16
    # diffusers' forms of `to`: a dtype alone casts every model and gives the same image
    cast = WuerstchenPipeline.from_pretrained(tiny_folder).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in cast.modules().values() for p in m.parameters())
    assert torch.equal(cast("a red circle", seed=4, **args).images, b)
    assert cast.to("cpu", torch.float32).prior.projection.weight.dtype == torch.float32


def test_float16_overflow_is_detected(tiny_folder):
    pipe = WuerstchenPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float16)
    with torch.no_grad():
        pipe.prior.projection.weight.mul_(1e4)  # provoke the overflow the official weights show
    with pytest.raises(FloatingPointError, match="bfloat16"):
        pipe("a red circle", seed=0, **FAST)


@pytest.mark.parametrize("kind", ["model", "sequential"])
def test_offload_gives_the_same_image(tiny_folder, pipe, kind):
    offloaded = WuerstchenPipeline.from_pretrained(tiny_folder)
    getattr(offloaded, f"enable_{kind}_cpu_offload")("cpu")
    assert torch.equal(offloaded("a red circle", seed=6, **FAST).images, pipe("a red circle", seed=6, **FAST).images)


def test_compile_gives_the_same_image(tiny_folder, pipe):
    # inductor with freezing (weights folded into the graph) on the prior, decoder and VQGAN decode;
    # fusing reorders float32 arithmetic, hence a tolerance rather than equality: images in [0, 1],
    # measured 4.4e-5 here (5.4e-5 with oneDNN held to AVX2).
    compiled = WuerstchenPipeline.from_pretrained(tiny_folder)
    compiled.compile()
    assert set(compiled.placement.compiled) == {"prior", "decoder", "vqgan"}
    args = dict(FAST, prior_num_inference_steps=2)
    want = pipe("a red circle", seed=5, **args).images
    assert max_abs(compiled("a red circle", seed=5, **args).images, want) <= 1e-4


def test_parse_weights():
    assert parse_weights("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
    assert parse_weights("(big) [dim] \\(literal\\)") == [("big", 1.1), (" ", 1.0), ("dim", 1 / 1.1),
                                                          (" (literal)", 1.0)]  # fmt: skip
    assert parse_weights("((nested:2))") == [("nested", 2 * 1.1)]
    assert parse_weights("plain text") == [("plain text", 1.0)]


def test_weight_one_is_exactly_unweighted(pipe):
    a = pipe("a (red:1.0) circle", seed=8, **FAST).images
    b = pipe("a red circle", seed=8, **FAST).images
    assert torch.equal(a, b)


def test_larger_weight_scales_the_weighted_tokens(pipe):
    import copy

    tok = pipe.prior_tokenizer
    red = slice(2, 5)  # BOS, "a</w>", then "r", "e", "d</w>" with the character tokenizer
    # A text encoder whose states have a real mean (a final LayerNorm bias, as trained CLIPs have):
    # the weighted tokens scale by weight · k and the rest by k, k restoring the sequence's mean.
    enc = copy.deepcopy(pipe.prior_text_encoder)
    with torch.no_grad():
        enc.final_layer_norm.bias.fill_(0.3)
    plain = encode_prompts(tok, enc, ["a red circle"], "cpu")
    weighted = encode_prompts(tok, enc, ["a (red:1.5) circle"], "cpu")
    ratio = weighted / plain
    k = ratio[0, 5:].median()
    assert 0.9 < k < 1  # the red tokens' larger share of the mean is taken out of every token
    # Ratios of ~1: a float32 product and quotient, a few ulps apart (measured 1.2e-7 relative).
    assert torch.allclose(ratio[0, red] / k, torch.full_like(ratio[0, red], 1.5), rtol=1e-5)
    assert torch.allclose(ratio[0, 5:] / k, torch.ones_like(ratio[0, 5:]), rtol=1e-5)
    # The mean (0.3 here) is restored up to the rounding of a mean over 77 × 32 float32 states.
    assert (weighted.mean() - plain.mean()).abs() <= 1e-5 * plain.mean().abs()
    # Without the bias (the fixture's fresh CLIP) the mean is ~1e-8 against states of ~1: a ratio of
    # two such means is noise (it gave -3.5, 4, ±inf on other seeds), so the weights stay plain.
    plain = encode_prompts(tok, pipe.prior_text_encoder, ["a red circle"], "cpu")
    weighted = encode_prompts(tok, pipe.prior_text_encoder, ["a (red:1.5) circle"], "cpu")
    assert torch.isfinite(weighted).all()
    assert torch.allclose(weighted[0, red], 1.5 * plain[0, red], rtol=1e-6)
    assert torch.equal(weighted[0, 5:], plain[0, 5:])


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt("prior", ["x" * 200], None, False, 1)
    assert "prompt truncated: 125 of 200 tokens cut" in caplog.text


def test_compel_style_embeds(pipe):
    (embeds,) = pipe.encode_prompt("prior", ["a red circle"], None, False, 1)  # token states (B, 77, D)
    (dec,) = pipe.encode_prompt("decoder", ["a red circle"], None, False, 1)
    a = pipe(prompt_embeds=embeds, decoder_prompt_embeds=dec, seed=2, **FAST).images
    b = pipe("a red circle", seed=2, **FAST).images
    assert torch.equal(a, b)
