"""`snapferry rollback` and `snapferry snapshot`: the ZFS changes sync makes besides transfers, each checked first."""

from __future__ import annotations

import argparse
import sys

from snapferry.cli import common


def run_rollback(args: argparse.Namespace) -> int:
    message = common.backend(args, args.snapshot).rollback(args.snapshot, destroy_later=args.r)
    if not (args.quiet or args.json):
        print(f"snapferry: {message}", file=sys.stderr)
    return 0


def run_snapshot(args: argparse.Namespace) -> int:
    common.backend(args, args.snapshot).take_snapshot(args.snapshot, recursive=args.r)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    rollback = sub.add_parser(
        "rollback", parents=[common_options], help="ZFS: roll a dataset back to a snapshot (refused where clones would be destroyed)"
    )
    rollback.add_argument("-r", action="store_true", help="destroy the snapshots after SNAPSHOT (as zfs rollback -r; never clones)")
    rollback.add_argument("snapshot", metavar="POOL/FS@SNAP")
    rollback.set_defaults(func=run_rollback)
    snapshot = sub.add_parser("snapshot", parents=[common_options], help="ZFS: take a snapshot (what sync --snapshot runs)")
    snapshot.add_argument("-r", action="store_true", help="of every descendant too, atomically (sync -r --snapshot)")
    snapshot.add_argument("snapshot", metavar="POOL/FS@SNAP")
    snapshot.set_defaults(func=run_snapshot)
