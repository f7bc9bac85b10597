"""The `snapferry` command line: argument parsing, dispatch, and the mapping of errors to exit codes."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from snapferry.btrfs.engine.command import is_btrfs_path
from snapferry.cli import btrfs as btrfs_cli
from snapferry.cli.progress import Reporter
from snapferry.core.lock import dataset_lock
from snapferry.core.process import enlarge_pipe
from snapferry.core.streamio import Prefixed
from snapferry.errors import SnapferryError, UsageError
from snapferry.transport.wire import WireSink, open_wire, parse_compression, parse_rate
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.records import Begin
from snapferry.zfs.codec.stream import read_header
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.engine.command import Zfs
from snapferry.zfs.resume.checkpoints import latest_token, read_transfers
from snapferry.zfs.resume.cleanup import discard_transfer, remove_finished_pieces
from snapferry.zfs.resume.native import MODES, abort_native, choose_mode, kernel_token, receive_native, send_native_continuation
from snapferry.zfs.resume.receiver import PieceReceiver
from snapferry.zfs.resume.sender import send_continuation, send_snapshot

# Chosen with bench/receive_bench.py (docs/BENCHMARKS.md): each checkpoint stalls the pipe for
# 40-110 ms on zfs-fuse, about 5 % of a raw transfer at 1 GiB per piece, and an interruption
# re-sends at most 1 GiB.
DEFAULT_CHECKPOINT = 1 << 30

EXIT_CODES = """exit codes:
  0  done
  1  nothing to do (token: no interrupted transfer), or another failure
  2  bad usage
  3  interrupted or out of space: checkpoints are kept, resume later
  4  refused: stale token, conflicting destination, concurrent receive
  5  bad stream: corrupt, truncated header, foreign or unsupported
  6  a zfs or btrfs command failed
"""

MODE_HELP = (
    "native: OpenZFS's own zfs receive -s / send -t (no re-reading of the source); pieces: snapferry's "
    "checkpoint snapshots (any ZFS). Default: native where both ends' ZFS can do it"
)

_SIZE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.I)


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64M, 1G, 1048576)")
    value = int(match[1]) << (10 * " KMGT".index(match[2].upper() or " "))
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"size {text} is below the 1M minimum")
    return value


def _checkpoint_text(text: str) -> str:
    """A size checked here but passed on as written (to the other end's command line)."""
    parse_size(text)
    return text


def _zfs(args: argparse.Namespace) -> Zfs:
    return Zfs(shlex.split(args.zfs) if args.zfs else None)


def _reporter(args: argparse.Namespace, total: int | None = None, label: str = "transfer") -> Reporter:
    return Reporter("quiet" if args.quiet else "json" if args.json else "bar", total, label)


def _estimated_stream_size(zfs: Zfs, snapshot: str, base: str | None, intermediates: bool, flags: list[str]) -> int | None:
    """For the progress bar's ETA. OpenZFS says it (`zfs send -nP`); on zfs-fuse, which cannot, a full
    stream carries about the snapshot's logical size and an incremental gets no estimate."""
    incremental = [("-I" if intermediates else "-i"), base] if base else []
    try:
        dry_run = zfs.run(f"cannot estimate the size of {snapshot}", "send", "-nP", *flags, *incremental, snapshot)
        sizes = [line.split()[1] for line in dry_run.splitlines() if line.startswith("size")]
        return int(sizes[-1])
    except (SnapferryError, IndexError, ValueError):
        pass
    if base:
        return None
    try:
        props = zfs.get_properties(snapshot, "referenced", "compressratio")[snapshot]
        return int(int(props["referenced"]) * float(props["compressratio"].rstrip("x")))
    except (SnapferryError, KeyError, ValueError):
        return None


def _stdout_sink(args: argparse.Namespace) -> WireSink:
    if sys.stdout.isatty():
        raise UsageError("refusing to write a stream to a terminal: redirect it to a file or a pipe")
    sys.stdout.flush()
    fd = sys.stdout.fileno()
    enlarge_pipe(fd)
    rate = parse_rate(args.bwlimit) if args.bwlimit else None
    return WireSink(fd, zstd_level=parse_compression(args.compress), rate=rate, buffer=args.buffer or 0)


def _is_openzfs_token(text: str) -> bool:
    return text.strip().startswith("1-")


def _split_c(args: argparse.Namespace) -> list[str]:
    """-c is two things: zfs send's flag (compressed) and btrfs send's -c CLONE_SRC; the clone sources.

    `send -c tank/fs@snap` parses as a clone source and no snapshot: that is the flag and the snapshot.
    """
    values = list(args.c or [])
    if args.snapshot is None and values and values[-1] and not args.token:
        args.snapshot = values.pop()
        values.append("")
    args.c = "" in values
    return [v for v in values if v]


def cmd_send(args: argparse.Namespace) -> int:
    clones = _split_c(args)
    if args.snapshot and is_btrfs_path(args.snapshot):
        if args.c:
            raise UsageError("btrfs send -c needs a clone source: -c PATH")
        return btrfs_cli.cmd_send(args, clones, _stdout_sink(args), _reporter)
    if args.token and btrfs_cli.is_btrfs_token(args.token):
        raise UsageError("send -t with a btrfs token needs the snapshot's path: snapferry send -t TOKEN /path/to/snapshot")
    if clones or args.parent or args.proto is not None or args.compressed_data:
        raise UsageError("-p, -c PATH, --proto and --compressed-data are btrfs send's: give a snapshot path (/...)")
    zfs = _zfs(args)
    flags = [flag for flag, wanted in (("-L", args.L), ("-e", args.e), ("-c", args.c), ("-w", args.w)) if wanted]
    sink = _stdout_sink(args)
    if args.token:
        if args.snapshot or args.i or args.I:
            raise UsageError("send -t TOKEN takes no snapshot and no -i/-I")
        with _reporter(args, label="resume") as events:
            if _is_openzfs_token(args.token):
                send_native_continuation(zfs, args.token, sink, flags=flags, events=events, visible=_serve_visibility())
            else:
                if flags:
                    raise UsageError("send -t takes -L/-e/-c/-w from the token (the interrupted stream's own flags): drop them")
                send_continuation(zfs, ResumeToken.decode(args.token), sink, events=events, visible=_serve_visibility())
        sink.close()
        return 0
    if not args.snapshot or "@" not in args.snapshot:
        raise UsageError("send needs a snapshot: snapferry send [-i SNAP | -I SNAP] POOL/FS@SNAP")
    if args.i and args.I:
        raise UsageError("use -i or -I, not both")
    base = args.i or args.I
    if base and base.startswith("@"):
        base = args.snapshot.partition("@")[0] + base
    total = None if args.quiet else _estimated_stream_size(zfs, args.snapshot, base, bool(args.I), flags)
    with _reporter(args, total, label=args.snapshot) as events:
        send_snapshot(zfs, args.snapshot, sink, base=base, intermediates=bool(args.I), events=events, estimate=total, flags=flags)
    sink.close()
    return 0


def cmd_receive(args: argparse.Namespace) -> int:
    if is_btrfs_path(args.dataset):
        return btrfs_cli.cmd_receive(args, _reporter)
    zfs = _zfs(args)
    if args.abort:
        return _abort(zfs, args.dataset, args)
    if sys.stdin.isatty():
        raise UsageError("receive reads a stream from standard input: pipe one in")
    size = (args.checkpoint or DEFAULT_CHECKPOINT) if args.s else 1 << 62
    with dataset_lock(args.dataset, "receive"), _reporter(args, label=args.dataset) as events:
        enlarge_pipe(sys.stdin.fileno())
        with io.BufferedReader(io.FileIO(sys.stdin.fileno(), closefd=False), buffer_size=1 << 20) as source:
            wire = open_wire(source)
            header = read_header(wire)
            sender_can_resume = Begin.decode(header, supported_only=False).sender_can_resume
            mode = choose_mode(zfs, args.dataset, args.mode, sender_can_resume=sender_can_resume)
            events("mode", mode=mode)
            stream = Prefixed(header, wire)
            if mode == "native":
                done = receive_native(zfs, args.dataset, stream, resumable=args.s, force=args.F, events=events)
            else:
                modern = zfs.is_modern(args.dataset)
                receiver = PieceReceiver(zfs, args.dataset, checkpoint_size=size, force=args.F, events=events, modern_zfs=modern)
                done = receiver.receive(stream)
    if not (args.quiet or args.json):
        print(f"snapferry: received {', '.join(done)}", file=sys.stderr)
    return 0


def _abort(zfs: Zfs, dataset: str, args: argparse.Namespace) -> int:
    with dataset_lock(dataset, "abort"):
        snapshots, transfers = read_transfers(zfs, dataset)
        native = abort_native(zfs, dataset)
        messages = [native] if native else []
        for transfer in transfers:
            if transfer.complete:
                remove_finished_pieces(zfs, transfer)
                messages.append(f"removed {len(transfer.pieces())} leftover checkpoint(s) of a completed transfer")
            else:
                messages.append(discard_transfer(zfs, transfer, snapshots))
                snapshots, _ = read_transfers(zfs, dataset)
    if not messages:
        print(f"snapferry: {dataset} has no interrupted snapferry transfer to abort", file=sys.stderr)
        return 1
    for message in messages:
        if args.json:
            print(json.dumps({"event": "aborted", "dataset": dataset, "message": message}), file=sys.stderr)
        elif not args.quiet:
            print(f"snapferry: {message}", file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    if is_btrfs_path(args.target) or btrfs_cli.is_btrfs_token(args.target):
        return btrfs_cli.cmd_token(args)
    if args.decode:
        if not _is_openzfs_token(args.target):
            print(json.dumps(ResumeToken.decode(args.target).describe(), indent=2))
        elif args.json:
            print(json.dumps(OpenZfsToken.decode(args.target).as_json(), indent=2))
        else:
            print(OpenZfsToken.decode(args.target).describe(), end="")
        return 0
    zfs = _zfs(args)
    _, transfers = read_transfers(zfs, args.target)
    unfinished = [t for t in transfers if not t.complete]
    token = latest_token(transfers)
    if token is None and args.mode != "pieces" and (native := kernel_token(zfs, args.target, transfers)):
        print(native)
        return 0
    if token is None:
        if unfinished:
            reason = "its interrupted transfer committed no checkpoint; send the stream again"
        elif transfers:
            reason = "its transfer is complete; nothing to resume"
        else:
            reason = "it has no interrupted snapferry transfer"
        print(f"snapferry: no resume token for {args.target}: {reason}", file=sys.stderr)
        return 1
    print(token.encode())
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from snapferry.sync.btrfs_sync import BtrfsSync
    from snapferry.sync.driver import Sync, SyncOptions
    from snapferry.sync.endpoints import Endpoint, Shell

    source, target = Endpoint.parse(args.source), Endpoint.parse(args.target)
    ssh, remote_snapferry = tuple(shlex.split(args.ssh)), tuple(shlex.split(args.remote_snapferry))
    remote = source.host is not None or target.host is not None
    compress = args.compress or ("zstd:3" if remote else "none")
    parse_compression(compress)
    if args.bwlimit:
        parse_rate(args.bwlimit)
    if source.is_btrfs != target.is_btrfs:
        raise UsageError("sync goes from ZFS to ZFS or from btrfs to btrfs: give two datasets or two directories")
    if source.is_btrfs and (args.force or args.snapshot or args.mode):
        raise UsageError("--force, --snapshot and --mode are for ZFS; take btrfs snapshots with btrfs subvolume snapshot -r")
    reporter = _reporter(args, label=str(target))
    options = SyncOptions(
        no_stream=args.no_stream,
        force=args.force,
        retries=args.retries,
        deadline=args.deadline,
        checkpoint=args.checkpoint,
        compress=compress,
        bwlimit=args.bwlimit,
        buffer=args.buffer,
        snapshot_prefix=args.snapshot_prefix if args.snapshot else None,
        mode=args.mode,
        progress=reporter.mode != "quiet",
    )
    with dataset_lock(f"sync-{target}", f"sync {source} {target}"), reporter as events:
        shells = Shell(source, ssh, remote_snapferry), Shell(target, ssh, remote_snapferry)
        sync: Sync | BtrfsSync = BtrfsSync(*shells, options, events) if source.is_btrfs else Sync(*shells, options, events)
        if args.dry_run:
            for line in sync.plan():
                print(line)
            return 0
        result = sync.run()
    if not (args.quiet or args.json):
        print(f"snapferry: {target}: {result}", file=sys.stderr)
    return 0


def _serve_visibility() -> Callable[[str], bool]:
    from snapferry.sync.serve import ALLOW_ENV, Policy

    allowed = os.environ.get(ALLOW_ENV)
    if allowed is None:
        return lambda dataset: True
    return Policy(tuple(allowed.split()), read_only=True).dataset_allowed


def cmd_serve(args: argparse.Namespace) -> int:
    from snapferry.sync.serve import Policy, serve

    return serve(Policy(tuple(args.allow), args.read_only))


def cmd_demo(args: argparse.Namespace) -> int:
    from snapferry.cli.demo import run_btrfs_demo, run_demo

    return run_btrfs_demo(quiet=args.quiet) if args.btrfs else run_demo(_zfs(args), quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--zfs", metavar="CMD", help="zfs command to run (default: $SNAPFERRY_ZFS or zfs)")
    output = common.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="progress and events as JSON lines on stderr")
    output.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    parser = argparse.ArgumentParser(
        prog="snapferry",
        description="Resumable snapshot transfer, on any ZFS and on btrfs. A path (/..., ./...) means btrfs; pool/fs means ZFS.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = sub.add_parser("send", parents=[common], help="write a snapshot's stream (or a continuation) to stdout")
    send.add_argument("-i", metavar="SNAP", help="incremental from SNAP (@name or pool/fs@name)")
    send.add_argument("-I", metavar="SNAP", help="like -i, with every intermediate snapshot")
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
    send.add_argument("--compress", default="none", metavar="zstd[:LEVEL]|none", help="compress the stream (receive detects it)")
    send.add_argument("--bwlimit", metavar="RATE", help="cap the output rate, e.g. 10M (bytes per second)")
    send.add_argument("--buffer", type=parse_size, metavar="SIZE", help="hold up to SIZE in memory to smooth a bursty link (like mbuffer)")
    send.add_argument("-p", dest="parent", metavar="PARENT", help="btrfs: incremental from the read-only snapshot PARENT")
    send.add_argument("--proto", type=int, metavar="N", help="btrfs: send protocol version (0: the highest the kernel has)")
    send.add_argument("--compressed-data", action="store_true", help="btrfs: compressed extents as they are on disk (protocol 2)")
    send.add_argument("snapshot", nargs="?", help="POOL/FS@SNAP, or the path of a read-only btrfs snapshot")
    send.set_defaults(func=cmd_send)

    recv = sub.add_parser("receive", aliases=["recv"], parents=[common], help="apply a stream from stdin, checkpointing as it goes")
    recv.add_argument("-s", action="store_true", help="resumable: commit a checkpoint every --checkpoint bytes")
    recv.add_argument("-F", action="store_true", help="roll the destination back to its last snapshot first")
    recv.add_argument("-A", dest="abort", action="store_true", help="abort an interrupted transfer into DATASET")
    recv.add_argument(
        "--checkpoint",
        type=parse_size,
        metavar="SIZE",
        help="bytes of stream between checkpoints (default 1G for ZFS, 256M for btrfs)",
    )
    recv.add_argument("--mode", choices=MODES, help=MODE_HELP)
    recv.add_argument("dataset", metavar="DATASET|DIR", help="POOL/FS to receive into, or a directory on btrfs (-A: DIR/SUBVOLUME)")
    recv.set_defaults(func=cmd_receive)

    token = sub.add_parser("token", parents=[common], help="print the resume token of an interrupted receive")
    token.add_argument("--decode", action="store_true", help="print the fields of TOKEN (snapferry's or OpenZFS's)")
    token.add_argument("--mode", choices=MODES, help="only this mode's token (default: whichever the dataset has)")
    token.add_argument("target", metavar="DATASET|DIR/SUBVOLUME|TOKEN")
    token.set_defaults(func=cmd_token)

    sync = sub.add_parser("sync", parents=[common], help="replicate a dataset's snapshots, resuming until done")
    sync.add_argument("--no-stream", action="store_true", help="send only the newest snapshot, not every one between")
    sync.add_argument("--force", action="store_true", help="roll back a diverged destination (destroys its newer snapshots)")
    sync.add_argument("--retries", type=int, default=5, metavar="N", help="retries after interruptions (default 5)")
    sync.add_argument("--deadline", type=float, metavar="SECONDS", help="stop retrying after this long")
    sync.add_argument("--ssh", default="ssh", metavar="CMD", help="ssh command for remote ends (default: ssh)")
    sync.add_argument("--remote-snapferry", default="snapferry", metavar="CMD", help="snapferry on the remote host")
    sync.add_argument("--checkpoint", type=_checkpoint_text, metavar="SIZE", help="as for receive -s (default 1G for ZFS, 256M for btrfs)")
    sync.add_argument("--compress", metavar="zstd[:LEVEL]|none", help="on the wire (default: zstd:3 when a side is remote)")
    sync.add_argument("--bwlimit", metavar="RATE", help="cap the transfer rate, e.g. 10M (bytes per second)")
    sync.add_argument("--buffer", type=_checkpoint_text, metavar="SIZE", help="memory buffer on the sending side (like mbuffer), e.g. 256M")
    sync.add_argument("--snapshot", action="store_true", help="take a snapshot of SRC first")
    sync.add_argument("--snapshot-prefix", default="snapferry_", metavar="PREFIX", help="name prefix for --snapshot")
    sync.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    sync.add_argument("--mode", choices=MODES, help=MODE_HELP)
    sync.add_argument(
        "source", metavar="SRC", help="pool/fs or [user@]host:pool/fs; btrfs: a directory of read-only snapshots, /path or host:/path"
    )
    sync.add_argument("target", metavar="DST", help="pool/fs or [user@]host:pool/fs; btrfs: the directory to receive into")
    sync.set_defaults(func=cmd_sync)

    serve = sub.add_parser("serve", help="SSH forced command: allow only sync's commands on some datasets")
    serve.add_argument("--allow", action="append", required=True, metavar="POOL/PREFIX", help="dataset (and children) allowed")
    serve.add_argument("--read-only", action="store_true", help="allow sending only, never receiving")
    serve.set_defaults(func=cmd_serve, quiet=True, json=False, zfs=None)

    subvolumes = sub.add_parser("subvolumes", parents=[common], help="btrfs: a directory's subvolumes and unfinished transfers, as JSON")
    subvolumes.add_argument("directory", metavar="DIR")
    subvolumes.set_defaults(func=btrfs_cli.cmd_subvolumes)

    demo = sub.add_parser("demo", parents=[common], help="interrupted and resumed transfer between two file-backed pools")
    demo.add_argument("--btrfs", action="store_true", help="between two loop-mounted btrfs file systems instead")
    demo.set_defaults(func=cmd_demo)
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except SnapferryError as exc:
        print(f"snapferry: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("snapferry: interrupted", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"snapferry: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line, and nothing is ever reported as success
        print(f"snapferry: internal error ({type(exc).__name__}: {exc}); please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
