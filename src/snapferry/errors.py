"""The error taxonomy: every failure snapferry reports, each with its exit code, and its form on the wire."""

from __future__ import annotations

from typing import Any


class SnapferryError(Exception):
    """A failure with a one-line message for the user; only the CLI turns it into an exit code."""

    exit_code = 1
    # Whether sync's driver tries again after it (with back-off): a passing state, not a verdict.
    retryable = False


class UsageError(SnapferryError):
    """Bad arguments."""

    exit_code = 2


class NothingToDo(SnapferryError):
    """There is nothing to act on: no interrupted transfer to resume (token) or to abort (receive -A)."""

    exit_code = 1


class TransferInterrupted(SnapferryError):
    """The transfer stopped before its end; committed checkpoints stay and it can be resumed."""

    exit_code = 3
    retryable = True


class OutOfSpace(TransferInterrupted):
    """The destination ran out of space; resumable once space is freed or the quota raised."""


class ReceiverGone(TransferInterrupted):
    """The receiving side closed the stream: its own failure says why."""


class StreamTruncated(TransferInterrupted):
    """The input ended before the stream's END record."""


class BtrfsStreamTruncated(StreamTruncated):
    """The input ended before the btrfs stream's END command."""


class Refused(SnapferryError):
    """snapferry will not do this: stale token, conflicting destination state, concurrent receive."""

    exit_code = 4


class StaleToken(Refused):
    """The source can no longer make the interrupted stream (its snapshot or base is gone, or the stream changed):
    only aborting the destination's transfer and sending again helps (sync --on-stale restart does that)."""


class Locked(Refused):
    """Another snapferry process holds the dataset or transfer.

    For sync this is a passing state: the receive of an attempt that ssh gave up on lives on at the
    far end until its own connection times out. So it is retried, though its exit code says refused.
    """

    PREFIX = "another snapferry process is working on"
    retryable = True


class DatasetMissing(Refused):
    """The dataset, snapshot or path named does not exist."""


class PartialReceiveInTheWay(Refused):
    """OpenZFS keeps an interrupted `zfs receive -s` (a token, a %recv child) that blocks this command."""


class MalformedToken(Refused):
    """The token text is damaged or not a snapferry (or OpenZFS) token."""


class MalformedOpenZfsToken(MalformedToken):
    """An OpenZFS receive_resume_token that is damaged, incomplete or of an unknown version."""


class MalformedBtrfsToken(MalformedToken):
    """The text is damaged or not a snapferry btrfs token."""


class StreamChanged(Refused):
    """The stream offered for a resume is not the one the checkpoints were taken from."""


class PartialInTheWay(Refused):
    """Something at the subvolume's path is not what a snapferry transfer of this stream left there."""


class StreamFormatError(SnapferryError):
    """The input is not a stream snapferry can handle (foreign, corrupt framing, unsupported kind)."""

    exit_code = 5


class StreamIntegrityError(StreamFormatError):
    """A checksum did not match: the stream was corrupted on its way.

    `verified_to` is the stream offset up to which every byte had been verified.
    """

    verified_to = 0

    def __init__(self, message: str, verified_to: int = 0) -> None:
        super().__init__(message)
        self.verified_to = verified_to


class StoredChunkDamaged(StreamFormatError):
    """A chunk in object storage does not match the checksum it was stored with, or does not decrypt."""


class NvlistError(StreamFormatError):
    """A packed nvlist (native or XDR) is damaged, or holds a type snapferry does not decode."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed nvlist: {reason}")
        self.reason = reason


class PrefixMismatch(StreamFormatError):
    """A regenerated btrfs stream differs from the one whose prefix was received: its commands up to `offset` differ."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"the stream differs from the one received up to stream byte {offset}")
        self.offset = offset


class UnsafeStream(StreamFormatError):
    """The stream tried to reach outside its subvolume: through a symlink, a foreign clone source, an absurd size."""


class CommandFailed(SnapferryError):
    """A zfs or btrfs command (or system call) failed for a reason snapferry has no better name for."""

    exit_code = 6


class ZfsCommandError(CommandFailed):
    """A zfs command failed for a reason snapferry has no better name for."""


class BtrfsCommandError(CommandFailed):
    """A btrfs command failed for a reason snapferry has no better name for."""


class BtrfsApplyError(SnapferryError):
    """The filesystem refused a btrfs stream's command for a reason that is not lack of space."""


def _every_class() -> dict[str, type[SnapferryError]]:
    found: dict[str, type[SnapferryError]] = {}
    pending: list[type[SnapferryError]] = [SnapferryError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def as_event(exc: SnapferryError) -> dict[str, Any]:
    """The `error` event a process with --json reports its failure by, for the process that started it."""
    return {"class": type(exc).__name__, "code": exc.exit_code, "message": str(exc)}


def from_event(fields: dict[str, Any]) -> SnapferryError:
    """The error another snapferry process reported as an `error` event: its class by name, else one with its exit code."""
    code = fields.get("code")
    by_code = {2: UsageError, 3: TransferInterrupted, 4: Refused, 5: StreamFormatError, 6: CommandFailed}
    cls = _every_class().get(str(fields.get("class"))) or by_code.get(code if isinstance(code, int) else 1, SnapferryError)
    # Past the class's own constructor (some take an offset or a reason): the message arrives whole.
    error = cls.__new__(cls)
    Exception.__init__(error, str(fields.get("message", "(no message)")))
    return error
