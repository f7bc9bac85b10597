"""`snapferry send`: a snapshot's stream, or the rest of an interrupted one, to stdout."""

from __future__ import annotations

import argparse

from snapferry.cli import common
from snapferry.cli.serve import visibility_from_env
from snapferry.errors import UsageError
from snapferry.interface import SendRequest


def split_c(args: argparse.Namespace) -> list[str]:
    """-c is two things: zfs send's flag (compressed) and btrfs send's -c CLONE_SRC; the clone sources.

    `send -c tank/fs@snap` parses as a clone source and no snapshot: that is the flag and the snapshot.
    """
    values = list(args.c or [])
    if args.snapshot is None and values and values[-1] and not args.token:
        args.snapshot = values.pop()
        values.append("")
    args.c = "" in values
    return [v for v in values if v]


def run(args: argparse.Namespace) -> int:
    clones = split_c(args)
    if args.i and args.I:
        raise UsageError("use -i or -I, not both")
    flags = tuple(flag for flag, wanted in (("-L", args.L), ("-e", args.e), ("-c", args.c), ("-w", args.w)) if wanted)
    request = SendRequest(
        snapshot=args.snapshot,
        token=args.token,
        base=args.i or args.I,
        intermediates=bool(args.I),
        replicate=args.R,
        flags=flags,
        parent=args.parent,
        clones=tuple(clones),
        proto=args.proto,
        compressed_data=args.compressed_data,
        estimate=not args.quiet,
        visible=visibility_from_env(),
    )
    backend = common.backend(args, args.snapshot, args.token)
    sink = common.stdout_sink(args)
    with common.reporter(args, label=args.snapshot or "resume") as events:
        backend.send(request, sink, events)
    sink.close()
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    send = sub.add_parser("send", parents=[common_options], help="write a snapshot's stream (or a continuation) to stdout")
    send.add_argument("-i", metavar="SNAP", help="incremental from SNAP (@name or pool/fs@name)")
    send.add_argument("-I", metavar="SNAP", help="like -i, with every intermediate snapshot")
    send.add_argument("-R", action="store_true", help="ZFS: the file system, its descendants and all their snapshots as one stream")
    send.add_argument("-t", dest="token", metavar="TOKEN", help="continue the interrupted transfer this token describes")
    send.add_argument("-L", action="store_true", help="zfs send -L: blocks larger than 128K as they are (OpenZFS)")
    send.add_argument("-e", action="store_true", help="zfs send -e: embedded blocks as they are (OpenZFS)")
    send.add_argument(
        "-c",
        action="append",
        nargs="?",
        const="",
        metavar="CLONE_SRC",
        help="ZFS: zfs send -c, compressed blocks as they are on disk (OpenZFS); btrfs: -c CLONE_SRC, a clone source (repeatable)",
    )
    send.add_argument("-w", action="store_true", help="zfs send -w: raw, encrypted blocks as they are (OpenZFS)")
    send.add_argument(
        "--compress",
        default="none",
        metavar="auto[:LEVEL]|zstd[:LEVEL]|none",
        help="compress the stream (receive detects it); auto: zstd only while the output takes it faster that way",
    )
    send.add_argument("--bwlimit", metavar="RATE", help="cap the output rate, e.g. 10M (bytes per second)")
    send.add_argument(
        "--buffer", type=common.parse_size, metavar="SIZE", help="hold up to SIZE in memory to smooth a bursty link (like mbuffer)"
    )
    send.add_argument("-p", dest="parent", metavar="PARENT", help="btrfs: incremental from the read-only snapshot PARENT")
    send.add_argument("--proto", type=int, metavar="N", help="btrfs: send protocol version (0: the highest the kernel has)")
    send.add_argument("--compressed-data", action="store_true", help="btrfs: compressed extents as they are on disk (protocol 2)")
    send.add_argument("snapshot", nargs="?", help="POOL/FS@SNAP, or the path of a read-only btrfs snapshot")
    send.set_defaults(func=run)
