"""The C fletcher-4 fuzz target: damaged streams through both readers with the C sums and with the numpy reference, compared."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fuzz.contract import Errors, attempt, check, outcome
from snapferry.errors import StreamFormatError, StreamIntegrityError, StreamTruncated
from snapferry.zfs.codec import fletcher
from snapferry.zfs.codec.fletcher import BlockSum

T = TypeVar("T")
ERRORS: Errors = (StreamFormatError, StreamIntegrityError, StreamTruncated)


@contextmanager
def _sums(native: bool) -> Iterator[None]:
    before = fletcher.use_native(native)
    try:
        yield
    finally:
        fletcher.use_native(before)


def _both(call: Callable[[], T]) -> tuple[T | None, Exception | None, T | None, Exception | None]:
    """call() with the C sums and then with the reference (twice the reference where C is not built)."""
    with _sums(fletcher.native_available()):
        fast, fast_error = attempt(ERRORS, call)
    with _sums(False):
        slow, slow_error = attempt(ERRORS, call)
    return fast, fast_error, slow, slow_error


def _same_error(a: Exception | None, b: Exception | None) -> bool:
    if a is None or b is None:
        return a is b
    return type(a) is type(b) and str(a) == str(b) and getattr(a, "verified_to", None) == getattr(b, "verified_to", None)


def run_stream_native(data: bytes) -> str:
    """The C sums must give what the reference gives: the same records and checksums, or the same error."""
    # Imported here: fuzz.targets imports this module's siblings, and the program of damage lives there.
    from fuzz.targets import parse_stream, stream_from_program

    stream, valid = stream_from_program(data)
    # The raw input as one block too: odd lengths and arbitrary word values straight into the C loop.
    whole = data[: len(data) - len(data) % 4]
    fast_sum, _, slow_sum, _ = _both(lambda: BlockSum.of(whole))
    check(fast_sum == slow_sum, f"BlockSum.of of {len(whole)} bytes: C {fast_sum} != reference {slow_sum}")
    errors: dict[bool, Exception | None] = {}
    for trusting in (False, True):
        # A fresh source for each run: a BytesIO made once would be at its end for the second.
        parse = functools.partial(lambda t: parse_stream(io.BytesIO(stream), trusting=t, expect=stream), trusting)
        fast, fast_error, slow, slow_error = _both(parse)
        tag = "trusting" if trusting else "strict"
        check(_same_error(fast_error, slow_error), f"{tag}: C sums raised {fast_error!r}, the reference {slow_error!r}")
        check(fast == slow, f"{tag}: the C sums and the reference yielded different records or checksums")
        check(fast_error is None or not valid, f"{tag}: a well-formed stream was refused: {fast_error!r}")
        errors[trusting] = fast_error
    return outcome(errors[True]) + ("" if errors[False] is None else f"/strict:{outcome(errors[False])}")
