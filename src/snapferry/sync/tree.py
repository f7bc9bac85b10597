"""sync -r: every dataset of a source tree, parents before children, each planned and resumed as a one-dataset sync."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from snapferry.core.events import EventSink
from snapferry.errors import Refused, SnapferryError, from_event
from snapferry.sync.driver import Sync, SyncOptions, SyncStats
from snapferry.sync.endpoints import Side


@dataclass
class TreeResult:
    """What a tree sync did, dataset by dataset."""

    done: list[str] = field(default_factory=list)
    refused: dict[str, SnapferryError] = field(default_factory=dict)
    failed: dict[str, SnapferryError] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)  # on the destination, no longer on the source: kept
    stats: SyncStats = field(default_factory=SyncStats)
    lag: float | None = None  # the largest of the datasets' lags

    def line(self) -> str:
        total = len(self.done) + len(self.refused) + len(self.failed)
        said = f"{total} dataset(s): {len(self.done)} done, {len(self.refused)} refused, {len(self.failed)} failed"
        return said + (f"; {len(self.gone)} gone from the source (kept on the destination)" if self.gone else "")

    def error(self) -> SnapferryError | None:
        """The one error a tree sync ends with when a dataset was not done: the worst kind, naming each dataset."""
        problems = {**self.refused, **self.failed}
        if not problems:
            return None
        worst = max(problems.values(), key=lambda e: e.exit_code)
        listed = "; ".join(f"{name}: {exc}" for name, exc in problems.items())
        return from_event({"class": type(worst).__name__, "code": worst.exit_code, "message": f"{self.line()}: {listed}"})


class TreeProgress:
    """One progress display for a whole tree: the sending sides' bytes and size estimates of every dataset summed
    (the ETA counts the transfers begun so far), and the datasets in flight as its description."""

    def __init__(self, events: EventSink) -> None:
        self._events = events
        self._lock = threading.Lock()
        self._done = 0  # bytes of the transfers that have ended
        self._current: dict[str, int] = {}  # dataset -> bytes of its transfer in flight
        self._estimated = 0

    def sink(self, dataset: str) -> EventSink:
        def tagged(event: str, **fields: Any) -> None:
            with self._lock:
                sending = fields.get("side") == "sending"
                if event == "progress" and sending and isinstance(fields.get("bytes"), int):
                    self._current[dataset] = fields["bytes"]
                    total = self._done + sum(self._current.values())
                    self._events("progress", bytes=total, datasets=sorted(self._current), side="sending")
                    return
                if event == "stream" and sending:
                    self._estimated += int(fields.get("estimate") or 0)
                    flying = sorted({*self._current, dataset})
                    self._events(
                        "stream", **{**fields, "dataset": dataset, "toname": ", ".join(flying), "estimate": self._estimated or None}
                    )
                    return
                if event in ("plan", "retry", "dataset"):
                    # A transfer ended (or is tried again): its bytes so far count as done.
                    self._done += self._current.pop(dataset, 0)
            self._events(event, **{"dataset": dataset, **fields})

        return tagged


class TreeSync:
    """The datasets at and below `source` into the same places below `target`; --jobs of them at a time, a level at a time."""

    def __init__(self, source: Side, target: Side, options: SyncOptions, events: EventSink, *, exclude: list[str], jobs: int = 1) -> None:
        self.source = source
        self.target = target
        self.options = options
        self.events = events
        self.exclude = [re.compile(pattern) for pattern in exclude]
        self.jobs = max(1, jobs)
        self._lock = threading.Lock()
        self.result = TreeResult()
        self.stats = self.result.stats
        self.progress = TreeProgress(events)
        self._statuses: dict[str, dict[str, Any]] = {}
        self._target_statuses: dict[str, dict[str, Any]] = {}

    def _wanted(self, name: str) -> bool:
        return not any(pattern.search(name) for pattern in self.exclude)

    def _target_of(self, name: str) -> str:
        return self.target.endpoint.dataset + name[len(self.source.endpoint.dataset) :]

    def datasets(self) -> tuple[list[str], list[str]]:
        """The source datasets to sync, parents first, and the destination's that the source no longer has.

        The statuses both ends answered with (one call each) are kept for each dataset's first planning.
        """
        self._statuses = {side.endpoint.dataset: status for side, status in self.source.tree()}
        sources = list(self._statuses)
        if not sources:
            raise Refused(f"{self.source.endpoint} does not exist")
        wanted = [name for name in sources if self._wanted(name)]
        mapped = {self._target_of(name) for name in sources}
        # The destination's datasets, and in the same call the status of every place the source's map to.
        targets = {side.endpoint.dataset: status for side, status in self.target.tree(also=tuple(sorted(mapped)))}
        self._target_statuses = targets
        gone = [name for name, status in targets.items() if name not in mapped and status.get("exists", True)]
        return wanted, [name for name in gone if self._wanted(name)]

    def plan(self) -> list[str]:
        wanted, gone = self.datasets()
        lines = []
        for name in wanted:
            sync = self._sync(name, replace(self.options, take_snapshot=False))
            lines += [f"{name}: {line}" for line in sync.plan()]
        return lines + [f"{name}: gone from the source; kept" for name in gone]

    def _sync(self, name: str, options: SyncOptions) -> Sync:
        target = self._target_of(name)
        sync = Sync(self.source.child(name), self.target.child(target), options, self.progress.sink(name))
        # A dataset's first plan comes from the tree's statuses: two calls fewer (one over ssh) per dataset.
        if name in self._statuses and target in self._target_statuses:
            sync.known_statuses = (self._statuses.pop(name), self._target_statuses.pop(target))
        return sync

    def lag(self) -> float | None:
        return self.result.lag

    def run(self) -> str:
        """Every dataset tried; the summary, or the error naming each dataset not done."""
        result = self.result
        if self.options.take_snapshot:
            # One recursive snapshot: every dataset of the tree at the same moment.
            self._sync(self.source.endpoint.dataset, self.options).take_snapshot(recursive=True)
        wanted, result.gone = self.datasets()
        if len(wanted) > 1:
            # Each dataset's stream then finds its snapferry processes started during the one before.
            self.source.keep_warm()
            self.target.keep_warm()
        for name in result.gone:
            self.events("warning", message=f"{name} is on the destination but no longer on the source; it is kept")
        options = replace(self.options, take_snapshot=False)
        levels: dict[int, list[str]] = {}
        for name in wanted:
            levels.setdefault(name.count("/"), []).append(name)
        # A parent's file system changes whenever a child's mountpoint is made in it: its receives discard
        # such changes (never its snapshots: a diverged parent is still refused).
        parents = {name.rpartition("/")[0] for name in wanted}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for depth in sorted(levels):
                jobs = [(name, replace(options, discard_changes=name in parents)) for name in levels[depth]]
                list(pool.map(lambda job: self._one(job[0], job[1], result), jobs))
        error = result.error()
        if error is not None:
            raise error
        return result.line()

    def _one(self, name: str, options: SyncOptions, result: TreeResult) -> None:
        sync = self._sync(name, options)
        error: SnapferryError | None = None
        try:
            sync.run()
        except SnapferryError as exc:
            error = exc
        outcome = "done" if error is None else "refused" if isinstance(error, Refused) else "failed"
        with self._lock:
            if error is None:
                result.done.append(name)
            else:
                (result.refused if isinstance(error, Refused) else result.failed)[name] = error
            for key in ("received_bytes", "resumes", "retries"):
                setattr(result.stats, key, getattr(result.stats, key) + getattr(sync.stats, key))
            lag = sync.lag()
            if lag is not None:
                result.lag = max(lag, result.lag or 0.0)
        self.progress.sink(name)("dataset", outcome=outcome, **({"reason": str(error)} if error is not None else {}))
