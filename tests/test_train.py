"""The shared training loop on CPU with tiny models: losses fall, resume is exact, bad checkpoints and
bad data are survived, outputs load, the cache and LoRA work, the CLI reports mistakes in one line.

pytest -q tests/test_train.py
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wuerstchen.errors import UserError
from wuerstchen.train.config import build_config
from wuerstchen.train.loop import train

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}


def make_data(root: Path, n: int = 16, size: int = 64) -> Path:
    """n PNGs of a coloured square on white, at four positions, captioned "a red square" etc."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(n):
        pixels = np.full((size, size, 3), 255, np.uint8)
        name, offset = names[i % 4], size // 8 + (i // 4 % 4) * size // 8
        pixels[offset : offset + size // 2, offset : offset + size // 2] = COLORS[name]
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square")
    return root


def losses_of(output: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a shared 2-core machine a second one mostly waits (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUIET = dict(num_workers=0, progress=False, log_every=1, sample_every=0, checkpoint_every=0, warmup_steps=1)


def stage_c(data: Path, pipe: Path, out: Path, **changes) -> dict:
    """A tiny Stage C run, fine-tuning the tiny pipeline's prior at 128 px (3×3 latents)."""
    return dict(
        QUIET, data=str(data), init_from=str(pipe), semantic="tiny", image_size=128, batch_size=4,
        lr=1e-3, ema_every=2, ema_start=3, output_dir=str(out),
    ) | changes  # fmt: skip


@pytest.fixture(scope="module")
def data_128(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "squares", size=128)


@pytest.fixture(scope="module")
def reference_c(tmp_path_factory, data_128: Path, tiny_folder: Path) -> tuple[dict, Path]:
    """Stage C for 6 steps with checkpoints every 2 and samples every 3, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    values = stage_c(data_128, tiny_folder, out, max_steps=6, checkpoint_every=2, sample_every=3, sample_steps=2)
    train(build_config("c", values))
    return values, out


@pytest.mark.parametrize(
    "stage, values, ratio",
    [
        # from scratch with the official init; a fixed dataset of 8 images, so every step sees it all
        ("c", dict(model="tiny", semantic="tiny", image_size=128, batch_size=8, lr=3e-3, max_steps=30), 0.6),
        ("b", dict(model="tiny", semantic="tiny", image_size=64, batch_size=8, lr=3e-3, max_steps=20), 0.3),
        ("a", dict(model="tiny", image_size=64, batch_size=8, lr=1e-3, max_steps=30, holdout=2, sample_every=15), 0.7),
    ],
)
def test_loss_falls(stage: str, values: dict, ratio: float, tmp_path: Path, tiny_folder: Path) -> None:
    data = make_data(tmp_path / "data", n=8 + values.get("holdout", 0), size=values["image_size"])
    pipeline = {} if stage == "a" else {"pipeline": str(tiny_folder)}
    cfg = build_config(stage, QUIET | values | pipeline | {"data": str(data), "output_dir": str(tmp_path / "run")})
    losses = list(train(cfg).losses.values())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.isfinite(losses).all() and last < ratio * first, (first, last)
    if stage == "a":  # PSNR of the held-out images, with their reconstructions as samples
        lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        psnr = [r["psnr"] for r in lines if r["kind"] == "eval"]
        assert len(psnr) == 2 and psnr[1] > psnr[0] and (tmp_path / "run" / "samples" / "step-000030.png").is_file()


def test_resume_gives_the_same_losses(tmp_path: Path, reference_c: tuple[dict, Path]) -> None:
    values, reference = reference_c
    values = values | {"output_dir": str(tmp_path / "run"), "sample_every": 0}

    class Interrupt(Exception):
        pass

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:  # between checkpoints 2 and 4: step 3 runs again after resuming
            raise Interrupt

    with pytest.raises(Interrupt):
        train(build_config("c", values), on_step=stop_at_3)
    assert list(losses_of(tmp_path / "run")) == [1, 2, 3]
    # The CLI's --resume, with the saved OUTPUT/config.json as the base config.
    from wuerstchen.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "c", "--output-dir", str(tmp_path / "run"), "--resume"])
    assert exit_info.value.code == 0
    assert losses_of(tmp_path / "run") == losses_of(reference)  # exact, on CPU
    for name in ("model", "ema", "optimizer"):
        ours = load(tmp_path / "run" / "checkpoints" / "step-000006" / f"{name}.safetensors")
        theirs = load(reference / "checkpoints" / "step-000006" / f"{name}.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_truncated_checkpoint_falls_back(tmp_path: Path, reference_c: tuple[dict, Path], caplog) -> None:
    values, reference = reference_c
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / "step-000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated, as by a crash or a full disk
    with caplog.at_level(logging.INFO, logger="wuerstchen.train"):
        result = train(build_config("c", values | {"output_dir": str(out), "sample_every": 0}), resume=True)
    error = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert "step-000006" in error.getMessage() and "truncated" in error.getMessage()
    assert "resumed from" in caplog.text and "step-000004" in caplog.text
    assert (out / "checkpoints" / "step-000006.corrupt").is_dir()
    assert result.losses == {k: v for k, v in losses_of(reference).items() if k > 4}  # steps 5, 6 again


def test_resume_finds_its_way_past_what_a_crash_leaves(tmp_path: Path, reference_c: tuple[dict, Path], caplog) -> None:
    """A partial last metrics line with NUL padding, a malformed manifest, a stale temporary write:
    the resume warns, falls back, cleans up and continues; the metrics of the steps kept stay."""
    values, reference = reference_c
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 7, "lo' + b"\x00" * 64)  # the crash came mid-write
    (out / "checkpoints" / "step-000006" / "manifest.json").write_text("[]")
    stale = out / "checkpoints" / ".step-000008.k2j3h4"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="wuerstchen.train"):
        result = train(build_config("c", values | {"output_dir": str(out), "sample_every": 0}), resume=True)
    assert "manifest.json is malformed" in caplog.text and "resumed from" in caplog.text
    assert "dropped 1 unreadable line" in caplog.text and not stale.exists()
    assert result.losses == {k: v for k, v in losses_of(reference).items() if k > 4}
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6 and 4 in steps  # steps 1–4 kept, 5–6 logged again


def test_every_checkpoint_corrupt_stops_unless_restart(tmp_path: Path, reference_c: tuple[dict, Path]) -> None:
    values, reference = reference_c
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for folder in (out / "checkpoints").iterdir():
        (folder / "manifest.json").write_text("{}")
    before = (out / "metrics.jsonl").read_text()
    cfg = build_config("c", values | {"output_dir": str(out), "sample_every": 0})
    with pytest.raises(UserError, match="pass --restart"):
        train(cfg, resume=True)
    assert (out / "metrics.jsonl").read_text() == before  # nothing wiped
    result = train(cfg, resume=True, restart=True)
    assert result.losses == losses_of(reference)  # from step 0: the same run again
    assert [p.read_text() for p in out.glob("metrics.*.jsonl")] == [before]  # the old metrics, kept aside


def test_outputs_load_as_a_pipeline(reference_c: tuple[dict, Path]) -> None:
    from wuerstchen import WuerstchenPipeline
    from wuerstchen.io.checkpoint import load_model
    from wuerstchen.models.stage_c import StageC

    values, out = reference_c
    assert json.loads((out / "config.json").read_text()) == {"stage": "c", **build_config("c", values).to_dict()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    pipe = WuerstchenPipeline.from_pretrained(out / "pipeline")
    prior = load_model(StageC, out / "prior")
    ema = load(out / "checkpoints" / "step-000006" / "ema.safetensors")
    assert all(torch.equal(v, ema[f"model.{k}"]) for k, v in prior.state_dict().items())  # EMA weights
    assert all(torch.equal(v, prior.state_dict()[k]) for k, v in pipe.prior.state_dict().items())
    image = pipe("a red square", prior_num_inference_steps=2, num_inference_steps=2, seed=0).images[0]
    assert image.size == (128, 128)


def test_bad_items_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    data = make_data(tmp_path / "data", n=15)
    (data / "corrupt.png").write_bytes(b"\x89PNG not really" * 20)
    (data / "corrupt.txt").write_text("a broken square")
    Image.new("RGB", (64, 64)).save(data / "uncaptioned.png")
    values = QUIET | dict(data=str(data), model="tiny", image_size=64, batch_size=4, max_steps=4, holdout=0)
    with caplog.at_level(logging.INFO, logger="wuerstchen.train"):
        result = train(build_config("a", values | {"output_dir": str(tmp_path / "run")}))
    assert result.step == 4  # one epoch: 16 items, the corrupt one replaced by the next
    assert result.skipped == {"corrupt image": 1, "missing caption": 1}
    assert "skipped 2 items: 1 corrupt image, 1 missing caption" in caplog.text


def test_cache_gives_the_same_inputs(tmp_path: Path, reference_c: tuple[dict, Path]) -> None:
    values, reference = reference_c
    cache = tmp_path / "squares.cache.safetensors"
    values = values | {"output_dir": str(tmp_path / "run"), "sample_every": 0, "cache": str(cache), "max_steps": 4}
    result = train(build_config("c", values))
    expected = [v for k, v in losses_of(reference).items() if k <= 4]
    np.testing.assert_allclose(list(result.losses.values()), expected, rtol=1e-4)
    built = cache.stat().st_mtime_ns
    train(build_config("c", values | {"output_dir": str(tmp_path / "run2"), "max_steps": 1}))
    assert cache.stat().st_mtime_ns == built  # reused, not rebuilt
    with pytest.raises(ValueError, match="other settings"):
        train(build_config("c", values | {"output_dir": str(tmp_path / "run3"), "image_size": 64}))


def test_lora_trains_only_the_adapters(tmp_path: Path, data_128: Path, tiny_folder: Path) -> None:
    pytest.importorskip("peft")
    from wuerstchen.io.checkpoint import load_model
    from wuerstchen.lora import lora_state_dict
    from wuerstchen.models.stage_c import StageC

    values = stage_c(data_128, tiny_folder, tmp_path / "run", max_steps=3, lora_rank=4, lr=1e-2, ema_beta=0.0)
    result = train(build_config("c", values))
    base = load_model(StageC, tiny_folder / "prior_prior").state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in result.module.model.state_dict().items() if "lora_" not in k}
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(result.module.model).items() if "lora_B" in k)
    assert (tmp_path / "run" / "lora.safetensors").is_file() and not (tmp_path / "run" / "prior").exists()


def test_cli_help_and_mistakes(tmp_path: Path, capsys) -> None:
    from wuerstchen.cli import main
    from wuerstchen.train.config import StageCTrainConfig, config_fields

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "c", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in text for f, _ in config_fields(StageCTrainConfig))
    (tmp_path / "run.toml").write_text("batch_size = 2\nbatch_sise = 4\n")
    (tmp_path / "b.json").write_text(json.dumps({"stage": "b", "lr": 1e-5}))
    for args, message in (
        (["--data", str(tmp_path / "nowhere"), "--model", "tiny"], "does not exist"),
        (["--config", str(tmp_path / "run.toml")], "unknown option(s) ['batch_sise']"),
        (["--config", str(tmp_path / "b.json")], "is a Stage B config"),
        (["--batch-size", "many"], "--batch-size: expected int"),
        (["--strategy", "horovod"], "ddp or fsdp"),
        (["--settings", '{"resolution_multiplier": 16}'], "--settings: unknown key(s) ['resolution_multiplier']"),
        (["--settings", "16"], "--settings must be a JSON object"),
        (["--loss-weighting", "snr"], "--loss-weighting must be p2, uniform or adaptive"),
        (["--x0-weight", "-1"], "--x0-weight must be in [0, 100]"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "c", "--output-dir", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_loss_weighting() -> None:
    from wuerstchen.train.stages import diffusion_loss, p2_weight

    g = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    per_sample = (pred - noise).pow(2).flatten(1).mean(1)
    assert torch.allclose(diffusion_loss(pred, noise, t, "uniform"), per_sample.mean())
    assert torch.allclose(diffusion_loss(pred, noise, t), (per_sample * p2_weight(t)).mean())
    assert p2_weight(t)[0] < 0.1 < 0.9 < p2_weight(t)[-1]  # little weight on low noise, nearly 1 at t = 1

    # The x0 term is the squared error of the x0 estimate that ε̂ implies, per sample.
    from wuerstchen.sampling import add_noise

    x0 = torch.randn(4, 3, 5, 5, generator=g)
    x0_error = (_x0_estimate(add_noise(x0, noise, t), pred, t) - x0).pow(2).flatten(1).mean(1).mean()
    extra = diffusion_loss(pred, noise, t, "uniform", x0_weight=0.5) - diffusion_loss(pred, noise, t, "uniform")
    assert torch.allclose(extra, 0.5 * x0_error, rtol=1e-4)


def _x0_estimate(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The x0 that a noise estimate implies: (x_t − √(1 − ᾱ)·ε̂) / √ᾱ."""
    from wuerstchen.sampling import alpha_cumprod

    ab = alpha_cumprod(t).view(-1, *[1] * (x_t.dim() - 1))
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def _x0_error_at_t1(x0_weight: float, steps: int = 300) -> tuple[float, float]:
    """Train a tiny prior whose latents are +1 or −1 everywhere, as a one-hot in the text says, on
    the usual training times; return its x0 error at t = 1 under the right and the wrong text."""
    from wuerstchen.models.stage_c import StageC, StageCConfig
    from wuerstchen.sampling import add_noise
    from wuerstchen.train.stages import PriorLoss, _official_init, sample_t

    torch.manual_seed(0)
    cfg = StageCConfig(c_in=4, c=32, c_cond=8, c_r=16, depth=2, nhead=2, dropout=0.0)
    loss_fn = PriorLoss(_official_init(StageC(cfg)), "p2", x0_weight)
    opt = torch.optim.AdamW(loss_fn.parameters(), lr=2e-3)

    def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = torch.randint(2, (n,), generator=g)
        x0 = (1 - 2 * k.float()).view(n, 1, 1, 1).expand(n, 4, 4, 4) + 0.1 * torch.randn(n, 4, 4, 4, generator=g)
        text = torch.zeros(n, 3, 8)
        text[torch.arange(n), 0, k] = 4.0
        return x0, text, k

    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x0, text, _ = batch(32, g)
        loss, _ = loss_fn(x0, torch.randn(x0.shape, generator=g), sample_t(32, g), text)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0, text, k = batch(128, torch.Generator().manual_seed(1))
    wrong = torch.zeros_like(text)
    wrong[torch.arange(128), 0, 1 - k] = 4.0
    t = torch.ones(128)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)), t)
    with torch.no_grad():
        right_error, wrong_error = (
            (_x0_estimate(x_t, loss_fn.model(x_t, t, c), t) - x0).pow(2).mean().item() for c in (text, wrong)
        )
    return right_error, wrong_error


def test_x0_weight_lets_the_text_set_the_latent_at_full_noise() -> None:
    """At t = 1 the noisy latent says nothing about x0, so E[x0 | text] is all a prior can know; the
    ε loss weighs that by ᾱ/(1 − ᾱ) ≈ 1e-4 and the prior never learns it, the x0 term does.
    (The mean x0 is ±1 as the text says: the best error is ~0.01 with the right text, ~4 wrong.)"""
    right, wrong = _x0_error_at_t1(0.1)
    assert right < 1.0 and wrong > 3.0, (right, wrong)
    right_p2, _ = _x0_error_at_t1(0.0)
    assert right_p2 > 5.0, right_p2


def test_semantic_reconstruction_head(tmp_path: Path, tiny_folder: Path, capsys) -> None:
    """--semantic-recon: the jointly trained compressor also learns to reconstruct the VQGAN latent
    through a training-only head; its loss falls and the exported model has no trace of the head."""
    from safetensors.torch import load_file

    from wuerstchen.cli import main

    data = make_data(tmp_path / "data", n=8, size=64)
    values = QUIET | dict(
        data=str(data), pipeline=str(tiny_folder), model="tiny", semantic="tiny", train_semantic=True,
        semantic_recon=1.0, semantic_scale_min=1.0, image_size=64, batch_size=8, lr=3e-3, max_steps=20,
        output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(build_config("b", values))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recon = [r["recon"] for r in lines if r["kind"] == "train"]
    assert len(recon) == 20 and np.mean(recon[-5:]) < 0.5 * np.mean(recon[:5]), recon
    exported = tmp_path / "run" / "pipeline"
    keys = [k for f in exported.rglob("*.safetensors") for k in load_file(f)]
    assert keys and not any("head" in k for k in keys)
    assert (exported / "semantic").is_dir()

    capsys.readouterr()  # what training printed
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "b", "--output-dir", str(tmp_path / "other"), "--semantic-recon", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs --train-semantic" in err and len(err.strip().splitlines()) == 1
