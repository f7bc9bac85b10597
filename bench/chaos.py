#!/usr/bin/env python3
"""Randomized fault injection against snapferry's resumable ZFS receive, on scratch zfs-fuse pools.

Each iteration (deterministic from --seed and its index) makes a source dataset of random data,
picks a full or an incremental transfer, a --checkpoint size and 1-3 faults, each at a random byte
of the stream fed to the receiver:

  cut       only the first N bytes reach `snapferry receive -s`
  sigkill   N bytes are written, then (after a new checkpoint or 5 s) the receiver is SIGKILLed
  corrupt   one byte at offset N is flipped: the receiver must exit 5
  daemon    N bytes are written, then the zfs-fuse daemon is kill -9ed and restarted

After each fault the transfer is resumed with `snapferry send -t $(snapferry token DST)` (or the
whole stream again when there is no token); the next fault hits that resume's stream. Then it
resumes until done (at most 5 more attempts) and checks the guid, the files and that no
`snapferry-*` snapshot is left.

    sudo python3 bench/chaos.py --seed 1 --iterations 6 [--json chaos.json]
    sudo python3 bench/chaos.py --seed 1 --only 3          # replay one iteration
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests import zfs_testbed as tb  # noqa: E402

MiB = 1 << 20
KINDS = ("cut", "sigkill", "corrupt", "daemon")
TIMEOUT = 300
EXTRA_ATTEMPTS = 5


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Iteration:
    seed: int
    index: int
    mode: str = ""
    megabytes: int = 0
    data_seed: int = 0
    checkpoint: str = ""
    faults: list[dict[str, object]] = field(default_factory=list)
    attempts: list[dict[str, object]] = field(default_factory=list)
    resumes: int = 0
    whole_resends: int = 0
    stream_bytes: int = 0
    bytes_fed: int = 0
    ok: bool = False
    lost: bool = False
    corrupted: bool = False
    leftover: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_fed / self.stream_bytes if self.stream_bytes else 0.0


def make_pool(base: Path, role: str) -> tb.Pool:
    name = f"sfchaos{os.getpid()}{role}"
    directory = base / name
    directory.mkdir(parents=True)
    image = directory / "vdev.img"
    tb.sh("truncate", "-s", "2G", str(image))
    tb.sh("zpool", "create", "-m", f"/{name}", name, str(image))
    return tb.Pool(name, directory)


def run_sf(*args: str, data: bytes | None = None) -> tb.Result:
    proc = subprocess.run([*tb.SNAPFERRY, *args], input=data, capture_output=True, check=False, timeout=TIMEOUT)
    return tb.Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def checkpoint_ends(dataset: str) -> list[int]:
    """`end` of every committed checkpoint (snapferry-<to>-<from>-<seq>-<end>-<fpfrom>-<fp>)."""
    ends = []
    for name in tb.piece_names(dataset):
        parts = name.split("-")
        if len(parts) == 7 and parts[-1] != "open":
            with contextlib.suppress(ValueError):
                ends.append(int(parts[4], 16))
    return ends


class Runner:
    def __init__(self, src: tb.Pool, dst: tb.Pool) -> None:
        self.src = src
        self.dst = dst

    # -- receivers ---------------------------------------------------------------------------

    def receive(self, target: str, checkpoint: str, data: bytes) -> tb.Result:
        return run_sf("receive", "-s", "--checkpoint", checkpoint, target, data=data)

    def partial_receive(
        self, target: str, checkpoint: str, data: bytes, wait_checkpoint: bool
    ) -> tuple[subprocess.Popen[bytes], list[int], threading.Thread]:
        """Start a receiver, write `data` without closing stdin, wait for a new checkpoint or 5 s."""
        before = set(tb.piece_names(target)) if tb.exists(target) else set()
        proc = subprocess.Popen(
            [*tb.SNAPFERRY, "receive", "-s", "--checkpoint", checkpoint, target],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        written = [0]

        def writer() -> None:
            assert proc.stdin is not None
            try:
                for start in range(0, len(data), 256 * 1024):
                    chunk = data[start : start + 256 * 1024]
                    proc.stdin.write(chunk)
                    proc.stdin.flush()
                    written[0] += len(chunk)
            except (BrokenPipeError, OSError, ValueError):
                pass

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            if wait_checkpoint and tb.exists(target) and set(tb.piece_names(target)) - before:
                break
            time.sleep(0.2)
        return proc, written, thread

    def finish(self, proc: subprocess.Popen[bytes], thread: threading.Thread, timeout: float = 120) -> tuple[int, str]:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            thread.join(5)
            return -999, "receiver hung; killed"
        thread.join(5)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        return proc.returncode, err

    # -- one attempt -------------------------------------------------------------------------

    def attempt(self, it: Iteration, target: str, stream: bytes, fault: dict[str, object] | None, resume_base: int) -> int:
        """Feed `stream` (with `fault` applied) to a receiver; return its exit code."""
        record: dict[str, object] = {"stream_bytes": len(stream), "fault": fault["kind"] if fault else None}
        if fault is None:
            res = self.receive(target, it.checkpoint, stream)
            it.bytes_fed += len(stream)
            record.update(rc=res.returncode, fed=len(stream), stderr=last_line(res.stderr))
            it.attempts.append(record)
            return res.returncode
        kind = str(fault["kind"])
        offset = max(1, min(len(stream) - 1, int(float(fault["fraction"]) * len(stream))))  # type: ignore[arg-type]
        fault["offset"] = offset
        fault["of"] = len(stream)
        record["offset"] = offset
        if kind == "cut":
            res = self.receive(target, it.checkpoint, stream[:offset])
            rc, err, fed = res.returncode, res.stderr, offset
            if rc == 0:
                it.problems.append(f"cut at {offset}/{len(stream)}: receiver exited 0 on a truncated stream")
                it.corrupted = True
            elif rc != 3:
                it.problems.append(f"cut at {offset}: exit {rc}, expected 3: {last_line(err)}")
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
            proc, written, thread = self.partial_receive(target, it.checkpoint, stream[:offset], True)
            proc.send_signal(signal.SIGKILL)
            rc, err = self.finish(proc, thread, timeout=30)
            fed = written[0]
        elif kind == "daemon":
            proc, written, thread = self.partial_receive(target, it.checkpoint, stream[:offset], True)
            tb.reboot_daemon([self.src.directory, self.dst.directory], [self.src.name, self.dst.name])
            rc, err = self.finish(proc, thread, timeout=120)
            fed = written[0]
            if rc == 0:
                it.problems.append(f"daemon kill at {offset}: receiver exited 0")
            elif rc == -999:
                it.problems.append(f"daemon kill at {offset}: receiver hung")
        else:
            raise ValueError(kind)
        it.bytes_fed += fed
        record.update(rc=rc, fed=fed, stderr=last_line(err))
        fault["rc"] = rc
        it.attempts.append(record)
        return rc

    def next_stream(self, it: Iteration, target: str, whole: bytes) -> tuple[bytes, int]:
        """The resume stream (and the original-stream byte where it starts), or the whole again."""
        tok = run_sf("token", target)
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

    def iteration(self, seed: int, index: int) -> Iteration:
        rng = random.Random(f"snapferry-chaos-{seed}-{index}")
        it = Iteration(seed=seed, index=index)
        it.mode = rng.choice(["full", "incremental"])
        it.megabytes = rng.randint(2, 16)
        it.data_seed = rng.randrange(1 << 30)
        it.checkpoint = f"{rng.randint(1, 4)}M"
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(KINDS)
            it.faults.append({"kind": kind, "fraction": rng.random(), "mask": 1 << rng.randrange(8)})
        started = time.monotonic()
        fs = f"{self.src.name}/it{index}"
        target = f"{self.dst.name}/it{index}"
        try:
            self._run(it, fs, target)
        except Exception as exc:  # noqa: BLE001 - a runner error is a failure of this iteration
            it.problems.append(f"runner error: {type(exc).__name__}: {exc}")
            it.ok = False
        finally:
            it.seconds = round(time.monotonic() - started, 1)
            for dataset in (target, fs):
                if tb.exists(dataset):
                    tb.sh("zfs", "destroy", "-r", dataset, check=False)
        return it

    def _run(self, it: Iteration, fs: str, target: str) -> None:
        log(f"iteration {it.index}: {it.mode}, {it.megabytes} MiB, --checkpoint {it.checkpoint}, faults {[f['kind'] for f in it.faults]}")
        for dataset in (target, fs):
            if tb.exists(dataset):
                tb.sh("zfs", "destroy", "-r", dataset)
        tb.sh("zfs", "create", fs)
        root = tb.mountpoint(fs)
        tb.write_tree(root, seed=it.data_seed, megabytes=it.megabytes)
        want_guid, want_files = tb.snapshot(f"{fs}@s1")
        snap = "s1"
        if it.mode == "incremental":
            tb.change_tree(root, seed=it.data_seed + 1)
            want_guid, want_files = tb.snapshot(f"{fs}@s2")
            snap = "s2"
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

        stream, base_offset = whole, 0
        rc = None
        for number, fault in enumerate(it.faults):
            if number:
                stream, base_offset = self.next_stream(it, target, whole)
            rc = self.attempt(it, target, stream, fault, base_offset)
            log(f"  fault {fault['kind']} at {fault['offset']}/{fault['of']}: exit {rc}")
            if rc == 0:
                break
        extra = 0
        while rc != 0 and extra < EXTRA_ATTEMPTS:
            extra += 1
            stream, base_offset = self.next_stream(it, target, whole)
            rc = self.attempt(it, target, stream, None, base_offset)
            log(f"  resume {extra}: {len(stream)} bytes, exit {rc}")
        if rc != 0:
            it.lost = True
            it.problems.append(f"not done after {EXTRA_ATTEMPTS} extra attempts (last exit {rc})")
            return
        final = f"{target}@{snap}"
        if not tb.exists(final):
            it.lost = True
            it.problems.append(f"{final} missing after exit 0")
            return
        got_guid = tb.guid(final)
        if got_guid != want_guid:
            it.lost = True
            it.problems.append(f"guid {got_guid} != source {want_guid}")
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
        it.ok = not (it.lost or it.corrupted or it.leftover)


def summarize(seed: int, results: list[Iteration]) -> dict[str, object]:
    faults: dict[str, int] = dict.fromkeys(KINDS, 0)
    for it in results:
        for fault in it.faults:
            if "offset" in fault:
                faults[str(fault["kind"])] += 1
    ratios = [it.ratio for it in results if it.stream_bytes]
    return {
        "seed": seed,
        "iterations": len(results),
        "faults": faults,
        "resumes": sum(it.resumes for it in results),
        "whole_resends": sum(it.whole_resends for it in results),
        "sent_over_stream_mean": round(sum(ratios) / len(ratios), 3) if ratios else None,
        "sent_over_stream_worst": round(max(ratios), 3) if ratios else None,
        "lost": sum(it.lost for it in results),
        "corrupted": sum(it.corrupted for it in results),
        "leftover": sum(it.leftover for it in results),
        "failures": [
            {"seed": it.seed, "index": it.index, "replay": f"--seed {it.seed} --only {it.index}", "problems": it.problems}
            for it in results
            if it.problems or not it.ok
        ],
    }


def print_report(summary: dict[str, object], results: list[Iteration]) -> None:
    print(
        f"{'it':>3} {'mode':<11} {'MiB':>3} {'ckpt':>4} {'faults':<28} {'resumes':>7} {'whole':>5} "
        f"{'stream':>10} {'fed':>10} {'ratio':>6} {'s':>6}  ok"
    )
    for it in results:
        kinds = ",".join(f"{str(f['kind'])}@{f.get('offset', '-')}" for f in it.faults)
        print(
            f"{it.index:>3} {it.mode:<11} {it.megabytes:>3} {it.checkpoint:>4} {kinds[:28]:<28} {it.resumes:>7} {it.whole_resends:>5} "
            f"{it.stream_bytes:>10} {it.bytes_fed:>10} {it.ratio:>6.2f} {it.seconds:>6}  {'yes' if it.ok else 'NO'}"
        )
    print()
    print(f"seed {summary['seed']}, iterations {summary['iterations']}")
    print(f"faults injected: {summary['faults']}")
    print(f"resumes: {summary['resumes']} (whole stream re-sent {summary['whole_resends']} time(s))")
    print(f"bytes fed / stream size: mean {summary['sent_over_stream_mean']}, worst {summary['sent_over_stream_worst']}")
    print(f"lost {summary['lost']}, corrupted {summary['corrupted']}, leftover {summary['leftover']}")
    failures = summary["failures"]
    assert isinstance(failures, list)
    for failure in failures:
        print(f"FAILURE/ANOMALY {failure['replay']}: {'; '.join(failure['problems'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--only", type=int, help="run just this iteration index")
    parser.add_argument("--json", type=Path, help="write the summary and every iteration here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("chaos.py needs root (zfs-fuse)", file=sys.stderr)
        return 2
    indices = [args.only] if args.only is not None else list(range(args.iterations))
    tb.start_daemon()
    results: list[Iteration] = []
    with tempfile.TemporaryDirectory(prefix="sfchaos") as tmp:
        base = Path(tmp)
        os.environ["SNAPFERRY_LOCK_DIR"] = str(base / "locks")
        pools: list[tb.Pool] = []
        try:
            pools.append(make_pool(base, "s"))
            pools.append(make_pool(base, "d"))
            runner = Runner(pools[0], pools[1])
            for index in indices:
                it = runner.iteration(args.seed, index)
                results.append(it)
                log(f"iteration {index}: {'ok' if it.ok else 'FAILED'} fed {it.bytes_fed}/{it.stream_bytes} {it.problems}")
        finally:
            tb.start_daemon()
            for pool in reversed(pools):
                pool.destroy()
    summary = summarize(args.seed, results)
    print_report(summary, results)
    if args.json:
        payload = {"summary": summary, "iterations": [dict(asdict(it), ratio=it.ratio) for it in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if summary["lost"] == summary["corrupted"] == summary["leftover"] == 0 and not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
