"""The `snapferry` command line: one parser built from the verb modules, dispatch, and errors mapped to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

from snapferry.cli import (
    check_cmd,
    common,
    demo_cmd,
    holds_cmd,
    offsite_cmd,
    receive_cmd,
    rollback_cmd,
    send_cmd,
    serve_cmd,
    session_cmd,
    status_cmd,
    sync_cmd,
    token_cmd,
)
from snapferry.errors import SnapferryError, TransferInterrupted, as_event

EXIT_CODES = """exit codes:
  0  done
  1  nothing to do (token: no interrupted transfer), or another failure
  2  bad usage
  3  interrupted or out of space: checkpoints are kept, resume later
  4  refused: stale token, conflicting destination, concurrent receive
  5  bad stream: corrupt, truncated header, foreign or unsupported
  6  a zfs or btrfs command failed
"""

_VERBS = (
    send_cmd, receive_cmd, token_cmd, status_cmd, check_cmd, sync_cmd, serve_cmd, session_cmd,
    rollback_cmd, holds_cmd, offsite_cmd, demo_cmd,
)  # fmt: skip


class _Version(argparse.Action):
    """--version, looked up only when asked: importlib.metadata costs 10 ms of every start-up."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        from importlib.metadata import version

        print(f"snapferry {version('snapferry')}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapferry",
        description="Resumable snapshot transfer, on any ZFS and on btrfs. A path (/..., ./...) means btrfs; pool/fs means ZFS.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = common.common_options()
    for verb in _VERBS:
        verb.add_parser(sub, options)
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _fail(args: argparse.Namespace, error: SnapferryError) -> int:
    """One line for a person; with --json also an `error` event first, which a sync on the other end reads."""
    if getattr(args, "json", False):
        print(json.dumps({"event": "error", **as_event(error)}), file=sys.stderr)
    print(f"snapferry: {error}", file=sys.stderr)
    return error.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except SnapferryError as exc:
        return _fail(args, exc)
    except KeyboardInterrupt:
        return _fail(args, TransferInterrupted("interrupted"))
    except OSError as exc:
        return _fail(args, SnapferryError(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")))
    except Exception as exc:  # a bug: still one line, and nothing is ever reported as success
        return _fail(args, SnapferryError(f"internal error ({type(exc).__name__}: {exc}); please report it"))


def run() -> NoReturn:
    """The command's entry point: main(), then an exit that skips the interpreter's teardown.

    By the time main() returns, everything it started is finished (its threads are daemons, its files closed
    by their `with`), and freeing every module at exit (numpy, zstandard, boto3 ...) costs 20-35 ms of every
    run: on sync's critical path that is paid by the far end's receive and by sync itself, and at 1 GiB it is
    0.02-0.03 s/GB of the CPU figures.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
