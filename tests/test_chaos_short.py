"""The chaos runner's short CI run (every fault kind of every scenario, a fixed seed, nothing lost), and the bugs it found."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from snapferry.btrfs.plan import BtrfsStep
from snapferry.btrfs.resume.checkpoints import transfer_lock
from snapferry.cli.progress import Reporter
from snapferry.core.events import ignore_events
from snapferry.core.lock import dataset_lock
from snapferry.errors import Locked, Refused, TransferInterrupted, as_event
from snapferry.sync.driver import SteppedSync, SyncOptions, run_pipe

ROOT = Path(__file__).resolve().parent.parent
SEED = 7
# bench/chaos.py --cover-kinds: iteration i starts with the i-th (scenario, fault kind) of its
# catalogue: 6 local kinds, 10 sync kinds, 5 btrfs kinds, then 8 btrfs sync kinds; small data sets
# keep the whole run near 5 minutes.
ITERATIONS = 29
MAX_MIB = 6


@pytest.mark.timeout(600)
def test_short_chaos_run_loses_nothing_and_covers_every_fault(zfs_daemon: None, tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    argv = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--seed", str(SEED), "--iterations", str(ITERATIONS)]
    argv += ["--cover-kinds", "--max-mib", str(MAX_MIB), "--json", str(report)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=560, check=False, stdin=subprocess.DEVNULL)
    tail = f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert report.exists(), tail
    summary = json.loads(report.read_text())["summary"]

    assert summary["iterations"] == ITERATIONS, tail
    assert (summary["lost"], summary["corrupted"], summary["leftover"]) == (0, 0, 0), tail
    assert summary["failures"] == [], tail
    assert proc.returncode == 0, tail
    never = [f"{scenario}:{kind}" for scenario, kinds in summary["faults"].items() for kind, count in kinds.items() if count == 0]
    assert never == [], f"fault kinds that never fired: {never}\n{tail}"
    # snapdestroy in each scenario: a resume refused with exit 4 "stale token", then receive -A.
    assert summary["correct_refusals"] >= 4, tail
    assert summary["resumes"] > 0 and summary["sync_retries"] > 0, tail


# -- regressions found by bench/chaos.py ----------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", [451, 472])
def test_quota_that_only_stops_the_mount_is_not_a_failed_piece(zfs_daemon: None, tmp_path: Path, index: int) -> None:
    """chaos --seed 2026 --only 451 / 472: a quota on the destination's parent let the first piece of a full
    transfer in but kept `zfs receive` from making its mountpoint ("cannot mount ...: failed to create
    mountpoint", exit 1 after receiving). snapferry took the piece as failed: exit 6 (451), and through sync
    a dataset with no snapshot that the next run refused as diverged (472). Replayed exactly."""
    report = tmp_path / "replay.json"
    argv = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--seed", "2026", "--only", str(index)]
    argv += ["--scenarios", "local,sync", "--max-mib", "6", "--json", str(report)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280, check=False, stdin=subprocess.DEVNULL)
    summary = json.loads(report.read_text())["summary"]
    assert summary["faults"]["local" if index == 451 else "sync"]["quota"] >= 1, proc.stderr[-3000:]
    assert summary["failures"] == [] and proc.returncode == 0, proc.stderr[-3000:]


def _writes(size: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.stdout.buffer.write(bytes({size}))"]


def _reads_then_fails(message: str, code: int) -> list[str]:
    script = f"import sys; sys.stdin.buffer.read(); print({message!r}, file=sys.stderr); sys.exit({code})"
    return [sys.executable, "-c", script]


def _refusal_while_locked(lock: Callable[[], AbstractContextManager[None]]) -> str:
    """What a second taker of the lock is told, as the far end prints it with --json: its error event, then its line."""
    with lock(), pytest.raises(Locked) as refused, lock():
        pass
    return f"{json.dumps({'event': 'error', **as_event(refused.value)})}\nsnapferry: {refused.value}"


def test_sync_backs_off_while_the_receive_of_a_stalled_attempt_still_holds_the_lock(tmp_path: Path) -> None:
    """chaos --seed 2026 --only 7 --max-mib 6: the link stalled for 7.7 s, ssh gave up after 3 s,
    sync retried, and the receive of the stalled attempt, still alive at the far end, held the
    destination's lock: the whole sync ended with exit 4 instead of retrying once it was gone.
    The same for btrfs (chaos --seed 2026 --only 5 --scenarios btrfs_sync --max-mib 8): its
    transfer lock said it in other words, which sync took for a refusal. Now the far end names the
    error's class (Locked) in its `error` event, and sync reads no message text."""
    zfs_locked = _refusal_while_locked(lambda: dataset_lock("tank/fs", "receive"))
    btrfs_locked = _refusal_while_locked(lambda: transfer_lock(tmp_path, "snap1"))
    for locked, what in ((zfs_locked, "tank/fs"), (btrfs_locked, "snap1")):
        with pytest.raises(TransferInterrupted, match=f"another snapferry process is working on {what}"):
            run_pipe(_writes(4096), _reads_then_fails(locked, 4))


class _ScriptedSync(SteppedSync[BtrfsStep]):
    """sync's driver over a script of plans (what the destination says is next) whose first run is refused."""

    def __init__(self, plans: list[BtrfsStep | None], *, moves_on: bool) -> None:  # no ends to reach: no super()
        self.options = SyncOptions(retries=3)
        self.events = ignore_events
        self.plans = plans
        self.moves_on = moves_on
        self.ran: list[BtrfsStep] = []

    def _next(self) -> BtrfsStep | None:
        return self.plans[0]

    def _run(self, step: BtrfsStep) -> None:
        if not self.ran and step.token == "sf1b-early":
            if self.moves_on:
                self.plans.pop(0)  # meanwhile the abandoned attempt's receive committed one more checkpoint
            raise Refused("stale token: the unfinished transfer of s1 has moved past this token")
        self.ran.append(step)
        self.plans.pop(0)


def test_sync_plans_again_when_a_refusal_came_from_a_destination_that_moved_on() -> None:
    """chaos --seed 2026 --only 5 --scenarios btrfs_sync --max-mib 8 (after bug 8's fix): the stalled
    attempt's receive committed one more checkpoint before it died, so the token the retry had fetched
    was behind and the receive refused it; sync ended with exit 4 instead of planning again."""
    behind, fresh = BtrfsStep("s1", token="sf1b-early"), BtrfsStep("s1", token="sf1b-late")
    moved_on = _ScriptedSync([behind, fresh, None], moves_on=True)
    assert moved_on.run() == "done in 1 step(s), 2 attempt(s)"
    assert moved_on.ran == [fresh]
    # A refusal that planning again does not change still ends the sync.
    stuck = _ScriptedSync([behind, None], moves_on=False)
    with pytest.raises(Refused, match="moved past this token"):
        stuck.run()
    assert stuck.ran == []


def test_json_events_throttle_the_skips_of_a_resume(capsys: pytest.CaptureFixture[str]) -> None:
    """send -t --json printed one `skip` line per record of the committed prefix (seen in every
    chaos resume through sync: hundreds of lines for 2 MiB, millions for a resume deep into a big stream)."""
    total = 5000 * 312
    with Reporter("json") as events:
        for record in range(1, 5001):
            events("skip", bytes=record * 312, total=total)
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 3, len(lines)
    assert json.loads(lines[-1])["bytes"] == total


def test_json_events_from_two_threads_are_whole_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """sync relays both ends' events from two threads; once two events shared a line (found by CI on a btrfs sync)."""
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so that an unguarded write interleaves
    with Reporter("json") as events:

        def emit(side: str) -> None:
            for n in range(2000):
                events("stream", side=side, n=n, toname="x" * 200)

        threads = [threading.Thread(target=emit, args=(side,)) for side in ("sending", "receiving")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    sys.setswitchinterval(interval)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4000
    assert all(json.loads(line)["event"] == "stream" for line in lines)
