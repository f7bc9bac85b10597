"""Progress events: what the data path reports, for the CLI to render as a bar, JSON or nothing."""

from __future__ import annotations

from typing import Any, Protocol


class EventSink(Protocol):
    def __call__(self, event: str, **fields: Any) -> None: ...


def ignore_events(event: str, **fields: Any) -> None:
    """An EventSink that drops everything."""
