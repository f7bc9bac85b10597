"""The Prometheus textfile a sync run leaves behind (`sync --metrics-file`), for node_exporter's textfile collector."""

from __future__ import annotations

import contextlib
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

_LABELS = ("source", "target")
# Counters go on from the previous run's file: each run adds what it did.
_COUNTERS = {
    "snapferry_sync_received_bytes": "Stream bytes of the transfers that completed, over every run",
    "snapferry_sync_resumes": "Interrupted transfers continued from a checkpoint, over every run",
    "snapferry_sync_retries": "Attempts retried after an interruption, over every run",
    "snapferry_sync_runs": "Sync runs",
    "snapferry_sync_failures": "Sync runs that ended with a non-zero exit code",
}


def _previous(path: Path) -> dict[str, float]:
    """The samples of the file the previous run wrote (none if there is none, or it is not a metrics file)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    values: dict[str, float] = {}
    with contextlib.suppress(ValueError):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = sample.value
    return values


def write_metrics(
    path: Path,
    *,
    source: str,
    target: str,
    started: float,
    duration: float,
    exit_code: int,
    received_bytes: int,
    resumes: int,
    retries: int,
    lag: float | None,
) -> None:
    """Write the run's metrics to `path` atomically (a temporary file renamed over it)."""
    before = _previous(path)
    disable_created_metrics()  # type: ignore[no-untyped-call]  # a textfile holds one run's view; counters' creation times would only be noise
    registry = CollectorRegistry()
    labels = {"source": source, "target": target}

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, _LABELS, registry=registry).labels(**labels).set(value)

    gauge("snapferry_sync_last_run_timestamp_seconds", "When the last sync run started", started)
    gauge("snapferry_sync_duration_seconds", "How long the last sync run took", duration)
    gauge("snapferry_sync_exit_code", "The last sync run's exit code (0: up to date)", exit_code)
    last_success = started if exit_code == 0 else before.get("snapferry_sync_last_success_timestamp_seconds")
    if last_success is not None:
        gauge("snapferry_sync_last_success_timestamp_seconds", "When the last successful sync run started", last_success)
    if lag is not None:
        gauge("snapferry_replication_lag_seconds", "Age of the newest snapshot both ends have, after the last run", lag)
    done = {
        "snapferry_sync_received_bytes": received_bytes,
        "snapferry_sync_resumes": resumes,
        "snapferry_sync_retries": retries,
        "snapferry_sync_runs": 1,
        "snapferry_sync_failures": int(exit_code != 0),
    }
    for name, doc in _COUNTERS.items():
        counter = Counter(name, doc, _LABELS, registry=registry).labels(**labels)
        counter.inc(before.get(f"{name}_total", 0.0) + done[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
