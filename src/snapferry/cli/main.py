"""The `snapferry` command line: one parser built from the verb modules, dispatch, and errors mapped to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

from snapferry.cli import common
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

# The modules that add the verbs' parsers, in the order --help lists them.
_VERB_MODULES = (
    "send_cmd", "receive_cmd", "token_cmd", "status_cmd", "check_cmd", "sync_cmd", "serve_cmd", "session_cmd",
    "rollback_cmd", "holds_cmd", "offsite_cmd", "demo_cmd",
)  # fmt: skip
# Which module adds each verb (and alias): a command line that names one imports and builds only that module's
# parsers. Importing all of them, and building every parser, took 14 ms of each start (`send --help`: 62 -> 48 ms CPU);
# tests/test_cli_verbs.py checks this table against what the modules add.
VERB_MODULE = {
    "send": "send_cmd", "receive": "receive_cmd", "recv": "receive_cmd", "token": "token_cmd",
    "status": "status_cmd", "subvolumes": "status_cmd", "check": "check_cmd", "sync": "sync_cmd",
    "serve": "serve_cmd", "session": "session_cmd", "rollback": "rollback_cmd", "snapshot": "rollback_cmd",
    "prune": "rollback_cmd", "hold": "holds_cmd", "release": "holds_cmd", "holds": "holds_cmd",
    "ls": "offsite_cmd", "get": "offsite_cmd", "restore": "offsite_cmd", "verify": "offsite_cmd",
    "forget": "offsite_cmd", "demo": "demo_cmd",
}  # fmt: skip


class _Version(argparse.Action):
    """--version, looked up only when asked: importlib.metadata costs 10 ms of every start-up."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        from importlib.metadata import version

        print(f"snapferry {version('snapferry')}")
        parser.exit()


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `verb` (a name of VERB_MODULE) only the parsers of the module that adds it."""
    parser = argparse.ArgumentParser(
        prog="snapferry",
        description="Resumable snapshot transfer, on any ZFS and on btrfs. A path (/..., ./...) means btrfs; pool/fs means ZFS.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = common.common_options()
    for name in (VERB_MODULE[verb],) if verb in VERB_MODULE else _VERB_MODULES:
        importlib.import_module(f"snapferry.cli.{name}").add_parser(sub, options)
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
    words = list(sys.argv[1:] if argv is None else argv)
    # A verb first: its module's parser is enough. Anything else (--help, --version, a typo) gets the whole parser.
    args = build_parser(words[0] if words else None).parse_args(words)
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
