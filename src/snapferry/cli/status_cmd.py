"""`snapferry status`: what sync plans from (--json), or for a person one line per target; and `subvolumes` (btrfs)."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict

from snapferry.cli import common
from snapferry.interface import Moment, Summary
from snapferry.sync.endpoints import Endpoint, Side
from snapferry.transport.ssh import Shell


def side_of(text: str, args: argparse.Namespace) -> Side:
    """A target here or `[user@]host:TARGET`, reached with --ssh and --remote-snapferry."""
    endpoint = Endpoint.parse(text)
    shell = Shell(endpoint.host, endpoint.user, tuple(shlex.split(args.ssh)), tuple(shlex.split(args.remote_snapferry)))
    return Side(endpoint, shell, with_properties=not getattr(args, "no_properties", False))


def age(seconds: float) -> str:
    """A duration as a person says it: 45s, 12m, 3h 2m, 2d 4h."""
    seconds = max(int(seconds), 0)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if seconds >= size:
            rest = (seconds % size) // smaller_size
            return f"{seconds // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{seconds // 60}m" if seconds >= 60 else f"{seconds}s"


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _moment(moment: Moment | None, now: float) -> str:
    if moment is None:
        return "none"
    return moment.name + (f" ({age(now - moment.created)} ago)" if moment.created else "")


def summary_line(summary: Summary, now: float, label: str | None = None) -> str:
    """One line: newest snapshot (each side, and the newest both have, given a source), what is unfinished, holds."""
    label = label or summary.target
    if not summary.exists:
        return f"{label}: does not exist yet"
    parts = [f"newest {_moment(summary.newest, now)}"]
    if summary.source_newest is not None:
        parts.append(f"source's newest {_moment(summary.source_newest, now)}")
        parts.append(f"newest common {_moment(summary.common, now)}")
    for item in summary.unfinished:
        done = f"{size(item.bytes_done)} committed" if item.bytes_done else "nothing committed yet"
        if item.checkpoints:
            done += f" in {item.checkpoints} checkpoint(s)"
        token = f"{item.token_kind}- token" if item.token_kind else "no token yet"
        last = f", last checkpoint {age(now - item.last_progress)} ago" if item.last_progress else ""
        parts.append(f"unfinished: {item.snapshot}, {done} ({token}{last})")
    if not summary.unfinished:
        parts.append("nothing unfinished")
    if summary.held:
        parts.append(f"{summary.held} held snapshot(s)")
    return f"{label}: " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    source = side_of(args.source, args) if args.source else None
    try:
        _print_statuses(args, source)
    finally:
        if source is not None:
            source.close()
    return 0


def _print_statuses(args: argparse.Namespace, source: Side | None) -> None:
    now = time.time()
    for text in args.targets:
        root = side_of(text, args)
        for side, status in (root.tree() if args.r else []) or [(root, root.status())]:
            compared = None
            if source is not None:
                # With -r each dataset is compared with the one at the same place below SRC.
                below = side.endpoint.dataset[len(root.endpoint.dataset) :]
                compared = (source.child(source.endpoint.dataset + below) if below else source).status()
            summary = side.backend.summarize(status, compared)
            if args.json:
                print(json.dumps({**status, "summary": asdict(summary)} if compared is not None else status))
            else:
                print(summary_line(summary, now, label=str(side.endpoint)))
        root.close()


def run_subvolumes(args: argparse.Namespace) -> int:
    """The btrfs listing sync used to plan from; `status --json DIR` answers the same and more."""
    print(json.dumps(common.backend(args, args.directory).status(args.directory)))
    return 0


def add_remote_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ssh", default="ssh", metavar="CMD", help="ssh command for remote ends (default: ssh)")
    parser.add_argument("--remote-snapferry", default="snapferry", metavar="CMD", help="snapferry on the remote host")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    status = sub.add_parser(
        "status", parents=[common_options], help="newest snapshots, unfinished transfers and holds (--json: what sync plans from)"
    )
    status.add_argument("-r", action="store_true", help="ZFS: every dataset below each TARGET too, one line (or JSON object) each")
    status.add_argument(
        "--no-properties", action="store_true", help="--json: leave out each target's own properties (sync reads them only with --props)"
    )
    status.add_argument("--source", metavar="SRC", help="also compare each TARGET with SRC: its newest snapshot, the newest both have")
    add_remote_options(status)
    status.add_argument("targets", nargs="+", metavar="TARGET", help="DATASET or DIR, here or [user@]host:TARGET")
    status.set_defaults(func=run)
    subvolumes = sub.add_parser(
        "subvolumes", parents=[common_options], help="btrfs: a directory's subvolumes and unfinished transfers, as JSON"
    )
    subvolumes.add_argument("directory", metavar="DIR")
    subvolumes.set_defaults(func=run_subvolumes)
