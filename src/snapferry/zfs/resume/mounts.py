"""Mounting a completed replica, and the descendants that unmounting it took down, never a partial one."""

from __future__ import annotations

from snapferry.core.events import EventSink
from snapferry.errors import SnapferryError
from snapferry.zfs.engine.command import Zfs
from snapferry.zfs.resume.checkpoints import PREFIX


def _mountable(props: dict[str, str]) -> bool:
    return props.get("type") == "filesystem" and props.get("canmount") == "on" and props.get("mountpoint") not in ("none", "legacy")


def mount_replica(zfs: Zfs, dataset: str, events: EventSink) -> None:
    """Mount `dataset` and then, parents first, every descendant file system that is not mounted (those
    with canmount=on and a mountpoint of their own).

    zfs-fuse's `zfs unmount` takes a dataset's mounted children down with it, and the receiver unmounts
    a partial dataset, so a tree's children would otherwise stay unmounted after their parent's transfer.
    A descendant holding snapferry checkpoints is mid-transfer and stays unmounted: zfs-fuse hangs a
    reader of a directory whose objects have not all arrived.
    """
    try:
        table = zfs.get_properties(dataset, "type", "mounted", "canmount", "mountpoint", recursive_depth=1 << 16)
        partial = {name.partition("@")[0] for name in table if f"@{PREFIX}-" in name}
        down: set[str] = set()  # file systems left unmounted: nothing below them is mounted either
        for name in sorted((n for n in table if "@" not in n), key=lambda n: n.count("/")):
            props = table[name]
            mid_transfer = name != dataset and (name in partial or name.rpartition("/")[0] in down)
            if mid_transfer or not _mountable(props):
                down.add(name)
            elif props.get("mounted") != "yes":
                zfs.mount(name)
    except SnapferryError as exc:
        events("warning", message=f"{exc}; mount it with: zfs mount {dataset}")
