"""sync holds what it sends until the destination has it: a pruner cannot make the token stale; holds go when done."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time

import pytest

from snapferry.errors import UsageError
from snapferry.interface import SyncPolicy, Transfer
from snapferry.zfs.plan import ZfsSyncPlanner
from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.sshd_server import SshServer
from tests.test_serve import restricted_key

TAG = "snapferry:dst/fs"


def _status(name: str, snaps: list[tuple[str, int]], token: str | None = None) -> dict[str, object]:
    return {
        "backend": "zfs",
        "target": name,
        "exists": bool(snaps),
        "snapshots": [{"name": f"{name}@{s}", "guid": g, "createtxg": g} for s, g in snaps],
        "token": token,
        "unfinished_pieces": False,
        "native_resume": False,
        "can_send_resume": False,
    }


SRC = _status("src/fs", [("a", 1), ("b", 2), ("c", 3)])


@pytest.mark.parametrize(
    ("target", "held"),
    [
        (_status("dst/fs", []), ("src/fs@a",)),  # full send of the oldest
        (_status("dst/fs", [("a", 1)]), ("src/fs@a", "src/fs@b", "src/fs@c")),  # -I a..c: every snapshot it sends
    ],
)
def test_a_transfer_holds_what_it_reads_and_releases_it_after(target: dict[str, object], held: tuple[str, ...]) -> None:
    step = ZfsSyncPlanner(SyncPolicy(hold_tag=TAG), "src/fs", "dst/fs").next_step(SRC, target)
    assert isinstance(step, Transfer)
    assert [a.args for a in step.before] == [("hold", TAG, *held)] and all(a.on_source for a in step.before)
    assert [a.args for a in step.after] == [("release", TAG, *held)]
    unheld = ZfsSyncPlanner(SyncPolicy(hold_tag=None), "src/fs", "dst/fs").next_step(SRC, target)
    assert isinstance(unheld, Transfer) and not unheld.before and not unheld.after


def test_up_to_date_releases_leftover_holds() -> None:
    source = _status("src/fs", [("a", 1), ("b", 2)])
    source["snapshots"][0]["userrefs"] = 1  # type: ignore[index]
    actions = ZfsSyncPlanner(SyncPolicy(hold_tag=TAG), "src/fs", "dst/fs").tidy(source, _status("dst/fs", [("a", 1), ("b", 2)]))
    assert [a.args for a in actions] == [("release", TAG, "src/fs@a")]


def _userrefs(snapshot: str) -> int:
    return int(tb.sh("zfs", "get", "-H", "-p", "-o", "value", "userrefs", snapshot).stdout.decode().strip())


def _sync(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [*tb.SNAPFERRY, "sync", "-q", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)


def _interrupted_sync(src: str, dst: str) -> None:
    """A slow sync killed (with everything it started, as a reboot does) once two checkpoints are committed."""
    argv = [*tb.SNAPFERRY, "sync", "-q", "--checkpoint", "1M", "--bwlimit", "2M", src, dst]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(tb.piece_names(dst) if tb.exists(dst) else []) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoints"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_pruner_cannot_destroy_what_an_interrupted_sync_sends(bed: tb.Bed) -> None:
    src = bed.dataset("pruned")
    tb.sh("zfs", "create", src)
    tb.write_tree(tb.mountpoint(src), seed=21, megabytes=2)
    tb.snapshot(f"{src}@a")
    dst = bed.target("pruned")
    assert _sync(src, dst).returncode == 0
    tb.write_tree(tb.mountpoint(src) / "more", seed=22, megabytes=8)
    tb.snapshot(f"{src}@b")
    tb.snapshot(f"{src}@c")
    _interrupted_sync(src, dst)  # -I a..c, cut inside b

    # The pruner (sanoid, cron) runs now: what the transfer needs is held, the rest goes.
    for snap in ("a", "b", "c"):
        pruned = tb.sh("zfs", "destroy", f"{src}@{snap}", check=False)
        assert pruned.returncode != 0 and "dataset is busy" in pruned.stderr.decode(), snap
    listed = tb.snapferry("holds", src)
    assert listed.returncode == 0 and listed.stdout.decode().count(f"{src}@") == 3, listed.stdout

    done = _sync(src, dst)
    assert done.returncode == 0, done.stderr  # resumed: no stale token
    assert tb.snapshot_names(dst) == ["a", "b", "c"] and tb.guid(f"{dst}@c") == tb.guid(f"{src}@c")
    assert [_userrefs(f"{src}@{s}") for s in ("a", "b", "c")] == [0, 0, 0]
    assert tb.snapferry("holds", src).stdout == b""


def test_holds_of_an_aborted_transfer_go_with_the_next_run_or_by_hand(bed: tb.Bed) -> None:
    src = bed.dataset("aborted")
    tb.sh("zfs", "create", src)
    tb.write_tree(tb.mountpoint(src), seed=31, megabytes=8)
    tb.snapshot(f"{src}@a")
    dst = bed.target("aborted")
    _interrupted_sync(src, dst)
    assert _userrefs(f"{src}@a") == 1
    assert tb.snapferry("receive", "-A", dst).returncode == 0  # given up on the destination
    by_hand = tb.snapferry("holds", "--release", "--tag", f"snapferry:{dst}", src)
    assert by_hand.returncode == 0 and by_hand.stdout.decode() == f"released snapferry:{dst} from {src}@a\n"
    assert _userrefs(f"{src}@a") == 0
    refused = tb.snapferry("release", "keep", f"{src}@a")
    assert refused.returncode == 2 and "snapferry only places and removes its own holds" in refused.stderr

    _interrupted_sync(src, dst)
    assert tb.snapferry("receive", "-A", dst).returncode == 0
    assert _sync(src, dst).returncode == 0  # starts again, and leaves no hold behind
    assert _userrefs(f"{src}@a") == 0


def test_a_read_only_key_on_the_source_places_and_releases_the_holds(bed: tb.Bed, sshd_server: SshServer) -> None:
    src = bed.dataset("served_holds")
    tb.sh("zfs", "create", src)
    tb.write_tree(tb.mountpoint(src), seed=41, megabytes=2)
    tb.snapshot(f"{src}@a")
    key = restricted_key(sshd_server, "source_reader", f"--allow {src} --read-only")
    dst = bed.target("served_holds")
    pulled = _sync("--ssh", key, "--remote-snapferry", "snapferry", f"root@127.0.0.1:{src}", dst)
    assert pulled.returncode == 0, pulled.stderr
    assert tb.guid(f"{dst}@a") == tb.guid(f"{src}@a") and _userrefs(f"{src}@a") == 0
    argv = [*shlex.split(key), "root@127.0.0.1", f"snapferry release keep {src}@a"]
    shell = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert shell.returncode != 0 and "snapferry only places and removes its own holds" in shell.stderr


def test_encrypted_datasets_are_sent_raw_and_send_flags_reach_zfs_send() -> None:
    """-w for an encrypted dataset, so the key never needs loading on the destination; --send-flags for every new stream."""
    source = {**SRC, "encrypted": True, "can_send_resume": True}
    new = ZfsSyncPlanner(SyncPolicy(send_flags=("-L", "-c")), "src/fs", "dst/fs").next_step(source, _status("dst/fs", []))
    assert isinstance(new, Transfer) and new.send_args == ("-L", "-c", "-w", "src/fs@a")
    raw_replica = {**_status("dst/fs", [("a", 1)]), "encrypted": True}
    incremental = ZfsSyncPlanner(SyncPolicy(), "src/fs", "dst/fs").next_step(source, raw_replica)
    assert isinstance(incremental, Transfer) and incremental.send_args == ("-w", "-I", "src/fs@a", "src/fs@c")
    # A replica an older snapferry received decrypted stays so: a raw incremental could not apply to it.
    decrypted = ZfsSyncPlanner(SyncPolicy(), "src/fs", "dst/fs").next_step(source, _status("dst/fs", [("a", 1)]))
    assert isinstance(decrypted, Transfer) and decrypted.send_args == ("-I", "src/fs@a", "src/fs@c")
    with pytest.raises(UsageError, match="has no -L, -e, -c or -w, and no encryption"):
        ZfsSyncPlanner(SyncPolicy(send_flags=("-w",)), "src/fs", "dst/fs").next_step(SRC, _status("dst/fs", []))


def test_zfs_fuse_says_it_has_no_send_flags(bed: tb.Bed) -> None:
    src = bed.dataset("flags")
    tb.sh("zfs", "create", src)
    tb.snapshot(f"{src}@a")
    refused = _sync("--send-flags", "-L -c", src, bed.target("flags"))
    assert refused.returncode == 2 and "has no -L, -e, -c or -w, and no encryption" in refused.stderr
    assert not tb.exists(bed.target("flags"))
    assert _sync("--send-flags", "-x", src, bed.target("flags")).returncode == 2


def _prefixed(dataset: str) -> list[str]:
    return [name for name in tb.snapshot_names(dataset) if name.startswith("snapferry_")]


def test_retention_keeps_the_newest_of_syncs_own_snapshots_and_never_a_held_or_foreign_one(bed: tb.Bed) -> None:
    src = bed.dataset("kept")
    tb.sh("zfs", "create", src)
    tb.write_tree(tb.mountpoint(src), seed=51, megabytes=1)
    tb.snapshot(f"{src}@manual")  # not sync's: never pruned
    dst = bed.target("kept")
    args = ["--snapshot", "--keep-source", "2", "--keep-dest", "3", src, dst]
    assert _sync(*args).returncode == 0
    first = _prefixed(src)[0]
    tb.sh("zfs", "hold", "keep", f"{src}@{first}")  # someone else's hold: that one stays on the source
    try:
        for n in range(3):
            time.sleep(1.1)  # sync's snapshot names have a resolution of one second
            tb.write_tree(tb.mountpoint(src) / f"more{n}", seed=60 + n, megabytes=1)
            done = _sync(*args)
            assert done.returncode == 0, done.stderr
        on_source, on_target = _prefixed(src), _prefixed(dst)
        assert len(on_target) == 3 and on_target == sorted(on_target)
        assert on_source == [first, *on_target[-2:]]  # the newest 2, and the held one
        assert "manual" in tb.snapshot_names(src) and "manual" in tb.snapshot_names(dst)
        assert tb.guid(f"{dst}@{on_target[-1]}") == tb.guid(f"{src}@{on_target[-1]}")  # the newest common one is kept on both
    finally:
        tb.sh("zfs", "release", "keep", f"{src}@{first}")
    assert _sync("--keep-dest", "0", src, dst).returncode == 2
    refused = tb.snapferry("prune", "--prefix", "", "--keep", "1", src)
    assert refused.returncode == 2 and "only prunes names with a prefix" in refused.stderr


def test_on_stale_restart_gives_up_what_the_source_cannot_continue_and_says_what_it_costs(bed: tb.Bed) -> None:
    src = bed.dataset("stale")
    tb.sh("zfs", "create", src)
    tb.write_tree(tb.mountpoint(src), seed=71, megabytes=8)
    tb.snapshot(f"{src}@a")
    dst = bed.target("stale")
    argv = [*tb.SNAPFERRY, "sync", "-q", "--no-hold", "--checkpoint", "1M", "--bwlimit", "2M", src, dst]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(tb.piece_names(dst) if tb.exists(dst) else []) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoints"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    tb.sh("zfs", "destroy", f"{src}@a")  # unheld (--no-hold): the pruner wins
    tb.snapshot(f"{src}@b")

    committed = json.loads(tb.snapferry("token", "--decode", tb.token(dst)).stdout)["offset"]
    refused = _sync(src, dst)
    assert refused.returncode == 4 and "stale token" in refused.stderr, refused.stderr
    restarted = subprocess.run(
        [*tb.SNAPFERRY, "sync", "--on-stale", "restart", src, dst], capture_output=True, text=True, timeout=300, check=False
    )
    assert restarted.returncode == 0, restarted.stderr
    warning = [line for line in restarted.stderr.splitlines() if "--on-stale restart:" in line]
    assert len(warning) == 1 and f"abort the unfinished transfer into {dst}, throwing away " in warning[0], restarted.stderr
    assert f"throwing away {committed} committed bytes, and send again" in warning[0]
    assert tb.snapshot_names(dst) == ["b"] and tb.guid(f"{dst}@b") == tb.guid(f"{src}@b")
