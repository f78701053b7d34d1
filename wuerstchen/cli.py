"""The `wuerstchen` command: one subcommand per module under `wuerstchen/commands/`.

    wuerstchen generate "a red circle above a blue square" --seed 1
    wuerstchen convert --stage-a vqgan.pt --stage-b stage_b.pt --stage-c stage_c.pt out/
    wuerstchen <command> --help

A user mistake is one line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import UserError

# name → (module under wuerstchen.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate images from text"),
    "convert": ("convert", "convert original .pt checkpoints to a diffusers-format folder"),
    "train": ("train", "train a stage (a, b, c) or a LoRA"),
    "eval": ("evaluate", "evaluate a model on the shapes world"),
    "serve": ("serve", "run the web UI and HTTP API"),
    "bench": ("bench", "benchmark against diffusers' reference pipeline"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the commands' examples as written and shows each option's default, unless its help
    already says it in words (or there is none: None, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wuerstchen", description="Würstchen text-to-image: generate, train, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"wuerstchen.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"wuerstchen.commands.{module}":
                raise
            continue  # a command whose module is not part of this install
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text).strip(),
            formatter_class=HelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:  # transformers' per-file progress bars would bury ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        code = args.run(args) or 0
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError) as e:
        # What the user can mend: a value the checks refused, a missing or unreadable file, a precision
        # that overflowed. Anything else is a bug or a failure of its own and keeps its traceback.
        if args.verbose:
            raise
        print(f"wuerstchen {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        if args.verbose:
            raise
        print(f"wuerstchen {args.command}: error: {e}", file=sys.stderr)  # the hub, a busy port, a full disk
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
