"""Where a pipeline's models run: the execution device, CPU offload (whole models or layer by
layer), opt-in `torch.compile`, and the CPU's packed oneDNN Linear layers while a stage samples.

    placement = Placement()
    with placement.placed("prior", pipe.prior, packed=True) as run:   # run: the module (or its compiled form)
        eps = run(x, r, kv=kv)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .hardware import check_dtype, cpu_has_native_bf16
from .models.kernels import inference_kernels
from .models.onednn import packed_linears


class Placement:
    """The device a pipeline computes on and how its models get there."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.offload: str | None = None  # None, "model" or "sequential"
        self.compiled: dict[str, Callable] = {}

    def move(self, modules: dict[str, nn.Module], device: torch.device | str | torch.dtype | None,
             dtype: torch.dtype | None) -> None:  # fmt: skip
        """`pipe.to(...)`: a new execution device and/or dtype for every model (`to(dtype)` alone
        casts); with offload the models stay on the CPU and only the execution device changes."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("pipe.to(dtype) takes one dtype: use pipe.to(device, dtype)")
            device, dtype = None, device
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            check_dtype(dtype, self.device)
        for m in modules.values():
            m.to(device=None if self.offload else device, dtype=dtype)

    def enable_offload(self, kind: str, device: torch.device | str | None, modules: dict[str, nn.Module]) -> None:
        """Keep every model on the CPU; move each to `device` while it runs ("model") or each layer
        for its own forward ("sequential": slowest, least memory). Works with any device."""
        self.offload = kind
        self.device = torch.device(device) if device is not None else self.device
        for m in modules.values():
            m.to("cpu")

    def compile(self, modules: dict[str, Callable], freeze: bool | None, options: dict[str, Any]) -> None:
        """`torch.compile` (inductor) each callable.

        `freeze` (default: on unless offloading) is inductor's freezing: the weights become constants
        of the compiled graph, which lets it fold them and pre-pack them for oneDNN, most of the gain
        on a CPU (`wuerstchen bench` measures it). Frozen weights must not be edited in place
        afterwards; replacing modules (a LoRA), `to()` and other sizes compile again by themselves.
        `options` go to `torch.compile` (e.g. `mode="max-autotune"`, which excludes `freeze`).
        """
        if freeze is None:
            freeze = self.offload is None and "mode" not in options
        if freeze:
            options = {**options, "options": {**options.get("options", {}), "freezing": True}}
        self.compiled = {name: torch.compile(fn, **options) for name, fn in modules.items()}

    @contextmanager
    def placed(self, name: str, module: nn.Module, packed: bool = False) -> Iterator[Callable]:
        """Yield the callable for model `name` on the execution device, honouring offload; with
        `packed` (a CPU stage), its Linear layers run on oneDNN with weights packed for the block.
        The models' fast inference paths (`kernels`) are on inside it."""
        # A quantized model (wuerstchen.quant) is not packed: its float Linears run once per generation,
        # and a packed copy of them would only add to the memory that quantizing saves.
        quantization = getattr(module, "quantization", None)
        packed = packed and name not in self.compiled and not quantization
        # The int8 pipeline (on the CPU) computes its float attention in bfloat16 where the CPU has it.
        bf16_attention = quantization == "int8" and cpu_has_native_bf16()
        with packed_linears(packed), inference_kernels(bf16_attention=bf16_attention):
            with self._offloaded(module):
                yield self.compiled.get(name, module)

    @contextmanager
    def _offloaded(self, module: nn.Module) -> Iterator[None]:
        if self.offload is None:
            yield
            return
        if self.offload == "model":
            module.to(self.device)
            try:
                yield
            finally:
                module.to("cpu")
            return

        def load(m: nn.Module, _args: Any) -> None:
            m.to(self.device)

        def unload(m: nn.Module, _args: Any, _out: Any) -> None:
            m.to("cpu")

        hooks = []
        for leaf in module.modules():
            if [*leaf.parameters(recurse=False), *leaf.buffers(recurse=False)]:
                hooks += [leaf.register_forward_pre_hook(load), leaf.register_forward_hook(unload)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            module.to("cpu")
