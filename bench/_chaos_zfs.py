"""The chaos runner's ZFS side: zfs-fuse pools, the checks of a replica, and the local scenario (pipes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from _chaos_common import Iteration, MiB, last_line, log, record_attempt, run_sf, size_bytes

from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.feeder import Feeder, faults_then_resumes


def make_pool(base: Path, role: str) -> tb.Pool:
    name = f"sfchaos{os.getpid()}{role}"
    directory = base / name
    directory.mkdir(parents=True)
    image = directory / "vdev.img"
    tb.sh("truncate", "-s", "2G", str(image))
    tb.sh("zpool", "create", "-m", f"/{name}", name, str(image))
    return tb.Pool(name, directory)


def checkpoint_ends(dataset: str) -> list[int]:
    """`end` of every committed checkpoint (snapferry-<to>-<from>-<seq>-<end>-<fpfrom>-<fp>)."""
    ends = []
    for name in tb.piece_names(dataset):
        parts = name.split("-")
        if len(parts) in (7, 8) and parts[3] != "open" and parts[-1] != "open":
            with contextlib.suppress(ValueError):
                ends.append(int(parts[4], 16))
    return ends


def committed(dataset: str) -> int:
    return max(checkpoint_ends(dataset), default=0) if tb.exists(dataset) else 0


def used(dataset: str) -> int:
    return int(tb.sh("zfs", "get", "-H", "-p", "-o", "value", "used", dataset).stdout.decode().strip())


def set_quota(parent: str, margin: int) -> int:
    """quota = what `parent` uses now + margin (more if zfs finds that below its use); returns it."""
    for _ in range(6):
        quota = used(parent) + margin
        if tb.sh("zfs", "set", f"quota={quota}", parent, check=False).returncode == 0:
            return quota
        margin *= 2
    raise RuntimeError(f"cannot set a quota on {parent}")


def raise_quota(parent: str, stream_bytes: int) -> None:
    tb.sh("zfs", "set", f"quota={used(parent) + 8 * stream_bytes + 64 * MiB}", parent)


def quota_margin(fault: dict[str, object], remaining: int) -> int:
    """Between 5 % and 80 % of what is left to receive, so that the quota is surely reached."""
    return max(256 * 1024, int((0.05 + 0.75 * float(fault["fraction"])) * remaining))  # type: ignore[arg-type]


def victim_of(it: Iteration, fs: str, fault: dict[str, object]) -> str:
    """snapdestroy: the snapshot being sent, or (incremental, every other time) its base."""
    return f"{fs}@s1" if it.mode == "incremental" and int(fault["mask"]) & 0x55 else f"{fs}@{final_snap(it)}"  # type: ignore[call-overload]


def destroy_victim(it: Iteration, fs: str, fault: dict[str, object]) -> str:
    victim = victim_of(it, fs, fault)
    tb.sh("zfs", "destroy", victim)
    fault["destroyed"] = victim
    return victim


def final_snap(it: Iteration) -> str:
    return "s2" if it.mode == "incremental" else "s1"


def check_aborted(it: Iteration, target: str, base_guid: int | None) -> None:
    """After `receive -A`: a full transfer leaves no dataset; an incremental leaves exactly its base."""
    if it.mode == "full":
        if tb.exists(target):
            it.leftover = True
            it.problems.append(f"{target} still exists after receive -A: {tb.snapshot_names(target)}")
        return
    names = tb.snapshot_names(target) if tb.exists(target) else None
    if names != ["s1"]:
        it.leftover = it.leftover or names is not None
        it.lost = it.lost or names is None or "s1" not in names
        it.problems.append(f"{target} after receive -A holds {names}, expected just its base s1")
    elif base_guid is not None and tb.guid(f"{target}@s1") != base_guid:
        it.lost = True
        it.problems.append(f"{target}@s1 changed guid after receive -A")


def stale_refusal(it: Iteration, rc: int, stderr: str, sent: bytes, what: str) -> bool:
    """The resume after snapdestroy must be refused: exit 4, 'stale token', nothing sent."""
    good = rc == 4 and "stale token" in stderr and not sent
    if good:
        it.refusals += 1
    else:
        it.problems.append(f"{what} after the source snapshot was destroyed: exit {rc} (want 4 'stale token'): {last_line(stderr)}")
    return good


def setup_source(it: Iteration, fs: str) -> tuple[int, dict[str, str], int]:
    """The source dataset with @s1 (and @s2 for an incremental): guid and files of the final snapshot, guid of @s1."""
    tb.sh("zfs", "create", fs)
    root = tb.mountpoint(fs)
    tb.write_tree(root, seed=it.data_seed, megabytes=it.megabytes)
    guid1, files = tb.snapshot(f"{fs}@s1")
    want_guid = guid1
    if it.mode == "incremental":
        tb.change_tree(root, seed=it.data_seed + 1)
        want_guid, files = tb.snapshot(f"{fs}@s2")
    return want_guid, files, guid1


def check_replica(it: Iteration, target: str, want_guid: int, want_files: dict[str, str]) -> None:
    final = f"{target}@{final_snap(it)}"
    if not tb.exists(final):
        it.lost = True
        it.problems.append(f"{final} missing after exit 0")
        return
    got_guid = tb.guid(final)
    if got_guid != want_guid:
        it.lost = True
        it.problems.append(f"guid {got_guid} != source {want_guid}")
    tb.sh("zfs", "set", "atime=off", target, check=False)
    mounted = tb.sh("zfs", "get", "-H", "-o", "value", "mounted", target).stdout.decode().strip()
    if mounted != "yes":
        tb.sh("zfs", "mount", target, check=False)
    got_files = tb.manifest(tb.mountpoint(target))
    if got_files != want_files:
        it.corrupted = True
        diff = sorted(k for k in set(got_files) | set(want_files) if got_files.get(k) != want_files.get(k))
        it.problems.append(f"manifest differs in {len(diff)} file(s): {diff[:5]}")
    left = tb.piece_names(target)
    if left:
        it.leftover = True
        it.problems.append(f"leftover checkpoints: {left}")


class Runner:
    """The local scenario: snapferry send | snapferry receive -s through pipes we control."""

    def __init__(self, src: tb.Pool, dst: tb.Pool) -> None:
        self.src = src
        self.dst = dst

    # -- receivers ---------------------------------------------------------------------------

    def receive(self, target: str, checkpoint: str, data: bytes) -> tb.Result:
        return run_sf("receive", "-s", "--checkpoint", checkpoint, target, data=data)

    def partial_receive(self, target: str, checkpoint: str, data: bytes) -> Feeder:
        """A receiver fed `data` without closing its stdin, left running until a new checkpoint (or 5 s)."""
        before = set(tb.piece_names(target)) if tb.exists(target) else set()
        feeder = Feeder([*tb.SNAPFERRY, "receive", "-s", "--checkpoint", checkpoint, target], data)
        feeder.wait_for(lambda: tb.exists(target) and bool(set(tb.piece_names(target)) - before))
        return feeder

    # -- one attempt -------------------------------------------------------------------------

    def attempt(self, it: Iteration, fs: str, target: str, stream: bytes, fault: dict[str, object] | None, resume_base: int) -> int:
        """Feed `stream` (with `fault` applied) to a receiver; return its exit code."""
        if resume_base < 0:  # `snapferry token` says the transfer is complete: nothing to feed (the replica is checked)
            it.attempts.append({"resend": "none", "why": "snapferry token: the transfer is complete"})
            if fault is not None:
                fault.update(fired=False, offset=0, of=0)
            return 0
        record: dict[str, object] = {"stream_bytes": len(stream), "fault": fault["kind"] if fault else None}
        if fault is None:
            res = self.receive(target, it.checkpoint, stream)
            it.bytes_fed += len(stream)
            record.update(rc=res.returncode, fed=len(stream), stderr=last_line(res.stderr))
            it.attempts.append(record)
            return res.returncode
        kind = str(fault["kind"])
        offset = max(1, min(len(stream) - 1, int(float(fault["fraction"]) * len(stream))))  # type: ignore[arg-type]
        if kind == "snapdestroy":
            # Past a checkpoint of this stream where the stream is long enough for one.
            offset = min(len(stream) - 1, max(offset, 2 * size_bytes(it.checkpoint) + 65536))
        fault["offset"] = offset
        fault["of"] = len(stream)
        fault["fired"] = True
        record["offset"] = offset
        if kind in ("cut", "snapdestroy"):
            res = self.receive(target, it.checkpoint, stream[:offset])
            rc, err, fed = res.returncode, res.stderr, offset
            if rc == 0:
                it.problems.append(f"{kind} at {offset}/{len(stream)}: receiver exited 0 on a truncated stream")
                it.corrupted = True
            elif rc != 3:
                it.problems.append(f"{kind} at {offset}: exit {rc}, expected 3: {last_line(err)}")
        elif kind == "corrupt":
            data = bytearray(stream)
            mask = int(fault["mask"])  # type: ignore[call-overload]
            data[offset] ^= mask
            res = self.receive(target, it.checkpoint, bytes(data))
            rc, err, fed = res.returncode, res.stderr, len(data)
            if rc == 0:
                it.corrupted = True
                it.problems.append(f"corrupt byte {offset}/{len(stream)} (^{mask:#x}): receiver exited 0")
            elif rc != 5:
                it.problems.append(f"corrupt byte {offset} (^{mask:#x}): exit {rc}, expected 5: {last_line(err)}")
            # No checkpoint may end beyond the flipped byte (positions in the original stream).
            ends = checkpoint_ends(target) if tb.exists(target) else []
            if ends and max(ends) > resume_base + offset:
                it.corrupted = True
                it.problems.append(f"corrupt byte {offset}: checkpoint ends at {max(ends)} > {resume_base + offset}")
        elif kind == "sigkill":
            feeder = self.partial_receive(target, it.checkpoint, stream[:offset])
            feeder.proc.send_signal(signal.SIGKILL)
            rc, err = feeder.finish(timeout=30)
            fed = feeder.written
        elif kind == "daemon":
            feeder = self.partial_receive(target, it.checkpoint, stream[:offset])
            tb.reboot_daemon([self.src.directory, self.dst.directory], [self.src.name, self.dst.name])
            rc, err = feeder.finish(timeout=120)
            fed = feeder.written
            if rc == 0:
                it.problems.append(f"daemon kill at {offset}: receiver exited 0")
            elif rc == -999:
                it.problems.append(f"daemon kill at {offset}: receiver hung")
        elif kind == "quota":
            parent = target.rpartition("/")[0]
            margin = quota_margin(fault, len(stream))
            fault["offset"] = record["offset"] = margin
            fault["quota"] = set_quota(parent, margin)
            res = self.receive(target, it.checkpoint, stream)
            rc, err, fed = res.returncode, res.stderr, len(stream)
            raise_quota(parent, it.stream_bytes)
            if rc == 0:
                fault["fired"] = False  # it fitted after all: no fault
            elif rc != 3 or "space" not in err:
                it.problems.append(f"quota {margin} bytes above use: exit {rc}, expected 3 out of space: {last_line(err)}")
        else:
            raise ValueError(kind)
        record_attempt(it, record, fault, rc, fed, err)
        if kind == "snapdestroy" and rc == 3:
            self.stale_resume(it, fs, target, fault)
        return rc

    def stale_resume(self, it: Iteration, fs: str, target: str, fault: dict[str, object]) -> None:
        tok = run_sf("token", target)
        if tok.returncode != 0:
            fault["applied"] = False  # no checkpoint yet: nothing to go stale, carry on as a cut
            fault["counted_as"] = "cut"
            return
        base_guid = tb.guid(f"{fs}@s1") if it.mode == "incremental" else None
        destroy_victim(it, fs, fault)
        it.terminal = True
        cont = run_sf("send", "-t", tok.stdout.decode().strip())
        it.attempts.append({"resend": "stale", "rc": cont.returncode, "stderr": last_line(cont.stderr)})
        stale_refusal(it, cont.returncode, cont.stderr, cont.stdout, "send -t")
        abort = run_sf("receive", "-A", target)
        if abort.returncode != 0:
            it.problems.append(f"receive -A after the stale token: exit {abort.returncode}: {last_line(abort.stderr)}")
        check_aborted(it, target, base_guid)

    def next_stream(self, it: Iteration, target: str, whole: bytes) -> tuple[bytes, int]:
        """The resume stream (and the original-stream byte where it starts), or the whole again."""
        tok = run_sf("token", target)
        if tok.returncode == 1 and "transfer is complete" in tok.stderr:
            # A receive that failed after its last piece was committed (zfs-fuse answering EIO after a restart).
            return b"", -1
        if tok.returncode == 1:
            it.whole_resends += 1
            it.attempts.append({"resend": "whole", "why": last_line(tok.stderr)})
            return whole, 0
        if tok.returncode != 0:
            raise RuntimeError(f"snapferry token exit {tok.returncode}: {last_line(tok.stderr)}")
        token = tok.stdout.decode().strip()
        decoded = run_sf("token", "--decode", token)
        base = 0
        if decoded.returncode == 0:
            try:
                base = int(json.loads(decoded.stdout).get("offset", 0))
            except (ValueError, TypeError, AttributeError):
                base = 0
        cont = run_sf("send", "-t", token)
        if cont.returncode != 0:
            raise RuntimeError(f"snapferry send -t exit {cont.returncode}: {last_line(cont.stderr)}")
        it.resumes += 1
        return cont.stdout, base

    # -- one iteration -----------------------------------------------------------------------

    def run(self, it: Iteration, fs: str, target: str) -> None:
        want_guid, want_files, _ = setup_source(it, fs)
        if it.mode == "incremental":
            base = run_sf("send", f"{fs}@s1")
            assert base.returncode == 0, base.stderr
            res = run_sf("receive", "-s", "--checkpoint", it.checkpoint, target, data=base.stdout)
            assert res.returncode == 0, f"base receive failed: {res.stderr}"
            sent = run_sf("send", "-i", "@s1", f"{fs}@s2")
        else:
            sent = run_sf("send", f"{fs}@s1")
        assert sent.returncode == 0, sent.stderr
        whole = sent.stdout
        it.stream_bytes = len(whole)

        done = faults_then_resumes(
            it,
            (whole, 0),
            lambda feed, fault: self.attempt(it, fs, target, feed[0], fault, feed[1]),
            lambda: self.next_stream(it, target, whole),
            log,
        )
        if it.terminal:
            it.ok = not it.problems
        if not done:
            return
        check_replica(it, target, want_guid, want_files)
        it.ok = it.clean
