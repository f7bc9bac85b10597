"""Offsite to object storage, on zfs-fuse and a real S3 store (Swift): store, resume after kills, restore, verify, prune."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.swift_server import SwiftServer
from snapferry_testkit.zfs_testbed import SNAPFERRY

MIB = 1 << 20


class Store:
    """snapferry's object-store commands, run as a user would, against the test server."""

    def __init__(self, swift: SwiftServer, bucket: str, home: Path) -> None:
        self.swift, self.bucket, self.home = swift, bucket, home
        self.url = f"s3://{bucket}/host1"

    def env(self, **extra: str) -> dict[str, str]:
        # A fresh HOME: no local state survives between runs but what the bucket holds.
        return {**os.environ, **self.swift.env(), "HOME": str(self.home), **extra}

    def argv(self, verb: str, *args: str) -> list[str]:
        return [*SNAPFERRY, verb, "--endpoint-url", self.swift.endpoint_url, *args]

    def run(self, verb: str, *args: str, env: dict[str, str] | None = None) -> tb.Result:
        done = subprocess.run(self.argv(verb, *args), capture_output=True, env=env or self.env(), check=False, timeout=240)
        return tb.Result(done.returncode, done.stdout, done.stderr.decode(errors="replace"))

    def killed_after(self, verb: str, *args: str, when: Callable[[dict[str, object]], bool]) -> list[dict[str, object]]:
        """Run with --json and kill -9 it at the first event `when` takes; the events seen."""
        proc = subprocess.Popen(self.argv(verb, "--json", *args), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=self.env())
        assert proc.stderr is not None
        seen: list[dict[str, object]] = []
        for line in proc.stderr:
            event = json.loads(line)
            seen.append(event)
            if when(event):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"it ended by itself first: {seen[-3:]}"
        return seen

    def objects(self, below: str = "") -> list[str]:
        client = self.swift.client()
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=below):
            found += [o["Key"] for o in page.get("Contents", ())]
        return found


def events_of(result: tb.Result, name: str) -> list[dict[str, object]]:
    found = []
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


@pytest.fixture
def store(swift: SwiftServer, swift_bucket: str, tmp_path: Path) -> Store:
    home = tmp_path / "home"
    home.mkdir()
    return Store(swift, swift_bucket, home)


@pytest.fixture
def source(bed: tb.Bed) -> Iterator[str]:
    """A dataset with three snapshots: a (about 8 MiB), b and c (a few MiB of changes each)."""
    fs = bed.dataset("off")
    tb.sh("zfs", "create", fs)
    tb.sh("zfs", "set", "compression=on", fs)
    root = tb.mountpoint(fs)
    tb.write_tree(root, seed=7, megabytes=8)
    tb.sh("zfs", "snapshot", f"{fs}@a")
    tb.change_tree(root, seed=8)
    tb.sh("zfs", "snapshot", f"{fs}@b")
    tb.change_tree(root, seed=9)
    tb.sh("zfs", "snapshot", f"{fs}@c")
    yield fs
    tb.destroy("-r", fs)


@pytest.fixture
def target(bed: tb.Bed) -> Iterator[str]:
    name = bed.target("restored")
    yield name
    if tb.exists(name):
        tb.destroy("-r", name)


def _same(source: str, target: str, snapshot: str) -> None:
    """The target has the snapshot (by guid), and its files are the source's, unchanged since that, its newest snapshot."""
    assert tb.guid(f"{target}@{snapshot}") == tb.guid(f"{source}@{snapshot}")
    assert tb.manifest(tb.mountpoint(target)) == tb.manifest(tb.mountpoint(source))


def test_full_incrementals_restore_and_ls(store: Store, source: str, target: str) -> None:
    first = store.run("sync", "--chunk-size", "1M", source, store.url)
    assert first.returncode == 0, first.stderr
    assert "stored c;" in first.stderr
    # The newest alone is stored as a full stream; later snapshots go as incrementals from it.
    tb.change_tree(tb.mountpoint(source), seed=10)
    tb.sh("zfs", "snapshot", f"{source}@d")
    tb.change_tree(tb.mountpoint(source), seed=11)
    tb.sh("zfs", "snapshot", f"{source}@e")
    second = store.run("sync", "--chunk-size", "1M", source, store.url)
    assert second.returncode == 0 and "stored d, e" in second.stderr, second.stderr
    listing = store.run("ls", store.url)
    lines = listing.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == [f"{source}@c", f"{source}@d", f"{source}@e"]
    assert "full;" in lines[0] and "incremental from @c" in lines[1] and "incremental from @d" in lines[2]
    assert all("complete" in line for line in lines)
    again = store.run("sync", source, store.url)
    assert again.returncode == 0 and "up to date" in again.stderr
    checked = store.run("check", source, store.url)
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.decode().startswith(f"SNAPFERRY OK - {store.url}: newest common snapshot e is ")

    restored = store.run("restore", f"{store.url}/{source}@e", target)
    assert restored.returncode == 0, restored.stderr
    for snapshot in ("c", "d", "e"):
        assert tb.guid(f"{target}@{snapshot}") == tb.guid(f"{source}@{snapshot}")
    _same(source, target, "e")
    assert tb.sh("zfs", "get", "-H", "-o", "value", "compression", target).stdout.decode().strip() == "on"
    # A stored stream is a plain zfs stream: `get` gives it to any pipe, byte for byte what was stored.
    got = subprocess.run(store.argv("get", f"{store.url}/{source}@c"), capture_output=True, env=store.env(), check=True).stdout
    assert got == tb.send_bytes(f"{source}@c")


def test_uploader_killed_twice_resumes_from_the_bucket(store: Store, source: str, target: str) -> None:
    args = ("--chunk-size", "1M", "--jobs", "2", source, store.url)
    seed = random.randrange(1 << 30)
    first, second = sorted(random.Random(seed).sample(range(1, 12), 2))
    for kill_at in (first, second):
        seen = store.killed_after("sync", *args, when=lambda e, k=kill_at: e.get("event") == "chunk" and e.get("index") == k)
        assert any(e.get("event") == "chunk" for e in seen), f"seed {seed}"
        # As if the sender were rebuilt: nothing of the last run is left on it (HOME, locks), only in the bucket.
        shutil.rmtree(store.home)
        store.home.mkdir()
    chunks_before = [k for k in store.objects() if "/chunk-" in k]
    assert len(chunks_before) >= 5
    assert not [k for k in store.objects() if k.endswith("manifest.json")]
    done = store.run("sync", "--json", *args)
    assert done.returncode == 0, done.stderr
    uploaded = [e for e in events_of(done, "chunk") if e["uploaded"]]
    skipped = [e for e in events_of(done, "chunk") if not e["uploaded"]]
    # Every chunk the killed runs stored is checked and kept, not sent again.
    assert len(skipped) == len(chunks_before)
    assert events_of(done, "resume")
    total = len(uploaded) + len(skipped)
    assert total == len([k for k in store.objects() if "/chunk-" in k])
    assert store.run("restore", f"{store.url}/{source}@c", target).returncode == 0
    _same(source, target, "c")


def test_killed_restore_goes_on_and_fetches_only_what_is_missing(store: Store, source: str, target: str) -> None:
    assert store.run("sync", "--chunk-size", "1M", source, store.url).returncode == 0
    total_chunks = len([k for k in store.objects() if "/chunk-" in k])
    restore = ("--checkpoint", "1M", "--jobs", "1", f"{store.url}/{source}@c", target)
    store.killed_after("restore", *restore, when=lambda e: e.get("event") == "checkpoint" and e.get("seq") == 6)
    offset = json.loads(tb.snapferry("token", "--decode", "--json", tb.token(target)).stdout)["offset"]
    assert offset > 6 * MIB
    done = store.run("restore", "--json", *restore)
    assert done.returncode == 0, done.stderr
    assert events_of(done, "resume")
    # The first chunk (for the stream's BEGIN), then only from the chunk that holds the checkpoint on.
    assert events_of(done, "fetched")[0]["chunks"] == 1 + total_chunks - offset // MIB
    _same(source, target, "c")


def test_a_damaged_chunk_is_named_by_verify_and_refused_by_restore(store: Store, source: str, target: str) -> None:
    assert store.run("sync", "--chunk-size", "1M", source, store.url).returncode == 0
    assert store.run("verify", store.url).returncode == 0
    chunk = sorted(k for k in store.objects() if "/chunk-" in k)[4]
    client = store.swift.client()
    body = bytearray(client.get_object(Bucket=store.bucket, Key=chunk)["Body"].read())
    body[1000] ^= 0x01
    client.put_object(Bucket=store.bucket, Key=chunk, Body=bytes(body))
    checked = store.run("verify", store.url)
    assert checked.returncode == 5
    assert f"stored chunk {chunk} is damaged" in checked.stderr
    restored = store.run("restore", f"{store.url}/{source}@c", target)
    assert restored.returncode == 5, restored.stderr
    assert f"stored chunk {chunk} is damaged" in restored.stderr
    assert "Traceback" not in restored.stderr
    assert not tb.exists(target) or "c" not in tb.snapshot_names(target)


def test_encrypted_at_rest(store: Store, source: str, target: str, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    assert store.run("sync", "--chunk-size", "1M", "--key-file", str(key), source, store.url).returncode == 0
    client = store.swift.client()
    plain = tb.send_bytes(f"{source}@c")
    for name in (k for k in store.objects() if "/chunk-" in k):
        stored = client.get_object(Bucket=store.bucket, Key=name)["Body"].read()
        assert plain[400:464] not in stored
    no_key = store.run("restore", f"{store.url}/{source}@c", target)
    assert no_key.returncode == 2 and "is encrypted: give its key file with --key-file" in no_key.stderr
    other = tmp_path / "other"
    other.write_bytes(os.urandom(32))
    wrong = store.run("verify", "--key-file", str(other), store.url)
    assert wrong.returncode == 5 and "does not decrypt" in wrong.stderr
    assert store.run("verify", "--key-file", str(key), store.url).returncode == 0
    assert store.run("restore", "--key-file", str(key), f"{store.url}/{source}@c", target).returncode == 0
    _same(source, target, "c")


def test_keep_prunes_whole_chains_only(store: Store, source: str) -> None:
    for name, seed in (("d", 20), ("e", 21), ("f", 22)):
        assert store.run("sync", "--chunk-size", "1M", "--full-every", "1", "--keep", "2", source, store.url).returncode == 0
        tb.change_tree(tb.mountpoint(source), seed=seed)
        tb.sh("zfs", "snapshot", f"{source}@{name}")
    done = store.run("sync", "--chunk-size", "1M", "--full-every", "1", "--keep", "2", source, store.url)
    assert done.returncode == 0, done.stderr
    # Chains: c (full) <- d; e (full) <- f. Keeping the newest 2 (e, f) needs e's full and no more.
    lines = store.run("ls", store.url).stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == [f"{source}@e", f"{source}@f"]
    assert "full;" in lines[0] and "incremental from @e" in lines[1]
    assert not [k for k in store.objects() if "/@c/" in k or "/@d/" in k]
    refused = store.run("forget", f"{store.url}/{source}@e")
    assert refused.returncode == 4 and "is the base of stored incrementals (f)" in refused.stderr


def test_bad_credentials_bucket_permission_and_prefix(store: Store, source: str, swift: SwiftServer) -> None:
    wrong = store.run("sync", source, store.url, env=store.env(AWS_SECRET_ACCESS_KEY="wrong"))
    assert wrong.returncode == 4 and "refused the credentials (SignatureDoesNotMatch)" in wrong.stderr
    assert "wrong" not in wrong.stderr and "testing" not in wrong.stderr
    missing = store.run("sync", source, "s3://no-such-bucket-here/x")
    assert missing.returncode == 4 and "no bucket 'no-such-bucket-here'" in missing.stderr
    other = store.run("ls", store.url, env=store.env(**swift.env(other=True)))
    assert other.returncode == 4 and "no permission" in other.stderr
    swift.client().put_object(Bucket=store.bucket, Key=f"host1/{source}/notes.txt", Body=b"mine")
    foreign = store.run("sync", source, store.url)
    assert foreign.returncode == 4 and "holds objects that are not a snapferry backup" in foreign.stderr
    assert len(foreign.stderr.strip().splitlines()) == 1


def test_quota_exceeded_keeps_what_is_stored(store: Store, source: str, swift: SwiftServer) -> None:
    swift.set_bucket_quota(store.bucket, 4 * MIB)
    try:
        full = store.run("sync", "--chunk-size", "1M", "--jobs", "1", "--retries", "0", source, store.url)
        assert full.returncode == 3 and "quota exceeded" in full.stderr, full.stderr
        stored = [k for k in store.objects() if "/chunk-" in k]
        assert stored
    finally:
        swift.set_bucket_quota(store.bucket, None)
    done = store.run("sync", "--json", "--chunk-size", "1M", source, store.url)
    assert done.returncode == 0, done.stderr
    assert len([e for e in events_of(done, "chunk") if not e["uploaded"]]) == len(stored)


def test_proxy_stopped_mid_upload_and_started_again(store: Store, source: str, target: str, swift: SwiftServer) -> None:
    proc = subprocess.Popen(
        store.argv("sync", "--json", "--chunk-size", "1M", "--jobs", "1", source, store.url),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=store.env(),
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if json.loads(line).get("event") == "chunk":
                swift.stop_proxy()
                break
        swift.start_proxy()
        rest = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, rest
    finally:
        swift.start_proxy() if proc.returncode is None else None
    assert store.run("restore", f"{store.url}/{source}@c", target).returncode == 0
    _same(source, target, "c")


def test_zfs_daemon_killed_mid_upload(store: Store, source: str, bed: tb.Bed) -> None:
    proc = subprocess.Popen(
        store.argv("sync", "--json", "--chunk-size", "1M", "--jobs", "1", "--retries", "0", source, store.url),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=store.env(),
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if json.loads(line).get("event") == "chunk":
            tb.reboot_daemon([bed.src.directory, bed.dst.directory], [bed.src.name, bed.dst.name])
            break
    proc.stderr.read()
    assert proc.wait(timeout=120) != 0
    done = store.run("sync", "--json", "--chunk-size", "1M", source, store.url)
    assert done.returncode == 0, done.stderr
    assert [e for e in events_of(done, "chunk") if not e["uploaded"]]
    assert store.run("verify", store.url).returncode == 0


def test_a_tree_with_snapshot_dry_run_holds_and_metrics(store: Store, bed: tb.Bed, tmp_path: Path) -> None:
    top = bed.dataset("offtree")
    for name in (top, f"{top}/a", f"{top}/b"):
        tb.sh("zfs", "create", name)
        tb.write_tree(tb.mountpoint(name), seed=len(name), megabytes=1, small_files=5)
    try:
        tb.sh("zfs", "snapshot", "-r", f"{top}@s1")
        plan = store.run("sync", "-r", "--dry-run", top, store.url)
        assert plan.returncode == 0, plan.stderr
        assert plan.stdout.decode().splitlines() == [f"{name}: store s1 (full)" for name in (top, f"{top}/a", f"{top}/b")]
        assert store.objects() == []
        metrics = tmp_path / "offsite.prom"
        done = store.run("sync", "-r", "--snapshot", "--metrics-file", str(metrics), top, store.url)
        assert done.returncode == 0, done.stderr
        taken = [n for n in tb.snapshot_names(f"{top}/b") if n.startswith("snapferry_")]
        assert len(taken) == 1
        lines = store.run("ls", store.url).stdout.decode().splitlines()
        assert sorted(line.split()[0] for line in lines) == sorted(f"{name}@{taken[0]}" for name in (top, f"{top}/a", f"{top}/b"))
        assert "snapferry_sync_exit_code" in metrics.read_text() and 'exit_code{source="' in metrics.read_text()
        assert 'snapferry_sync_exit_code{source="' + top + '",target="' + store.url + '"} 0.0' in metrics.read_text()
        # The holds that kept the snapshots from a pruner while they were stored are gone.
        assert all(tb.snapferry("holds", name).stdout == b"" for name in (top, f"{top}/a", f"{top}/b"))
        copy = bed.target("offtree-copy")
        restored = store.run("restore", "-r", f"{store.url}/{top}@{taken[0]}", copy)
        assert restored.returncode == 0, restored.stderr
        for name in ("", "/a", "/b"):
            assert tb.guid(f"{copy}{name}@{taken[0]}") == tb.guid(f"{top}{name}@{taken[0]}")
            assert tb.manifest(tb.mountpoint(copy + name)) == tb.manifest(tb.mountpoint(top + name))
        again = store.run("restore", "-r", f"{store.url}/{top}@{taken[0]}", copy)
        assert again.returncode == 0, again.stderr
    finally:
        tb.destroy("-r", top)
        if tb.exists(bed.target("offtree-copy")):
            tb.destroy("-r", bed.target("offtree-copy"))


def test_a_partial_upload_of_a_destroyed_snapshot(store: Store, source: str) -> None:
    store.killed_after("sync", "--chunk-size", "1M", "--jobs", "1", source, store.url, when=lambda e: e.get("event") == "chunk")
    checked = store.run("check", source, store.url).stdout.decode()
    assert checked.startswith(f"SNAPFERRY CRITICAL - {store.url}: no snapshot in common with the source"), checked
    # The killed run's hold is still on @c: it keeps a pruner from taking what the resume needs.
    assert tb.sh("zfs", "destroy", f"{source}@c", check=False).returncode != 0
    assert tb.snapferry("release", f"snapferry:{store.url}", f"{source}@c").returncode == 0
    tb.destroy(f"{source}@c")
    tb.sh("zfs", "snapshot", f"{source}@d")
    refused = store.run("sync", "--chunk-size", "1M", source, store.url)
    assert refused.returncode == 4
    assert f"{store.url}/{source}@c is a partial upload the source can no longer continue" in refused.stderr
    assert f"snapferry forget {store.url}/{source}@c" in refused.stderr
    restarted = store.run("sync", "--chunk-size", "1M", "--on-stale", "restart", source, store.url)
    assert restarted.returncode == 0, restarted.stderr
    assert "discarded the partial upload" in restarted.stderr
    lines = store.run("ls", store.url).stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == [f"{source}@d"]
