"""The chaos runner's btrfs scenario: snapferry send | snapferry receive -s between two loop-mounted btrfs.

Faults, each at a random byte of the stream being fed:
  cut          only the first N bytes reach `snapferry receive -s DIR`                 -> exit 3
  sigkill      the receiver is SIGKILLed after a new checkpoint (or 5 s)
  corrupt      one bit flipped at byte N -> exit 5 (3 when a flipped length runs past the end; 4 when it
               lands in a continuation's header); no checkpoint may end past the flipped byte
  remount      the receiver is SIGKILLed after a checkpoint and the target file system unmounted and
               mounted again (a reboot)
  snapdestroy  cut after a checkpoint, then the source snapshot (or, for an incremental, every other time
               its parent) deleted: `send -t` must exit 4 "stale token" and send nothing; `receive -A`
               then leaves nothing (full) or exactly the parent (incremental). Ends the iteration.
After each fault: `snapferry send -t $(snapferry token DIR/NAME) SNAPSHOT | snapferry receive -s DIR`, or
the whole stream again when nothing was checkpointed. The result must match the source snapshot in
content, modes, owners, times, xattrs and hardlinks, be read-only with the source's received UUID, and
leave no .snapferry state behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _chaos_common import Iteration, last_line, log, record_attempt, run_sf, size_bytes

from snapferry_testkit import btrfs_testbed as bt
from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.feeder import Feeder, faults_then_resumes

BTRFS_KINDS = ("cut", "sigkill", "corrupt", "remount", "snapdestroy")
STATE = ".snapferry"


class BtrfsRunner:
    """Two loop-mounted btrfs (source, target) for the whole run; per iteration a source subvolume and a target directory."""

    def __init__(self, base: Path) -> None:
        self._stack = ExitStack()
        # Sparse 8 GiB images: 384 MiB ones ran out of unallocated chunks after ~430 iterations of
        # creating and deleting subvolumes (btrfs ENOSPC with space free), failing every iteration after.
        self.src = bt.mkfs(self._stack, base, "btrfs_src", size=8 << 30).mnt
        self.dst = bt.mkfs(self._stack, base, "btrfs_dst", size=8 << 30).mnt
        self.loop = bt.run("findmnt", "-n", "-o", "SOURCE", self.dst).strip()

    def close(self) -> None:
        self._stack.close()

    # -- helpers -------------------------------------------------------------------------------

    def checkpoint_ends(self, target: Path, name: str) -> list[int]:
        state = target / STATE / name
        if not state.is_dir():
            return []
        return [int(entry.split("-")[2], 16) for entry in os.listdir(state) if entry.startswith("ck-")]

    def partial_receive(self, it: Iteration, target: Path, name: str, data: bytes) -> Feeder:
        """A receiver fed `data` without closing its stdin, left running until a new checkpoint (or 5 s)."""
        before = set(self.checkpoint_ends(target, name))
        feeder = Feeder([*tb.SNAPFERRY, "receive", "-s", "--checkpoint", it.checkpoint, str(target)], data)
        feeder.wait_for(lambda: bool(set(self.checkpoint_ends(target, name)) - before))
        return feeder

    def remount(self) -> None:
        bt.run("umount", self.dst)
        bt.run("mount", "-o", "noatime", self.loop, self.dst)

    # -- one attempt ---------------------------------------------------------------------------

    def attempt(self, it: Iteration, paths: dict[str, Path], stream: bytes, fault: dict[str, Any] | None, base: int, prefix: int) -> int:
        """Feed `stream` (original-stream bytes from `base` on, after `prefix` bytes of continuation header) with `fault`."""
        target, name = paths["target"], paths["snap"].name
        record: dict[str, object] = {"stream_bytes": len(stream), "fault": fault["kind"] if fault else None}
        if fault is None:
            res = run_sf("receive", "-s", "--checkpoint", it.checkpoint, target, data=stream)
            it.bytes_fed += len(stream)
            record.update(rc=res.returncode, fed=len(stream), stderr=last_line(res.stderr))
            it.attempts.append(record)
            return res.returncode
        kind = str(fault["kind"])
        offset = max(1, min(len(stream) - 1, int(float(fault["fraction"]) * len(stream))))
        if kind == "snapdestroy":
            offset = min(len(stream) - 1, max(offset, 2 * size_bytes(it.checkpoint) + 65536))
        fault.update(offset=offset, of=len(stream), fired=True)
        record["offset"] = offset
        if kind in ("cut", "snapdestroy"):
            res = run_sf("receive", "-s", "--checkpoint", it.checkpoint, target, data=stream[:offset])
            rc, err, fed = res.returncode, res.stderr, offset
            if rc != 3:
                it.corrupted = it.corrupted or rc == 0
                it.problems.append(f"{kind} at {offset}/{len(stream)}: exit {rc}, expected 3: {last_line(err)}")
        elif kind == "corrupt":
            data = bytearray(stream)
            data[offset] ^= int(fault["mask"])
            res = run_sf("receive", "-s", "--checkpoint", it.checkpoint, target, data=bytes(data))
            rc, err, fed = res.returncode, res.stderr, len(data)
            allowed = (3, 4, 5) if offset < prefix else (3, 5)
            if rc not in allowed:
                it.corrupted = it.corrupted or rc == 0
                it.problems.append(
                    f"corrupt byte {offset}/{len(stream)} (^{fault['mask']:#x}): exit {rc}, expected {allowed}: {last_line(err)}"
                )
            limit = base + max(0, offset - prefix)
            ends = self.checkpoint_ends(target, name)
            if ends and max(ends) > limit:
                it.corrupted = True
                it.problems.append(f"corrupt byte {offset}: a checkpoint ends at {max(ends)} > {limit}")
        elif kind in ("sigkill", "remount"):
            feeder = self.partial_receive(it, target, name, stream[:offset])
            feeder.proc.send_signal(signal.SIGKILL)
            rc, err = feeder.finish()
            fed = feeder.written
            if kind == "remount":
                self.remount()
        else:
            raise ValueError(kind)
        record_attempt(it, record, fault, rc, fed, err)
        if kind == "snapdestroy" and rc == 3:
            self.stale_resume(it, paths, fault)
        return rc

    def stale_resume(self, it: Iteration, paths: dict[str, Path], fault: dict[str, Any]) -> None:
        target, snap = paths["target"], paths["snap"]
        tok = run_sf("token", target / snap.name)
        if tok.returncode != 0:
            fault["applied"] = False  # nothing checkpointed yet: nothing to go stale, carry on as a cut
            fault["counted_as"] = "cut"
            return
        victim = paths["parent"] if it.mode == "incremental" and int(fault["mask"]) & 0x55 else snap
        bt.run("btrfs", "-q", "subvolume", "delete", victim)
        fault["destroyed"] = victim.name
        it.terminal = True
        cont = run_sf("send", "-t", tok.stdout.decode().strip(), snap)
        it.attempts.append({"resend": "stale", "rc": cont.returncode, "stderr": last_line(cont.stderr)})
        if cont.returncode == 4 and "stale token" in cont.stderr and not cont.stdout:
            it.refusals += 1
        else:
            it.problems.append(
                f"send -t after {victim.name} was deleted: exit {cont.returncode} (want 4 'stale token'): {last_line(cont.stderr)}"
            )
        abort_and_check(it, target, snap.name)

    def next_stream(self, it: Iteration, paths: dict[str, Path], whole: bytes) -> tuple[bytes, int, int]:
        """The resume stream, the original-stream byte it resumes from, and its header's length; or the whole again."""
        target, snap = paths["target"], paths["snap"]
        tok = run_sf("token", target / snap.name)
        if tok.returncode == 1:
            it.whole_resends += 1
            it.attempts.append({"resend": "whole", "why": last_line(tok.stderr)})
            return whole, 0, 0
        if tok.returncode != 0:
            raise RuntimeError(f"snapferry token exit {tok.returncode}: {last_line(tok.stderr)}")
        token = tok.stdout.decode().strip()
        offset = int(json.loads(run_sf("token", "--decode", token).stdout)["offset"])
        cont = run_sf("send", "-t", token, snap)
        if cont.returncode != 0:
            raise RuntimeError(f"snapferry send -t exit {cont.returncode}: {last_line(cont.stderr)}")
        it.resumes += 1
        return cont.stdout, offset, len(cont.stdout) - (len(whole) - offset)

    # -- one iteration -------------------------------------------------------------------------

    def run(self, it: Iteration) -> None:
        live, snaps, target = self.src / f"it{it.index}", self.src / f"snaps{it.index}", self.dst / f"it{it.index}"
        try:
            self._run(it, live, snaps, target)
        finally:
            remove(live, snaps, target)

    def make_source(self, it: Iteration, live: Path, snaps: Path, target: Path) -> None:
        """A live subvolume of random data and a tree of every kind of file, and its read-only snapshot snaps/s1."""
        bt.run("btrfs", "-q", "subvolume", "create", live)
        tb.write_tree(live / "data", seed=it.data_seed, megabytes=it.megabytes)
        bt.fill_tree(live)
        snaps.mkdir()
        target.mkdir()
        bt.run("btrfs", "-q", "subvolume", "snapshot", "-r", live, snaps / "s1")

    def change_source(self, it: Iteration, live: Path, snaps: Path) -> None:
        """Changes to data and tree, then the read-only snapshot snaps/s2."""
        tb.change_tree(live / "data", seed=it.data_seed + 1)
        bt.change_tree(live)
        bt.run("btrfs", "-q", "subvolume", "snapshot", "-r", live, snaps / "s2")

    def _run(self, it: Iteration, live: Path, snaps: Path, target: Path) -> None:
        self.make_source(it, live, snaps, target)
        paths = {"target": target, "snap": snaps / "s1", "parent": snaps / "s1"}
        if it.mode == "incremental":
            self.change_source(it, live, snaps)
            paths["snap"] = snaps / "s2"
            base = run_sf("receive", target, data=run_sf("send", snaps / "s1").stdout)
            assert base.returncode == 0, base.stderr
            sent = run_sf("send", "-p", snaps / "s1", snaps / "s2")
        else:
            sent = run_sf("send", snaps / "s1")
        assert sent.returncode == 0, sent.stderr
        whole = sent.stdout
        it.stream_bytes = len(whole)
        done = faults_then_resumes(
            it,
            (whole, 0, 0),
            lambda feed, fault: self.attempt(it, paths, feed[0], fault, feed[1], feed[2]),
            lambda: self.next_stream(it, paths, whole),
            log,
        )
        if it.terminal:
            it.ok = not it.problems
        if not done:
            return
        self.check_replica(it, paths)
        it.ok = it.clean

    def check_replica(self, it: Iteration, paths: dict[str, Path]) -> None:
        snap, target = paths["snap"], paths["target"]
        got = target / snap.name
        want_names = sorted({"s1", snap.name})
        if sorted(os.listdir(target)) != want_names:
            it.leftover = True
            it.problems.append(f"{target} holds {sorted(os.listdir(target))}, expected {want_names}")
        if not got.is_dir():
            it.lost = True
            return
        info, source = bt.subvol(got), bt.subvol(snap)
        if not info.readonly or info.received_uuid != source.uuid:
            it.problems.append(f"{got}: read-only {info.readonly}, received uuid {info.received_uuid} (source {source.uuid})")
        want, have = bt.describe(snap), bt.describe(got)
        if want != have:
            it.corrupted = True
            differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            it.problems.append(f"tree differs at {len(differ)} path(s): {differ[:5]}")


def abort_and_check(it: Iteration, target: Path, name: str) -> None:
    """After a refused stale token: `receive -A` must leave nothing (full) or exactly the parent s1 (incremental)."""
    abort = run_sf("receive", "-A", target / name)
    if abort.returncode != 0:
        it.problems.append(f"receive -A after the stale token: exit {abort.returncode}: {last_line(abort.stderr)}")
    left = sorted(os.listdir(target))
    want = ["s1"] if it.mode == "incremental" else []
    if left != want:
        it.leftover = it.leftover or bool(set(left) - set(want))
        it.lost = it.lost or bool(set(want) - set(left))
        it.problems.append(f"{target} after receive -A holds {left}, expected {want}")


def remove(live: Path, *directories: Path) -> None:
    """An iteration's subvolumes and directories, whatever state a fault left them in."""
    for directory in directories:
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name != STATE:
                    subprocess.run(["btrfs", "-q", "subvolume", "delete", str(entry)], check=False)
            subprocess.run(["rm", "-rf", str(directory)], check=False)
    if live.exists():
        subprocess.run(["btrfs", "-q", "subvolume", "delete", str(live)], check=False)
