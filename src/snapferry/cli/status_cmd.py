"""`snapferry status`: everything sync plans from, for one dataset or btrfs directory, in one answer."""

from __future__ import annotations

import argparse
import json
from typing import Any

from snapferry.cli import common


def _summary(status: dict[str, Any]) -> str:
    """The answer as a person reads it."""
    lines = [f"{status['target']} ({status['backend']})"]
    snapshots = status.get("snapshots", status.get("subvolumes", []))
    lines.append(f"  snapshots: {len(snapshots)}" + (f", newest {snapshots[-1]['name']}" if snapshots else ""))
    if status.get("exists") is False:
        lines.append("  does not exist")
    unfinished = status.get("unfinished") or ({"": status["token"]} if status.get("token") else {})
    for name, token in unfinished.items():
        lines.append(f"  unfinished transfer{' of ' + name if name else ''}: " + (token or "no checkpoint yet"))
    lines.append(f"  native resume: {'yes' if status.get('native_resume') else 'no'}")
    if status.get("modified") is not None:
        lines.append(f"  modified since its last snapshot: {'yes' if status['modified'] else 'no'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    status = common.backend(args, args.target).status(args.target)
    print(json.dumps(status) if args.json else _summary(status))
    return 0


def run_subvolumes(args: argparse.Namespace) -> int:
    """The btrfs listing sync used to plan from; `status --json DIR` answers the same and more."""
    print(json.dumps(common.backend(args, args.directory).status(args.directory)))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common_options], help="snapshots, unfinished transfer and resume abilities of a target")
    status.add_argument("target", metavar="DATASET|DIR")
    status.set_defaults(func=run)
    subvolumes = sub.add_parser(
        "subvolumes", parents=[common_options], help="btrfs: a directory's subvolumes and unfinished transfers, as JSON"
    )
    subvolumes.add_argument("directory", metavar="DIR")
    subvolumes.set_defaults(func=run_subvolumes)
