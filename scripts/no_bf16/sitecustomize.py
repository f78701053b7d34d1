"""Run the suite as on a CPU without native bfloat16 (this project's Intel Xeon: AVX-512 and VNNI,
no AVX512_BF16 or AMX) from a CPU that has it:

    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI PYTHONPATH=$PWD/scripts/no_bf16 python -m pytest -q

On this folder's `PYTHONPATH` every Python process (the tests' subprocesses too) sees
`wuerstchen.hardware.cpu_flags()` without the bfloat16 and AMX flags, so `dtype="auto"` picks
float32 and the bf16 warnings fire as there; `ONEDNN_MAX_CPU_ISA` holds oneDNN to that CPU's
instructions, so bfloat16 products are emulated (on a Zen 4: 72 GFLOP/s at 2048³ instead of ~200).
ATen's own kernels are the same AVX-512 build on both. What stays different: the microarchitecture's
speed, not its rounding (the same instructions give the same results).
"""

import importlib.abc
import importlib.util
import sys

HIDDEN = frozenset({"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})


class _WithoutBf16(importlib.abc.MetaPathFinder):
    """Loads `wuerstchen.hardware` as usual, then wraps its `cpu_flags` (before anyone imports it)."""

    def find_spec(self, name, path, target=None):
        if name != "wuerstchen.hardware":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real = module.cpu_flags

            def cpu_flags():
                return real() - HIDDEN

            cpu_flags.cache_clear = real.cache_clear
            module.cpu_flags = cpu_flags

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _WithoutBf16())
