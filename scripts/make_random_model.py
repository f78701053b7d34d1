"""Write a pipeline folder with random weights (no download, no training): a stand-in model that
shows the whole system working end to end. Its images are noise-like, not pictures.

    python scripts/make_random_model.py demo-model [--preset tiny] [--seed 0]
    wuerstchen generate "a red circle" --model demo-model
"""

import argparse

from wuerstchen.testing import random_pipeline

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--preset", default="tiny", help="tiny or medium")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random_pipeline(args.preset, args.seed).save_pretrained(args.output)
    print(args.output)
