"""The btrfs side of the `snapferry` verbs: a path argument where ZFS takes a dataset."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

from snapferry.btrfs.engine.command import subvolumes_in
from snapferry.btrfs.resume.checkpoints import (
    BTRFS_TOKEN_PREFIX,
    STATE_DIR,
    BtrfsToken,
    abort,
    btrfs_token,
    read_state,
)
from snapferry.btrfs.resume.receiver import DEFAULT_CHECKPOINT_SIZE, BtrfsCheckpointReceiver
from snapferry.btrfs.resume.sender import BtrfsSendOptions, send_btrfs, send_btrfs_continuation
from snapferry.cli.progress import Reporter
from snapferry.core.process import enlarge_pipe
from snapferry.errors import UsageError
from snapferry.transport.wire import WireSink, open_wire

ReporterFactory = Callable[..., Reporter]


def is_btrfs_token(text: str) -> bool:
    return text.strip().startswith(BTRFS_TOKEN_PREFIX)


def _path(text: str) -> Path:
    """Absolute, so that every message names it in a form that means btrfs when pasted back."""
    return Path(text).absolute()


def _options(args: argparse.Namespace, clones: list[str], estimate: bool) -> BtrfsSendOptions:
    return BtrfsSendOptions(
        _path(args.parent) if args.parent else None,
        tuple(_path(c) for c in clones),
        args.proto,
        args.compressed_data,
        estimate,
    )


def cmd_send(args: argparse.Namespace, clones: list[str], sink: WireSink, reporter: ReporterFactory) -> int:
    if args.i or args.I or args.L or args.e or args.w:
        raise UsageError("-i/-I/-L/-e/-w are zfs send's: for btrfs, give the parent with -p PARENT")
    path = _path(args.snapshot)
    with reporter(args, label=path.name) as events:
        options = _options(args, clones, estimate=events.mode != "quiet")
        if args.token:
            send_btrfs_continuation(BtrfsToken.decode(args.token), path, sink, options, events=events)
        else:
            send_btrfs(path, sink, options, events=events)
    sink.close()
    return 0


def transfer_at(path: Path) -> tuple[Path, str]:
    """The receive root and subvolume name `path` means: ROOT/NAME, or a ROOT with exactly one unfinished transfer."""
    try:
        unfinished = sorted(p.name for p in (path / STATE_DIR).iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        unfinished = []
    if len(unfinished) == 1:
        return path, unfinished[0]
    if len(unfinished) > 1:
        raise UsageError(f"{path} has unfinished transfers of {', '.join(unfinished)}: name one, as {path / unfinished[0]}")
    if path.name in ("", ".", ".."):
        raise UsageError(f"{path} names no subvolume: give RECEIVE_DIR/SUBVOLUME")
    return path.parent, path.name


def cmd_receive(args: argparse.Namespace, reporter: ReporterFactory) -> int:
    if args.F or args.mode:
        raise UsageError("-F and --mode are for ZFS datasets, not btrfs paths")
    if args.abort:
        root, name = transfer_at(_path(args.dataset))
        abort(root, name)
        message = f"aborted the unfinished transfer of {name} under {root}"
        if args.json:
            print(json.dumps({"event": "aborted", "path": str(root / name), "message": message}), file=sys.stderr)
        elif not args.quiet:
            print(f"snapferry: {message}", file=sys.stderr)
        return 0
    if sys.stdin.isatty():
        raise UsageError("receive reads a stream from standard input: pipe one in")
    size = (args.checkpoint or DEFAULT_CHECKPOINT_SIZE) if args.s else 1 << 62
    root = _path(args.dataset)
    with reporter(args, label=str(root)) as events:
        enlarge_pipe(sys.stdin.fileno())
        with io.BufferedReader(io.FileIO(sys.stdin.fileno(), closefd=False), buffer_size=1 << 20) as source:
            received = BtrfsCheckpointReceiver(root, checkpoint_size=size, events=events).receive(open_wire(source))
    if not (args.quiet or args.json):
        print(f"snapferry: received {', '.join(map(str, received))}", file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    if args.decode:
        print(json.dumps(BtrfsToken.decode(args.target).__dict__, indent=2))
        return 0
    root, name = transfer_at(_path(args.target))
    state = read_state(root, name)
    if state is None or state.last is None:
        reason = "its interrupted transfer committed no checkpoint; send it again" if state else "it has no unfinished snapferry transfer"
        print(f"snapferry: no resume token for {root / name}: {reason}", file=sys.stderr)
        return 1
    print(btrfs_token(root, name))
    return 0


def cmd_subvolumes(args: argparse.Namespace) -> int:
    """The subvolumes of a directory and its unfinished transfers, as JSON: what sync plans from."""
    directory = Path(args.directory)
    snapshots = [s.as_json() for s in subvolumes_in(directory)]
    transfers: dict[str, str | None] = {}
    for entry in sorted((directory / STATE_DIR).glob("*")):
        state = read_state(directory, entry.name)
        if state is not None and state.identity is not None:
            transfers[entry.name] = btrfs_token(directory, entry.name) if state.last is not None else None
    print(json.dumps({"subvolumes": snapshots, "unfinished": transfers}))
    return 0
