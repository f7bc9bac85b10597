"""`snapferry session`: the far end of sync's session (transport/session.py), running each request in this process."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable

import setproctitle

from snapferry.errors import SnapferryError, UsageError, as_event
from snapferry.transport.session import PROTOCOL, SessionError, read_frame, read_frame_with_fds, receives, write_frame

# A check of each request's words (serve's policy), raising SnapferryError to refuse it.
Check = Callable[[list[str]], object]


def _run_verb(argv: list[str]) -> int:
    from snapferry.cli.main import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse's refusal of bad words (it printed why)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2


def _short_call(argv: list[str]) -> dict[str, object]:
    """One verb with its output captured. Descriptors 0-2 point at /dev/null meanwhile: a zfs child that inherits
    them must neither read the next request nor write into the channel."""
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = os.open(os.devnull, os.O_RDWR)
    out, err = io.StringIO(), io.StringIO()
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = _run_verb(argv)
    finally:
        for fd, copy in zip((0, 1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)
    return {"session": PROTOCOL, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _refusal(argv: list[str], error: SnapferryError) -> dict[str, object]:
    event = json.dumps({"event": "error", **as_event(error)}) + "\n" if "--json" in argv else ""
    return {"session": PROTOCOL, "rc": error.exit_code, "stdout": "", "stderr": f"{event}snapferry: {error}\n"}


def run_session(check: Check | None = None, channel_fd: int | None = None) -> int:
    """Answer requests until the near end closes the channel, or run its stream request as the last; the exit status.

    The channel is fd 0 and 1 themselves (over ssh), read and written unbuffered, so that a stream verb takes
    them over as they are; or a unix socket (`channel_fd`), whose stream request brings the stream's descriptor.
    """
    channel = socket.socket(fileno=channel_fd) if channel_fd is not None else None
    if channel is None and (sys.stdin.isatty() or sys.stdout.isatty()):
        raise UsageError("session talks to snapferry sync over a pipe (ssh), not to a terminal")
    out = channel.fileno() if channel is not None else 1
    while True:
        try:
            request, fds = read_frame_with_fds(channel) if channel is not None else (read_frame(0), [])
        except SessionError as exc:
            raise UsageError(f"session: {exc}") from None
        if request is None:
            return 0
        argv = request.get("argv")
        if not (isinstance(argv, list) and argv and all(isinstance(word, str) for word in argv)):
            raise UsageError("session: a request names a snapferry verb and its arguments")
        stream = bool(request.get("stream"))
        try:
            if argv[0] in ("session", "serve"):
                raise UsageError(f"session: {argv[0]} cannot run inside a session")
            if check is not None:
                check(argv)
        except SnapferryError as exc:
            refusal = _refusal(argv, exc)
            if not stream:
                write_frame(out, refusal)
                continue
            print(refusal["stderr"], end="", file=sys.stderr)
            return exc.exit_code
        if not stream:
            write_frame(out, _short_call(argv))
            continue
        is_receive = receives(argv)
        if fds:
            os.dup2(fds[0], 0 if is_receive else 1)
            for fd in fds:
                os.close(fd)
        elif not is_receive:
            write_frame(out, {"session": PROTOCOL, "stream": True})
        # What ps shows: this process is now that stream's send or receive, not an idle session.
        setproctitle.setproctitle(f"{setproctitle.getproctitle()} {shlex.join(argv)}")
        return _run_verb(argv)


def run(args: argparse.Namespace) -> int:
    return run_session(channel_fd=args.channel_fd)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("session", help="for sync over ssh: answer its requests on stdin and stdout (not for a terminal)")
    parser.add_argument("--channel-fd", type=int, metavar="FD", help=argparse.SUPPRESS)  # sync's own, here (transport/session.py)
    parser.set_defaults(func=run, quiet=True, json=False, zfs=None)
