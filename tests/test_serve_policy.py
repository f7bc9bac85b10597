"""The forced-command policy of `snapferry serve`: what a restricted key may run."""

from __future__ import annotations

import shlex

import pytest

from snapferry.cli.serve import Policy
from snapferry.errors import Refused

POLICY = Policy(("tank/backup",), read_only=False)
READ_ONLY = Policy(("tank/backup",), read_only=True)


@pytest.mark.parametrize(
    "command",
    [
        "snapferry receive -q -s --checkpoint 1G tank/backup/fs",
        "/usr/local/bin/snapferry send -q -I @a tank/backup/fs@c",
        "python3 -m snapferry token tank/backup",
        "snapferry send -q -t sf1-abc-123",
        "snapferry send --json --compress zstd:3 --bwlimit 10M -I @a tank/backup/fs@c",
        "snapferry status --json tank/backup/fs",
        "snapferry receive --json -s --mode pieces -o atime=off tank/backup/fs",
        "snapferry receive -q --json -A tank/backup/fs",
        "snapferry snapshot --json tank/backup/fs@snapferry_2026",
        "snapferry session",
    ],
)
def test_allowed(command: str) -> None:
    words = shlex.split(command)
    assert POLICY.check(command) == words[3 if words[1] == "-m" else 1 :]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("snapferry receive -s tank/other", "outside --allow"),
        ("snapferry receive -s tank/backupx", "outside --allow"),
        ("snapferry send -I other/fs@a tank/backup/fs@c", "outside --allow"),
        # No raw zfs or zpool reaches the host: sync asks `snapferry status` and runs snapferry verbs.
        ("zfs destroy -r tank/backup", "zfs is not allowed"),
        ("zfs rollback -R tank/backup/fs@a", "zfs is not allowed"),
        ("zfs get -H -p -o value type tank/backup/fs", "zfs is not allowed"),
        ("zfs set atime=off tank/backup/fs", "zfs is not allowed"),
        ("zpool get -H -o value feature@extensible_dataset tank", "zpool is not allowed"),
        ("snapferry receive -s -o mountpoint=/etc tank/backup/fs", "receive -o mountpoint is not allowed"),
        ("snapferry status --json tank", "outside --allow"),
        ("snapferry rollback -r other/fs@a", "outside --allow"),
        ("snapferry snapshot other/fs@a", "outside --allow"),
        ("snapferry sync tank/backup/fs other/fs", "snapferry sync is not allowed"),
        ("snapferry receive -s --no-such-flag tank/backup/fs", "cannot parse"),
        ("snapferry receive --zf /bin/sh tank/backup/fs", "--zfs is not allowed"),
        ("rm -rf /", "rm is not allowed"),
        ("snapferry demo", "snapferry demo is not allowed"),
        ("snapferry receive --zfs=/bin/sh tank/backup/fs", "--zfs is not allowed"),
        ("snapferry send 'unterminated", "cannot parse"),
    ],
)
def test_refused(command: str, message: str) -> None:
    with pytest.raises(Refused, match=message):
        POLICY.check(command)


def test_read_only_key_cannot_receive_or_roll_back() -> None:
    with pytest.raises(Refused, match="read-only"):
        READ_ONLY.check("snapferry receive -s tank/backup/fs")
    with pytest.raises(Refused, match="read-only: rollback is not allowed"):
        READ_ONLY.check("snapferry rollback -r tank/backup/fs@a")
    with pytest.raises(Refused, match="read-only: snapshot is not allowed"):
        READ_ONLY.check("snapferry snapshot tank/backup/fs@b")
    assert READ_ONLY.check("snapferry send tank/backup/fs@a")[-1] == "tank/backup/fs@a"


BTRFS = Policy(("/mnt/backup",), read_only=False)


@pytest.mark.parametrize(
    "command",
    [
        "snapferry receive --json -s /mnt/backup/host1",
        "snapferry subvolumes /mnt/backup/host1",
        "snapferry token /mnt/backup/host1/day2",
        "snapferry send --json -p /mnt/backup/snaps/day1 /mnt/backup/snaps/day2",
        "snapferry send -t sf1b-abc /mnt/backup/snaps/day2",
        "snapferry receive -A /mnt/backup/host1/day2",
    ],
)
def test_btrfs_paths_allowed(command: str) -> None:
    assert BTRFS.check(command) == shlex.split(command)[1:]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("snapferry receive -s /mnt/backup/../../etc", "path /mnt/backup/../../etc is outside"),
        ("snapferry receive -s /mnt/backupx", "outside --allow"),
        ("snapferry send -p /mnt/other/a /mnt/backup/b", "path /mnt/other/a is outside"),
        ("snapferry subvolumes /", "outside --allow"),
        ("snapferry receive -s ./backup", "outside --allow"),
    ],
)
def test_btrfs_paths_refused(command: str, message: str) -> None:
    with pytest.raises(Refused, match=message):
        BTRFS.check(command)
