"""The precision `torch_dtype="auto"` / `--dtype auto` picks from the hardware, and the warnings
for a precision that is slow (emulated bf16) or wrong (float16) on it."""

from __future__ import annotations

import logging

import pytest
import torch

from wuerstchen import WuerstchenPipeline, hardware

XEON_VNNI = frozenset({"avx2", "avx512f", "avx512_vnni"})  # the Intel machine: bf16 emulated
ZEN4 = XEON_VNNI | {"avx512_bf16"}
SAPPHIRE_RAPIDS = XEON_VNNI | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
GRAVITON3 = frozenset({"fp", "asimd", "bf16", "i8mm"})


@pytest.mark.parametrize(
    ("flags", "native"), [(XEON_VNNI, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True), (set(), False)]
)
def test_native_bf16_from_the_flags(flags, native):
    assert hardware.cpu_has_native_bf16(frozenset(flags)) is native


@pytest.mark.parametrize(("flags", "want"), [(XEON_VNNI, torch.float32), (ZEN4, torch.bfloat16)])
def test_auto_picks_by_the_cpu(monkeypatch, flags, want):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.resolve_dtype("auto", "cpu") == want
    assert hardware.resolve_dtype("float32", "cpu") == torch.float32


def test_forced_bf16_on_an_emulating_cpu_warns(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: XEON_VNNI)
    with caplog.at_level(logging.WARNING, logger="wuerstchen.hardware"):
        assert hardware.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert "bfloat16 has no hardware support on this CPU" in caplog.text
    caplog.clear()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ZEN4)
    with caplog.at_level(logging.WARNING, logger="wuerstchen.hardware"):
        hardware.resolve_dtype(torch.bfloat16, "cpu")
    assert not caplog.text


def test_float16_warns_and_bad_names_are_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="wuerstchen.hardware"):
        assert hardware.resolve_dtype(torch.float16, "cpu") == torch.float16  # allowed: e.g. to store weights
    assert "float16 overflows" in caplog.text
    with pytest.raises(ValueError, match="use auto, float32 or bfloat16"):
        hardware.resolve_dtype("float64x", "cpu")
    with pytest.raises(TypeError, match="floating-point"):
        hardware.resolve_dtype(torch.int8, "cpu")


def test_from_pretrained_auto(monkeypatch, tiny_folder):
    for flags, want in ((XEON_VNNI, torch.float32), (ZEN4, torch.bfloat16)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        pipe = WuerstchenPipeline.from_pretrained(tiny_folder, torch_dtype="auto", device="cpu")
        assert {p.dtype for m in pipe.modules().values() for p in m.parameters()} == {want}


@pytest.mark.skipif(not hardware.Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_this_machines_flags_are_read():
    flags = hardware.cpu_flags()
    assert "fpu" in flags or "fp" in flags, sorted(flags)[:20]  # x86 lists fpu, ARM fp
