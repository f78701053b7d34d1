"""Training speed and peak memory of each stage, through the real loop, for a tiny and a medium config.

    python benchmarks/train_bench.py                                  # CPU, and CUDA when available
    python benchmarks/train_bench.py --devices cpu --sizes tiny --timed 5 --threads 4
    python benchmarks/train_bench.py --stages c3 b3 --variants full ckpt bf16 lora   # Stable Cascade

Stages `c3` and `b3` are Stable Cascade's prior and decoder (`tiny-c`/`tiny-b`, `medium-c`/`medium-b`
U-Nets from `wuerstchen.testing.random_cascade_pipeline`), fine-tuned from that pipeline folder with
the memory options as variants: `full` (float32 AdamW + EMA), `ckpt` (+ gradient checkpointing),
`bf16` (+ bfloat16 autocast), `lora` (rank 4 on the attention, no EMA). Each row also gives the
trained model's parameter count and its trainable parameters, for extrapolating the state memory.

Each case runs in a fresh process: a folder of generated images, a random pipeline of the preset
(`wuerstchen.testing.random_pipeline`: its VQGAN and text encoders are the frozen parts), the
semantic compressor preset (tiny, or the official EfficientNetV2-S shape for medium), then
`wuerstchen.train.loop.train` for `--warmup` + `--timed` steps. Reported: optimizer steps/s and
images/s over the timed steps, and peak memory: on CUDA `torch.cuda.max_memory_allocated`, on the
CPU the growth of the process's peak RSS (`resource.getrusage`) from just before training, which
covers the frozen parts, the trained model, AdamW and EMA states, and activations. Checkpoints,
samples and the final export are off (their cost is I/O).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (image size, batch size, semantic preset) per config size; the stage models use the same preset name.
SIZES = {"tiny": (128, 4, "tiny"), "medium": (256, 4, "official-v2")}
VARIANTS = {
    "full": {},
    "ckpt": {"gradient_checkpointing": True},
    "bf16": {"gradient_checkpointing": True, "bf16": True},
    "lora": {"lora_rank": 4, "ema_beta": 0.0},
}


def run_case(
    stage: str, size: str, device: str, warmup: int, timed: int, threads: int, variant: str = "full"
) -> dict:
    """One case in this process; returns its numbers."""
    import numpy as np
    import torch
    from PIL import Image

    from wuerstchen.testing import random_pipeline
    from wuerstchen.train.config import build_config
    from wuerstchen.train.loop import train

    torch.set_num_threads(threads)
    image_size, batch, semantic = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        rng = np.random.default_rng(0)
        for i in range(batch * (warmup + timed)):
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / f"{i:03d}.png")
            (root / "data" / f"{i:03d}.txt").write_text(f"random image {i}")
        cascade = stage.endswith("3")
        if cascade:
            from wuerstchen.testing import random_cascade_pipeline

            random_cascade_pipeline(size, seed=0).save_pretrained(root / "pipe")
            source = dict(init_from=str(root / "pipe"))
            semantic = "tiny" if size == "tiny" else "stable-cascade"
        else:
            random_pipeline(size, seed=0).save_pretrained(root / "pipe")
            source = dict(pipeline=str(root / "pipe"), model=size)
        values = dict(
            **source, image_size=image_size, data=str(root / "data"),
            batch_size=batch, max_steps=warmup + timed, warmup_steps=1, checkpoint_every=0, sample_every=0,
            log_every=warmup + timed, num_workers=0, progress=False, device=device, output_dir=str(root / "run"),
            ema_every=1, **VARIANTS[variant],
        )  # fmt: skip
        if stage != "a":
            values["semantic"] = semantic
        if stage == "a":
            values["holdout"] = 0
        cfg = build_config(stage[0], values)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times: list[float] = []
        result = train(cfg, on_step=lambda step, loss: times.append(time.perf_counter()))
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        params = sum(p.numel() for p in result.module.model.parameters())
        trainable = sum(p.numel() for p in result.module.parameters() if p.requires_grad)
    steps_per_s = timed / (times[-1] - times[warmup - 1])
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else (peak_rss - base_rss) / 1024
    return {
        "stage": stage, "size": size, "variant": variant, "device": device, "image_size": image_size, "batch": batch,
        "params": params, "trainable": trainable,
        "steps_per_s": steps_per_s, "images_per_s": steps_per_s * batch, "peak_memory_mib": memory,
        "memory_kind": "cuda max_memory_allocated" if device == "cuda" else "peak RSS growth",
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=["c", "b", "a"], choices=["c", "b", "a", "c3", "b3"])
    p.add_argument("--variants", nargs="+", default=["full"], choices=list(VARIANTS), help="v3 memory options")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--timed", type=int, default=5, help="timed steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (on a shared machine, 1 is fastest)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
    if args.case:
        stage, size, device, variant = args.case.split(",")
        print(json.dumps(run_case(stage, size, device, args.warmup, args.timed, args.threads, variant)))
        return
    import torch

    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {args.threads} CPU threads, {args.warmup} warm-up + {args.timed} timed steps")
    print(f"{'stage':<6}{'config':<8}{'variant':<8}{'device':<7}{'px':>5}{'batch':>6}{'steps/s':>9}{'images/s':>9}"
          f"{'peak MiB':>10}{'params':>12}{'trainable':>11}")  # fmt: skip
    cases = [(stage, size, device, variant) for device in devices for size in args.sizes for stage in args.stages
             for variant in (args.variants if stage.endswith("3") else ["full"])]  # fmt: skip
    for stage, size, device, variant in dict.fromkeys(cases):
        case = f"{stage},{size},{device},{variant}"
        cmd = [sys.executable, __file__, "--case", case, "--warmup", str(args.warmup)]
        cmd += ["--timed", str(args.timed), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{case}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{stage:<6}{size:<8}{variant:<8}{device:<7}{r['image_size']:>5}{r['batch']:>6}"
            f"{r['steps_per_s']:>9.2f}{r['images_per_s']:>9.1f}{r['peak_memory_mib']:>10.0f}"
            f"{r['params']:>12,}{r['trainable']:>11,}"
        )

if __name__ == "__main__":
    main()
