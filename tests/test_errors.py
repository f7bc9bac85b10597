"""The error taxonomy: every class in snapferry.errors with its exit code, and its way across ssh as an `error` event."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import snapferry
from snapferry import errors
from snapferry.sync.driver import run_pipe


def _every_error_class() -> list[type[errors.SnapferryError]]:
    for module in pkgutil.walk_packages(snapferry.__path__, "snapferry."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found, pending = [], [errors.SnapferryError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


CLASSES = _every_error_class()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_lives_in_errors_and_has_a_documented_exit_code(cls: type[errors.SnapferryError]) -> None:
    assert cls.__module__ == "snapferry.errors"
    assert cls.exit_code in range(1, 7)
    assert cls.__doc__


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@given(message=st.text(min_size=1, max_size=200))
def test_an_error_crosses_as_an_event_with_its_class_code_and_message(cls: type[errors.SnapferryError], message: str) -> None:
    sent = cls.__new__(cls)
    Exception.__init__(sent, message)
    event = json.loads(json.dumps({"event": "error", **errors.as_event(sent)}))
    received = errors.from_event(event)
    assert type(received) is cls and str(received) == message and received.exit_code == cls.exit_code
    assert received.retryable == cls.retryable


def test_an_unknown_class_falls_back_to_its_exit_code() -> None:
    assert type(errors.from_event({"class": "FromANewerVersion", "code": 4, "message": "m"})) is errors.Refused
    assert type(errors.from_event({"class": "FromANewerVersion", "code": 3, "message": "m"})) is errors.TransferInterrupted
    assert type(errors.from_event({"message": "m"})) is errors.SnapferryError


def _fails_with(stderr: str, code: int) -> list[str]:
    script = f"import sys; sys.stdin.buffer.read(); sys.stderr.write({stderr!r}); sys.exit({code})"
    return [sys.executable, "-c", script]


def _writes() -> list[str]:
    return [sys.executable, "-c", "import sys; sys.stdout.buffer.write(bytes(4096))"]


def test_sync_reads_the_class_not_the_text() -> None:
    """A lock's words without its `error` event are just a refusal (exit 4): sync matches no message text."""
    words = f"snapferry: {errors.Locked.PREFIX} tank/fs (pid 1, receive); wait for it or stop it first\n"
    with pytest.raises(errors.Refused) as refused:
        run_pipe(_writes(), _fails_with(words, 4))
    assert type(refused.value) is errors.Refused
    event = json.dumps({"event": "error", **errors.as_event(errors.Locked("held"))}) + "\n"
    with pytest.raises(errors.TransferInterrupted, match="held"):
        run_pipe(_writes(), _fails_with(event + "snapferry: held\n", 4))
    corrupt = json.dumps({"event": "error", **errors.as_event(errors.StreamIntegrityError("checksum mismatch"))}) + "\n"
    with pytest.raises(errors.StreamIntegrityError, match="checksum mismatch"):
        run_pipe(_writes(), _fails_with(corrupt, 5))
