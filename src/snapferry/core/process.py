"""Child processes at either end of a stream (a receive we feed, a send we read) and what their failures mean."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

from snapferry.core.splice import SpliceRing, unread_bytes
from snapferry.core.streamio import Buffer, write_all
from snapferry.errors import CommandFailed, ReceiverGone, SnapferryError, TransferInterrupted

# Linux pipes hold 64 KiB, less than one 128 KiB record: with bigger pipes snapferry and zfs
# overlap instead of taking turns (measured in docs/BENCHMARKS.md).
PIPE_SIZE = 1 << 20

# Seconds a sending command stopped early gets to notice its closed output before it is killed.
STOP_GRACE = 5


def enlarge_pipe(fd: int) -> None:
    """Best effort: a non-pipe, or a limit below PIPE_SIZE, just keeps the default; a larger pipe (its other end's
    choice, mbuffer's say) stays as large."""
    with contextlib.suppress(OSError):
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


@dataclass(frozen=True)
class Tool:
    """A filesystem's command line tool: what its stderr means (`classify(action, stderr)`), what to say when it is missing."""

    classify: Callable[[str, str], Exception]
    missing_hint: str

    def not_found(self, program: str) -> CommandFailed:
        return CommandFailed(f"cannot run {program!r}: not found ({self.missing_hint})")


class ReceiveProcess:
    """One receiving command (`zfs receive`) fed by us: what it receives is committed only when finish() returns."""

    def __init__(self, argv: list[str], action: str, tool: Tool) -> None:
        self.action = action
        self._program = os.path.basename(argv[0])
        self._tool = tool
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise tool.not_found(argv[0]) from None
        assert self._proc.stdin is not None
        self.fd = self._proc.stdin.fileno()
        enlarge_pipe(self.fd)
        # What it printed on a success: zfs receive warns there, e.g. of a received property it could not set.
        self.said = ""

    def write(self, parts: Sequence[Buffer]) -> None:
        try:
            write_all(self.fd, parts)
        except BrokenPipeError:
            raise self._stopped_reading() from None

    def splice(self, ring: SpliceRing, start: int, size: int) -> None:
        """write() of a part of the ring, by reference (the ring keeps it until this command has read it)."""
        try:
            ring.splice(self, start, size)
        except BrokenPipeError:
            raise self._stopped_reading() from None

    def unread(self) -> int:
        """Bytes written that the command has not read yet (0 once its input is closed or it has exited)."""
        if self._proc.stdin is None or self._proc.stdin.closed or self._proc.poll() is not None:
            return 0
        return unread_bytes(self.fd)

    def _stopped_reading(self) -> Exception:
        # Its own error says why (a pipe cannot break on a clean exit 0).
        return self._failure() or CommandFailed(f"{self.action}: the receiving command stopped reading")

    def _failure(self) -> Exception | None:
        """Close our end, wait for zfs receive, and return its error if it failed."""
        self._close_stdin()
        assert self._proc.stderr is not None
        stderr = self._proc.stderr.read().decode(errors="replace")
        status = self._proc.wait()
        if status == 0:
            self.said = stderr
            return None
        if status < 0 and not stderr.strip():
            # Killed, most often by SIGPIPE when the ZFS service it talks to went away: nothing was committed.
            name = signal.Signals(-status).name if -status in signal.valid_signals() else f"signal {-status}"
            return TransferInterrupted(f"{self.action}: {self._program} receive was killed by {name} (the service or the system went away)")
        return self._tool.classify(self.action, stderr or f"the receiving command exited with status {status}")

    def _close_stdin(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()

    def finish(self) -> None:
        failure = self._failure()
        if failure is not None:
            raise failure

    def abort(self) -> None:
        """Close the stream without an END: zfs receive discards everything of this piece."""
        self._close_stdin()
        if self._proc.stderr:
            self._proc.stderr.read()
        self._proc.wait()


class SendProcess:
    """One sending command (`zfs send`, `btrfs send`) whose stdout we read; its tool turns its stderr into an error."""

    def __init__(self, argv: list[str], action: str, tool: Tool) -> None:
        self.action = action
        self._program = os.path.basename(argv[0])
        self._tool = tool
        try:
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1 << 16)
        except FileNotFoundError:
            raise tool.not_found(argv[0]) from None
        assert self._proc.stdout is not None
        enlarge_pipe(self._proc.stdout.fileno())
        self.stdout = cast(io.BufferedReader, self._proc.stdout)
        self._stderr: str | None = None

    def failure(self, timeout: float | None = 2.0) -> Exception | None:
        """The command's own error if it has failed; None if it succeeded or is still running after `timeout`."""
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._proc.returncode == 0:
            return None
        if self._stderr is None:
            assert self._proc.stderr is not None
            self._stderr = self._proc.stderr.read().decode(errors="replace")
        return self._tool.classify(self.action, self._stderr or f"{self._program} send exited with status {self._proc.returncode}")

    @contextmanager
    def reading(self, bytes_read: Callable[[], int]) -> Iterator[None]:
        """Around reading the whole stream: the command's own error wins over what its output looked like."""
        try:
            yield
            self.check()
        except SnapferryError:
            # A stream that stops short is most often the send failing: its own words say more.
            failure = self.failure()
            if failure is not None:
                raise failure from None
            raise
        except BrokenPipeError:
            raise ReceiverGone(f"the receiving side closed the stream after {bytes_read()} bytes") from None
        finally:
            self.stop()

    def check(self) -> None:
        """Wait for the command and raise its own error if it failed."""
        failure = self.failure(timeout=None)
        if failure is not None:
            raise failure

    def stop(self) -> None:
        if self._proc.poll() is None:
            # Our end of its output closed first: it then stops at its next write, as `zfs send | head` does. A
            # SIGKILL in the middle of a kernel send is kept as the last resort (suspected of leaving OpenZFS's
            # zfs send hanging: docs/RELIABILITY.md).
            if self._proc.stdout:
                self._proc.stdout.close()
            try:
                self._proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream:
                stream.close()
