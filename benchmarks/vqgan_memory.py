"""The measurement behind `wuerstchen generate`'s memory check (`VQGAN_BYTES_PER_PIXEL_CHANNEL` in
wuerstchen/commands/generate.py): the peak memory of the VQGAN decoder (random weights) decoding one
image, above the process's baseline, per output pixel and per unit of its `embed_dim`.

    python benchmarks/vqgan_memory.py --sizes 512 1024 2048 --embed-dims 384 64

Each (embed_dim, size) runs in a fresh process (peak RSS is per process), float32, as the pipeline
decodes (inference mode, the CPU fast paths on).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def child(embed_dim: int, side: int) -> None:
    import torch

    from wuerstchen.models import kernels
    from wuerstchen.models.stage_a import StageA, StageAConfig

    torch.set_num_threads(1)
    model = StageA(StageAConfig(embed_dim=embed_dim)).eval()
    latents = torch.randn(1, 4, side // 4, side // 4)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.inference_mode(), kernels.inference_kernels():
        model.decode_latents(latents)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    print(f"embed_dim {embed_dim:4}  {side:5}²  peak +{grown / 2**20:7.0f} MiB  "
          f"{grown / side**2 / embed_dim:.2f} B per pixel and channel")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--embed-dims", type=int, nargs="+", default=[384, 64])
    p.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    for embed_dim in args.embed_dims:
        for side in args.sizes:
            subprocess.run([sys.executable, __file__, "--child", str(embed_dim), str(side)], check=True)


if __name__ == "__main__":
    main()
