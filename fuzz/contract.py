"""The contract every fuzz target keeps: a correct parse, or an allowed exception with a one-line message."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
Errors = tuple[type[Exception], ...]

OK = "parsed"


class ContractViolation(AssertionError):
    """A parser returned something wrong, or refused an input without a clean one-line message."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def attempt(allowed: Errors, call: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """`call()`'s result, or the allowed exception it raised; any other exception propagates (a finding)."""
    try:
        return call(), None
    except allowed as exc:
        text = str(exc)
        # The CLI prints the message as the user's only explanation: one specific line.
        check(bool(text.strip()) and "\n" not in text, f"{type(exc).__name__} without a one-line message: {text!r}")
        # Its frames would keep the failed parser's buffers (up to 16 MiB) alive through the next attempt.
        return None, exc.with_traceback(None)


def outcome(error: Exception | None) -> str:
    return OK if error is None else type(error).__name__
