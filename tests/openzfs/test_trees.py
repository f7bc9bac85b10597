"""-R trees on real OpenZFS: a plain `zfs send -R` cut and resumed in pieces, to what `zfs receive -d` makes of it."""

from __future__ import annotations

import json

import pytest

from snapferry_testkit.zfs_testbed import change_tree, manifest, mountpoint, send_bytes, sh, snapferry, write_tree

CHILDREN = ["a", "a/b", "c"]


def _tree_state(top: str) -> dict[str, object]:
    out = sh("zfs", "get", "-H", "-p", "-r", "-o", "name,value", "guid", top).stdout.decode()
    state: dict[str, object] = {}
    for line in out.splitlines():
        name, value = line.split("\t")
        if "@" in name:
            state[name[len(top) :]] = int(value)
        else:
            state[name[len(top) :]] = manifest(mountpoint(name) / "data")
    return state


@pytest.mark.parametrize("sender", ["zfs", "snapferry"])
def test_an_R_stream_cut_then_resumed_in_pieces(pool: str, sender: str) -> None:
    root = f"{pool}/tree"
    sh("zfs", "create", root)
    for child in CHILDREN:
        sh("zfs", "create", f"{root}/{child}")
    names = [root] + [f"{root}/{c}" for c in CHILDREN]
    for n, dataset in enumerate(names):
        write_tree(mountpoint(dataset) / "data", seed=60 + n, megabytes=4)
    sh("zfs", "snapshot", "-r", f"{root}@s1")
    for n, dataset in enumerate(names):
        change_tree(mountpoint(dataset) / "data", seed=70 + n)
    sh("zfs", "snapshot", "-r", f"{root}@s2")
    stream = sh("zfs", "send", "-R", f"{root}@s2").stdout if sender == "zfs" else send_bytes("-R", f"{root}@s2")

    sh("zfs", "create", f"{pool}/ref")
    sh("zfs", "receive", "-d", f"{pool}/ref", input=sh("zfs", "send", "-R", f"{root}@s2").stdout)
    sh("zfs", "create", f"{pool}/dst")
    cut = snapferry("receive", "-s", "-d", "--checkpoint", "1M", f"{pool}/dst", input=stream[: len(stream) // 2])
    assert cut.returncode == 3, cut.stderr
    token = snapferry("token", f"{pool}/dst").stdout.decode().strip()
    assert token.startswith("sf1r-")
    assert json.loads(snapferry("token", "--decode", token).stdout)["snapshots_received"] > 0
    rest = snapferry("send", "-t", token)
    assert rest.returncode == 0, rest.stderr
    assert len(rest.stdout) < len(stream) * 2 // 3
    done = snapferry("receive", "-s", "-d", f"{pool}/dst", input=rest.stdout)
    assert done.returncode == 0, done.stderr
    assert _tree_state(f"{pool}/dst/tree") == _tree_state(f"{pool}/ref/tree")
