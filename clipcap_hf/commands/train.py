"""`clipcap train ARGS...`: the arguments of `examples/run_clipcap.py`, forwarded as they are to `training.main`."""

from __future__ import annotations

import argparse

from ..training import main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The parser has no option of its own (prefix '+'), so every `--flag`, `--help` included, reaches main's
    # HfArgumentParser.
    parser.add_argument("arguments", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    main(args.arguments, prog="clipcap train")
    return 0
