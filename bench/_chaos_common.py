"""What every chaos scenario shares: the iteration record, running snapferry, and the log."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapferry_testkit import zfs_testbed as tb

MiB = 1 << 20
TIMEOUT = 300


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Iteration:
    seed: int
    index: int
    scenario: str = "local"
    mode: str = ""
    megabytes: int = 0
    data_seed: int = 0
    checkpoint: str = ""
    compress: str = ""
    bwlimit: str = ""
    faults: list[dict[str, object]] = field(default_factory=list)
    attempts: list[dict[str, object]] = field(default_factory=list)
    resumes: int = 0
    whole_resends: int = 0
    retries: int = 0
    sync_runs: int = 0
    stream_bytes: int = 0
    bytes_fed: int = 0
    refusals: int = 0
    terminal: bool = False
    ok: bool = False
    lost: bool = False
    corrupted: bool = False
    leftover: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing lost, corrupted or left over, and no other problem noted."""
        return not (self.lost or self.corrupted or self.leftover or self.problems)

    @property
    def ratio(self) -> float:
        return self.bytes_fed / self.stream_bytes if self.stream_bytes else 0.0


def run_sf(*args: str | Path, data: bytes | None = None) -> tb.Result:
    proc = subprocess.run([*tb.SNAPFERRY, *map(str, args)], input=data, capture_output=True, check=False, timeout=TIMEOUT)
    return tb.Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("{")]
    return lines[-1][:300] if lines else ""


def size_bytes(text: str) -> int:
    return int(text.rstrip("M")) * MiB


def record_attempt(it: Iteration, record: dict[str, object], fault: dict[str, Any], rc: int, fed: int, stderr: str) -> None:
    """A faulted attempt's outcome, in the iteration's report."""
    it.bytes_fed += fed
    record.update(rc=rc, fed=fed, stderr=last_line(stderr))
    fault["rc"] = rc
    it.attempts.append(record)
