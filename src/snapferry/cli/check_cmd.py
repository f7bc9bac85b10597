"""`snapferry check SRC DST`: a Nagios/Icinga plugin, one status line and exit 0/1/2/3, on replication lag and stuck transfers."""

from __future__ import annotations

import argparse
import re
import sys
import time

from snapferry.cli.status_cmd import add_remote_options, age, side_of
from snapferry.errors import SnapferryError
from snapferry.interface import Summary

# The monitoring plugin convention (Nagios, Icinga, Sensu): not snapferry's own exit codes.
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90m, 26h, 2d)")
    return float(match[1]) * _UNIT[match[2]]


def verdict(summary: Summary, now: float, warn: float, crit: float, stuck: float) -> tuple[int, str, float | None]:
    """(state, what to say, lag in seconds): lag is the age of the newest snapshot both ends have."""
    if summary.common is None:
        if not summary.exists:
            return CRITICAL, "the destination does not exist", None
        return CRITICAL, "no snapshot in common with the source", None
    lag = now - summary.common.created if summary.common.created else None
    state, said = OK, f"newest common snapshot {summary.common.name}"
    if lag is not None:
        said += f" is {age(lag)} old"
        state = CRITICAL if lag >= crit else WARNING if lag >= warn else OK
    for item in summary.unfinished:
        idle = now - item.last_progress if item.last_progress else None
        if idle is not None and idle >= stuck:
            state = max(state, WARNING)
            said += f"; the transfer of {item.snapshot} has made no progress for {age(idle)}"
        else:
            said += f"; a transfer of {item.snapshot} is unfinished"
    return state, said, lag


def run(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        if args.target.startswith("s3://"):
            summary = _bucket_summary(args)
        else:
            source, target = side_of(args.source, args), side_of(args.target, args)
            summary = target.backend.summarize(target.status(), source.status())
    except SnapferryError as exc:
        print(f"SNAPFERRY UNKNOWN - {args.target}: {exc}")
        return UNKNOWN
    state, said, lag = verdict(summary, now, args.warn, args.crit, args.stuck if args.stuck is not None else args.warn)
    perf = f" | lag={lag:.0f}s;{args.warn:.0f};{args.crit:.0f};0" if lag is not None else ""
    print(f"SNAPFERRY {_NAMES[state]} - {args.target}: {said}{perf}")
    sys.stdout.flush()
    return state


def _bucket_summary(args: argparse.Namespace) -> Summary:
    """An offsite copy (s3://BUCKET/PREFIX) of a local dataset, found by the dataset's key below the prefix."""
    from snapferry.cli import common
    from snapferry.cli.offsite_cmd import open_bucket, parse_url
    from snapferry.offsite.catalog import dataset_entries, summarize

    url = parse_url(args.target)
    source = common.backend(args, args.source).source_snapshots(args.source)
    return summarize(args.target, dataset_entries(open_bucket(args, url, 1), url.below(args.source)), source)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    from snapferry.cli.offsite_cmd import store_options

    check = sub.add_parser(
        "check",
        parents=[store_options()],
        help="monitoring plugin: is DST's newest common snapshot with SRC recent? exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
    )
    check.add_argument("--warn", type=parse_duration, default=parse_duration("26h"), metavar="AGE", help="warn past this lag (26h)")
    check.add_argument("--crit", type=parse_duration, default=parse_duration("48h"), metavar="AGE", help="critical past this lag (48h)")
    check.add_argument(
        "--stuck", type=parse_duration, metavar="AGE", help="warn when an unfinished transfer has made no progress for this long (--warn)"
    )
    add_remote_options(check)
    check.add_argument("source", metavar="SRC")
    check.add_argument("target", metavar="DST", help="a dataset or directory (maybe [user@]host:...), or s3://BUCKET/PREFIX")
    check.set_defaults(func=run, zfs=None, json=False, quiet=False, retries=1)
