"""An -R header's properties as `zfs set` takes them: index properties travel as numbers, and zfs set wants their names."""

from __future__ import annotations

from collections.abc import Mapping

_OFF_ON = ("off", "on")
# zfs_prop.c's index tables, for the values every ZFS since pool v23 shares (OpenZFS only appended).
_INDEX: dict[str, tuple[str, ...]] = {
    **{name: _OFF_ON for name in ("atime", "readonly", "setuid", "exec", "devices", "xattr", "nbmand", "vscan", "zoned", "relatime")},
    "canmount": ("off", "on", "noauto"),
    "compression": (
        "inherit", "on", "off", "lzjb", "empty", *(f"gzip-{n}" for n in range(1, 10)), "zle", "lz4", "zstd",
    ),
    "checksum": (
        "inherit", "on", "off", "label", "gang_header", "zilog", "fletcher2", "fletcher4", "sha256", "zilog2", "noparity",
        "sha512", "skein", "edonr", "blake3",
    ),
    "snapdir": ("hidden", "visible"),
    "logbias": ("latency", "throughput"),
    "primarycache": ("none", "metadata", "all"),
    "secondarycache": ("none", "metadata", "all"),
    "sync": ("standard", "always", "disabled"),
}  # fmt: skip
# Index properties whose numbers differ between ZFS versions, or pack more than a name (zstd levels, dedup's
# verify bit): a wrong name would be worse than none, so they are left to the user.
_NOT_MAPPED = frozenset({"dedup", "aclinherit", "aclmode", "acltype", "volmode", "dnodesize", "redundant_metadata", "keyformat"})


def settable_properties(props: Mapping[str, object]) -> tuple[dict[str, str], list[str]]:
    """({name: value as zfs set takes it}, [names that cannot be given to zfs set with confidence])."""
    chosen: dict[str, str] = {}
    skipped: list[str] = []
    for name, value in props.items():
        if isinstance(value, str):
            chosen[name] = value
        elif isinstance(value, int) and name in _INDEX:
            names = _INDEX[name]
            if 0 <= value < len(names) and names[value] != "inherit":
                chosen[name] = names[value]
            else:
                skipped.append(name)
        elif isinstance(value, int) and name not in _NOT_MAPPED:
            chosen[name] = str(value)  # a number: quota, recordsize, copies...
        else:
            skipped.append(name)
    return chosen, skipped
