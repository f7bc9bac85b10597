"""System-level fuzzing: mutated real streams fed to `snapferry receive -s` into a target that already holds
snapshots. Every run must end in a one-line error (or a receive), and the snapshots that were there stay untouched.

SNAPFERRY_RECEIVE_FUZZ=N runs N mutants per file system instead of the CI's few dozen (docs/FUZZING.md).
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuzz.btrfs_targets import recrc

from snapferry.btrfs.resume.checkpoints import STATE_DIR
from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.btrfs_testbed import describe, mkfs, require_btrfs, run, snapshot_pair

MUTANTS = int(os.environ.get("SNAPFERRY_RECEIVE_FUZZ", "0"))
EXIT_CODES = {0, 3, 4, 5, 6}


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """One to four kinds of damage: bit flips, a cut, a chunk duplicated, dropped or taken from another stream."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out)) if out else 0
        if op <= 1 and out:
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 2:
            del out[pos:]
        elif op == 3:
            out[pos:pos] = out[pos : pos + rng.randint(1, 4096)]
        elif op == 4:
            del out[pos : pos + rng.randint(1, 4096)]
        else:
            other = rng.choice(others)
            start = rng.randrange(len(other))
            out[pos:pos] = other[start : start + rng.randint(1, 4096)]
    return bytes(out)


def receive(target: str | Path, data: bytes) -> subprocess.CompletedProcess[str]:
    argv = [*tb.SNAPFERRY, "receive", "-s", "--checkpoint", "1M", str(target)]
    done = subprocess.run(argv, input=data, capture_output=True, timeout=120, check=False)
    return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


def check_outcome(done: subprocess.CompletedProcess[str], what: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode in EXIT_CODES, f"{what}: exit {done.returncode}: {done.stderr}"
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, f"{what}: {done.stderr}"
    if done.returncode:
        assert len(lines) == 1 and lines[0].startswith("snapferry: "), f"{what}: not one line: {done.stderr!r}"


# --- btrfs ----------------------------------------------------------------------------------------


@dataclass
class BtrfsBed:
    root: Path  # receive root holding s1 (received) and keep (a local subvolume)
    streams: list[bytes]  # the incremental s1 -> s2, as sent and as a v2 stream


@pytest.fixture(scope="module")
def btrfs_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BtrfsBed]:
    require_btrfs()
    base = tmp_path_factory.mktemp("receive_fuzz")
    with ExitStack() as stack:
        src = mkfs(stack, base, "src").mnt
        dst = mkfs(stack, base, "dst").mnt
        snapshot_pair(src / "live", src / "s1", src / "s2")
        root = dst / "root"
        root.mkdir()
        run("btrfs", "receive", "-q", root, input=subprocess.run(["btrfs", "send", "-q", str(src / "s1")], capture_output=True).stdout)
        run("btrfs", "-q", "subvolume", "create", root / "keep")
        (root / "keep" / "precious").write_bytes(os.urandom(10_000))
        streams = [
            subprocess.run(["btrfs", "send", "-q", *proto, "-p", str(src / "s1"), str(src / "s2")], capture_output=True, check=True).stdout
            for proto in ([], ["--proto", "2"])
        ]
        yield BtrfsBed(root, streams)


def _btrfs_reset(root: Path) -> None:
    """Back to s1 and keep: unfinished transfers aborted, anything received removed."""
    state = root / STATE_DIR
    if state.is_dir():
        for name in os.listdir(state):
            subprocess.run([*tb.SNAPFERRY, "receive", "-q", "-A", str(root / name)], check=False)
    for entry in os.listdir(root):
        if entry not in ("s1", "keep", STATE_DIR):
            run("btrfs", "-q", "subvolume", "delete", root / entry)


def test_mutated_btrfs_streams_leave_existing_subvolumes_untouched(btrfs_bed: BtrfsBed) -> None:
    root = btrfs_bed.root
    outside = sorted(os.listdir(root.parent))
    before = {name: describe(root / name) for name in ("s1", "keep")}
    rng = random.Random(2026)
    outcomes: dict[int, int] = {}
    for number in range(MUTANTS or 40):
        data = mutate(rng, rng.choice(btrfs_bed.streams), btrfs_bed.streams)
        # Half get every crc made right: the damage then reaches the applier instead of the crc check.
        if number % 2:
            data = recrc(data)
        done = receive(root, data)
        check_outcome(done, f"btrfs mutant {number}")
        outcomes[done.returncode] = outcomes.get(done.returncode, 0) + 1
        assert sorted(os.listdir(root.parent)) == outside, f"mutant {number} wrote beside the receive root"
        assert {name: describe(root / name) for name in ("s1", "keep")} == before, f"mutant {number} changed s1 or keep"
        _btrfs_reset(root)
    print(f"btrfs mutants by exit code: {dict(sorted(outcomes.items()))}")
    assert outcomes.get(5, 0) > 0, outcomes  # most damage is caught as a bad stream


# --- ZFS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zfs_streams(bed: tb.Bed) -> tuple[str, str, list[bytes]]:
    """A source with @s0, @s1 and @s2, a target holding @s0 and @s1, and the stamped incremental @s1 -> @s2."""
    fs = f"{bed.src.name}/fuzzsrc"
    tb.sh("zfs", "create", fs)
    tb.write_tree(tb.mountpoint(fs), seed=5, megabytes=4)
    tb.snapshot(f"{fs}@s0")
    tb.change_tree(tb.mountpoint(fs), seed=6)
    tb.snapshot(f"{fs}@s1")
    tb.change_tree(tb.mountpoint(fs), seed=7)
    tb.snapshot(f"{fs}@s2")
    target = f"{bed.dst.name}/fuzzdst"
    assert receive(target, tb.send_bytes(f"{fs}@s0")).returncode == 0
    assert receive(target, tb.send_bytes("-i", "@s0", f"{fs}@s1")).returncode == 0
    return fs, target, [tb.send_bytes("-i", "@s1", f"{fs}@s2")]


def test_mutated_zfs_streams_leave_existing_snapshots_untouched(zfs_streams: tuple[str, str, list[bytes]]) -> None:
    _, target, streams = zfs_streams
    before = {name: tb.guid(f"{target}@{name}") for name in ("s0", "s1")}
    rng = random.Random(2026)
    outcomes: dict[int, int] = {}
    for number in range(MUTANTS or 20):
        done = receive(target, mutate(rng, streams[0], streams))
        check_outcome(done, f"zfs mutant {number}")
        outcomes[done.returncode] = outcomes.get(done.returncode, 0) + 1
        assert {name: tb.guid(f"{target}@{name}") for name in ("s0", "s1")} == before, f"mutant {number} changed a snapshot"
        aborted = subprocess.run([*tb.SNAPFERRY, "receive", "-A", target], capture_output=True, text=True, check=False)
        assert aborted.returncode in (0, 1), f"mutant {number}: receive -A: {aborted.stderr}"
        if "s2" in tb.snapshot_names(target):
            tb.sh("zfs", "destroy", f"{target}@s2")
        assert [n for n in tb.snapshot_names(target) if n not in ("s0", "s1")] == [], f"mutant {number} left snapshots"
    print(f"zfs mutants by exit code: {dict(sorted(outcomes.items()))}")
    assert outcomes.get(5, 0) + outcomes.get(3, 0) > 0, outcomes
