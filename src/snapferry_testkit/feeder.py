"""What the chaos runners share: a receiver fed from memory on a thread, and the loop of faults and resumes."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

Feed = TypeVar("Feed")
EXTRA_ATTEMPTS = 5


class Faulted(Protocol):
    faults: list[dict[str, Any]]
    terminal: bool
    lost: bool
    problems: list[str]


CHUNK = 256 * 1024


class Feeder:
    """`argv` started with `data` written to its stdin on a thread, stdin left open until finish()."""

    def __init__(self, argv: list[str], data: bytes) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.written = 0
        self._thread = threading.Thread(target=self._write, args=(data,), daemon=True)
        self._thread.start()

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            for start in range(0, len(data), CHUNK):
                chunk = data[start : start + CHUNK]
                self.proc.stdin.write(chunk)
                self.proc.stdin.flush()
                self.written += len(chunk)
        except (BrokenPipeError, OSError, ValueError):
            pass

    def wait_for(self, condition: Callable[[], bool], seconds: float = 5) -> None:
        """Until condition() holds, the receiver exits, or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None and not condition():
            time.sleep(0.1)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Close stdin and wait: exit code and stderr (-999 when it hung and was killed)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._thread.join(5)
            return -999, "receiver hung; killed"
        self._thread.join(5)
        return self.proc.returncode, self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""


def faults_then_resumes(
    it: Faulted,
    first: Feed,
    attempt: Callable[[Feed, dict[str, Any] | None], int],
    next_feed: Callable[[], Feed],
    log: Callable[[str], None],
) -> bool:
    """Each fault on its own attempt (the first on `first`, the others on a resume), then plain resumes.

    True when the transfer ended with exit 0; False when a refusal ended the iteration (it.terminal) or
    it was not done after EXTRA_ATTEMPTS more (then it.lost is set).
    """
    feed, rc = first, None
    for number, fault in enumerate(it.faults):
        if number:
            feed = next_feed()
        rc = attempt(feed, fault)
        log(f"  fault {fault['kind']} at {fault['offset']}/{fault['of']}: exit {rc}")
        if rc == 0 or it.terminal:
            break
    if it.terminal:
        return False
    extra = 0
    while rc != 0 and extra < EXTRA_ATTEMPTS:
        extra += 1
        rc = attempt(next_feed(), None)
        log(f"  resume {extra}: exit {rc}")
    if rc != 0:
        it.lost = True
        it.problems.append(f"not done after {EXTRA_ATTEMPTS} extra attempts (last exit {rc})")
    return rc == 0
