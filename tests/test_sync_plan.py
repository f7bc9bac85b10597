"""The pure sync planner: which step comes next, and when a destination has diverged."""

from __future__ import annotations

import pytest

from snapferry.errors import Refused
from snapferry.sync.driver import SyncOptions
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.engine.command import Snapshot
from snapferry.zfs.plan import Rollback, Step, next_step


def snaps(dataset: str, spec: str) -> list[Snapshot]:
    """'a:1 b:2' -> snapshots @a (guid 1) and @b (guid 2), oldest first."""
    return [Snapshot(f"{dataset}@{name}", int(guid), txg) for txg, (name, guid) in enumerate(p.split(":") for p in spec.split())]


SRC = snaps("src/fs", "a:1 b:2 c:3")


def test_missing_destination_gets_the_oldest_then_the_rest() -> None:
    assert next_step(SRC, None, None, no_stream=False, force=False) == Step(snapshot="src/fs@a")
    assert next_step(SRC, None, None, no_stream=True, force=False) == Step(snapshot="src/fs@c")


def test_incremental_from_the_newest_common_snapshot() -> None:
    step = next_step(SRC, snaps("dst/fs", "a:1"), None, no_stream=False, force=False)
    assert step == Step(snapshot="src/fs@c", base="src/fs@a", intermediates=True)
    assert next_step(SRC, snaps("dst/fs", "a:1 b:2"), None, no_stream=True, force=False) == Step(
        snapshot="src/fs@c", base="src/fs@b", intermediates=False
    )


def test_up_to_date() -> None:
    assert next_step(SRC, snaps("dst/fs", "a:1 b:2 c:3"), None, no_stream=False, force=False) is None


def test_an_interrupted_transfer_is_resumed_first() -> None:
    token = ResumeToken("dst/fs", 3, 2, 99, 4, 5000, 312, "0" * 16)
    assert next_step(SRC, snaps("dst/fs", "a:1"), token, no_stream=False, force=False) == Step(token=token)


@pytest.mark.parametrize("target", ["x:9", "a:1 x:9", ""])
def test_diverged_destination_is_refused(target: str) -> None:
    with pytest.raises(Refused, match="diverged"):
        next_step(SRC, snaps("dst/fs", target), None, no_stream=False, force=False)


def test_force_rolls_back_to_the_common_snapshot() -> None:
    assert next_step(SRC, snaps("dst/fs", "a:1 x:9"), None, no_stream=False, force=True) == Rollback("dst/fs@a")


def test_checkpoint_snapshots_are_not_snapshots_of_the_dataset() -> None:
    dst = snaps("dst/fs", "a:1") + [Snapshot(f"dst/fs@snapferry-{3:016x}-{1:016x}-0-1000-138-{0:016x}", 77, 9)]
    assert next_step(SRC, dst, None, no_stream=False, force=False) == Step(snapshot="src/fs@c", base="src/fs@a", intermediates=True)


def test_only_an_unnamed_first_piece_means_start_again() -> None:
    # The daemon died after zfs receive committed the first piece of a full stream, before its rename.
    dst = [Snapshot(f"dst/fs@snapferry-{1:016x}-{0:016x}-0-open", 77, 9)]
    assert next_step(SRC, dst, None, no_stream=False, force=False) == Step(snapshot="src/fs@a")


def test_empty_source_is_refused() -> None:
    with pytest.raises(Refused, match="no snapshot"):
        next_step([], None, None, no_stream=False, force=False)


def test_dry_run_plan_lists_every_step() -> None:
    from snapferry.zfs.plan import plan_all

    token = ResumeToken("dst/fs", 2, 1, 99, 4, 5000, 312, "0" * 16)
    steps = plan_all(SRC, snaps("dst/fs", "a:1"), token, no_stream=False, force=False)
    assert [s.describe() for s in steps] == [
        "resume the interrupted transfer at byte 5000",
        "incremental src/fs@b -> src/fs@c with every snapshot between",
    ]
    assert [s.describe() for s in plan_all(SRC, None, None, no_stream=False, force=False)] == [
        "full send of src/fs@a",
        "incremental src/fs@a -> src/fs@c with every snapshot between",
    ]
    assert plan_all(SRC, snaps("dst/fs", "a:1 b:2 c:3"), None, no_stream=False, force=False) == []
    rollback = plan_all(SRC, snaps("dst/fs", "a:1 x:9"), None, no_stream=True, force=True)
    assert [s.describe() for s in rollback] == [
        "roll the destination back to dst/fs@a (--force)",
        "incremental src/fs@a -> src/fs@c",
    ]


def test_the_sending_side_reports_progress_only_when_the_sync_shows_it() -> None:
    """A quiet sync (cron) spares the sending side its events and the size estimate behind the ETA
    (-q); it still reports a failure as an `error` event (--json)."""
    assert SyncOptions(compress="zstd:3").wire() == ["--json", "--compress", "zstd:3"]
    assert SyncOptions(compress="zstd:3", progress=False).wire() == ["--json", "-q", "--compress", "zstd:3"]
