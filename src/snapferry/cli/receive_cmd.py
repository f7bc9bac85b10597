"""`snapferry receive`: apply a stream from stdin resumably (-s), or abort an interrupted transfer (-A)."""

from __future__ import annotations

import argparse
import json
import sys

from snapferry.cli import common
from snapferry.errors import UsageError
from snapferry.interface import Backend, ReceiveRequest


def receive_property(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"-o takes PROPERTY=VALUE, not {text!r}")
    return name, value


def run(args: argparse.Namespace) -> int:
    backend = common.backend(args, args.dataset)
    if args.abort:
        return _abort(backend, args)
    request = ReceiveRequest(
        target=args.dataset,
        resumable=args.s,
        checkpoint=args.checkpoint,
        force=args.F,
        mode=args.mode,
        properties=tuple(args.o or ()),
        prefix="d" if args.d else "e" if args.e else None,
        exclude_properties=tuple(args.x or ()),
        mount=not args.u,
    )
    with common.stdin_stream() as source, common.reporter(args, label=args.dataset) as events:
        done = backend.receive(request, source, events)
    if args.status_after and args.json:
        # Saves sync a round trip to the far end (an ssh session and a snapferry start-up) to plan its next step.
        # Without the destination's own properties: sync reads those only from a source.
        print(json.dumps({"event": "status", "status": backend.status(args.dataset, properties=False)}), file=sys.stderr)
    if not (args.quiet or args.json):
        said = ", ".join(done) if done else "nothing new: the -R stream's every snapshot was already there"
        print(f"snapferry: received {said}", file=sys.stderr)
    return 0


def _abort(backend: Backend, args: argparse.Namespace) -> int:
    if args.F or args.mode or args.o or args.x or args.d or args.e or args.u:
        raise UsageError("receive -A takes no -F, -d, -e, -o, -x, -u or --mode")
    for message in backend.abort(args.dataset):
        if args.json and not args.quiet:
            print(json.dumps({"event": "aborted", backend.target_field: args.dataset, "message": message}), file=sys.stderr)
        elif not (args.quiet or args.json):
            print(f"snapferry: {message}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    recv = sub.add_parser("receive", aliases=["recv"], parents=[common_options], help="apply a stream from stdin, checkpointing as it goes")
    recv.add_argument("-s", action="store_true", help="resumable: commit a checkpoint every --checkpoint bytes")
    recv.add_argument("-F", action="store_true", help="roll the destination back to its last snapshot first")
    layout = recv.add_mutually_exclusive_group()
    layout.add_argument("-d", action="store_true", help="-R stream: the sent names less the pool's become names below DATASET")
    layout.add_argument("-e", action="store_true", help="-R stream: the sent top file system's last name goes below DATASET")
    recv.add_argument("-u", action="store_true", help="ZFS: leave what is received unmounted")
    recv.add_argument("-x", action="append", metavar="PROPERTY", help="-R stream: do not take this property from the stream (repeatable)")
    recv.add_argument("-A", dest="abort", action="store_true", help="abort an interrupted transfer into DATASET")
    recv.add_argument(
        "-o",
        action="append",
        type=receive_property,
        metavar="PROPERTY=VALUE",
        help="ZFS: set this property on the dataset once the transfer is complete (repeatable)",
    )
    recv.add_argument(
        "--checkpoint",
        type=common.parse_size,
        metavar="SIZE",
        help="bytes of stream between checkpoints (default 1G for ZFS, 256M for btrfs)",
    )
    recv.add_argument("--mode", choices=common.MODES, help=common.MODE_HELP)
    recv.add_argument(
        "--status-after",
        action="store_true",
        help="with --json: end with a `status` event, as `snapferry status --json --no-properties DATASET` prints it (sync plans from it)",
    )
    recv.add_argument("dataset", metavar="DATASET|DIR", help="POOL/FS to receive into, or a directory on btrfs (-A: DIR/SUBVOLUME)")
    recv.set_defaults(func=run)
