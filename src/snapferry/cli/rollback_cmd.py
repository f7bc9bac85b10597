"""`snapferry rollback`, `snapshot` and `prune`: the ZFS changes sync makes besides transfers, each checked first."""

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
    add_prune_parser(sub, common_options)


def run_prune(args: argparse.Namespace) -> int:
    destroyed = common.backend(args, args.dataset).prune(args.dataset, args.prefix, args.keep, args.protect or [])
    if not (args.quiet or args.json):
        for name in destroyed:
            print(f"snapferry: destroyed {name}", file=sys.stderr)
    return 0


def add_prune_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    prune = sub.add_parser("prune", parents=[common_options], help="ZFS: destroy sync's older PREFIX... snapshots, keeping the newest N")
    prune.add_argument("--prefix", default="snapferry_", metavar="PREFIX", help="only snapshots whose name starts so (snapferry_)")
    prune.add_argument("--keep", type=int, required=True, metavar="N", help="how many of the newest to keep (at least 1)")
    prune.add_argument("--protect", action="append", metavar="POOL/FS@SNAP", help="never this one (sync: the newest both ends have)")
    prune.add_argument("dataset", metavar="POOL/FS")
    prune.set_defaults(func=run_prune)
