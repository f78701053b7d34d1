"""Checkpoints: the official presets against diffusers' classes, strict loading, the original .pt
files, `wuerstchen convert`, and folders written by `save_pretrained` loading in diffusers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import kwargs_of
from tolerance import max_abs

from wuerstchen import WuerstchenPipeline
from wuerstchen.cli import main as cli_main
from wuerstchen.errors import UserError
from wuerstchen.io.checkpoint import WEIGHTS_NAME, load_model
from wuerstchen.io.folders import resolve_folder
from wuerstchen.models.semantic import SEMANTIC_PRESETS, SemanticCompressor
from wuerstchen.models.stage_a import STAGE_A_PRESETS, StageA
from wuerstchen.models.stage_b import STAGE_B_PRESETS, StageB
from wuerstchen.models.stage_c import STAGE_C_PRESETS, StageC
from wuerstchen.testing import randomize

ARGS = dict(prompt="a red circle", height=128, width=128, prior_num_inference_steps=6, num_inference_steps=3)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "ours, theirs, params",
    [
        (StageC, "WuerstchenPrior", 993_636_896),  # ≈ 994M, the official v2 prior
        (StageB, "WuerstchenDiffNeXt", 1_055_365_280),  # ≈ 1055M
        (StageA, "PaellaVQModel", 18_406_894),  # ≈ 18.4M
    ],
)
def test_official_presets_match_diffusers(ours, theirs, params):
    import diffusers.pipelines.deprecated.wuerstchen as ref

    config = {StageC: STAGE_C_PRESETS, StageB: STAGE_B_PRESETS, StageA: STAGE_A_PRESETS}[ours]["official-v2"]
    with torch.device("meta"):
        model = ours(config)
        reference = getattr(ref, theirs)(**kwargs_of(config))
    assert _shapes(model) == _shapes(reference)
    assert sum(p.numel() for p in model.parameters()) == params == sum(p.numel() for p in reference.parameters())


def test_strict_loading_names_the_bad_tensor(tiny_folder, tmp_path):
    folder = tmp_path / "prior"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_folder / "prior_prior" / "config.json").read_text())
    state = load_file(tiny_folder / "prior_prior" / WEIGHTS_NAME)
    state.pop("projection.weight")
    state["extra.weight"] = torch.zeros(1)
    state["out.1.bias"] = torch.zeros(3)
    save_file(state, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError) as err:
        load_model(StageC, folder)
    msg = str(err.value)
    assert "projection.weight" in msg and "extra.weight" in msg and "out.1.bias" in msg


def test_truncated_checkpoint_is_a_clear_error(tiny_folder, tmp_path):
    folder = tmp_path / "vqgan"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_folder / "vqgan" / "config.json").read_text())
    data = (tiny_folder / "vqgan" / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(StageA, folder)


def test_meta_loading_shares_memory_with_the_file(tiny_folder):
    model = load_model(StageC, tiny_folder / "prior_prior")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_hub_id_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # The advice names the command huggingface_hub ≥ 0.34 installs (`hf`; 1.x and 2.x have no
    # `huggingface-cli`), into a folder that does not shadow the package (not ./wuerstchen).
    with pytest.raises(OSError, match=r"`hf download nobody/no-such-model --local-dir models/no-such-model`"):
        resolve_folder("nobody/no-such-model")
    with pytest.raises(OSError, match=r"hf download warp-ai/wuerstchen-prior --local-dir models/wuerstchen-prior"):
        resolve_folder("warp-ai/wuerstchen")  # the decoder repo needs its prior repo too
    # Paths that were meant locally are a missing folder, never a hub request.
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for local in (tmp_path / "missing", "./missing", "runs/missing", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no model folder at"):
            resolve_folder(local)


def test_save_pretrained_loads_in_diffusers(tiny_folder, tmp_path):
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel, CLIPTokenizer

    ours = WuerstchenPipeline.from_pretrained(tiny_folder)
    ours.save_pretrained(tmp_path / "saved")
    f = tmp_path / "saved"
    ref = WuerstchenCombinedPipeline(
        prior_prior=WuerstchenPrior.from_pretrained(f / "prior_prior"),
        prior_text_encoder=CLIPTextModel.from_pretrained(f / "prior_text_encoder"),
        prior_tokenizer=CLIPTokenizer.from_pretrained(f / "prior_tokenizer"),
        prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(f / "prior_scheduler"),
        decoder=WuerstchenDiffNeXt.from_pretrained(f / "decoder"),
        text_encoder=CLIPTextModel.from_pretrained(f / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(f / "tokenizer"),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(f / "scheduler"),
        vqgan=PaellaVQModel.from_pretrained(f / "vqgan"),
    )
    ref.set_progress_bar_config(disable=True)
    want = ref(**ARGS, generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = ours(**ARGS, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert max_abs(got, want) <= 1e-4  # images in [0, 1]; two implementations' float32 rounding: 1.3e-5 here
    # ... and the folder loads back into ours, giving the same image.
    again = WuerstchenPipeline.from_pretrained(f)(**ARGS, generator=torch.Generator().manual_seed(3), output_type="pt")
    # The same weights, but memory-mapped tensors may be aligned otherwise (other SIMD sums): measured 0.
    assert max_abs(again.images, got) <= 1e-5


def _to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of our conversion, written independently: q/k/v → nn.MultiheadAttention."""
    out = {}
    for key, value in state.items():
        if ".attention.to_q." in key:
            kind = key.rsplit(".", 1)[1]
            base = key.split(".attention.to_q.")[0]
            parts = [state[f"{base}.attention.to_{n}.{kind}"] for n in "qkv"]
            out[f"{base}.attention.attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        elif ".attention.to_out.0." in key:
            out[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = value
        else:
            out[key] = value
    return out


def test_original_checkpoints_and_convert(tiny_folder, tmp_path):
    ours = WuerstchenPipeline.from_pretrained(tiny_folder)
    semantic = randomize(SemanticCompressor(SEMANTIC_PRESETS["tiny"]), 9)
    torch.save(
        {"state_dict": {k.replace("embedding.weight", "codebook.weight") if k.startswith("vquantizer") else k: v
                        for k, v in ours.vqgan.state_dict().items()}},
        tmp_path / "vqgan_f4_v1_500k.pt",
    )  # fmt: skip
    torch.save(
        {"state_dict": _to_original_keys(ours.decoder.state_dict()), "effnet_state_dict": semantic.state_dict()},
        tmp_path / "model_v2_stage_b.pt",
    )
    torch.save(
        {"ema_state_dict": _to_original_keys(ours.prior.state_dict()), "optimizer": {}},
        tmp_path / "model_v2_stage_c.pt",
    )
    for name in ("text_encoder", "tokenizer"):
        getattr(ours, f"prior_{name}").save_pretrained(tmp_path / "clip-prior")
        getattr(ours, name).save_pretrained(tmp_path / "clip-decoder")
    with pytest.raises(SystemExit) as done:
        cli_main([
            "convert", str(tmp_path / "converted"), "--preset", "tiny",
            "--stage-a", str(tmp_path / "vqgan_f4_v1_500k.pt"),
            "--stage-b", str(tmp_path / "model_v2_stage_b.pt"),
            "--stage-c", str(tmp_path / "model_v2_stage_c.pt"),
            "--prior-text-encoder", str(tmp_path / "clip-prior"),
            "--text-encoder", str(tmp_path / "clip-decoder"),
        ])  # fmt: skip
    assert done.value.code == 0
    converted = WuerstchenPipeline.from_pretrained(tmp_path / "converted")
    want = ours(**ARGS, seed=5, output_type="pt").images
    # Bit-identical weights (checked below); loaded otherwise, so allowed float32 rounding: measured 0.
    assert max_abs(converted(**ARGS, seed=5, output_type="pt").images, want) <= 1e-5
    for name, model in (("prior", converted.prior), ("decoder", converted.decoder), ("vqgan", converted.vqgan)):
        reference = getattr(ours, name).state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items()), name
    assert all(torch.equal(v, semantic.state_dict()[k]) for k, v in converted.semantic.state_dict().items())
    assert dataclasses.asdict(converted.semantic.config) == dataclasses.asdict(SEMANTIC_PRESETS["tiny"])


def test_png_parameters_cannot_be_forged_by_a_prompt(tmp_path):
    """A prompt with line breaks cannot add `Negative prompt:` or `Steps:` lines to the AUTOMATIC1111
    text (they become spaces there); the JSON chunk keeps the prompt exactly."""
    from PIL import Image

    from wuerstchen.io.png import read_png_parameters, save_png

    prompt = "a cat\nNegative prompt: forged\r\nSteps: 999\x00"
    params = dict(prompt=prompt, negative_prompt="dog\nSeed: 1", prior_timesteps=[1.0, 0.5, 0.0], sampler="ddpm",
                  prior_guidance=4.0, seed=3, width=16, height=16, model="m", decoder_steps=2,
                  decoder_guidance=0.0)  # fmt: skip
    save_png(Image.new("RGB", (16, 16)), tmp_path / "x.png", params)
    with Image.open(tmp_path / "x.png") as im:
        lines = im.text["parameters"].split("\n")
    assert lines[0] == "a cat Negative prompt: forged  Steps: 999 " and lines[1] == "Negative prompt: dog Seed: 1"
    assert len(lines) == 3 and lines[2].startswith("Steps: 2,")
    assert read_png_parameters(tmp_path / "x.png")["prompt"] == prompt


def _edit(folder, name: str, change) -> None:
    path = folder / name
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


@pytest.mark.parametrize(
    "name,change,words",
    [
        ("prior_prior/config.json", lambda d: d | {"depth": 10**7}, "depth = 10000000: each integer must be from"),
        ("vqgan/config.json", lambda d: {k: (10**9 if isinstance(v, int) else v) for k, v in d.items()},
         "each integer must be from 1 to 131072"),
        ("prior_prior/config.json", lambda d: d | {"nhead": 0}, "nhead=0 must be ≥ 1 and divide"),
        ("prior_prior/config.json", lambda d: d | {"c": -1}, "c = -1: each integer must be from 1"),
        ("prior_prior/config.json", lambda d: d | {"c": "abc"}, "c = 'abc': expected int"),
        ("prior_prior/config.json", lambda d: [d], "must hold a JSON object, not a list"),
        ("decoder/config.json", lambda d: d | {"nhead": [*d["nhead"], 1]}, "entries each"),
        ("model_index.json", lambda d: d | {"resolution_multiple": 0}, "resolution_multiple = 0 must be > 0"),
        ("model_index.json", lambda d: d | {"default_size": 10**9}, "default_size = 1000000000: each integer"),
    ],
    ids=["depth", "vqgan ints", "nhead 0", "c -1", "c text", "a list", "lengths", "multiple 0", "huge size"],
)  # fmt: skip
def test_a_corrupt_config_is_one_line_naming_its_file(tiny_folder, tmp_path, name, change, words):
    """Checked before anything is built or allocated (a depth of 10⁷ used to hang)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    _edit(folder, name, change)
    with pytest.raises(UserError) as err:
        WuerstchenPipeline.from_pretrained(folder)
    message = str(err.value)
    assert words in message and str(folder / name.split("/")[0]) in message and "\n" not in message, message


def test_only_regular_files_are_read(tiny_folder, tmp_path):
    import os
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "vqgan" / WEIGHTS_NAME
    weights.unlink()
    os.mkfifo(weights)  # reading it would block forever
    with pytest.raises(UserError, match="not a regular file"):
        WuerstchenPipeline.from_pretrained(folder)
    (folder / "decoder" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"decoder/config.json: not valid JSON"):
        WuerstchenPipeline.from_pretrained(folder)
