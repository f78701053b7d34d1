"""Benchmark our pipeline against diffusers' reference on the same weights (see wuerstchen.bench).

wuerstchen bench                     # medium config, 512×512, CPU
wuerstchen bench --paper             # also FLOPs per 1024² image: Würstchen v2 vs SDXL
"""

from ..bench import add_arguments, main


def run(args) -> int:
    return main(args)


__all__ = ["add_arguments", "run"]
