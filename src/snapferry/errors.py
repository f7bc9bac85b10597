"""The error taxonomy: every failure snapferry reports, each with its exit code."""

from __future__ import annotations


class SnapferryError(Exception):
    """A failure with a one-line message for the user; only the CLI turns it into an exit code."""

    exit_code = 1


class UsageError(SnapferryError):
    """Bad arguments."""

    exit_code = 2


class TransferInterrupted(SnapferryError):
    """The transfer stopped before its end; committed checkpoints stay and it can be resumed."""

    exit_code = 3


class OutOfSpace(TransferInterrupted):
    """The destination ran out of space; resumable once space is freed or the quota raised."""


class Refused(SnapferryError):
    """snapferry will not do this: stale token, conflicting destination state, concurrent receive."""

    exit_code = 4


class Locked(Refused):
    """Another snapferry process holds the dataset or transfer. For sync's retry this is a passing state
    (the receive of an attempt that ssh gave up on lives on at the far end until its own connection
    times out): it backs off and tries again, recognising the message by PREFIX across ssh."""

    PREFIX = "another snapferry process is working on"


class StreamFormatError(SnapferryError):
    """The input is not a ZFS stream snapferry can handle (foreign, corrupt framing, unsupported kind)."""

    exit_code = 5


class StreamIntegrityError(StreamFormatError):
    """A checksum did not match: the stream was corrupted on its way.

    `verified_to` is the stream offset up to which every byte had been verified.
    """

    def __init__(self, message: str, verified_to: int = 0) -> None:
        super().__init__(message)
        self.verified_to = verified_to


class ZfsCommandError(SnapferryError):
    """A zfs command failed for a reason snapferry has no better name for."""

    exit_code = 6
