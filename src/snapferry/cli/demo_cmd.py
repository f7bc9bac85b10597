"""`snapferry demo`: the built-in demonstration on throwaway file-backed pools or loop-mounted btrfs."""

from __future__ import annotations

import argparse
import shlex


def run(args: argparse.Namespace) -> int:
    from snapferry.demo import run_btrfs_demo, run_demo

    if args.btrfs:
        return run_btrfs_demo(quiet=args.quiet)
    return run_demo(shlex.split(args.zfs) if args.zfs else None, quiet=args.quiet)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[common_options], help="interrupted and resumed transfer between two file-backed pools")
    demo.add_argument("--btrfs", action="store_true", help="between two loop-mounted btrfs file systems instead")
    demo.set_defaults(func=run)
