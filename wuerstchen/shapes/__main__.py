"""Write renders of the shapes world as a training image folder (image + same-named .txt caption).

    python -m wuerstchen.shapes photos/ -n 64                  # 64 training-split scenes, 128 px
    python -m wuerstchen.shapes heldout/ -n 16 --split heldout # colour–shape pairs training never shows
"""

import argparse
from pathlib import Path

from .world import write_folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m wuerstchen.shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", help="folder to write (files already there are kept)")
    p.add_argument("-n", "--images", type=int, default=64, help="how many scenes (default: 64)")
    p.add_argument("--split", choices=("train", "heldout"), default="train", help="(default: train)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--size", type=int, default=128, help="side in px (default: 128, the shipped model's)")
    args = p.parse_args(argv)
    if args.images < 1 or args.size < 16:
        p.error("--images must be at least 1 and --size at least 16")
    print(write_folder(Path(args.folder), args.images, args.seed, args.size, args.split))


if __name__ == "__main__":
    main()
