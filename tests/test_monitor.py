"""Watching replication on real pools: `status` for a person, the `check` plugin, and sync's metrics file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.sshd_server import SshServer
from tests.test_serve import restricted_key

REMOTE = "root@127.0.0.1"


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tb.SNAPFERRY, *args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def source(bed: tb.Bed, name: str, snaps: list[str], megabytes: int = 2) -> str:
    fs = bed.dataset(name)
    tb.sh("zfs", "create", fs)
    for n, snap in enumerate(snaps):
        tb.write_tree(tb.mountpoint(fs) / snap, seed=n + 7, megabytes=megabytes)
        tb.snapshot(f"{fs}@{snap}")
    return fs


def test_status_leaves_out_the_properties_only_when_asked(bed: tb.Bed) -> None:
    """sync asks `--no-properties` of every end but a --props source: each status then costs one zfs call less."""
    fs = source(bed, "st_props", ["a"])
    tb.sh("zfs", "set", "compression=on", fs)
    full = run("status", "--json", fs)
    lean = run("status", "--json", "--no-properties", fs)
    assert full.returncode == lean.returncode == 0, full.stderr + lean.stderr
    assert json.loads(full.stdout)["properties"]["compression"] == "on"
    assert json.loads(lean.stdout)["properties"] == {}
    assert {k: v for k, v in json.loads(lean.stdout).items() if k != "properties"} == {
        k: v for k, v in json.loads(full.stdout).items() if k != "properties"
    }


def test_status_shows_each_target_in_one_line(bed: tb.Bed) -> None:
    src = source(bed, "st_src", ["a", "b"])
    dst = bed.target("st_dst")
    tb.sh("zfs", "hold", "keep", f"{src}@a")
    try:
        assert run("sync", "-q", "--no-stream", src, dst).returncode == 0  # only @b
        cut = tb.send_bytes(f"{src}@a")
        half = bed.target("st_half")
        assert tb.receive(half, cut[: len(cut) // 2]).returncode == 3

        shown = run("status", src, dst, half, bed.target("st_none"))
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert len(lines) == 4
        assert lines[0].startswith(f"{src}: newest {src}@b (") and lines[0].endswith("nothing unfinished; 1 held snapshot(s)")
        assert lines[1].startswith(f"{dst}: newest {dst}@b (")
        assert f"{half}: newest none; unfinished: the snapshot with guid" in lines[2] and "checkpoint(s) (sf1- token" in lines[2]
        assert lines[3] == f"{bed.target('st_none')}: does not exist yet"

        compared = run("status", "--source", src, dst, half)
        assert compared.returncode == 0, compared.stderr
        with_source, partial = compared.stdout.splitlines()
        assert f"source's newest {src}@b (" in with_source and f"newest common {src}@b (" in with_source
        assert f"newest common none; unfinished: {src}@a, " in partial  # named from the source by its guid
    finally:
        tb.sh("zfs", "release", "keep", f"{src}@a")


def test_check_says_ok_warning_critical_and_stuck(bed: tb.Bed) -> None:
    src = source(bed, "ck_src", ["a"])
    dst = bed.target("ck_dst")
    assert run("check", src, dst).returncode == 2
    assert run("check", src, dst).stdout.startswith(f"SNAPFERRY CRITICAL - {dst}: the destination does not exist")
    assert run("sync", "-q", src, dst).returncode == 0
    ok = run("check", src, dst)
    assert ok.returncode == 0 and ok.stdout.startswith(f"SNAPFERRY OK - {dst}: newest common snapshot {src}@a is "), ok.stdout
    assert "| lag=" in ok.stdout and ";93600;172800;0" in ok.stdout
    time.sleep(2.1)
    warning = run("check", "--warn", "1s", "--crit", "1h", src, dst)
    assert warning.returncode == 1 and warning.stdout.startswith("SNAPFERRY WARNING"), warning.stdout
    critical = run("check", "--warn", "1s", "--crit", "2s", src, dst)
    assert critical.returncode == 2 and critical.stdout.startswith("SNAPFERRY CRITICAL"), critical.stdout

    # An unfinished transfer that has stopped moving.
    tb.write_tree(tb.mountpoint(src) / "more", seed=3, megabytes=3)
    tb.snapshot(f"{src}@b")
    stream = tb.send_bytes("-i", f"{src}@a", f"{src}@b")
    assert tb.receive(dst, stream[: len(stream) // 2]).returncode == 3
    moving = run("check", "--stuck", "1h", src, dst)
    assert moving.returncode == 0 and f"a transfer of {src}@b is unfinished" in moving.stdout, moving.stdout
    time.sleep(2.1)
    stuck = run("check", "--stuck", "2s", src, dst)
    assert stuck.returncode == 1 and f"the transfer of {src}@b has made no progress for " in stuck.stdout, stuck.stdout
    unreachable = run("check", "--ssh", "false", src, f"{REMOTE}:{dst}")  # the host cannot be asked
    assert unreachable.returncode == 3 and unreachable.stdout.startswith(f"SNAPFERRY UNKNOWN - {REMOTE}:{dst}: "), unreachable.stdout


def test_status_and_check_of_a_remote_target_over_ssh_and_through_serve(bed: tb.Bed, sshd_server: SshServer, remote_snapferry: str) -> None:
    src = source(bed, "rm_src", ["a"])
    allowed = bed.target("mon_allowed")
    tb.sh("zfs", "create", allowed)
    dst = f"{allowed}/fs"
    assert run("sync", "-q", src, dst).returncode == 0
    over_ssh = ["--ssh", sshd_server.command, "--remote-snapferry", remote_snapferry]
    shown = run("status", *over_ssh, "--source", src, f"{REMOTE}:{dst}")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{REMOTE}:{dst}: newest {dst}@a (") and f"newest common {src}@a" in shown.stdout
    ok = run("check", *over_ssh, src, f"{REMOTE}:{dst}")
    assert ok.returncode == 0 and ok.stdout.startswith(f"SNAPFERRY OK - {REMOTE}:{dst}: newest common snapshot"), ok.stdout

    key = restricted_key(sshd_server, "monitor_key", f"--allow {allowed} --read-only")
    served = ["--ssh", key, "--remote-snapferry", "snapferry"]
    ok = run("check", *served, src, f"{REMOTE}:{dst}")
    assert ok.returncode == 0 and ok.stdout.startswith("SNAPFERRY OK"), ok.stdout
    outside = run("check", *served, src, f"{REMOTE}:{bed.target('elsewhere')}")
    assert outside.returncode == 3 and "outside --allow" in outside.stdout, outside.stdout


def _samples(path: Path) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(path.read_text()) for s in family.samples}


def test_metrics_file_after_an_interrupted_and_a_finished_sync(bed: tb.Bed, tmp_path: Path) -> None:
    src = source(bed, "mt_src", ["a"], megabytes=8)
    dst = bed.target("mt_dst")
    metrics = tmp_path / "textfile" / "snapferry.prom"
    args = ["sync", "--metrics-file", str(metrics), "--checkpoint", "1M", src, dst]
    # Interrupted: a slow link (--bwlimit) and SIGTERM once two checkpoints are committed.
    slow = [*tb.SNAPFERRY, *args, "--bwlimit", "2M"]
    proc = subprocess.Popen(slow, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(tb.piece_names(dst) if tb.exists(dst) else []) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoints"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the sync, its send and its receive: as a shutdown does
    assert proc.wait(timeout=60) == 3
    first = _samples(metrics)
    labels_ok = f'source="{src}"' in metrics.read_text() and f'target="{dst}"' in metrics.read_text()
    assert labels_ok
    assert first["snapferry_sync_exit_code"] == 3
    assert first["snapferry_sync_runs_total"] == 1 and first["snapferry_sync_failures_total"] == 1
    assert "snapferry_sync_last_success_timestamp_seconds" not in first
    assert first["snapferry_sync_resumes_total"] == 0

    finished = run(*args)
    assert finished.returncode == 0, finished.stderr
    summary = [line for line in finished.stderr.splitlines() if line.startswith(f"snapferry: sync {src} -> {dst}: done in ")]
    assert len(summary) == 1 and "1 dataset, " in summary[0] and "1 resume(s), 0 retry(ies)" in summary[0], finished.stderr
    second = _samples(metrics)
    assert second["snapferry_sync_exit_code"] == 0
    assert second["snapferry_sync_runs_total"] == 2 and second["snapferry_sync_failures_total"] == 1
    assert second["snapferry_sync_resumes_total"] == 1
    assert 0 < second["snapferry_sync_received_bytes_total"] < len(tb.send_bytes(f"{src}@a"))  # only the rest after the checkpoints
    assert second["snapferry_sync_last_success_timestamp_seconds"] == second["snapferry_sync_last_run_timestamp_seconds"]
    assert 0 <= second["snapferry_replication_lag_seconds"] < 600
