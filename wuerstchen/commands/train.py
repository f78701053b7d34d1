"""Train a stage of the cascade: `wuerstchen train {a,b,c} [--config FILE] [options] [--resume]`.

    wuerstchen train c --data photos/ --init-from wuerstchen-v2 --lr 1e-5 --max-steps 2000
    wuerstchen train b --config decoder.toml --batch-size 8
    wuerstchen train c --output-dir runs/prior --resume        # continue from the newest good checkpoint
    torchrun --nproc_per_node 4 -m wuerstchen train c --config prior.json --strategy fsdp

Options come from the stage's config dataclass (wuerstchen/train/config.py): defaults < --config
file (JSON, TOML or YAML) < flags. With --resume and no --config, OUTPUT/config.json is the base.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from pathlib import Path

from ..errors import UserError
from ..train.config import CONFIGS, config_fields, load_config

HELP = {
    "a": "Stage A, the VQGAN (reconstruction + codebook loss)",
    "b": "Stage B, the decoder (semantic latent + text → VQGAN latent)",
    "c": "Stage C, the prior (text → semantic latent)",
}


def _default_text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join(value) or "none"
    return str(value).replace("%", "%%")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, cls in CONFIGS.items():
        sp = sub.add_parser(stage, help=HELP[stage], description=f"{HELP[stage]}. {(cls.__doc__ or '').strip()}")
        sp.add_argument("--config", default=None, help="JSON, TOML or YAML file of options (flags override it)")
        sp.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
        sp.add_argument(
            "--restart",
            action="store_true",
            help="with --resume: when no checkpoint is usable, start again at step 0 (else it stops)",
        )
        sp.add_argument(
            "--allow-pipe-urls",
            action="store_true",
            help="allow --data `pipe:` URLs, which run shell commands (never taken from a config file)",
        )
        for f, tp in config_fields(cls):
            flag = "--" + f.name.replace("_", "-")
            text = f.metadata.get("help", "")
            if "default:" not in text:
                text += f" (default: {_default_text(f.default)})"
            if tp is bool or tp == (bool | None):
                sp.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
            elif typing.get_origin(tp) is tuple:
                sp.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="TEXT", help=text)
            else:
                sp.add_argument(flag, default=argparse.SUPPRESS, metavar=f.name.split("_")[-1].upper(), help=text)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.getLogger("wuerstchen.train").setLevel(level)
    cls = CONFIGS[args.stage]
    overrides = {f.name: getattr(args, f.name) for f, _ in config_fields(cls) if hasattr(args, f.name)}
    path = args.config
    if path is None and args.resume:
        run_dir = Path(overrides.get("output_dir", cls.__dataclass_fields__["output_dir"].default))
        if not run_dir.is_dir():
            raise UserError(f"--resume: no run folder at {run_dir}: pass the --output-dir of the run to continue")
        saved = run_dir / "config.json"
        path = saved if saved.exists() else None
    cfg = load_config(args.stage, path, overrides)
    if args.restart and not args.resume:
        raise UserError("--restart goes with --resume (it says what to do when no checkpoint is usable)")
    result = train(cfg, resume=args.resume, allow_pipe_urls=args.allow_pipe_urls, restart=args.restart)
    if rank == 0:
        print(f"trained Stage {args.stage.upper()} to step {result.step}; outputs in {result.output_dir}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: everything is written (atomic
        # renames) and the process group destroyed, yet now and then a collective backend's thread
        # is still joinable when its destructor runs, which aborts the process ("terminate called
        # without an active exception", exit -6) and fails a finished run.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
