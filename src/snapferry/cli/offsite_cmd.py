"""The object-store verbs: `ls`, `get`, `restore`, `verify`, `forget` of s3:// backups, and sync's s3:// destination."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from snapferry.cli import common
from snapferry.cli.status_cmd import size
from snapferry.errors import Refused, SnapferryError, StreamFormatError, UsageError
from snapferry.interface import hold_tag

if TYPE_CHECKING:
    from snapferry.offsite.bucket import Bucket
    from snapferry.offsite.catalog import Entry
    from snapferry.offsite.layout import BucketUrl


def store_options() -> argparse.ArgumentParser:
    """The options every object-store verb takes (sync's s3:// destination too)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("object storage (s3://)")
    group.add_argument("--endpoint-url", metavar="URL", help="a non-AWS store (MinIO, Ceph, Swift, B2, Wasabi): its S3 endpoint")
    group.add_argument("--profile", metavar="NAME", help="the AWS profile to take credentials from (default: boto3's own chain)")
    group.add_argument(
        "--key-file", type=Path, metavar="PATH", help="encrypt chunks (AES-256-GCM) with the secret in PATH, and decrypt them"
    )
    return options


def open_bucket(args: argparse.Namespace, url: BucketUrl, jobs: int) -> Bucket:
    from snapferry.offsite.bucket import Bucket, StoreOptions

    bucket = Bucket(url.bucket, StoreOptions(args.endpoint_url, args.profile, jobs), retries=getattr(args, "retries", 6))
    bucket.check()
    return bucket


def key_material(args: argparse.Namespace) -> bytes | None:
    from snapferry.offsite.chunkseal import read_key_file

    return read_key_file(args.key_file) if args.key_file else None


def parse_url(text: str) -> BucketUrl:
    from snapferry.offsite.layout import BucketUrl

    return BucketUrl.parse(text)


def _date(seconds: int | None) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M") if seconds else "-"


def _line(entry: Entry) -> str:
    record = entry.record
    kind = f"incremental from @{record.base}" if record.base else "full"
    if record.complete:
        state = f"complete, {size(record.size or 0)} in {len(record.chunks)} chunks, stored {_date(record.finished)}"
    else:
        state = f"PARTIAL: {entry.chunks_stored} chunks of {size(record.chunk_size)} stored, started {_date(record.started)}"
    crypt = ", encrypted" if record.encryption else ""
    return f"{record.dataset}@{record.snapshot}  {kind}{crypt}; {state}; taken {_date(record.created)}"


def run_ls(args: argparse.Namespace) -> int:
    from snapferry.offsite.catalog import walk

    url = parse_url(args.url)
    entries = walk(open_bucket(args, url, 1), url.path)
    if url.snapshot:
        entries = [e for e in entries if e.record.snapshot == url.snapshot]
    for entry in entries:
        if args.json:
            print(
                json.dumps(
                    {
                        "key": entry.prefix,
                        "chunks_stored": entry.chunks_stored,
                        "complete": entry.record.complete,
                        **{k: v for k, v in entry.record.__dict__.items() if k != "chunks"},
                    }
                )
            )
        else:
            print(_line(entry))
    if not entries and not args.json:
        print(f"nothing stored under {url}", file=sys.stderr)
    return 0


def run_get(args: argparse.Namespace) -> int:
    from snapferry.offsite.restore import write_stream

    url = parse_url(args.url)
    if sys.stdout.isatty():
        raise UsageError("refusing to write a stream to a terminal: redirect it to a file or a pipe")
    bucket = open_bucket(args, url, args.jobs)
    with common.reporter(args, label=str(url)) as events:
        write_stream(bucket, url, key_material(args), sys.stdout.fileno(), events, args.jobs)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from snapferry.core.lock import dataset_lock
    from snapferry.offsite.restore import restore, restore_tree

    url = parse_url(args.url)
    backend = common.backend(args, args.target)
    bucket = open_bucket(args, url, args.jobs)
    started = time.time()
    with dataset_lock(f"restore-{args.target}", f"restore {url} {args.target}"), common.reporter(args, label=args.target) as events:
        received = (restore_tree if args.r else restore)(
            backend, bucket, url, args.target, key_material(args), events, jobs=args.jobs, force=args.F, checkpoint=args.checkpoint
        )
    if not (args.quiet or args.json):
        done = f"restored {', '.join(received)}" if received else f"{args.target} already has {url.snapshot}: nothing to restore"
        print(f"snapferry: {done} from {url} in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from snapferry.offsite.catalog import walk
    from snapferry.offsite.restore import stored_chain, verify

    url = parse_url(args.url)
    bucket = open_bucket(args, url, args.jobs)
    entries = stored_chain(bucket, url) if url.snapshot else walk(bucket, url.path)
    if not entries:
        raise Refused(f"nothing stored under {url}")
    with common.reporter(args, label=f"verify {url}") as events:
        problems = verify(bucket, entries, key_material(args), events, args.jobs)
    for problem in problems:
        print(f"snapferry: {problem}", file=sys.stderr)
    if problems:
        raise StreamFormatError(f"{len(problems)} problem(s) in {url}: the first is {problems[0]}")
    if not (args.quiet or args.json):
        chunks = sum(len(e.record.chunks) if e.record.complete else e.chunks_stored for e in entries)
        print(f"snapferry: {url}: {len(entries)} snapshot(s), {chunks} chunks: all whole", file=sys.stderr)
    return 0


def run_forget(args: argparse.Namespace) -> int:
    from snapferry.offsite.catalog import dataset_entries, forget, needed_by

    url = parse_url(args.url)
    if not url.snapshot:
        raise UsageError(f"name the snapshot to forget: {url}@SNAPSHOT")
    bucket = open_bucket(args, url, 1)
    entries = dataset_entries(bucket, url.path)
    entry = next((e for e in entries if e.record.snapshot == url.snapshot), None)
    if entry is None:
        raise Refused(f"{url} is not stored")
    others = [e for e in entries if e is not entry and e.record.complete]
    dependants = [e.record.snapshot for e in others if url.snapshot in needed_by(entries, [e])]
    if dependants:
        raise Refused(f"{url} is the base of stored incrementals ({', '.join(dependants)}): forget those first")
    forget(bucket, entry)
    print(f"forgot {url}")
    return 0


def run_sync(args: argparse.Namespace) -> int:
    """`sync SRC s3://BUCKET/PREFIX`: store SRC's snapshots (-r: of every dataset below it) in the bucket."""
    from snapferry.core.lock import dataset_lock
    from snapferry.offsite.backup import Backup, BackupOptions
    from snapferry.offsite.chunkseal import ChunkSeal
    from snapferry.offsite.layout import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
    from snapferry.sync.endpoints import Endpoint
    from snapferry.transport.wire import parse_rate

    url = parse_url(args.target)
    if url.snapshot:
        raise UsageError(f"sync stores into a prefix, not a snapshot: {args.target}")
    if Endpoint.parse(args.source).host is not None:
        raise UsageError("an s3:// destination takes a local source: run snapferry on the host that has the snapshots")
    for_a_receiver = {
        "--force": args.force,
        "--mode": args.mode,
        "--props": args.props,
        "-x": args.x,
        "-o": args.o,
        "--keep-dest": args.keep_dest,
        "--checkpoint": args.checkpoint,
        "--compress": args.compress,
        "--buffer": args.buffer,
    }
    unfit = [flag for flag, given in for_a_receiver.items() if given]
    if unfit:
        raise UsageError(f"{', '.join(unfit)}: not for an s3:// destination (--keep N prunes the bucket; properties are kept anyway)")
    chunk_size = common.parse_size(args.chunk_size) if args.chunk_size else DEFAULT_CHUNK_SIZE
    if chunk_size > MAX_CHUNK_SIZE:
        raise UsageError(f"--chunk-size is at most {MAX_CHUNK_SIZE >> 20}M (each chunk in flight is held in memory)")
    jobs = args.jobs or 4
    backend = common.backend(args, args.source)
    backend.check_sync_endpoint(args.source, remote=False)
    options = BackupOptions(
        chunk_size=chunk_size,
        jobs=jobs,
        rate=parse_rate(args.bwlimit) if args.bwlimit else None,
        no_stream=args.no_stream,
        keep=args.keep,
        full_every=args.full_every,
        hold_tag=None if args.no_hold else hold_tag(str(url)),
        restart_on_stale=args.on_stale == "restart",
        retries=args.retries,
        deadline=args.deadline,
        send_flags=common.send_flags(args.send_flags),
    )
    bucket = open_bucket(args, url, jobs)
    seal = ChunkSeal(key_material(args))
    started = time.time()
    datasets = backend.descendants(args.source) if args.r else [args.source]
    if args.exclude:
        import re

        datasets = [d for d in datasets if not any(re.search(x, d) for x in args.exclude)]
    if args.snapshot and not args.dry_run:
        # One snapshot of the whole tree, atomically (-r), before anything is stored.
        backend.take_snapshot(f"{args.source}@{args.snapshot_prefix}{time.strftime('%Y-%m-%d_%H:%M:%S', time.gmtime())}", recursive=args.r)
    totals = {"bytes": 0, "resumes": 0, "retries": 0}
    lag: float | None = None
    exit_code = 1
    try:
        with dataset_lock(f"sync-{url}", f"sync {args.source} {url}"), common.reporter(args, label=str(url)) as events:
            for dataset in datasets:
                backup = Backup(backend, dataset, url, bucket, seal, options, events)
                if args.dry_run:
                    for line in backup.plan():
                        print(f"{dataset}: {line}")
                    continue
                outcome = backup.run()
                stats = backup.stats
                totals = {"bytes": totals["bytes"] + stats.bytes, "resumes": totals["resumes"] + stats.resumes,
                          "retries": totals["retries"] + stats.retries}  # fmt: skip
                if stats.newest is not None and stats.newest.created:
                    lag = max(lag or 0.0, time.time() - stats.newest.created)
                if args.keep_source and stats.newest is not None:
                    newest = backend.send_request(dataset, stats.newest.name, None).snapshot or ""
                    backend.prune(dataset, args.snapshot_prefix, args.keep_source, [newest])
                if not (args.quiet or args.json):
                    print(
                        f"snapferry: sync {dataset} -> {url}: {outcome}; {size(stats.bytes)} stored, {stats.resumes} resume(s), "
                        f"{stats.retries} retry(ies)" + (f", pruned {', '.join(stats.pruned)}" if stats.pruned else ""),
                        file=sys.stderr,
                    )
        exit_code = 0
    except SnapferryError as exc:
        exit_code = exc.exit_code
        raise
    except KeyboardInterrupt:
        exit_code = 3
        raise
    finally:
        if args.metrics_file and not args.dry_run:
            from snapferry.sync.metrics import write_metrics

            write_metrics(Path(args.metrics_file), source=args.source, target=str(url), started=started, duration=time.time() - started,
                          exit_code=exit_code, received_bytes=totals["bytes"], resumes=totals["resumes"], retries=totals["retries"],
                          lag=lag)  # fmt: skip
    if args.r and not (args.quiet or args.json or args.dry_run):
        print(
            f"snapferry: sync -r {args.source} -> {url}: {len(datasets)} dataset(s), {size(totals['bytes'])} stored "
            f"in {time.time() - started:.0f} s",
            file=sys.stderr,
        )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    store = store_options()
    jobs = argparse.ArgumentParser(add_help=False)
    jobs.add_argument("--jobs", type=int, default=4, metavar="N", help="chunks fetched at once (default 4)")
    ls = sub.add_parser("ls", parents=[common_options, store], help="list the snapshots stored under s3://BUCKET/PREFIX")
    ls.add_argument("url", metavar="s3://BUCKET/PREFIX[/DATASET[@SNAP]]")
    ls.set_defaults(func=run_ls, retries=2)
    get = sub.add_parser("get", parents=[common_options, store, jobs], help="write one stored snapshot's stream to stdout")
    get.add_argument("url", metavar="s3://BUCKET/PREFIX/DATASET@SNAP")
    get.set_defaults(func=run_get)
    restore = sub.add_parser("restore", parents=[common_options, store, jobs], help="receive a stored snapshot (and its chain), resumably")
    restore.add_argument("-r", action="store_true", help="ZFS: every dataset stored below the prefix with that snapshot (sync -r)")
    restore.add_argument("-F", action="store_true", help="ZFS: roll the target back to its newest snapshot first (as zfs receive -F)")
    restore.add_argument(
        "--checkpoint",
        type=common.parse_size,
        metavar="SIZE",
        help="as for receive -s: bytes between checkpoints (default 1G ZFS, 256M btrfs)",
    )
    restore.add_argument("url", metavar="s3://BUCKET/PREFIX/DATASET@SNAP")
    restore.add_argument("target", metavar="POOL/FS|DIR")
    restore.set_defaults(func=run_restore)
    verify = sub.add_parser("verify", parents=[common_options, store, jobs], help="read and check every stored chunk, without restoring")
    verify.add_argument("url", metavar="s3://BUCKET/PREFIX[/DATASET[@SNAP]]")
    verify.set_defaults(func=run_verify)
    forget = sub.add_parser("forget", parents=[common_options, store], help="delete one stored snapshot (never one another needs)")
    forget.add_argument("url", metavar="s3://BUCKET/PREFIX/DATASET@SNAP")
    forget.set_defaults(func=run_forget, retries=2)
