"""`snapferry token`: the resume token of an interrupted receive, or (--decode) a token's fields."""

from __future__ import annotations

import argparse
import sys

from snapferry.cli import common


def run(args: argparse.Namespace) -> int:
    backend = common.backend(args, args.target)
    if args.decode:
        sys.stdout.write(backend.describe_token(args.target, as_json=args.json))
        return 0
    print(backend.token(args.target, mode=args.mode))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    token = sub.add_parser("token", parents=[common_options], help="print the resume token of an interrupted receive")
    token.add_argument("--decode", action="store_true", help="print the fields of TOKEN (snapferry's or OpenZFS's)")
    token.add_argument("--mode", choices=common.MODES, help="only this mode's token (default: whichever the dataset has)")
    token.add_argument("target", metavar="DATASET|DIR/SUBVOLUME|TOKEN")
    token.set_defaults(func=run)
