"""A session: one snapferry process at the far end that answers short calls in turn, then maybe carries a stream.

Every ssh session costs a channel, the remote user's shell and a Python start-up (0.17 s on loopback here, more
over a WAN), and a sync step used to pay it twice at the far end: once for the status it plans from, once for
the receive. In a session the status and the receive share one process.

The channel is the process's stdin and stdout, in frames: a 4-byte big-endian length, then that many bytes of
JSON. The near end sends requests (`{"argv": [...]}`), each answered by `{"session": 1, "rc": N, "stdout": "...",
"stderr": "..."}`. A request with `"stream": true` is the last: its verb then owns stdin and stdout as they are,
unframed, and its events go to stderr. A send first answers `{"session": 1, "stream": true}`, so that the near end
knows the bytes after it are the stream; a receive answers nothing (the near end may already have stopped reading).

A session here (`LocalSession`) only ever runs one stream: it is started before the step is planned, so that
Python's start-up overlaps the planning, and is then handed its verb and the stream's descriptor over a unix
socket (SCM_RIGHTS), in the same frame format.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from snapferry.core.process import enlarge_pipe

PROTOCOL = 1
_LENGTH = struct.Struct(">I")
# A status of a pool with tens of thousands of snapshots is a few MiB; anything far larger is not a frame.
MAX_FRAME = 256 << 20


class SessionError(Exception):
    """The channel broke or carried something that is not a frame (the far end is gone, or is not a session)."""


def _frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return _LENGTH.pack(len(payload)) + payload


def write_frame(fd: int, message: dict[str, Any]) -> None:
    data = memoryview(_frame(message))
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, size: int, read: Callable[[int, int], bytes] = os.read) -> bytes | None:
    """`size` bytes, or None at end of file before the first; a partial read is a SessionError."""
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = read(fd, left)
        if not chunk:
            if left == size:
                return None
            raise SessionError(f"the channel ended inside a frame ({size - left} of {size} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, read: Callable[[int, int], bytes] = os.read) -> dict[str, Any] | None:
    """The next message, or None when the other end closed the channel between frames."""
    header = _read_exactly(fd, _LENGTH.size, read)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise SessionError(f"not a session frame (a length of {length} bytes)")
    payload = _read_exactly(fd, length, read) if length else b""
    if payload is None:
        raise SessionError("the channel ended inside a frame")
    try:
        message = json.loads(payload)
    except ValueError:
        raise SessionError("not a session frame (its payload is not JSON)") from None
    if not isinstance(message, dict):
        raise SessionError("not a session frame (its payload is not an object)")
    return message


def read_frame_with_fds(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """read_frame() from a unix socket, with the descriptors that came along (SCM_RIGHTS)."""
    fds: list[int] = []

    def read(fd: int, size: int) -> bytes:
        data, got, _, _ = socket.recv_fds(sock, size, 4)
        fds.extend(got)
        return data

    return read_frame(sock.fileno(), read), fds


@dataclass(frozen=True)
class Reply:
    """A short call's outcome, as `subprocess.run` would have given it."""

    returncode: int
    stdout: bytes
    stderr_lines: list[str]
    # False: the session ended instead of answering (the far end's exit status and stderr are above).
    answered: bool = True

    @property
    def lost(self) -> bool:
        """The session died rather than failed: killed (a signal there or here), or its connection dropped."""
        return not self.answered and (self.returncode < 0 or self.returncode >= 128)


def receives(argv: Sequence[str]) -> bool:
    """Whether a stream verb's words are a receive (the stream is its stdin), not a send (its stdout)."""
    return argv[0] in ("receive", "recv")


# One end of a pipe to start on the pipe's descriptor (its stdout for a send, its stdin for a receive).
Launch = Callable[[int], "subprocess.Popen[bytes]"]


def launch_command(argv: list[str], *, receives: bool) -> Launch:
    def start(fd: int) -> subprocess.Popen[bytes]:
        if receives:
            return subprocess.Popen(argv, stdin=fd, stderr=subprocess.PIPE)
        return subprocess.Popen(argv, stdout=fd, stderr=subprocess.PIPE)

    return start


@dataclass(frozen=True)
class StartedStream:
    """A session that now carries a stream: its process, and the descriptor this end writes the stream to (for a
    receive at the far end) or reads it from (a send). Whoever takes it closes `fd`."""

    proc: subprocess.Popen[bytes]
    fd: int


class RemoteSession:
    """The near end of a session: `argv` starts `snapferry session` at the far end (through ssh)."""

    def __init__(self, argv: list[str]) -> None:
        to_far, self._to_far = os.pipe()
        self._from_far, from_far = os.pipe()
        try:
            self.proc = subprocess.Popen(argv, stdin=to_far, stdout=from_far, stderr=subprocess.PIPE)
        except BaseException:
            for fd in (self._to_far, self._from_far):
                os.close(fd)
            raise
        finally:
            os.close(to_far)
            os.close(from_far)
        self._open = True

    @property
    def usable(self) -> bool:
        """Not handed over to a stream, closed, or ended."""
        return self._open and self.proc.poll() is None

    def _ended(self) -> Reply:
        """What the far end ended with, once it stopped answering."""
        self.close()
        assert self.proc.stderr is not None
        lines = self.proc.stderr.read().decode(errors="replace").splitlines()
        rc = self.proc.wait()
        return Reply(rc if rc != 0 else 1, b"", lines or [f"the session ended (exit status {rc})"], answered=False)

    def _answer(self) -> dict[str, Any] | None:
        answer = read_frame(self._from_far)
        if answer is not None and answer.get("session") != PROTOCOL:
            raise SessionError(f"not a snapferry session (it answered {json.dumps(answer)[:80]})")
        return answer

    def call(self, argv: list[str]) -> Reply:
        """Run one snapferry verb there (not a stream); what it printed and its exit status."""
        try:
            write_frame(self._to_far, {"argv": argv})
            reply = self._answer()
        except (BrokenPipeError, ConnectionResetError):
            return self._ended()
        if reply is None:
            return self._ended()
        try:
            return Reply(int(reply["rc"]), str(reply["stdout"]).encode(), str(reply["stderr"]).splitlines())
        except (KeyError, TypeError, ValueError):
            raise SessionError("not a session reply") from None

    def stream(self, argv: list[str]) -> StartedStream:
        """Run a stream verb there, as the session's last: the session is handed over and no longer usable here.
        A far end that already ended, or refused, says why on its stderr, as a stream's failure does."""
        self._open = False
        is_receive = receives(argv)
        try:
            write_frame(self._to_far, {"argv": argv, "stream": True})
            if not is_receive:
                self._answer()  # the bytes after it are the stream
        except (OSError, SessionError):
            pass  # the pipe's run reads why from the far end's stderr
        keep, close = (self._to_far, self._from_far) if is_receive else (self._from_far, self._to_far)
        os.close(close)
        enlarge_pipe(keep)
        return StartedStream(self.proc, keep)

    def close(self) -> None:
        """End the session: the far end sees the end of its requests and exits."""
        if self._open:
            self._open = False
            for fd in (self._to_far, self._from_far):
                os.close(fd)


class SessionPool:
    """The sessions to one host: a call takes an idle one (or starts one) and gives it back after; a stream keeps the
    one it takes. Threads (sync --jobs) each get their own."""

    def __init__(self, argv: list[str]) -> None:
        self._argv = argv
        self._idle: list[RemoteSession] = []
        self._lock = threading.Lock()
        # Start the next session as soon as a stream takes one (sync -r: the next dataset's, meanwhile).
        self.keep_warm = False

    def _take(self) -> RemoteSession:
        with self._lock:
            while self._idle:
                session = self._idle.pop()
                if session.usable:
                    return session
                session.close()
        return RemoteSession(self._argv)

    def call(self, argv: list[str]) -> Reply:
        session = self._take()
        try:
            reply = session.call(argv)
            if reply.lost:
                # An idle session can die meanwhile (a dropped link, the far host rebooted): a new one says
                # whether the host is still there.
                session = RemoteSession(self._argv)
                reply = session.call(argv)
        except BaseException:
            session.close()
            raise
        with self._lock:
            if session.usable:
                self._idle.append(session)
        return reply

    def stream(self, argv: list[str]) -> StartedStream:
        started = self._take().stream(argv)
        if self.keep_warm:
            with self._lock:
                if not self._idle:
                    self._idle.append(RemoteSession(self._argv))
        return started

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()


class LocalSession:
    """`snapferry session` here, started ahead of its one stream: `launch` hands it the verb and the descriptor."""

    def __init__(self, snapferry: Sequence[str]) -> None:
        near, far = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [*snapferry, "session", "--channel-fd", str(far.fileno())],
                pass_fds=(far.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except BaseException:
            near.close()
            raise
        finally:
            far.close()
        self._channel = near

    def launch(self, argv: list[str], fd: int) -> subprocess.Popen[bytes]:
        """Run the stream verb `argv` there on `fd` (its stdout for a send, its stdin for a receive); its process."""
        # If it ended already, its stderr says why, and the pipe's run reads it.
        with contextlib.suppress(OSError):
            socket.send_fds(self._channel, [_frame({"argv": argv, "stream": True})], [fd])
        self._channel.close()
        return self.proc

    def close(self) -> None:
        """Not needed after all: it sees the channel's end and exits."""
        self._channel.close()


class SpareSessions:
    """At most one LocalSession started ahead (`warm`, when a step is about to be planned), for the next stream."""

    def __init__(self, snapferry: Sequence[str]) -> None:
        self._snapferry = tuple(snapferry)
        self._spare: LocalSession | None = None
        self._lock = threading.Lock()
        self.keep_warm = False  # as SessionPool's

    def warm(self) -> None:
        with self._lock:
            self._spare = self._running_or_new(self._spare)

    def take(self) -> LocalSession:
        with self._lock:
            spare, self._spare = self._spare, None
        if self.keep_warm:
            self.warm()
        return self._running_or_new(spare)

    def _running_or_new(self, spare: LocalSession | None) -> LocalSession:
        """`spare` while its process runs; else a new one (a spare that died is closed, or its socket would leak)."""
        if spare is not None and spare.proc.poll() is None:
            return spare
        if spare is not None:
            spare.close()
        return LocalSession(self._snapferry)

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
