"""What the hardware computes fast: the precision `torch_dtype="auto"` and `--dtype auto` pick.

    from wuerstchen.hardware import auto_dtype, cpu_flags
    auto_dtype("cpu")          # torch.bfloat16 on a CPU with AVX512_BF16 or AMX, else torch.float32

bfloat16 is chosen only where it is native: on CUDA devices that support it and on CPUs with
AVX512_BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or AMX. Elsewhere oneDNN emulates it
and it runs about 3× slower than float32 (measured on an Intel Xeon with AVX-512 and VNNI but no
AVX512_BF16: bf16 GEMM 45–56 GFLOP/s against 135–290 in float32), so float32 is chosen. float16 is
never chosen: the Würstchen weights overflow in it (NaN, black images).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch

from .errors import UserError

logger = logging.getLogger(__name__)

# CPU flags (as /proc/cpuinfo spells them) that matter for this project's matrix products.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")

FLOAT16_MESSAGE = "float16 overflows with the Würstchen weights (NaN values, black images): use bfloat16 or float32"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: Linux's /proc/cpuinfo, macOS's sysctl (`hw.optional.*`); else empty."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86 / ARM
                return frozenset(value.split())
        return frozenset()
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        # "hw.optional.arm.FEAT_BF16: 1" → "arm.feat_bf16"
        return frozenset(
            k.removeprefix("hw.optional.").strip().lower()
            for k, _, v in (line.partition(":") for line in out.splitlines())
            if v.strip() == "1"
        )
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """AVX512_BF16 or AMX on x86; BF16 (ARMv8.6, e.g. Apple M2 and later, Graviton 3) on ARM."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS) or "bf16" in flags or "arm.feat_bf16" in flags


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (faster than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False  # MPS and others: float32, the safe choice


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where `device` has it natively, float32 elsewhere."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def check_dtype(dtype: torch.dtype, device: torch.device | str) -> None:
    """Warn about a precision that will be slow or wrong on `device` (never an error: the caller asked)."""
    device = torch.device(device)
    if dtype == torch.float16:
        logger.warning(FLOAT16_MESSAGE)
    elif dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "bfloat16 has no hardware support on this CPU (no AVX512_BF16 or AMX): about 3× slower than "
            "float32; pass float32 (or dtype auto)"
        )


def default_device() -> torch.device:
    """The device a pipeline runs on when none is named: CUDA, else MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def total_memory(device: torch.device | str) -> int | None:
    """Bytes of memory on `device`: the GPU's for CUDA, the machine's RAM for the CPU; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # Linux and macOS
    except (AttributeError, ValueError, OSError):
        return None


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str | None = None) -> torch.dtype:
    """A dtype or its name (`"auto"`, `"float32"`, `"bf16"`, ...) → a torch dtype for `device`
    (default: the best available), warning about one that is slow or overflows there."""
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        if dtype.lower() == "auto":
            return auto_dtype(device)
        try:
            dtype = DTYPE_NAMES[dtype.lower()]
        except KeyError:
            raise UserError(f"unknown dtype {dtype!r}: use auto, float32 or bfloat16") from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype or 'auto', got {dtype!r}")
    check_dtype(dtype, device)
    return dtype
