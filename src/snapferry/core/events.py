"""Progress events: what the data path reports, for the CLI to render as a bar, JSON or nothing."""

from __future__ import annotations

from typing import Any, Protocol

# A data path reports progress every few MiB, not every record: reporters show ten events a second at
# most, and an event per 128 KiB record is a measurable part of a transfer loop's CPU.
PROGRESS_STEP = 4 << 20


class EventSink(Protocol):
    def __call__(self, event: str, **fields: Any) -> None: ...


def ignore_events(event: str, **fields: Any) -> None:
    """An EventSink that drops everything."""
