"""The forced-command policy of `snapferry serve`: what a restricted key may run."""

from __future__ import annotations

import sys

import pytest

from snapferry.errors import Refused
from snapferry.sync.serve import Policy

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
        "zfs get -H -p -r -d 1 -o name,property,value guid,createtxg tank/backup/fs",
        "zfs get -H -p -o value type tank/backup/fs",
        "zfs rollback -r tank/backup/fs@a",
        "zfs set atime=off tank/backup/fs",
    ],
)
def test_allowed(command: str) -> None:
    argv = POLICY.check(command)
    assert argv[0] in ("zfs", sys.executable)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("snapferry receive -s tank/other", "outside --allow"),
        ("snapferry receive -s tank/backupx", "outside --allow"),
        ("snapferry send -I other/fs@a tank/backup/fs@c", "outside --allow"),
        ("zfs destroy -r tank/backup", "zfs destroy is not allowed"),
        ("zfs set mountpoint=/etc tank/backup/fs", "zfs set mountpoint=/etc is not allowed"),
        ("zfs get all tank", "outside --allow"),
        ("zfs get all other/secret tank/backup/fs", "outside --allow"),
        ("zfs get -H guid", "must name a dataset"),
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
    with pytest.raises(Refused, match="zfs rollback is not allowed"):
        READ_ONLY.check("zfs rollback -r tank/backup/fs@a")
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
    assert BTRFS.check(command)[0] == sys.executable


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
