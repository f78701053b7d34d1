"""Inference benchmark: our pipeline against diffusers' deprecated Würstchen pipeline on the same
weights, prompt and generator, alternating in one run.

    wuerstchen bench                       # medium config, 512×512, CPU
    wuerstchen bench --size 1024 --repeats 1 --official   # also the official-size config, bf16
    wuerstchen bench --cascade             # Stable Cascade: medium config against diffusers' pipelines

The "medium" config is about a third of the official widths (prior c 512, depth 8, 8 heads;
decoder c_hidden 96/192/384/384, blocks 2/2/6/2; VQGAN 192 hidden, 6 bottleneck blocks) with random
weights and CLIP text towers of the official widths (1280 / 1024, 2 layers, a character
vocabulary). Everything printed is measured in this run: seconds and steps/s per stage, achieved
GFLOP/s (FLOPs from torch's FLOP counter, counted per implementation: ours does less work, e.g.
the text part of K/V once per generation), peak memory and load time (each in a fresh subprocess),
and the outputs' differences. It needs diffusers installed (the reference; `pip install -e .[test]`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .pipeline import WuerstchenPipeline
from .quant import MODES as QUANT_MODES
from .quant import default_kernel as quant_kernel
from .sampling import DEFAULT_STAGE_C_TIMESTEPS


@dataclass
class BenchOptions:
    """What to measure (the `wuerstchen bench` flags)."""

    preset: str = "medium"  # model config of the random-weight pipeline: medium or tiny
    size: int = 512  # image side in pixels
    decoder_steps: int = 12
    repeats: int = 2  # timed runs of each implementation, alternating
    warmup: int = 1  # untimed runs first
    threads: int | None = None  # torch threads (None: torch's choice)
    compile: bool = True  # also the torch.compile rows
    openvino: bool = True  # also the OpenVINO rows, when openvino and nncf are installed (wuerstchen.bench_openvino)
    paper: bool = False  # also FLOPs per 1024² image: Würstchen v2 vs SDXL
    official: bool = False  # ours alone on the official-size config
    dtype: str = "bfloat16"  # with `official`
    quantize: str | None = None  # with `official` / `shipped`: that int8 mode (wuerstchen.quant)
    shipped: bool = False  # the shipped small model: s/image, bf16 vs fp32 PSNR
    model: str | None = None  # with `shipped`: another model folder
    images: int = 24  # with `shipped`: prompts for the bf16 vs fp32 PSNR
    cascade: bool = False  # Stable Cascade (v3) medium config against diffusers' Stable Cascade pipelines
    child: str | None = None  # internal: measure one implementation in this fresh process
    folder: str | None = None  # internal: the child's model folder


PROMPT = "a red circle above a blue square"
CASCADE_PRIOR_STEPS = 20  # diffusers' Stable Cascade prior default
STAGES = ("prior", "decoder", "vqgan")
# (M, K, N) of the medium config's largest matrix products: prior MLP in/out at 512² with CFG,
# decoder level 1 MLP (4096 tokens, 384 → 1536).
GEMM_SHAPES = ((288, 512, 2048), (288, 2048, 512), (4096, 384, 1536))


def gemm_gflops(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...] = GEMM_SHAPES, repeats: int = 5) -> float:
    """Achieved GFLOP/s of `torch.matmul` in `dtype` at `shapes` (best of `repeats` per shape, the
    shapes' FLOPs summed over their best times): what this CPU's matrix units give this dtype."""
    g = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g).to(dtype)
        b = torch.randn(k, n, generator=g).to(dtype)
        a @ b  # warm-up: oneDNN picks and caches its kernel
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        flops += 2 * m * k * n
        seconds += best
    return flops / seconds / 1e9


def print_machine(threads: int) -> None:
    """The lines that say what a figure below was measured on: CPU, its matrix-relevant flags, the
    GEMM speed per dtype at the benchmark's shapes, and the dtype `auto` picks here."""
    from .hardware import RELEVANT_FLAGS, auto_dtype, cpu_flags, cpu_name

    flags = cpu_flags()
    have = [f for f in RELEVANT_FLAGS if f in flags]
    lacks = [f for f in RELEVANT_FLAGS if f not in flags]
    print(f"# cpu: {cpu_name()}, {threads} threads; flags: {' '.join(have) or '-'}; lacks: {' '.join(lacks) or '-'}")
    rates = {str(dt).removeprefix("torch."): gemm_gflops(dt) for dt in (torch.float32, torch.bfloat16)}
    shapes = ", ".join("×".join(map(str, s)) for s in GEMM_SHAPES)
    print(f"# GEMM ({shapes}): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
          + f" (bf16/fp32 {rates['bfloat16'] / rates['float32']:.2f}×); dtype auto → "
          + str(auto_dtype("cpu")).removeprefix("torch."))  # fmt: skip


def load_reference(folder: Path, dtype: torch.dtype = torch.float32, prior: Any = None, decoder: Any = None):
    """diffusers' combined pipeline from the component folders we wrote (its own `from_pretrained`
    of the whole folder no longer resolves the deprecated classes); `prior` / `decoder`: modules
    that stand in for its torch prior and decoder, which are then not loaded (the OpenVINO rows)."""
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel, CLIPTokenizer

    def model(cls, name):
        return cls.from_pretrained(folder / name, torch_dtype=dtype)

    ref = WuerstchenCombinedPipeline(
        prior_prior=model(WuerstchenPrior, "prior_prior") if prior is None else prior,
        prior_text_encoder=CLIPTextModel.from_pretrained(folder / "prior_text_encoder", dtype=dtype),
        prior_tokenizer=CLIPTokenizer.from_pretrained(folder / "prior_tokenizer"),
        prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(folder / "prior_scheduler"),
        decoder=model(WuerstchenDiffNeXt, "decoder") if decoder is None else decoder,
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(folder / "scheduler"),
        vqgan=model(PaellaVQModel, "vqgan"),
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def load_cascade_reference(folder: Path, dtype: torch.dtype = torch.float32):
    """diffusers' Stable Cascade combined pipeline from the component folders we wrote."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    text = CLIPTextModelWithProjection.from_pretrained(folder / "prior_text_encoder", dtype=dtype)
    ref = StableCascadeCombinedPipeline(
        prior_prior=StableCascadeUNet.from_pretrained(folder / "prior_prior", torch_dtype=dtype),
        prior_text_encoder=text,
        prior_tokenizer=CLIPTokenizer.from_pretrained(folder / "prior_tokenizer"),
        prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(folder / "prior_scheduler"),
        decoder=StableCascadeUNet.from_pretrained(folder / "decoder", torch_dtype=dtype),
        text_encoder=text,  # one CLIP-G for both stages, as ours shares it
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(folder / "scheduler"),
        vqgan=PaellaVQModel.from_pretrained(folder / "vqgan", torch_dtype=dtype),
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def cascade_runners(impl: str, pipe: Any, size: int, prior_steps: int, decoder_steps: int) -> list[Callable]:
    """`stage_runners` for Stable Cascade: diffusers' prior and decoder pipelines (its decoder reads
    the pooled prompt through its text encoder; ours too when called alone)."""
    if impl == "diffusers":
        return [
            lambda _, g: pipe.prior_pipe(PROMPT, height=size, width=size, num_inference_steps=prior_steps,
                                         guidance_scale=4.0, generator=g, output_type="pt").image_embeddings,
            lambda emb, g: pipe.decoder_pipe(emb, PROMPT, num_inference_steps=decoder_steps, generator=g,
                                             output_type="latent").images,
            lambda lat, g: pipe.vqgan.decode(lat * pipe.vqgan.config.scale_factor).sample.clamp(0, 1),
        ]  # fmt: skip
    return [
        lambda _, g: pipe.generate_prior(PROMPT, height=size, width=size, num_inference_steps=prior_steps,
                                         guidance_scale=4.0, generator=g).image_embeddings,
        lambda emb, g: pipe.decode(emb, PROMPT, num_inference_steps=decoder_steps, generator=g,
                                   output_type="latent").images,
        lambda lat, g: pipe.decode_latents(lat),
    ]  # fmt: skip


def stage_runners(impl: str, pipe: Any, size: int, prior_times: list[float], decoder_steps: int) -> list[Callable]:
    """Three callables run in order (prior → decoder latents → image); each takes the previous
    stage's output and a shared generator."""
    if impl == "diffusers":
        return [
            lambda _, g: pipe.prior_pipe(
                PROMPT, height=size, width=size, timesteps=prior_times, guidance_scale=4.0, generator=g,
                output_type="pt",
            ).image_embeddings,
            lambda emb, g: pipe.decoder_pipe(
                emb, PROMPT, num_inference_steps=decoder_steps, generator=g, output_type="latent"
            ).images,
            lambda lat, g: pipe.vqgan.decode(lat * pipe.vqgan.config.scale_factor).sample.clamp(0, 1),
        ]  # fmt: skip
    return [
        lambda _, g: (
            pipe.generate_prior(
                PROMPT, height=size, width=size, timesteps=prior_times, guidance_scale=4.0, generator=g
            ).image_embeddings
        ),
        lambda emb, g: (
            pipe.decode(emb, PROMPT, num_inference_steps=decoder_steps, generator=g, output_type="latent").images
        ),
        lambda lat, g: pipe.decode_latents(lat),
    ]


@torch.no_grad()
def run_once(runners: list[Callable], seed: int = 0) -> tuple[list[float], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, seconds, outputs = None, [], []
    for run in runners:
        t0 = time.perf_counter()
        x = run(x, g)
        seconds.append(time.perf_counter() - t0)
        outputs.append(x.float())
    return seconds, outputs


def _attention_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    """QKᵀ and PV of an attention call: 2·B·H·N·M·(d + d_v)."""
    *batch, n, d = query_shape
    return 2 * math.prod(batch) * n * key_shape[-2] * (d + value_shape[-1])


def _int_mm_ops(a_shape, b_shape, *args: Any, **kwargs: Any) -> int:
    """An int8 matrix product (M, K) · (K, N): 2·M·K·N operations, as its float counterpart."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _linear_dynamic_ops(x_shape, packed, *args: Any, **kwargs: Any) -> int:
    """fbgemm's int8 Linear (M, K) → (M, N): 2·M·K·N operations (N from its packed weight)."""
    weight, _ = torch.ops.quantized.linear_unpack(packed)
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * weight.shape[0]


def _flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU kernel of `scaled_dot_product_attention` (torch
    counts its GPU kernels, not that one: attention would count as 0 FLOPs on a CPU) and the int8
    products of `wuerstchen.quant` (as operations: "GFLOP/s" of an int8 row are int8 GOP/s)."""
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    mapping = {cpu_attention: _attention_flops, torch.ops.aten._int_mm: _int_mm_ops}
    if quant_kernel() == "fbgemm":
        mapping[torch.ops.quantized.linear_dynamic] = _linear_dynamic_ops
    return FlopCounterMode(display=False, custom_mapping=mapping)


@torch.no_grad()
def count_flops(impl: str, pipe: Any, size: int, prior_times: list[float], decoder_steps: int) -> list[float]:
    """FLOPs per stage for the full schedule: counted with 1 and 2 steps and extrapolated (the
    per-step work is constant; the difference separates it from the once-per-generation work)."""
    per_k = []
    if impl == "ours":  # the counter does not see oneDNN's ops; F.linear does the same arithmetic
        packed, pipe.packed_stages = pipe.packed_stages, ()
    try:
        for k in (1, 2):
            times = [1.0 - i / k for i in range(k + 1)]
            runners = stage_runners(impl, pipe, size, times, k)
            flops, x, g = [], None, torch.Generator().manual_seed(0)
            for run in runners:
                with _flop_counter() as counter:
                    x = run(x, g)
                flops.append(float(counter.get_total_flops()))
            per_k.append(flops)
    finally:
        if impl == "ours":
            pipe.packed_stages = packed
    steps = [len(prior_times) - 1, decoder_steps, 1]
    return [f1 + (n - 1) * (f2 - f1) if i < 2 else f1 for i, (f1, f2, n) in enumerate(zip(*per_k, steps, strict=True))]


@torch.no_grad()
def ablations(
    pipe: WuerstchenPipeline, size: int, prior_times: list[float], decoder_steps: int, repeats: int = 1
) -> dict[str, float]:
    """Seconds of the two sampling loops (prior with CFG 4, decoder) with one speed-up taken away at a
    time, through the models' public calls: what each speed-up is worth on its own (best of
    `repeats` alternating runs)."""
    from unittest import mock

    from .models import blocks, stage_b, stage_c
    from .models.kernels import inference_kernels
    from .models.onednn import packed_linears
    from .sampling import sample, timesteps

    h, w = pipe.prior_latent_size(size, size)
    (text,) = pipe.encode_prompt("prior", [PROMPT], None, True, 1)  # (2, 77, D): [cond; uncond]
    (dec_text,) = pipe.encode_prompt("decoder", [PROMPT], None, False, 1)
    x_prior = torch.randn(1, pipe.prior.config.c_in, h, w, generator=torch.Generator().manual_seed(0))
    effnet = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(1))
    hb, wb = int(h * pipe.settings.latent_dim_scale), int(w * pipe.settings.latent_dim_scale)
    x_dec = torch.randn(1, pipe.decoder.config.c_in, hb, wb, generator=torch.Generator().manual_seed(2))
    prior, decoder = pipe.prior, pipe.decoder

    def run(cache_text: bool, batched_cfg: bool, packed: tuple[str, ...] = ("prior",), fast: bool = True) -> float:
        @contextmanager
        def stage(name: str) -> Iterator[None]:  # as the pipeline does (`packed_stages`, `Placement.placed`)
            with packed_linears(name in packed), inference_kernels(fast):
                yield

        with stage("prior"):
            kv = prior.condition(text)
            kv_halves = [prior.condition(t) for t in text.chunk(2)]
        with stage("decoder"):
            cond = decoder.condition(effnet, dec_text, (hb, wb))

        def denoise_prior(x, r):
            if not batched_cfg:
                c, u = (prior(x, r, kv=k) for k in kv_halves)
            elif cache_text:
                c, u = prior(x, r, kv=kv, copies=2).chunk(2)
            else:  # the reference's way: the text part of K/V recomputed at every step
                c, u = prior(torch.cat([x, x]), torch.cat([r, r]), text).chunk(2)
            return torch.lerp(u, c, 4.0)

        def denoise_decoder(x, r):
            return decoder(x, r, cond=cond) if cache_text else decoder(x, r, effnet, dec_text)

        t0 = time.perf_counter()
        with stage("prior"):
            sample(denoise_prior, x_prior, prior_times, sampler="ddim")
        with stage("decoder"):
            sample(denoise_decoder, x_dec, timesteps(decoder_steps), sampler="ddim")
        return time.perf_counter() - t0

    def without_projection() -> float:
        decoder.project_effnet = False
        try:
            return run(True, True)
        finally:
            decoder.project_effnet = True

    def without_channels_last() -> float:
        identity = lambda t: t  # noqa: E731
        with (
            mock.patch.object(blocks, "to_channels_last", identity),
            mock.patch.object(stage_b, "to_channels_last", identity),
            mock.patch.object(stage_c, "to_channels_last", identity),
        ):
            return run(True, True)

    variants: dict[str, Callable[[], float]] = {
        "all speed-ups": lambda: run(True, True),
        "text K/V every step": lambda: run(False, True),
        "CFG as two passes": lambda: run(True, False),
        "prior's Linear layers as F.linear": lambda: run(True, True, packed=()),
        "(decoder's on oneDNN too)": lambda: run(True, True, packed=("prior", "decoder")),
        "semantic projection every step": without_projection,
        "reference GRN and attention (no inference_kernels)": lambda: run(True, True, fast=False),
        "no channels-last": without_channels_last,
    }
    # Alternate the variants and keep each one's best, so drift in the machine's speed hits all alike.
    results = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            results[name] = min(results[name], variant())
    return results


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kib() -> int:
    """This process's peak RSS since its exec (VmHWM). Not `ru_maxrss`: Linux carries the parent's
    RSS at fork into it, so a child of a large benchmark process would report the parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _impl(name: str) -> str:
    """Which `stage_runners` an implementation takes: the OpenVINO rows run in diffusers' pipeline."""
    return "diffusers" if name.startswith(("diffusers", "openvino")) else "ours"


def child_main(args: BenchOptions) -> None:
    """In a fresh process: load one implementation, generate once, print load time and peak RSS."""
    torch.set_num_threads(args.threads)
    # Import what either side needs before the clock starts: load time is reading weights.
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    if args.child.startswith(("diffusers", "openvino")):
        import diffusers.pipelines.deprecated.wuerstchen  # noqa: F401
    else:
        import wuerstchen.io.folders  # noqa: F401
    if args.child.startswith("openvino"):
        import openvino  # noqa: F401
    base = _current_rss_kib()
    dtype = torch.bfloat16 if args.child.endswith("bf16") else torch.float32
    quantize = next((m for m in QUANT_MODES if args.child.endswith(f"-{m}")), None)
    t0 = time.perf_counter()
    impl = _impl(args.child)
    if args.child.startswith("openvino"):  # the IR saved by the parent (bench_openvino.export), compiled
        pipe = load_openvino(Path(args.folder), args.child.removeprefix("openvino-"), args.threads)
    elif impl == "diffusers":
        pipe = (load_cascade_reference if args.cascade else load_reference)(Path(args.folder), dtype)
    else:
        pipe = WuerstchenPipeline.from_pretrained(args.folder, torch_dtype=dtype, quantize=quantize)
    load = time.perf_counter() - t0
    after_load = _current_rss_kib()
    if args.cascade:
        run_once(cascade_runners(impl, pipe, args.size, CASCADE_PRIOR_STEPS, args.decoder_steps))
    else:
        run_once(stage_runners(impl, pipe, args.size, DEFAULT_STAGE_C_TIMESTEPS, args.decoder_steps))
    peak = _peak_rss_kib()
    print(json.dumps({"load_s": load, "load_mib": (after_load - base) / 1024, "peak_mib": (peak - base) / 1024}))


def measure_in_child(which: str, folder: Path, args: BenchOptions) -> dict[str, float]:
    cmd = [sys.executable, "-m", "wuerstchen", "bench", "--child", which, "--folder", str(folder), "--size",
           str(args.size), "--decoder-steps", str(args.decoder_steps), "--threads", str(args.threads)]  # fmt: skip
    cmd += ["--cascade"] if args.cascade else []
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def paper_flops() -> tuple[float, float]:
    """FLOPs per 1024² image: Würstchen v2 (official configs: prior 29 steps with CFG, decoder 12
    steps, VQGAN decode) and an SDXL UNet (50 steps with CFG), counted on the meta device."""
    from .models.stage_a import STAGE_A_PRESETS, StageA
    from .models.stage_b import STAGE_B_PRESETS, StageB
    from .models.stage_c import STAGE_C_PRESETS, StageC

    with torch.device("meta"):
        prior, decoder = StageC(STAGE_C_PRESETS["official-v2"]), StageB(STAGE_B_PRESETS["official-v2"])
        vqgan = StageA(STAGE_A_PRESETS["official-v2"])
        r = torch.full((2,), 0.5)
        with _flop_counter() as c_prior:
            prior(torch.zeros(2, 16, 24, 24), r, torch.zeros(2, 77, 1280))
        with _flop_counter() as c_decoder:
            decoder(torch.zeros(1, 4, 256, 256), r[:1], torch.zeros(1, 16, 24, 24), torch.zeros(1, 77, 1024))
        with _flop_counter() as c_vqgan:
            vqgan.decode(torch.zeros(1, 4, 256, 256))
    steps = len(DEFAULT_STAGE_C_TIMESTEPS) - 1
    wuerstchen = steps * c_prior.get_total_flops() + 12 * c_decoder.get_total_flops() + c_vqgan.get_total_flops()
    sdxl = 50 * sdxl_unet_flops()
    return float(wuerstchen), float(sdxl)


def sdxl_unet_flops() -> float:
    """One CFG (batch 2) call of an SDXL UNet at 128×128 latents (diffusers' UNet, SDXL config)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )  # fmt: skip
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        cond = {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)}
        with _flop_counter() as counter:
            unet(
                torch.zeros(2, 4, 128, 128), torch.tensor([500, 500]), torch.zeros(2, 77, 2048), added_cond_kwargs=cond
            )
    return float(counter.get_total_flops())


def official_pipeline(dtype: torch.dtype) -> WuerstchenPipeline:
    """The official-size stages with random weights, built straight in `dtype` (no fp32 copy of
    two billion parameters), with 2-layer CLIP text towers of the official widths (the text
    encoders run once per generation: their depth hardly changes the time)."""
    from .models.stage_a import STAGE_A_PRESETS, StageA
    from .models.stage_b import STAGE_B_PRESETS, StageB
    from .models.stage_c import STAGE_C_PRESETS, StageC
    from .testing import char_tokenizer, clip_text_model, randomize

    def build(cls, config, seed):
        with torch.device("meta"):
            model = cls(config)
        return randomize(model.to_empty(device="cpu").to(dtype), seed)

    return WuerstchenPipeline(
        prior=build(StageC, STAGE_C_PRESETS["official-v2"], 1),
        prior_text_encoder=clip_text_model(2, 1280).to(dtype),
        prior_tokenizer=char_tokenizer(),
        decoder=build(StageB, STAGE_B_PRESETS["official-v2"], 3),
        text_encoder=clip_text_model(4, 1024).to(dtype),
        tokenizer=char_tokenizer(),
        vqgan=build(StageA, STAGE_A_PRESETS["official-v2"], 5),
    )


def official_main(args: BenchOptions) -> int:
    """Ours alone at the official size: seconds per image and achieved GFLOP/s."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    size, times = args.size, DEFAULT_STAGE_C_TIMESTEPS
    print(
        f"# official-size config (random weights), ours, {dtype}, {size}×{size}, prior {len(times) - 1} steps "
        f"CFG 4, decoder {args.decoder_steps} steps, {args.threads} threads, torch {torch.__version__}"
    )
    t0 = time.perf_counter()
    pipe = official_pipeline(dtype)
    if args.quantize:
        pipe.quantize(args.quantize)
        print(f"# quantized: {args.quantize} (the int8 rows' GFLOP/s are int8 and float operations together)")
    print(f"built in {time.perf_counter() - t0:.1f} s")
    seconds, _ = run_once(stage_runners("ours", pipe, size, times, args.decoder_steps))
    flops = count_flops("ours", pipe, size, times, args.decoder_steps)
    steps = [len(times) - 1, args.decoder_steps, 1]
    for stage, s, f, n in zip(STAGES, seconds, flops, steps, strict=True):
        print(f"  {stage:8} {s:8.1f} s  {n / s:7.3f} steps/s  {f / 1e12:7.2f} TFLOP  {f / 1e9 / s:7.1f} GFLOP/s")
    print(f"  {'total':8} {sum(seconds):8.1f} s per image  {sum(flops) / 1e12:7.2f} TFLOP  "
          f"{sum(flops) / 1e9 / sum(seconds):7.1f} GFLOP/s")  # fmt: skip
    return 0


def shipped_main(args: BenchOptions) -> int:
    """The shipped small model (or --model) at its native size with the default sampling settings
    (DEFAULT_STAGE_C_TIMESTEPS, CFG 4, decoder 12 steps): seconds per image in float32 and bfloat16
    (or `quantize`'s int8 mode), and how far those images are from the float32 ones (PSNR, same seeds)."""
    import numpy as np

    from .assets import shipped_model
    from .shapes import eval_prompts
    from .shapes.evaluate import psnr

    folder = Path(args.model) if args.model else shipped_model()
    other = args.quantize or "bf16"  # against fp32: bfloat16, or an int8 mode (on float32)
    pipes = {"fp32": WuerstchenPipeline.from_pretrained(folder),
             other: WuerstchenPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16 if other == "bf16"
                                                       else torch.float32, quantize=args.quantize)}  # fmt: skip
    size = pipes["fp32"].settings.default_size
    times = DEFAULT_STAGE_C_TIMESTEPS
    call = dict(height=size, width=size, prior_timesteps=times, num_inference_steps=args.decoder_steps)
    print(f"# shipped small model {folder}: {size}×{size}, prior {len(DEFAULT_STAGE_C_TIMESTEPS) - 1} steps CFG 4, "
          f"decoder {args.decoder_steps} steps, {args.threads} threads, torch {torch.__version__}, cpu")  # fmt: skip
    for name, pipe in pipes.items():
        for _ in range(args.warmup):
            pipe(PROMPT, **call, seed=0)
        seconds = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            pipe(PROMPT, **call, seed=i)
            seconds.append(time.perf_counter() - t0)
        print(f"  {name}: {np.median(seconds):.2f} s per image (median of {args.repeats}; best {min(seconds):.2f} s)")
    prompts = [p for p, _ in eval_prompts(args.images, seed=0, split="heldout")]
    images = {name: [] for name in pipes}
    for i in range(0, len(prompts), 8):
        for name, pipe in pipes.items():
            images[name] += pipe(prompts[i : i + 8], **call, seed=i).images
    values = [min(psnr(a, b), 100.0) for a, b in zip(images["fp32"], images[other], strict=True)]
    print(f"  {other} vs fp32 images, {len(values)} held-out prompts: PSNR mean {np.mean(values):.1f} dB, "
          f"median {np.median(values):.1f} dB, lowest {min(values):.1f} dB (100 = identical); "
          f"{sum(v >= 30 for v in values)} of {len(values)} at ≥ 30 dB")  # fmt: skip
    return 0


def main(args: BenchOptions) -> int:
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.child:
        child_main(args)
        return 0
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    if args.official:
        return official_main(args)
    if args.shipped:
        return shipped_main(args)
    import importlib.util

    from .testing import random_pipeline

    if importlib.util.find_spec("diffusers") is None:
        from .errors import UserError

        raise UserError(
            "wuerstchen bench compares with diffusers' pipeline, which is not installed: pip install "
            "'diffusers==0.42.1' (it comes with the test extra), or use --shipped / --official, which need none"
        )
    if args.cascade:
        return cascade_main(args)
    size, decoder_steps, times = args.size, args.decoder_steps, DEFAULT_STAGE_C_TIMESTEPS
    print(f"# Würstchen inference benchmark: {args.preset} config, {size}×{size}, prior {len(times) - 1} steps "
          f"(DEFAULT_STAGE_C_TIMESTEPS) CFG 4, decoder {decoder_steps} steps, {args.threads} threads, "
          f"torch {torch.__version__}, device cpu")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        random_pipeline(args.preset, seed=0).save_pretrained(folder)
        impls = {
            "diffusers fp32": load_reference(folder),
            "ours fp32": WuerstchenPipeline.from_pretrained(folder),
            "ours bf16": WuerstchenPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16),
            **{f"ours {mode}": WuerstchenPipeline.from_pretrained(folder, quantize=mode) for mode in QUANT_MODES},
        }
        if args.compile:
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                pipe = WuerstchenPipeline.from_pretrained(folder, torch_dtype=dtype)
                pipe.compile()
                impls[f"ours {name} compiled"] = pipe
        openvino_seconds = openvino_rows(impls, folder, args, times) if args.openvino else {}
        runners = {name: stage_runners(_impl(name), p, size, times, decoder_steps) for name, p in impls.items()}
        results: dict[str, list[list[float]]] = {name: [] for name in impls}
        outputs: dict[str, list[torch.Tensor]] = {}
        compile_seconds = {}
        for name in impls:
            if name.endswith("compiled"):  # the first call compiles each stage: not part of the timing
                compile_seconds[name] = sum(run_once(runners[name])[0])
        for _ in range(args.warmup):
            for name in impls:
                run_once(runners[name])
        for _ in range(args.repeats):  # alternate, so drift in the machine's speed hits all alike
            for name in impls:
                seconds, outputs[name] = run_once(runners[name])
                results[name].append(seconds)
        # FLOPs are counted in eager mode (a compiled model does the same arithmetic); torch's counter
        # does not see OpenVINO's ops: those rows count diffusers' (the same graph; int8 as operations).
        flops = {
            name: count_flops(_impl(name), p, size, times, decoder_steps)
            for name, p in impls.items()
            if not name.endswith("compiled") and not name.startswith("openvino")
        }
        flops |= {name: flops[name.removesuffix(" compiled")] for name in impls if name.endswith("compiled")}
        flops |= {name: flops["diffusers fp32"] for name in impls if name.startswith("openvino")}
        eager = [name for name in impls if not name.endswith("compiled")]
        memory = {name: measure_in_child(name.replace(" ", "-"), folder, args) for name in eager}
        ablation = ablations(impls["ours fp32"], size, times, decoder_steps, args.repeats)

    steps = [len(times) - 1, decoder_steps, 1]
    best = {name: [min(r[i] for r in rs) for i in range(3)] for name, rs in results.items()}
    print(f"\n{'implementation':20} {'stage':8} {'seconds':>8} {'steps/s':>8} {'GFLOP':>9} {'GFLOP/s':>8}")
    for name in impls:
        for i, stage in enumerate(STAGES):
            s = best[name][i]
            print(f"{name:20} {stage:8} {s:8.3f} {steps[i] / s:8.2f} {flops[name][i] / 1e9:9.1f} "
                  f"{flops[name][i] / 1e9 / s:8.1f}")  # fmt: skip
        total = sum(best[name])
        print(f"{name:20} {'total':8} {total:8.3f} {'':8} {sum(flops[name]) / 1e9:9.1f} "
              f"{sum(flops[name]) / 1e9 / total:8.1f}")  # fmt: skip
    ref_total = sum(best["diffusers fp32"])
    for name, seconds in compile_seconds.items():
        print(f"{name}: the first call (compiling each stage) took {seconds:.1f} s")
    if openvino_seconds:
        took = ", ".join(f"{k} {v:.1f} s" for k, v in openvino_seconds.items())
        print(f"openvino (not part of the timing): {took}; the openvino rows' GFLOP are diffusers fp32's "
              "(torch's counter does not see OpenVINO's ops)")  # fmt: skip
    print("\nspeed-up against diffusers fp32 (best of the repeats, whole generation):")
    for name in [n for n in impls if n != "diffusers fp32"]:
        per_stage = ", ".join(f"{st} {best['diffusers fp32'][i] / best[name][i]:.2f}×" for i, st in enumerate(STAGES))
        print(f"  {name}: {ref_total / sum(best[name]):.2f}× ({per_stage})")
    ref_img, ours_img = outputs["diffusers fp32"][2], outputs["ours fp32"][2]
    print(f"\nmax |ours fp32 − diffusers fp32|: image {(ours_img - ref_img).abs().max():.2e}, "
          f"prior latents {(outputs['ours fp32'][0] - outputs['diffusers fp32'][0]).abs().max():.2e}, "
          f"decoder latents {(outputs['ours fp32'][1] - outputs['diffusers fp32'][1]).abs().max():.2e}")  # fmt: skip
    a = outputs["ours fp32"][1]
    for name in [n for n in impls if n not in ("diffusers fp32", "ours fp32")]:
        b = outputs[name][1]
        print(f"{name} decoder latents vs ours fp32: mean relative error {(a - b).abs().mean() / a.abs().mean():.2%}"
              f"; max |image − diffusers fp32| {(outputs[name][2] - ref_img).abs().max():.2e}")  # fmt: skip
    print("\nfresh process each (load, then one generation): load s, weights MiB, peak RSS MiB above the baseline")
    for name, m in memory.items():
        print(
            f"  {name:16} load {m['load_s']:6.2f} s   weights {m['load_mib']:7.0f} MiB   peak {m['peak_mib']:7.0f} MiB"
        )
    ref_m = memory["diffusers fp32"]
    for name in [n for n in memory if n != "diffusers fp32"]:
        m = memory[name]
        ratio = m["peak_mib"] / ref_m["peak_mib"] if ref_m["peak_mib"] > 0 else float("nan")
        print(f"  {name} / diffusers fp32: load time {m['load_s'] / ref_m['load_s']:.2f}×, peak memory {ratio:.2f}×")
    print(
        f"\nours fp32, the two sampling loops (prior + decoder) with one speed-up taken away at a time "
        f"(best of {args.repeats}, alternating):"
    )
    for name, seconds in ablation.items():
        print(f"  {name:34} {seconds:7.2f} s  ({seconds / ablation['all speed-ups']:.2f}× the time)")
    if args.paper:
        w, sdxl = paper_flops()
        print(f"\nFLOPs per 1024² image (torch's FLOP counter, official configs): Würstchen v2 {w / 1e12:.0f} TFLOP "
              f"(prior 29 steps CFG + decoder 12 + VQGAN), SDXL UNet 50 steps CFG {sdxl / 1e12:.0f} TFLOP: "
              f"{sdxl / w:.1f}× more")  # fmt: skip
    return 0


def load_openvino(folder: Path, precision: str, threads: int) -> Any:
    """diffusers' combined pipeline with the OpenVINO models of `precision` (saved under `folder` by
    `bench_openvino.export`) as its prior and decoder: the torch prior and decoder are not loaded."""
    from .bench_openvino import load_module

    return load_reference(folder, prior=load_module(folder, "prior", precision, threads),
                          decoder=load_module(folder, "decoder", precision, threads))  # fmt: skip


def openvino_rows(impls: dict[str, Any], folder: Path, args: BenchOptions, times: list[float]) -> dict[str, float]:
    """Adds "openvino fp32" and "openvino int8" to `impls` (diffusers' pipeline with its prior and
    decoder in OpenVINO, see wuerstchen.bench_openvino), converted and quantized from "diffusers
    fp32"'s torch modules and saved under `folder` for the fresh processes; returns the seconds
    that took. Without openvino and nncf installed: one line, and nothing added."""
    from . import bench_openvino

    if not bench_openvino.available():
        print("# openvino/nncf not installed: pip install 'wuerstchen[bench]' for the OpenVINO rows")
        return {}
    import openvino

    print(f"# openvino {openvino.__version__}: diffusers' prior and decoder converted (fp32) and quantized by NNCF "
          f"(int8), inside diffusers' pipeline, CPU, {args.threads} threads")  # fmt: skip
    seconds = bench_openvino.export(impls["diffusers fp32"], folder, args.size, times, args.decoder_steps)
    for precision in bench_openvino.PRECISIONS:
        t0 = time.perf_counter()
        impls[f"openvino {precision}"] = load_openvino(folder, precision, args.threads)
        seconds[f"{precision} load and compile"] = time.perf_counter() - t0
    return seconds


def cascade_main(args: BenchOptions) -> int:
    """Stable Cascade's medium config (random weights) against diffusers' Stable Cascade pipelines:
    seconds per stage (best of the alternating repeats), the outputs' differences, load time and
    peak memory in fresh processes."""
    from .testing import random_cascade_pipeline

    size, steps, decoder_steps = args.size, CASCADE_PRIOR_STEPS, args.decoder_steps
    print(f"# Stable Cascade inference benchmark: {args.preset}-c + {args.preset}-b, {size}×{size}, "
          f"prior {steps} steps CFG 4, decoder {decoder_steps} steps, {args.threads} threads, "
          f"torch {torch.__version__}, device cpu")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        random_cascade_pipeline(args.preset, seed=0).save_pretrained(folder)
        impls = {
            "diffusers fp32": load_cascade_reference(folder),
            "ours fp32": WuerstchenPipeline.from_pretrained(folder),
            "ours bf16": WuerstchenPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16),
        }
        runners = {
            n: cascade_runners("diffusers" if n.startswith("diffusers") else "ours", p, size, steps, decoder_steps)
            for n, p in impls.items()
        }
        results: dict[str, list[list[float]]] = {name: [] for name in impls}
        outputs: dict[str, list[torch.Tensor]] = {}
        for _ in range(args.warmup):
            for name in impls:
                run_once(runners[name])
        for _ in range(args.repeats):  # alternating
            for name in impls:
                seconds, outputs[name] = run_once(runners[name])
                results[name].append(seconds)
        memory = {name: measure_in_child(name.replace(" ", "-"), folder, args) for name in impls}
    best = {name: [min(r[i] for r in rs) for i in range(3)] for name, rs in results.items()}
    ref = best["diffusers fp32"]
    print(f"\n{'implementation':16} " + " ".join(f"{st:>9}" for st in (*STAGES, "total")) + "   speed-up")
    for name, b in best.items():
        cells = " ".join(f"{x:8.3f}s" for x in (*b, sum(b)))
        per_stage = ", ".join(f"{r / x:.2f}×" for r, x in zip(ref, b, strict=True))
        print(f"{name:16} {cells}   {sum(ref) / sum(b):.2f}× ({per_stage})")
    want = outputs["diffusers fp32"]
    for name in ("ours fp32", "ours bf16"):
        got = outputs[name]
        rel = [float((g - w).abs().max() / w.std()) for g, w in zip(got[:2], want[:2], strict=True)]
        print(f"{name} vs diffusers fp32: prior latents {rel[0]:.2e}, decoder latents {rel[1]:.2e} (max |Δ| / std), "
              f"image max |Δ| {(got[2] - want[2]).abs().max():.2e}")  # fmt: skip
    print("\nfresh process each (load, then one generation): load s, weights MiB, peak RSS MiB above the baseline")
    for name, m in memory.items():
        ratio = m["peak_mib"] / memory["diffusers fp32"]["peak_mib"]
        print(f"  {name:16} load {m['load_s']:6.2f} s   weights {m['load_mib']:7.0f} MiB   "
              f"peak {m['peak_mib']:7.0f} MiB   ({ratio:.2f}× diffusers' peak)")  # fmt: skip
    return 0
