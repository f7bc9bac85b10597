"""`snapferry sync`: replicate a dataset's (or a directory's) snapshots to another, locally or over ssh, resuming until done."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from snapferry.cli import common
from snapferry.cli.receive_cmd import receive_property
from snapferry.cli.status_cmd import age, size
from snapferry.core.lock import dataset_lock
from snapferry.errors import SnapferryError, UsageError
from snapferry.interface import hold_tag
from snapferry.sync.endpoints import Endpoint, Side
from snapferry.transport.ssh import Shell
from snapferry.transport.wire import parse_compression, parse_rate

if TYPE_CHECKING:
    from snapferry.sync.driver import Sync
    from snapferry.sync.tree import TreeSync


def run(args: argparse.Namespace) -> int:
    if args.target.startswith("s3://"):
        from snapferry.cli.offsite_cmd import run_sync

        return run_sync(args)
    if args.chunk_size or args.keep or args.full_every is not None or args.key_file or args.endpoint_url or args.profile:
        raise UsageError("--chunk-size, --keep, --full-every, --key-file, --endpoint-url and --profile are for an s3:// destination")
    # Imported here, not at the top: every other verb's start-up (sync runs several per dataset) skips them.
    from snapferry.sync.driver import Sync, SyncOptions
    from snapferry.sync.tree import TreeSync

    source, target = Endpoint.parse(args.source), Endpoint.parse(args.target)
    ssh, remote_snapferry = tuple(shlex.split(args.ssh)), tuple(shlex.split(args.remote_snapferry))
    remote = source.host is not None or target.host is not None
    compress = args.compress or ("auto" if remote else "none")
    parse_compression(compress)
    if args.bwlimit:
        parse_rate(args.bwlimit)
    if source.backend().name != target.backend().name:
        raise UsageError("sync goes from ZFS to ZFS or from btrfs to btrfs: give two datasets or two directories")
    args.jobs = args.jobs or 1
    if not args.r and (args.exclude or args.jobs != 1):
        raise UsageError("--exclude and --jobs are for sync -r (a tree of datasets)")
    reporter = common.reporter(args, label=str(target))
    options = SyncOptions(
        no_stream=args.no_stream,
        force=args.force,
        retries=args.retries,
        deadline=args.deadline,
        checkpoint=args.checkpoint,
        compress=compress,
        bwlimit=args.bwlimit,
        buffer=args.buffer,
        take_snapshot=args.snapshot,
        snapshot_prefix=args.snapshot_prefix,
        keep_source=args.keep_source,
        keep_target=args.keep_dest,
        restart_on_stale=args.on_stale == "restart",
        props=args.props,
        exclude_props=tuple(args.x or ()),
        set_props=tuple(args.o or ()),
        mode=args.mode,
        hold_tag=None if args.no_hold else hold_tag(str(target)),
        send_flags=common.send_flags(args.send_flags),
        progress=reporter.mode != "quiet",
    )
    started = time.time()
    exit_code, outcome = 1, "failed"
    sync: Sync | TreeSync | None = None
    control_dir = tempfile.mkdtemp(prefix="snapferry-ssh-") if remote else None
    shells = [Shell(end.host, end.user, ssh, remote_snapferry, control_dir, shared_streams=args.jobs == 1) for end in (source, target)]
    sides = [Side(source, shells[0], with_properties=options.props), Side(target, shells[1], with_properties=False)]
    try:
        with dataset_lock(f"sync-{target}", f"sync {source} {target}"), reporter as events:
            if args.r:
                sync = TreeSync(sides[0], sides[1], options, events, exclude=args.exclude or [], jobs=args.jobs)
            else:
                sync = Sync(sides[0], sides[1], options, events)
            if args.dry_run:
                for line in sync.plan():
                    print(line)
                exit_code = 0
                return 0
            outcome = sync.run()
        exit_code = 0
    except SnapferryError as exc:
        exit_code, outcome = exc.exit_code, f"failed (exit {exc.exit_code})"
        raise
    except KeyboardInterrupt:
        exit_code, outcome = 3, "interrupted (exit 3)"
        raise
    finally:
        for side in sides:
            side.close()
        for shell in shells:
            shell.close()
        if control_dir is not None:
            shutil.rmtree(control_dir, ignore_errors=True)
        if sync is not None and not args.dry_run:
            _report(args, sync, source, target, started, exit_code, outcome)
    return 0


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"keeps at least 1 snapshot: {text!r}")
    return int(text)


def _report(
    args: argparse.Namespace, sync: Sync | TreeSync, source: Endpoint, target: Endpoint, started: float, exit_code: int, outcome: str
) -> None:
    """The run's one summary line (kept by journald from the systemd unit) and, with --metrics-file, its metrics."""
    stats, duration, lag = sync.stats, time.time() - started, sync.lag()
    # A failure's one line is its error (printed by main); a success gets the summary.
    if exit_code == 0 and not (args.quiet or args.json):
        behind = f", newest common snapshot {age(lag)} old" if lag is not None else ""
        datasets = "" if args.r else "1 dataset, "
        print(
            f"snapferry: sync {'-r ' if args.r else ''}{source} -> {target}: {outcome}; {datasets}{size(stats.received_bytes)} received, "
            f"{stats.resumes} resume(s), {stats.retries} retry(ies), {age(duration)}{behind}",
            file=sys.stderr,
        )
    if args.metrics_file:
        # prometheus_client (with http.server) costs 15 ms of start-up: only --metrics-file loads it.
        from snapferry.sync.metrics import write_metrics

        write_metrics(
            Path(args.metrics_file),
            source=str(source),
            target=str(target),
            started=started,
            duration=duration,
            exit_code=exit_code,
            received_bytes=stats.received_bytes,
            resumes=stats.resumes,
            retries=stats.retries,
            lag=lag,
        )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    from snapferry.cli.offsite_cmd import store_options

    sync = sub.add_parser("sync", parents=[common_options, store_options()], help="replicate a dataset's snapshots, resuming until done")
    sync.add_argument("--no-stream", action="store_true", help="send only the newest snapshot, not every one between")
    sync.add_argument("--force", action="store_true", help="roll back a diverged destination (destroys its newer snapshots)")
    sync.add_argument("--retries", type=int, default=5, metavar="N", help="retries after interruptions (default 5)")
    sync.add_argument("--deadline", type=float, metavar="SECONDS", help="stop retrying after this long")
    sync.add_argument("--ssh", default="ssh", metavar="CMD", help="ssh command for remote ends (default: ssh)")
    sync.add_argument("--remote-snapferry", default="snapferry", metavar="CMD", help="snapferry on the remote host")
    sync.add_argument("--checkpoint", type=common.size_text, metavar="SIZE", help="as for receive -s (default 1G for ZFS, 256M for btrfs)")
    sync.add_argument(
        "--compress",
        metavar="auto[:LEVEL]|zstd[:LEVEL]|none",
        help="on the wire; auto: zstd only while the link takes the stream faster that way (default when a side is remote)",
    )
    sync.add_argument("--bwlimit", metavar="RATE", help="cap the transfer rate, e.g. 10M (bytes per second)")
    sync.add_argument("--buffer", type=common.size_text, metavar="SIZE", help="memory buffer on the sending side (like mbuffer), e.g. 256M")
    sync.add_argument("--snapshot", action="store_true", help="take a snapshot of SRC first")
    sync.add_argument("--snapshot-prefix", default="snapferry_", metavar="PREFIX", help="name prefix for --snapshot")
    sync.add_argument(
        "--keep-source", type=_at_least_one, metavar="N", help="ZFS: after the sync, keep only the newest N PREFIX... snapshots on SRC"
    )
    sync.add_argument("--keep-dest", type=_at_least_one, metavar="N", help="ZFS: the same on DST")
    sync.add_argument("--props", action="store_true", help="ZFS: give each replica its source's locally set properties")
    sync.add_argument("-x", action="append", metavar="PROPERTY", help="with --props: not this one (repeatable)")
    sync.add_argument("-o", action="append", type=receive_property, metavar="PROPERTY=VALUE", help="set this on each replica (repeatable)")
    sync.add_argument(
        "--on-stale",
        choices=("refuse", "restart"),
        default="refuse",
        help="when the source can no longer continue an interrupted transfer: refuse (exit 4, the default) or abort it and send again",
    )
    sync.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    sync.add_argument("-r", action="store_true", help="ZFS: every dataset below SRC too, into the same places below DST")
    sync.add_argument("--exclude", action="append", metavar="REGEX", help="with -r: skip the datasets whose name matches (repeatable)")
    sync.add_argument(
        "--jobs", type=int, metavar="N", help="with -r: sync N datasets at a time (default 1); to s3://: chunks in flight (default 4)"
    )
    sync.add_argument("--chunk-size", type=common.size_text, metavar="SIZE", help="s3://: the size of each stored chunk (default 64M)")
    sync.add_argument(
        "--full-every", type=int, metavar="N", help="s3://: store a full stream (a new chain) after N incrementals, so --keep can prune"
    )
    sync.add_argument("--keep", type=_at_least_one, metavar="N", help="s3://: keep the newest N stored snapshots (and the bases they need)")
    sync.add_argument("--mode", choices=common.MODES, help=common.MODE_HELP)
    sync.add_argument(
        "--send-flags",
        metavar='"-L -e -c"',
        help="ZFS (OpenZFS): zfs send flags for new streams; -w (raw) is added for encrypted datasets by itself",
    )
    sync.add_argument(
        "--no-hold", action="store_true", help="ZFS: do not hold the snapshots being sent (holds keep a pruner from destroying them)"
    )
    sync.add_argument(
        "--metrics-file", metavar="PATH", help="after the run, write Prometheus metrics there (node_exporter's textfile collector)"
    )
    sync.add_argument(
        "source", metavar="SRC", help="pool/fs or [user@]host:pool/fs; btrfs: a directory of read-only snapshots, /path or host:/path"
    )
    sync.add_argument(
        "target", metavar="DST", help="pool/fs or [user@]host:pool/fs; btrfs: the directory to receive into; or s3://BUCKET/PREFIX"
    )
    sync.set_defaults(func=run)
