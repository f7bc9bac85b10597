"""Renders data-path events: a rich progress bar on a terminal, JSON lines when asked, or nothing."""

from __future__ import annotations

import json
import sys
import threading
import time
from types import TracebackType
from typing import Any

_BAR_INTERVAL = 0.1
_JSON_INTERVAL = 1.0
_NOTICES = ("warning", "discard", "destroyed")


def _notice(event: str, fields: dict[str, Any]) -> str:
    """A warning, a discard or a destruction as the one line a person reads."""
    if event == "warning":
        return f"snapferry: warning: {fields.get('message', '')}"
    if event == "destroyed":
        return f"snapferry: destroyed {fields.get('name')}: {fields.get('reason')}"
    where = fields.get("target") or "the destination"
    what = fields.get("reason", "unfinished transfer")
    return f"snapferry: {where}: discarded the {what}; it holds no checkpoint, so this transfer starts from the beginning"


class Reporter:
    """An EventSink. Mode is "bar" (on a terminal, else quiet), "json" or "quiet"."""

    def __init__(self, mode: str, total: int | None = None, label: str = "transfer") -> None:
        # Warnings reach a person unless -q: as plain lines in scripts and cron, above the bar on a terminal.
        self._notices = mode == "bar"
        if mode == "bar" and not sys.stderr.isatty():
            # Like zfs itself, show no progress in scripts and cron; --json is there for machines.
            mode = "quiet"
        self.mode = mode
        self.checkpoints = 0
        self._last = 0.0
        self._progress: Any = None
        self._task: Any = None
        self._total = total
        self._label = label
        self._lock = threading.Lock()

    def __enter__(self) -> Reporter:
        if self.mode == "bar":
            # rich costs 40 ms of start-up: only a terminal that shows the bar pays for it.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=self._total, note="")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: str, **fields: Any) -> None:
        if self.mode == "quiet":
            if self._notices and event in _NOTICES:
                with self._lock:
                    print(_notice(event, fields), file=sys.stderr, flush=True)
            return
        # sync relays both ends' events from two threads: one event at a time, each line in one write.
        with self._lock:
            if event == "checkpoint":
                self.checkpoints += 1
            now = time.monotonic()
            # send -t reports a skip per record of the committed prefix it verifies: thousands a second.
            throttled = event == "progress" or (event == "skip" and fields.get("bytes") != fields.get("total"))
            if throttled and now - self._last < (_BAR_INTERVAL if self.mode == "bar" else _JSON_INTERVAL):
                return
            self._last = now
            if self.mode == "json":
                sys.stderr.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
                sys.stderr.flush()
            elif self.mode == "bar":
                self._update_bar(event, fields)

    def _update_bar(self, event: str, fields: dict[str, Any]) -> None:
        assert self._progress is not None
        if event in _NOTICES:
            self._progress.console.print(_notice(event, fields), markup=False, highlight=False)
            return
        note = f"{self.checkpoints} checkpoints" if self.checkpoints else ""
        if event == "skip":
            self._progress.update(self._task, description="verifying committed prefix", completed=fields["bytes"], total=fields["total"])
        elif event == "estimate":
            self._progress.update(self._task, total=fields["total"])
        elif event == "stream":
            total = fields.get("estimate") or self._total
            self._progress.update(self._task, description=str(fields.get("toname", self._label)), total=total)
        elif "bytes" in fields:
            self._progress.update(self._task, completed=fields["bytes"], note=note)
        else:
            self._progress.update(self._task, note=note)
