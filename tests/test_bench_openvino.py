"""The OpenVINO rows of `wuerstchen bench` (wuerstchen.bench_openvino), when openvino and nncf are
installed: diffusers' prior and decoder converted to OpenVINO compute what the torch modules do,
and run inside diffusers' pipeline; the NNCF int8 models run and stay near them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from wuerstchen import bench, bench_openvino  # noqa: E402
from wuerstchen.sampling import DEFAULT_STAGE_C_TIMESTEPS  # noqa: E402
from wuerstchen.testing import random_pipeline  # noqa: E402

SIZE, DECODER_STEPS = 128, 3
# float32: OpenVINO sums in another order and fuses differently than torch, each rounding within a
# few ulps (2⁻²⁴ relative) per operation; over these networks' depth that stays far below 1e-4 of
# the output's scale (seen: about 2e-6). A wrong conversion (a resize, a norm) is off by 1e-2 or more.
FP32_TOLERANCE = 1e-4
# int8 (per-channel weights, per-tensor activations, a random-weight model): seen 0.1–2 % mean
# relative error per call; 10 % would be a quantization gone wrong, not int8's rounding.
INT8_MEAN_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openvino") / "model"
    random_pipeline("tiny", seed=0).save_pretrained(folder)
    reference = bench.load_reference(folder)
    bench_openvino.export(reference, folder, SIZE, DEFAULT_STAGE_C_TIMESTEPS, DECODER_STEPS)
    # Other inputs than the calibration's: the benchmark's prompt and seed.
    inputs = bench_openvino.record_inputs(reference, SIZE, DEFAULT_STAGE_C_TIMESTEPS, DECODER_STEPS, bench.PROMPT, 0)
    return folder, reference, inputs


def _errors(exported, precision: str) -> dict[str, list[tuple[float, float]]]:
    """Per stage and call (first and last step): max |Δ| / std and mean |Δ| / mean |torch|."""
    folder, reference, inputs = exported
    modules = {"prior": reference.prior_pipe.prior, "decoder": reference.decoder_pipe.decoder}
    errors = {}
    for stage, module in modules.items():
        converted = bench_openvino.load_module(folder, stage, precision, threads=1)
        errors[stage] = []
        for sample in (inputs[stage][0], inputs[stage][-1]):
            tensors = [torch.from_numpy(a) for a in sample]
            with torch.no_grad():
                want = module(*tensors)
            got = converted(*tensors)
            assert got.shape == want.shape and got.dtype == torch.float32
            delta = (got - want).abs()
            errors[stage].append((float(delta.max() / want.std()), float(delta.mean() / want.abs().mean())))
    return errors


def test_fp32_models_match_diffusers_torch_modules(exported):
    for stage, errors in _errors(exported, "fp32").items():
        for worst, _ in errors:
            assert worst < FP32_TOLERANCE, (stage, errors)


def test_fp32_pipeline_matches_diffusers(exported):
    """The stand-in modules inside diffusers' pipeline: the same prior and decoder latents."""
    folder, reference, _ = exported
    pipe = bench.load_openvino(folder, "fp32", threads=1)
    assert isinstance(pipe.prior_pipe.prior, bench_openvino.OpenVINOModule)
    assert isinstance(pipe.decoder_pipe.decoder, bench_openvino.OpenVINOModule)
    run = lambda p: bench.run_once(bench.stage_runners("diffusers", p, SIZE, DEFAULT_STAGE_C_TIMESTEPS, DECODER_STEPS))
    (_, want), (_, got) = run(reference), run(pipe)
    for w, g in zip(want[:2], got[:2], strict=True):  # 29 prior steps: the rounding compounds a little
        assert float((g - w).abs().max() / w.std()) < 10 * FP32_TOLERANCE


def test_int8_models_are_quantized_and_stay_close(exported):
    import openvino as ov

    folder = exported[0]
    for stage in ("prior", "decoder"):
        model = ov.Core().read_model(bench_openvino.ir_path(folder, stage, "int8"))
        assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops()), stage
    for stage, errors in _errors(exported, "int8").items():
        for _, mean in errors:
            assert mean < INT8_MEAN_TOLERANCE, (stage, errors)
    pipe = bench.load_openvino(folder, "int8", threads=1)
    _, outputs = bench.run_once(bench.stage_runners("diffusers", pipe, SIZE, DEFAULT_STAGE_C_TIMESTEPS, 1))
    assert all(torch.isfinite(x).all() for x in outputs)
