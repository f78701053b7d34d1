"""Stable Cascade (v3) through our one pipeline against diffusers' deprecated Stable Cascade
pipelines, on the same tiny random weights: same generator → same prior latents, decoder latents
and images. Images (in [0, 1]) max abs difference ≤ 1e-4; latents relative to their standard
deviation (see `tolerance`: float32 rounding differs between CPUs in proportion to the values).
Also what diffusers cannot do: lists of prompts, `seed=`, the prior's `timesteps`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny import run_both
from tolerance import max_abs, std_err

from wuerstchen import WuerstchenPipeline

# Both pipelines run the same float32 arithmetic in other orders (our text K/V once per generation,
# our CPU kernels): rounding only. Images in [0, 1], absolute: measured here (Zen 4) ≤ 2.0e-5
# (decoder guidance; the others 1.2–1.8e-5), the bound 1e-4 leaves other CPUs 5×. Latents
# relative to their std: measured ≤ 7.8e-7 (prior) and ≤ 6.7e-7 (decoder); 1e-5 leaves the 4×
# that an Intel Xeon showed for v2 three times over, where the 1e-4 would hide real errors.
IMAGE_TOL = 1e-4
LATENT_TOL = 1e-5

BASE = dict(height=128, width=128, prior_num_inference_steps=6, num_inference_steps=4)
CASES = {
    "prompt with CFG": dict(prompt="a red circle"),
    "negative prompt": dict(prompt="a red circle", negative_prompt="a blue square"),
    "2 images per prompt": dict(prompt="a red circle", num_images_per_prompt=2),
    "non-square": dict(prompt="a green triangle", height=128, width=256),
    "decoder guidance": dict(prompt="a red circle", negative_prompt="noise", decoder_guidance_scale=3.0),
    "no guidance": dict(prompt="a red circle", prior_guidance_scale=1.0),
}


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(4321)


def picture() -> Image.Image:
    g = torch.Generator().manual_seed(5)
    return Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def ours(cascade_reference):
    return WuerstchenPipeline.from_pretrained(cascade_reference[1] / "combined")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_latents_and_images(case, ours, cascade_reference):
    ref, _ = cascade_reference
    args = {**BASE, **CASES[case]}
    want, got, want_lat, got_lat = run_both(ref, ours, args, gen)
    assert std_err(got_lat["prior"], want_lat["prior"]) <= LATENT_TOL
    assert std_err(got_lat["decoder"], want_lat["decoder"]) <= LATENT_TOL
    assert got.shape == want.shape == (args.get("num_images_per_prompt", 1), 3, args["height"], args["width"])
    assert max_abs(got, want) <= IMAGE_TOL
    assert want.std() > 0.02  # the images are not flat: the comparison means something


def test_image_variation_from_a_pil_image(ours, cascade_reference):
    ref, _ = cascade_reference
    args = {**BASE, "prompt": "", "images": [picture()]}
    want, got, want_lat, got_lat = run_both(ref, ours, args, gen)
    assert std_err(got_lat["prior"], want_lat["prior"]) <= LATENT_TOL
    assert max_abs(got, want) <= IMAGE_TOL
    plain = ours(**{**BASE, "prompt": ""}, generator=gen(), output_type="pt").images
    assert max_abs(plain, got) > 1e-3  # the image condition changes the result


def test_image_weights_scale_the_embeddings(ours):
    one = ours.encode_images([picture()])
    two = ours.encode_images([picture(), picture()], weights=[1.0, 0.5])
    assert one.shape == (1, 1, ours.prior.config.clip_image_in_channels) and two.shape[1] == 2
    assert torch.equal(two[:, :1], one) and torch.allclose(two[:, 1:], one * 0.5)


def test_custom_prior_timesteps(ours, cascade_reference):
    # diffusers' prior accepts `timesteps` and ignores them; the reference here is its scheduler
    # set to the same times, which is what honouring them means.
    from diffusers import DDPMWuerstchenScheduler

    ref, _ = cascade_reference
    times = [1.0, 0.8, 0.55, 0.3, 0.1, 0.0]
    sched = ref.prior_pipe.scheduler
    original = sched.set_timesteps
    sched.set_timesteps = lambda *a, device=None, **k: DDPMWuerstchenScheduler.set_timesteps(
        sched, timesteps=times, device=device
    )
    try:
        want = ref.prior_pipe("a red circle", height=128, width=128, generator=gen(), output_type="pt")
    finally:
        sched.set_timesteps = original
    got = ours.generate_prior("a red circle", height=128, width=128, timesteps=times, generator=gen())
    assert std_err(got.image_embeddings, want.image_embeddings) <= LATENT_TOL


def test_two_repo_hub_layout(cascade_reference, ours):
    ref, root = cascade_reference
    pipe = WuerstchenPipeline.from_pretrained(root / "decoder-repo", prior=root / "prior-repo")
    assert type(pipe.prior).__name__ == "CascadeUNet" and pipe.image_encoder is not None
    args = {**BASE, **CASES["negative prompt"]}
    want, got, _, _ = run_both(ref, pipe, args, gen)
    assert max_abs(got, want) <= IMAGE_TOL


def test_prior_and_decoder_alone(ours, cascade_reference):
    ref, _ = cascade_reference
    prior_args = dict(prompt="a red circle", height=128, width=256, num_inference_steps=5, negative_prompt="x")
    want = ref.prior_pipe(**prior_args, generator=gen(), output_type="pt")
    got = ours.generate_prior(**prior_args, generator=gen())
    assert got.image_embeddings.shape == (1, 16, 3, 6)
    assert std_err(got.image_embeddings, want.image_embeddings) <= LATENT_TOL
    emb = torch.randn(2, 16, 3, 3, generator=gen())
    dec = dict(num_inference_steps=4, guidance_scale=2.0)
    want = ref.decoder_pipe(emb, prompt=["a", "b"], negative_prompt=["n", "n"], generator=gen(),
                            output_type="latent", **dec).images  # fmt: skip
    got = ours.decode(emb, prompt=["a", "b"], negative_prompt="n", generator=gen(), output_type="latent", **dec)
    assert std_err(got.images, want) <= LATENT_TOL


def test_lists_of_prompts_and_seeds_match_single_runs(ours):
    prompts = ["a red circle", "two blue squares"]
    batch = ours(prompts, num_images_per_prompt=2, seed=11, output_type="pt", **BASE).images
    assert batch.shape == (4, 3, 128, 128)
    for i in range(4):
        alone = ours(prompts[i // 2], seed=11 + i, output_type="pt", **BASE).images
        # A batch of 4 and of 1 may take other GEMM kernels: float32 rounding in other orders, as
        # against diffusers (IMAGE_TOL); measured here ≤ 1.6e-5 (these random weights' images are
        # mostly saturated, their few mid-tones change fastest).
        assert max_abs(alone[0], batch[i]) <= IMAGE_TOL, f"image {i} differs from its regeneration alone"
    assert max_abs(batch[0], batch[1]) > 0.01


def test_defaults_are_diffusers_stable_cascade_ones(ours):
    assert ours.prior_part.defaults == {
        "prior_steps": 20, "decoder_steps": 10, "prior_guidance": 4.0, "decoder_guidance": 0.0
    }  # fmt: skip
    seen = {}
    ours(**{k: v for k, v in BASE.items() if "steps" not in k}, prompt="x", seed=0, output_type="latent",
         step_hook=lambda stage, step, total, _x: seen.__setitem__(stage, total))  # fmt: skip
    assert seen == {"prior": 20, "decoder": 10}


def test_save_pretrained_round_trip_loads_in_ours_and_diffusers(ours, tmp_path):
    from diffusers import StableCascadeUNet

    ours.save_pretrained(tmp_path / "saved")
    again = WuerstchenPipeline.from_pretrained(tmp_path / "saved")
    args = {**BASE, "prompt": "a red circle", "images": [picture()]}
    assert torch.equal(again(**args, seed=3, output_type="pt").images, ours(**args, seed=3, output_type="pt").images)
    for name, model in (("prior_prior", ours.prior), ("decoder", ours.decoder)):
        theirs = StableCascadeUNet.from_pretrained(tmp_path / "saved" / name)
        assert all(torch.equal(theirs.state_dict()[k], v) for k, v in model.state_dict().items())


def test_lite_folders_and_variant_files(cascade_reference, tmp_path):
    import shutil

    # The hub's repos hold decoder_lite/ and prior_lite/ beside the full models, and bf16 files
    # (diffusion_pytorch_model.bf16.safetensors); components without that variant load their plain files.
    _, root = cascade_reference
    for repo, model in (("decoder-repo", "decoder"), ("prior-repo", "prior")):
        shutil.copytree(root / repo, tmp_path / repo)
        lite = tmp_path / repo / f"{model}_lite"
        (tmp_path / repo / model).rename(lite)
        (lite / "diffusion_pytorch_model.safetensors").rename(lite / "diffusion_pytorch_model.bf16.safetensors")
    pipe = WuerstchenPipeline.from_pretrained(tmp_path / "decoder-repo", prior=tmp_path / "prior-repo", lite=True,
                                              variant="bf16")  # fmt: skip
    full = WuerstchenPipeline.from_pretrained(root / "decoder-repo", prior=root / "prior-repo")
    for a, b in ((pipe.decoder, full.decoder), (pipe.prior, full.prior)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(FileNotFoundError, match="prior_lite"):
        WuerstchenPipeline.from_pretrained(root / "prior-repo", lite=True)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):  # the lite folder has only bf16 files
        WuerstchenPipeline.from_pretrained(tmp_path / "prior-repo", lite=True)
    with pytest.raises(FileNotFoundError, match="lite=True"):
        WuerstchenPipeline.from_pretrained(tmp_path / "prior-repo")


def test_bfloat16_runs_end_to_end_close_to_float32(cascade_reference):
    # DDIM and a fixed seed; bfloat16 keeps 8 bits of mantissa: these random-weight images are
    # mostly saturated, so a flipped pixel counts fully. Mean abs difference of images in [0, 1].
    _, root = cascade_reference
    f32 = WuerstchenPipeline.from_pretrained(root / "combined")
    bf16 = WuerstchenPipeline.from_pretrained(root / "combined", torch_dtype=torch.bfloat16)
    assert next(bf16.prior.parameters()).dtype == torch.bfloat16
    args = {**BASE, "prompt": "a red circle", "sampler": "ddim", "seed": 4, "output_type": "pt"}
    a, b = f32(**args).images, bf16(**args).images
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().mean() <= 0.03  # ≈ 8 BF16_EPS, as for v2; measured 1.4e-3 here (seeds 0–3)


@pytest.mark.parametrize("kind", ["model", "sequential"])
def test_offload_gives_the_same_image(cascade_reference, ours, kind):
    offloaded = WuerstchenPipeline.from_pretrained(cascade_reference[1] / "combined")
    getattr(offloaded, f"enable_{kind}_cpu_offload")("cpu")
    args = {**BASE, "prompt": "a red circle", "images": [picture()], "seed": 6, "output_type": "pt"}
    assert torch.equal(offloaded(**args).images, ours(**args).images)


def test_prompt_embeds_need_their_pooled_embedding(ours):
    states, pooled = ours.encode_prompt("prior", ["a red circle"], None, False, 1)
    with pytest.raises(ValueError, match="pooled"):
        ours.generate_prior(prompt_embeds=states, height=128, width=128, num_inference_steps=2)
    got = ours.generate_prior(prompt_embeds=states, prompt_embeds_pooled=pooled, height=128, width=128,
                              num_inference_steps=2, seed=1, negative_prompt="x")  # fmt: skip
    want = ours.generate_prior("a red circle", height=128, width=128, num_inference_steps=2, seed=1,
                               negative_prompt="x")  # fmt: skip
    assert torch.equal(got.image_embeddings, want.image_embeddings)


def test_comfyui_lora_loads_and_scale_0_is_the_base_image(cascade_reference, tmp_path):
    """A LoRA in ComfyUI's key format (`lora_prior_unet_<official module path>`, lora_down/lora_up,
    alpha), written here under the official Stable Cascade names: at scale 0 the base image bit for
    bit; at scale 1 the image of the base weights with W + (alpha / r)·up·down merged in."""
    pytest.importorskip("peft")
    from wuerstchen.io.checkpoint import save_tensors

    folder = cascade_reference[1] / "combined"
    g = torch.Generator().manual_seed(9)
    # official (ComfyUI) name → ours; tiny-c's level 0 is ResBlock, TimestepBlock, AttnBlock
    layers = {"down_blocks.0.2.attention.attn.to_q": "down_blocks.0.2.attention.to_q",
              "down_blocks.0.2.attention.attn.out_proj": "down_blocks.0.2.attention.to_out.0",
              "up_blocks.0.2.kv_mapper.1": "up_blocks.0.2.kv_mapper.1"}  # fmt: skip
    base = WuerstchenPipeline.from_pretrained(folder)
    state, merged = {}, WuerstchenPipeline.from_pretrained(folder)
    for i, (official, ours_path) in enumerate(layers.items()):
        weight = merged.prior.get_submodule(ours_path).weight
        down = torch.randn(4, weight.shape[1], generator=g) * 0.3
        up = torch.randn(weight.shape[0], 4, generator=g) * 0.3
        alpha = 2.0 if i else 4.0  # per-layer alphas: scale alpha / rank
        key = "lora_prior_unet_" + official.replace(".", "_")
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
        with torch.no_grad():
            weight += alpha / 4 * up @ down
    save_tensors(state, tmp_path / "comfy.safetensors")
    args = {**BASE, "prompt": "a red circle", "seed": 2, "output_type": "pt"}
    pipe = WuerstchenPipeline.from_pretrained(folder)
    pipe.load_lora_weights(tmp_path / "comfy.safetensors", scale=0.0)
    assert torch.equal(pipe(**args).images, base(**args).images)
    from wuerstchen.lora import set_lora_scale

    set_lora_scale(pipe, 1.0)
    got = pipe(**args).images
    # W·x + s·B·A·x against (W + s·B·A)·x: rounding in other orders, as against diffusers; measured 1.5e-5
    assert max_abs(got, merged(**args).images) <= IMAGE_TOL
    assert max_abs(got, base(**args).images) > 1e-3  # and the LoRA does something
    bad = {**state, "lora_prior_unet_no_such_layer.lora_down.weight": down.clone()}
    save_tensors(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no_such_layer"):
        WuerstchenPipeline.from_pretrained(folder).load_lora_weights(tmp_path / "bad.safetensors")


def test_convert_official_single_files(cascade_reference, ours, tmp_path):
    """The official files, written here under the official key names (test_cascade_files' inverse),
    convert to a folder that generates what the diffusers-format folder does; the VQGAN takes Stable
    Cascade's official latent scale, 0.43."""
    from test_cascade_files import to_official

    from wuerstchen.io.cascade_files import convert_cascade_files
    from wuerstchen.io.checkpoint import save_tensors
    from wuerstchen.models.previewer import PREVIEWER_PRESETS, Previewer
    from wuerstchen.models.semantic import SEMANTIC_PRESETS, SemanticCompressor
    from wuerstchen.testing import randomize

    _, root = cascade_reference
    save_tensors(to_official(ours.prior.state_dict(), "c"), tmp_path / "stage_c.safetensors")
    save_tensors(to_official(ours.decoder.state_dict(), "b"), tmp_path / "stage_b.safetensors")
    vq = {("vquantizer.codebook.weight" if k == "vquantizer.embedding.weight" else k): v
          for k, v in ours.vqgan.state_dict().items()}  # fmt: skip
    save_tensors(vq, tmp_path / "stage_a.safetensors")
    previewer = randomize(Previewer(PREVIEWER_PRESETS["tiny"]), seed=3)
    save_tensors(previewer.state_dict(), tmp_path / "previewer.safetensors")
    effnet = randomize(SemanticCompressor(SEMANTIC_PRESETS["stable-cascade"]), seed=4)  # the official size
    save_tensors(effnet.state_dict(), tmp_path / "effnet_encoder.safetensors")
    heads = {"num_attention_heads": list(ours.prior.config.num_attention_heads)}  # not in the weights
    out = convert_cascade_files(
        tmp_path / "converted", tmp_path / "stage_c.safetensors", tmp_path / "stage_b.safetensors",
        tmp_path / "stage_a.safetensors", root / "combined" / "prior_text_encoder",
        tokenizer=root / "combined" / "prior_tokenizer", image_encoder=root / "prior-repo" / "image_encoder",
        previewer=tmp_path / "previewer.safetensors", effnet=tmp_path / "effnet_encoder.safetensors",
        stage_c_options=heads,
        stage_b_options={"num_attention_heads": list(ours.decoder.config.num_attention_heads)},
    )  # fmt: skip
    pipe = WuerstchenPipeline.from_pretrained(out)
    assert pipe.vqgan.config.scale_factor == 0.43 and pipe.previewer is not None
    args = {**BASE, "prompt": "a red circle", "images": [picture()], "seed": 5, "output_type": "latent"}
    assert torch.equal(pipe(**args).images, ours(**args).images)
    edited = pipe(**{**args, "images": None}, image=picture(), strength=0.5).images  # the effnet: image inputs
    assert torch.isfinite(edited).all() and not torch.equal(edited, pipe(**{**args, "images": None}).images)
    latents = torch.randn(1, 16, 3, 3)
    assert torch.equal(pipe.previewer.preview(latents), previewer.preview(latents))
    from wuerstchen.server.preview import latents_to_rgb

    assert torch.equal(latents_to_rgb(pipe, latents), previewer.preview(latents))  # the UI's Stage C preview


def test_sizes_where_diffusers_fails(ours, cascade_reference):
    """176 px: Stage C side ⌈176 / 42.67⌉ = 5, so diffusers' Stage B side is int(5 · 10.67) = 53, odd,
    and its patch-2 decoder fails; ours sizes Stage B from the image (176 / 4 = 44), as the official
    sampler does, at any multiple of 8 px. A list of prompts there matches single runs too."""
    ref, _ = cascade_reference
    args = dict(height=136, width=176, prior_num_inference_steps=4, num_inference_steps=3)
    with pytest.raises(RuntimeError, match="pixel_unshuffle"):
        ref("a red circle", **args, generator=gen(), output_type="pt")
    assert ours.size_step == 8
    batch = ours(["a red circle", "a blue square"], **args, seed=3, output_type="pt").images
    assert batch.shape == (2, 3, 136, 176)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        alone = ours(prompt, **args, seed=3 + i, output_type="pt").images
        assert max_abs(alone[0], batch[i]) <= IMAGE_TOL  # batch vs single: rounding, as above


def test_the_cli_generates_with_a_stable_cascade_folder(cascade_reference, tmp_path):
    import json
    import subprocess
    import sys

    folder = cascade_reference[1] / "combined"
    cmd = [sys.executable, "-m", "wuerstchen", "generate", "a red circle", "--model", str(folder), "--height", "136",
           "--width", "176", "--prior-steps", "3", "--prior-shift", "2", "--decoder-steps", "2", "--seed", "4",
           "--dtype", "float32", "--output-dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "00000-4.png") as im:
        assert im.size == (176, 136)
        saved = json.loads(im.text["wuerstchen"])
    from wuerstchen import shifted_timesteps

    assert saved["prior_timesteps"] == shifted_timesteps(3, 2.0) and saved["decoder_steps"] == 2
