"""sync -r: a tree of real datasets, full then incremental, in parallel or not, interrupted, partly refused, through serve."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.sshd_server import SshServer
from tests.test_serve import restricted_key
from tests.test_sync import (  # noqa: F401  (background is a fixture)
    background,
    checkpoints,
    logged_bytes,
    slow_ssh,
    ssh_clients,
    start_sync,
    sync_argv,
    wait_for,
)

REMOTE = "root@127.0.0.1"
CHILDREN = ["a", "a/b", "a/b/c", "a/d", "e", "e/f", "e/f/g", "h", "h/i", "j", "k"]  # with the root, 12 datasets, 3 levels


def _sync(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    argv = [*tb.SNAPFERRY, "sync", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _tree(bed: tb.Bed, name: str, megabytes: int = 1) -> str:
    root = bed.dataset(name)
    tb.sh("zfs", "create", root)
    for n, child in enumerate(CHILDREN):
        tb.sh("zfs", "create", *(["-o", "compression=on"] if n % 3 == 0 else []), f"{root}/{child}")
    for n, dataset in enumerate([root] + [f"{root}/{c}" for c in CHILDREN]):
        tb.write_tree(tb.mountpoint(dataset) / "data", seed=n, megabytes=megabytes)
    tb.sh("zfs", "snapshot", "-r", f"{root}@s1")
    return root


def _change(root: str, snapshot: str, seed: int) -> None:
    for n, dataset in enumerate([root] + [f"{root}/{c}" for c in CHILDREN]):
        tb.change_tree(tb.mountpoint(dataset) / "data", seed=seed + n)
    tb.sh("zfs", "snapshot", "-r", f"{root}@{snapshot}")


def _guids(root: str) -> dict[str, dict[str, int]]:
    """Every dataset's snapshots by guid, names relative to the root."""
    out = tb.sh("zfs", "get", "-H", "-p", "-r", "-o", "name,value", "guid", root).stdout.decode()
    table: dict[str, dict[str, int]] = {}
    for line in out.splitlines():
        name, guid = line.split("\t")
        if "@" in name and "@snapferry-" not in name:
            dataset, _, snap = name.partition("@")
            table.setdefault(dataset[len(root) :], {})[snap] = int(guid)
    return table


def _files(root: str) -> dict[str, dict[str, str]]:
    tables = {}
    for child in ["", *(f"/{c}" for c in CHILDREN)]:
        dataset = root + child
        if tb.sh("zfs", "get", "-H", "-o", "value", "mounted", dataset).stdout.decode().strip() != "yes":
            tb.sh("zfs", "mount", dataset)
        tables[child] = tb.manifest(tb.mountpoint(dataset) / "data")
    return tables


def test_a_tree_full_then_incremental_alone_and_three_at_a_time(bed: tb.Bed) -> None:
    src = _tree(bed, "tree")
    one, three = bed.target("tree1"), bed.target("tree3")
    first = _sync("--jobs", "1", "-r", "--props", src, one)
    assert first.returncode == 0, first.stderr
    assert f"snapferry: sync -r {src} -> {one}: 12 dataset(s): 12 done, 0 refused, 0 failed;" in first.stderr
    assert _sync("-q", "--jobs", "3", "-r", "--props", src, three).returncode == 0
    _change(src, "s2", seed=100)
    _change(src, "s3", seed=200)
    for dst, jobs in ((one, "1"), (three, "3")):
        done = _sync("-q", "--jobs", jobs, "-r", "--props", src, dst)
        assert done.returncode == 0, done.stderr
        assert _guids(dst) == _guids(src)  # every snapshot of every dataset, by guid
    assert _files(one) == _files(three) == _files(src)
    for child in ["", *(f"/{c}" for c in CHILDREN)]:  # the mixed properties, dataset by dataset
        assert _local(one + child).get("compression") == _local(three + child).get("compression") == _local(src + child).get("compression")
    again = _sync("-r", src, one)
    assert again.returncode == 0 and "12 dataset(s): 12 done" in again.stderr and " 0 B received" in again.stderr


def _unmounted(root: str) -> list[str]:
    out = tb.sh("zfs", "get", "-H", "-r", "-o", "name,value", "mounted", root).stdout.decode()
    return [line.split("\t")[0] for line in out.splitlines() if line.endswith("\tno")]


def test_children_are_mounted_again_after_their_parent_received(bed: tb.Bed) -> None:
    # zfs-fuse's unmount of the partial parent takes its mounted children down too; they have nothing
    # to receive this time, so only the parent's transfer can bring them back.
    src = _tree(bed, "mounttree")
    dst = bed.target("mounttree")
    assert _sync("-q", "-r", src, dst).returncode == 0
    tb.change_tree(tb.mountpoint(src) / "data", seed=7)
    tb.sh("zfs", "snapshot", f"{src}@s2")
    done = _sync("-r", src, dst)
    assert done.returncode == 0, done.stderr
    assert _unmounted(dst) == []
    assert _files(dst) == _files(src)


def test_a_killed_tree_sync_goes_on_where_it_stopped(bed: tb.Bed) -> None:
    src = _tree(bed, "killedtree", megabytes=2)
    dst = bed.target("killedtree")
    argv = [*tb.SNAPFERRY, "sync", "-q", "--checkpoint", "1M", "--bwlimit", "4M", "-r", src, dst]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    # Killed (sync, send and receive at once, as a reboot does) in the middle of the tree, inside a dataset.
    while not checkpoints(f"{dst}/a"):  # a named one: an -open piece would be sent again, with no resume
        assert proc.poll() is None and time.monotonic() < deadline, "the tree sync never reached a checkpoint in its second dataset"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1)
    # A pruner runs meanwhile: the snapshot the interrupted transfer needs is held, so its token stays good.
    pruned = tb.sh("zfs", "destroy", f"{src}/a@s1", check=False)
    assert pruned.returncode != 0 and "dataset is busy" in pruned.stderr.decode()
    done = _sync("-r", src, dst)
    assert done.returncode == 0, done.stderr
    assert "12 dataset(s): 12 done" in done.stderr and " 1 resume(s)" in done.stderr, done.stderr
    assert _guids(dst) == _guids(src)


def test_a_diverged_dataset_is_refused_alone_and_datasets_come_and_go(bed: tb.Bed) -> None:
    src = _tree(bed, "divtree")
    dst = bed.target("divtree")
    assert _sync("-q", "-r", src, dst).returncode == 0
    _change(src, "s2", seed=300)
    tb.sh("zfs", "snapshot", f"{dst}/e/f@local")  # only on the destination
    tb.sh("zfs", "create", f"{src}/new")
    tb.sh("zfs", "snapshot", f"{src}/new@s2")
    refused = _sync("-r", src, dst)
    assert refused.returncode == 4, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("snapferry: 13 dataset(s): 12 done, 1 refused, 0 failed: ")
    assert f"{src}/e/f: the destination has diverged" in lines[-1]
    assert _guids(dst)["/e/f"] == {"s1": _guids(src)["/e/f"]["s1"], "local": _guids(dst)["/e/f"]["local"]}  # kept as it was
    assert _guids(dst)["/new"] == _guids(src)["/new"] and _guids(dst)["/e/f/g"] == _guids(src)["/e/f/g"]

    excluded = _sync("-r", "--exclude", "/e/f$", "--exclude", "^" + src + "/k$", src, dst)
    assert excluded.returncode == 0, excluded.stderr
    assert "11 dataset(s): 11 done" in excluded.stderr
    tb.destroy("-r", f"{src}/j")
    gone = _sync("-r", "--exclude", "/e/f$", src, dst)
    assert gone.returncode == 0, gone.stderr
    assert f"snapferry: warning: {dst}/j is on the destination but no longer on the source; it is kept" in gone.stderr
    assert "1 gone from the source (kept on the destination)" in gone.stderr and tb.exists(f"{dst}/j")


def test_a_restricted_key_receives_a_tree_below_its_prefix_only(bed: tb.Bed, sshd_server: SshServer, remote_snapferry: str) -> None:
    src = _tree(bed, "servedtree")
    allowed = bed.target("treeallowed")
    tb.sh("zfs", "create", allowed)
    key = restricted_key(sshd_server, "tree_key", f"--allow {allowed}")
    over = ["--ssh", key, "--remote-snapferry", "snapferry"]
    done = _sync("-q", *over, "-r", src, f"root@127.0.0.1:{allowed}/fs")
    assert done.returncode == 0, done.stderr
    assert _guids(f"{allowed}/fs") == _guids(src)
    pulled = bed.target("treepulled")
    pull = _sync("-q", "--ssh", sshd_server.command, "--remote-snapferry", remote_snapferry, "-r", f"root@127.0.0.1:{src}", pulled)
    assert pull.returncode == 0, pull.stderr  # and the other way: pulled from a remote source
    assert _guids(pulled) == _guids(src)
    outside = _sync("-q", *over, "-r", src, f"root@127.0.0.1:{bed.target('treeoutside')}")
    assert outside.returncode == 4 and "outside --allow" in outside.stderr
    assert not tb.exists(bed.target("treeoutside"))
    raw = [*shlex.split(key), "root@127.0.0.1", f"zfs destroy -r {allowed}/fs"]
    shell = subprocess.run(raw, capture_output=True, text=True, timeout=60, check=False)
    assert shell.returncode == 4 and tb.exists(f"{allowed}/fs")


def test_btrfs_has_no_tree_to_sync(tmp_path: object) -> None:
    refused = _sync("-r", "/mnt/snaps", "/mnt/backup")
    assert refused.returncode == 2 and "-r is for ZFS dataset trees" in refused.stderr


def _local(dataset: str) -> dict[str, str]:
    out = tb.sh("zfs", "get", "-H", "-p", "-s", "local", "-o", "property,value", "all", dataset).stdout.decode()
    return dict(line.split("\t", 1) for line in out.splitlines())


def test_props_give_each_replica_its_sources_own_properties_but_never_a_mountpoint(bed: tb.Bed) -> None:
    src = bed.dataset("propped")
    tb.sh("zfs", "create", "-o", "compression=on", "-o", "recordsize=32768", "-o", "com.example:owner=ops", src)
    tb.sh("zfs", "create", "-o", "copies=2", "-o", f"mountpoint=/{bed.src.name}-elsewhere", f"{src}/child")
    for dataset in (src, f"{src}/child"):
        tb.write_tree(tb.mountpoint(dataset) / "data", seed=5, megabytes=1)
    tb.sh("zfs", "snapshot", "-r", f"{src}@s1")
    dst = bed.target("propped")
    done = _sync("-q", "-r", "--props", "-x", "recordsize", "-o", "checksum=sha256", src, dst)
    assert done.returncode == 0, done.stderr
    parent, child = _local(dst), _local(f"{dst}/child")
    assert parent["compression"] == "on" and parent["com.example:owner"] == "ops" and parent["checksum"] == "sha256"
    assert "recordsize" not in parent  # -x
    assert child["copies"] == "2" and "mountpoint" not in child  # below its destination, not over the host's directories
    assert parent["atime"] == child["atime"] == "off"  # a replica: reading it is no change
    # A change on the source goes with the next incremental.
    tb.sh("zfs", "set", "com.example:owner=backup-team", src)
    tb.sh("zfs", "snapshot", "-r", f"{src}@s2")
    assert _sync("-q", "-r", "--props", src, dst).returncode == 0
    assert _local(dst)["com.example:owner"] == "backup-team"


def test_a_tree_over_a_link_that_is_cut_then_a_daemon_restart(  # noqa: F811  (fixtures from test_sync)
    bed: tb.Bed,
    ssh_command: str,
    remote_snapferry: str,
    tmp_path: Path,
    background: list[subprocess.Popen[bytes]],  # noqa: F811
) -> None:
    """The link cut inside the tree's second dataset, then the zfs-fuse daemon killed and restarted in an
    incremental: each time the same sync goes on, and what crossed the link is the tree's streams plus at
    most one checkpoint for the dataset that was in flight."""
    src = _tree(bed, "cuttree", megabytes=2)
    dst = bed.target("cuttree")
    log, err = tmp_path / "bytes.log", tmp_path / "sync.err"
    args = ["--json", "--compress", "none", "--checkpoint", "1M", "-r", src, f"{REMOTE}:{dst}"]
    proc = start_sync(background, sync_argv(slow_ssh(ssh_command, log), remote_snapferry, *args), err)
    wait_for(lambda: checkpoints(f"{dst}/a"), 120, "a checkpoint in the second dataset", proc, err)
    for pid in ssh_clients(proc.pid):
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
    assert _guids(dst) == _guids(src)
    streams = sum(len(tb.send_bytes(f"{src}{child}@s1")) for child in ["", *(f"/{c}" for c in CHILDREN)])
    # Sent again: the cut dataset's bytes after its last checkpoint, at most one checkpoint (1M) of them
    # received, plus what was still in the pipes and ssh's buffers when the link went (1 MiB pipes at
    # each end), and a BEGIN and END per transfer.
    assert streams <= logged_bytes(log) <= streams + (1 << 20) + (2 << 20) + 13 * (64 << 10), (logged_bytes(log), streams)

    _change(src, "s2", seed=500)
    err2 = tmp_path / "sync2.err"
    proc = start_sync(background, sync_argv(slow_ssh(ssh_command, tmp_path / "bytes2.log"), remote_snapferry, *args), err2)
    wait_for(lambda: any(checkpoints(f"{dst}{c}") for c in ("", "/a", "/e", "/h")), 120, "a checkpoint of an incremental", proc, err2)
    tb.reboot_daemon([bed.src.directory, bed.dst.directory], [bed.src.name, bed.dst.name])
    assert proc.wait(timeout=600) == 0, err2.read_text()[-3000:]
    assert _guids(dst) == _guids(src)
