"""What every verb shares: the common options, sizes, the reporter, stdin and stdout as streams, picking the backend."""

from __future__ import annotations

import argparse
import io
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from snapferry.backends import backend_for
from snapferry.cli.progress import Reporter
from snapferry.core.process import enlarge_pipe
from snapferry.core.streamio import Readable
from snapferry.errors import UsageError
from snapferry.interface import Backend
from snapferry.transport.wire import LazyWire, WireSink, parse_compression, parse_rate

MODES = ("native", "pieces")
MODE_HELP = (
    "native: OpenZFS's own zfs receive -s / send -t (no re-reading of the source); pieces: snapferry's "
    "checkpoint snapshots (any ZFS). Default: native where both ends' ZFS can do it"
)
_SEND_FLAGS = ("-L", "-e", "-c", "-w")
_SIZE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.I)


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--zfs", metavar="CMD", help="zfs command to run (default: $SNAPFERRY_ZFS or zfs)")
    common.add_argument("--json", action="store_true", help="progress and events as JSON lines on stderr (with -q: only an error)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return common


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64M, 1G, 1048576)")
    value = int(match[1]) << (10 * " KMGT".index(match[2].upper() or " "))
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"size {text} is below the 1M minimum")
    return value


def size_text(text: str) -> str:
    """A size checked here but passed on as written (to the other end's command line)."""
    parse_size(text)
    return text


def backend(args: argparse.Namespace, *arguments: str | None) -> Backend:
    return backend_for(*arguments, zfs_command=shlex.split(args.zfs) if args.zfs else None)


def reporter(args: argparse.Namespace, label: str = "transfer") -> Reporter:
    return Reporter("quiet" if args.quiet else "json" if args.json else "bar", None, label)


def stdout_sink(args: argparse.Namespace) -> WireSink:
    if sys.stdout.isatty():
        raise UsageError("refusing to write a stream to a terminal: redirect it to a file or a pipe")
    sys.stdout.flush()
    fd = sys.stdout.fileno()
    enlarge_pipe(fd)
    rate = parse_rate(args.bwlimit) if args.bwlimit else None
    return WireSink(fd, compression=parse_compression(args.compress), rate=rate, buffer=args.buffer or 0)


@contextmanager
def stdin_stream() -> Iterator[Readable]:
    """Standard input as a stream, zstd undone if the sender compressed it."""
    if sys.stdin.isatty():
        raise UsageError("receive reads a stream from standard input: pipe one in")
    enlarge_pipe(sys.stdin.fileno())
    # A small buffer: reads of a payload beyond it go straight into the parser's buffer, not through a copy in this one.
    with io.BufferedReader(io.FileIO(sys.stdin.fileno(), closefd=False), buffer_size=1 << 16) as source:
        yield LazyWire(source)


def send_flags(text: str | None) -> tuple[str, ...]:
    """--send-flags "-L -e -c": zfs send's flags that keep blocks as they are on disk (OpenZFS)."""
    flags = tuple(f"-{letter}" for word in shlex.split(text or "") for letter in word.lstrip("-"))
    unknown = [f for f in flags if f not in _SEND_FLAGS]
    if unknown:
        raise UsageError(f"--send-flags takes {' '.join(_SEND_FLAGS)}, not {' '.join(unknown)}")
    return tuple(dict.fromkeys(flags))
