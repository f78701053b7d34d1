"""The OpenVINO rows of `wuerstchen bench`: diffusers' Würstchen prior and decoder converted to
OpenVINO (float32, and int8 by NNCF's post-training quantization) and run inside diffusers' own
pipeline, in place of its torch modules. Only the benchmark imports this module, and only when
`openvino` and `nncf` are installed (`pip install 'wuerstchen[bench]'`); the library never needs them.

What runs in OpenVINO is the prior's and the decoder's network; the text encoders, the sampling
loops (scheduler, CFG) and the VQGAN stay diffusers' torch code, as in OpenVINO's Würstchen notebook.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# The arguments of diffusers' `WuerstchenPrior.forward(x, r, c)` and `WuerstchenDiffNeXt.forward(x,
# r, effnet, clip, ...)` that its pipelines pass (the prior's by position and keyword, the decoder's
# `x_cat`, `eps` and `return_noise` never): the converted models' inputs, in this order.
INPUTS = {"prior": ("x", "r", "c"), "decoder": ("x", "r", "effnet", "clip")}
FOLDERS = {"prior": "prior_prior", "decoder": "decoder"}  # the component folders of their configs
PRECISIONS = ("fp32", "int8")
# The calibration generation: another prompt and seed than the timed one (wuerstchen.bench.PROMPT).
CALIBRATION_PROMPT = "a green triangle to the left of a yellow circle"
CALIBRATION_SEED = 1


def available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


def _bind(names: Sequence[str], args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The call's tensors in `names`' order, however the pipeline passed them."""
    bound = dict(zip(names, args, strict=False)) | kwargs
    if len(args) > len(names) or set(bound) != set(names):
        raise TypeError(f"expected exactly the arguments {', '.join(names)}; got {', '.join(bound)}")
    return [bound[n] for n in names]


class OpenVINOModule(nn.Module):
    """Stands in for diffusers' `WuerstchenPrior` or `WuerstchenDiffNeXt` in its pipelines. Both
    torch modules return the prediction itself (a tensor, not an output object: the pipelines chunk
    it for CFG and hand it to the scheduler), so `forward` returns the compiled model's only output
    as a float32 tensor. The pipelines also read `config` (`prior.config.c_in`), `dtype` (the decoder
    pipeline's latents' dtype) and `device` (`DiffusionPipeline.device` asks every module), which a
    module without parameters does not have: they are given here."""

    def __init__(self, compiled: Any, names: Sequence[str], config: Any) -> None:
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.names = tuple(names)
        self.config = config
        self.recorded: list[list[np.ndarray]] | None = None  # a list: forward also keeps a copy of its inputs

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # contiguous: the decoder's `r` is an expanded (stride 0) view
        arrays = [t.detach().float().contiguous().numpy() for t in _bind(self.names, args, kwargs)]
        if self.recorded is not None:
            self.recorded.append([a.copy() for a in arrays])
        outputs = self.request.infer(arrays)  # share_outputs=False (the default): the result is a copy
        return torch.from_numpy(outputs.to_tuple()[0])


def record_inputs(reference: Any, size: int, prior_times: list[float], decoder_steps: int,
                  prompt: str = CALIBRATION_PROMPT, seed: int = CALIBRATION_SEED) -> dict[str, list]:  # fmt: skip
    """The inputs diffusers' torch prior and decoder receive in one generation of `prompt` and `seed`
    (the call of the benchmark's `stage_runners`: CFG 4 for the prior, batch 2; the decoder without
    CFG, batch 1), per call a list of float32 arrays in `INPUTS` order."""
    recorded: dict[str, list] = {"prior": [], "decoder": []}

    def hook(stage: str):
        def keep(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            recorded[stage].append([t.detach().float().contiguous().numpy().copy()
                                    for t in _bind(INPUTS[stage], args, kwargs)])  # fmt: skip

        return keep

    modules = {"prior": reference.prior_pipe.prior, "decoder": reference.decoder_pipe.decoder}
    handles = [m.register_forward_pre_hook(hook(stage), with_kwargs=True) for stage, m in modules.items()]
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            emb = reference.prior_pipe(prompt, height=size, width=size, timesteps=prior_times,
                                       guidance_scale=4.0, generator=g, output_type="pt").image_embeddings  # fmt: skip
            reference.decoder_pipe(emb, prompt, num_inference_steps=decoder_steps, generator=g,
                                   output_type="latent")  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return recorded


class _BicubicAsMatrices:
    """Stands in for `F.interpolate` while a model is converted. diffusers' decoder resizes the
    effnet features to each level with `mode="bicubic", antialias=True, align_corners=True`;
    OpenVINO (2026.4 seen) converts that to its `bicubic_pillow` Interpolate, which computes the
    half-pixel (align_corners=False) resize: the decoder's output was off by a quarter of its scale.
    At fixed shapes that resize is a linear map along each axis, so here it is two matrix products
    with torch's own weights (an impulse per input row, resized by torch), out = A_h · e · A_wᵀ:
    the same values, exported as MatMul. Other interpolations go to torch's function."""

    def __init__(self) -> None:
        self.interpolate = torch.nn.functional.interpolate
        self.matrices: dict[tuple[int, int], torch.Tensor] = {}

    def matrix(self, n_in: int, n_out: int) -> torch.Tensor:
        """(n_out, n_in): column k is input k's impulse resized. Made before tracing (`warm`): a
        tensor made in the trace would be a traced interpolation folded by OpenVINO, wrong again."""
        if (n_in, n_out) not in self.matrices:
            # Constant along a width of 4, which the resize keeps constant (its weights sum to 1): from
            # a 1-wide input torch's antialiased kernel returns the first row's value everywhere (2.13).
            impulses = torch.eye(n_in)[:, None, :, None].expand(n_in, 1, n_in, 4)
            resized = self.interpolate(impulses, size=(n_out, 4), mode="bicubic", antialias=True, align_corners=True)
            self.matrices[n_in, n_out] = resized[:, 0, :, 0].T.contiguous()
        return self.matrices[n_in, n_out]

    def __call__(self, input: torch.Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                 align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                 antialias: bool = False) -> torch.Tensor:  # fmt: skip
        if mode != "bicubic" or not antialias or not align_corners or size is None or input.dim() != 4:
            return self.interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
        (h_in, w_in), (h, w) = input.shape[-2:], size
        return self.matrix(int(h_in), int(h)) @ input @ self.matrix(int(w_in), int(w)).T


def convert(module: nn.Module, example: Sequence[np.ndarray]) -> Any:
    """`openvino.convert_model` of a torch module traced with `example`, then made static at the
    example's shapes (the benchmark calls each model at one shape; static shapes let OpenVINO plan
    every layer ahead). The decoder's antialiased resizes are traced as matrix products
    (`_BicubicAsMatrices`: OpenVINO's conversion of them computes another resize)."""
    import warnings
    from unittest import mock

    import openvino as ov

    inputs = tuple(torch.from_numpy(a) for a in example)
    resize = _BicubicAsMatrices()
    with torch.no_grad(), mock.patch.object(torch.nn.functional, "interpolate", resize), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shapes are meant to be constants
        module(*inputs)  # makes the resize matrices of these shapes, outside the trace
        model = ov.convert_model(module, example_input=inputs)
    model.reshape({i: ov.PartialShape(list(a.shape)) for i, a in enumerate(example)})
    return model


def edge_convolutions(model: Any) -> list[str]:
    """The first and last (non-grouped) convolution of a converted model, in execution order: for the
    prior, its input projection and output head."""
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return [convs[0], convs[-1]] if convs else []


def quantize(model: Any, samples: list[list[np.ndarray]], keep_float: Sequence[str] = ()) -> Any:
    """NNCF's post-training int8 quantization of an OpenVINO model, calibrated on `samples` (all of
    them) with the transformer preset (it keeps softmax, layer norms and the like in float and
    smooths the activations' outliers into the weights); the nodes named in `keep_float` stay float.
    NNCF's INFO lines and progress bars (on stdout) are kept out of the benchmark's output."""
    import contextlib
    import io
    import logging

    import nncf
    from nncf.common.logging import nncf_logger

    ignored = nncf.IgnoredScope(names=list(keep_float)) if keep_float else None
    level = nncf_logger.level
    nncf.set_log_level(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.quantize(model.clone(), nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                                 subset_size=len(samples), ignored_scope=ignored)  # fmt: skip
    finally:
        nncf.set_log_level(level)


def compile_model(model: Any, threads: int) -> Any:
    """Compiled for the CPU plugin. INFERENCE_PRECISION_HINT f32: without it OpenVINO runs a float
    model in bf16 on a CPU with bf16 units (AMX, AVX-512 BF16) — silently, so "fp32" would not be.
    INFERENCE_NUM_THREADS: the benchmark's --threads, as torch's."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {hints.inference_precision: ov.Type.f32, props.inference_num_threads: threads}
    return ov.Core().compile_model(model, "CPU", config)


def ir_path(folder: Path, stage: str, precision: str) -> Path:
    return folder / "openvino" / f"{stage}-{precision}.xml"


def export(reference: Any, folder: Path, size: int, prior_times: list[float], decoder_steps: int) -> dict[str, float]:
    """Records the calibration inputs, converts diffusers' prior and decoder, quantizes them, and
    saves the four models as OpenVINO IR under `folder`/openvino (fresh processes load them there).
    Returns the seconds each step took."""
    import openvino as ov

    seconds = {}
    t0 = time.perf_counter()
    samples = record_inputs(reference, size, prior_times, decoder_steps)
    seconds["calibration generation"] = time.perf_counter() - t0
    modules = {"prior": reference.prior_pipe.prior, "decoder": reference.decoder_pipe.decoder}
    for stage, module in modules.items():
        t0 = time.perf_counter()
        model = convert(module, samples[stage][0])
        seconds[f"{stage} conversion"] = time.perf_counter() - t0
        # As OpenVINO's Würstchen notebook does, the prior's first and last convolution (the input
        # projection of the 16 latent channels and the output head that makes the noise estimate)
        # stay float; the decoder is quantized whole.
        keep = edge_convolutions(model) if stage == "prior" else []
        t0 = time.perf_counter()
        quantized = quantize(model, samples[stage], keep)
        seconds[f"{stage} quantization"] = time.perf_counter() - t0
        for precision, m in (("fp32", model), ("int8", quantized)):
            path = ir_path(folder, stage, precision)
            path.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(m, path, compress_to_fp16=False)  # the default would store the weights in fp16
    return seconds


def load_module(folder: Path, stage: str, precision: str, threads: int) -> OpenVINOModule:
    """One saved model, compiled, in its stand-in module (with the torch module's config)."""
    import openvino as ov
    from diffusers.configuration_utils import FrozenDict
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior

    cls = WuerstchenPrior if stage == "prior" else WuerstchenDiffNeXt
    config = FrozenDict(cls.load_config(folder / FOLDERS[stage]))
    compiled = compile_model(ov.Core().read_model(ir_path(folder, stage, precision)), threads)
    return OpenVINOModule(compiled, INPUTS[stage], config)
