"""`snapferry hold`, `release` and `holds`: the user holds sync keeps on what it sends, and seeing or dropping them."""

from __future__ import annotations

import argparse
import json
import sys

from snapferry.cli import common
from snapferry.interface import HOLD_PREFIX


def run_hold(args: argparse.Namespace) -> int:
    common.backend(args, args.snapshots[0]).hold(args.tag, args.snapshots)
    return 0


def run_release(args: argparse.Namespace) -> int:
    common.backend(args, args.snapshots[0]).release(args.tag, args.snapshots)
    return 0


def run_holds(args: argparse.Namespace) -> int:
    """List the holds in each target; with --release, take the given tag (or every snapferry tag) off."""
    for target in args.targets:
        backend = common.backend(args, target)
        held = backend.holds(target)
        if args.release:
            tags = [args.tag] if args.tag else sorted({t for _, t in held if t and t.startswith(HOLD_PREFIX)})
            if not tags and any(t is None for _, t in held):
                print(f"snapferry: {target}: this zfs cannot list hold tags; name the one to release with --tag", file=sys.stderr)
                return 2
            for tag in tags:
                for snapshot in backend.release(tag, sorted({s for s, t in held if t in (tag, None)})):
                    if not args.quiet:
                        print(f"released {tag} from {snapshot}")
            continue
        for snapshot, tag in held:
            if args.json:
                print(json.dumps({"snapshot": snapshot, "tag": tag, "snapferry": bool(tag and tag.startswith(HOLD_PREFIX))}))
            else:
                print(f"{snapshot}\t{tag if tag is not None else '(a hold; this zfs cannot list its tag)'}")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    for verb, func, what in (("hold", run_hold, "put"), ("release", run_release, "take")):
        parser = sub.add_parser(
            verb, parents=[common_options], help=f"ZFS: {what} a snapferry user hold (tag {HOLD_PREFIX}...) on snapshots"
        )
        parser.add_argument("tag", metavar="TAG", help=f"{HOLD_PREFIX}DESTINATION, as sync names them")
        parser.add_argument("snapshots", nargs="+", metavar="POOL/FS@SNAP")
        parser.set_defaults(func=func)
    holds = sub.add_parser("holds", parents=[common_options], help="ZFS: the user holds on a dataset's snapshots; --release drops sync's")
    holds.add_argument("--release", action="store_true", help="take snapferry's holds off (those of --tag, or every snapferry: tag)")
    holds.add_argument("--tag", metavar="TAG", help=f"only this tag ({HOLD_PREFIX}DESTINATION)")
    holds.add_argument("targets", nargs="+", metavar="POOL/FS")
    holds.set_defaults(func=run_holds)
