"""The `zfs send -R` header fuzz targets: XDR nvlists, and the compound BEGIN read as a ReplicationHeader; oracles, seeds."""

from __future__ import annotations

import functools
from pathlib import Path

from fuzz.contract import Errors, attempt, check, outcome
from snapferry.errors import NvlistError, StreamFormatError, StreamTruncated
from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType
from snapferry.zfs.codec.nvlist_xdr import decode_xdr, encode_xdr
from snapferry.zfs.codec.records import HEADER_SIZE
from snapferry.zfs.codec.replication import ReplicationHeader, compound_begin, header_records, read_header

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "zfs-fuse-R"
HEADER_ERRORS: Errors = (StreamFormatError, StreamTruncated)
# The input after marker byte 1 is a payload, framed here with a correct END checksum so damage reaches the nvlist.
AS_PAYLOAD = 1


def run_nvlist_xdr(data: bytes) -> str:
    nvl, error = attempt((NvlistError,), lambda: nvlist.decode(data))
    if nvl is not None:
        nvlist.format_nvlist(nvl)
        again = encode_xdr(nvl, big_endian_host=data[1] == 0)
        check(decode_xdr(again) == nvl, "an XDR nvlist does not survive re-encoding")
        check(nvlist.decode(nvlist.encode(nvl)) == nvl, "an XDR nvlist does not survive the native encoding")
    return outcome(error)


def run_replication_header(data: bytes) -> str:
    framed = data[1:]
    if data[:1] == bytes([AS_PAYLOAD]):
        payload = framed[: len(framed) & ~3]
        framed = header_records(compound_begin("pool/fs@snap"), payload)
    parsed, error = attempt(HEADER_ERRORS, lambda: read_header(framed))
    if parsed is not None:
        begin, header, end = parsed
        check(end == HEADER_SIZE + begin.payloadlen + HEADER_SIZE, f"the header ends at {end}, not after its END record")
        again = read_header(header_records(begin, header.to_payload()))[1]
        check(again == header, "a -R header does not survive re-packing")
        names = [fs.name for fs in header.filesystems]
        if header.filesystems:
            smaller = header.without_filesystems([header.filesystems[0].guid])
            check([fs.name for fs in ReplicationHeader.from_payload(smaller.to_payload()).filesystems] == names[1:], "without_filesystems")
    return outcome(error)


@functools.cache
def replication_seeds() -> tuple[bytes, ...]:
    samples = [path.read_bytes() for path in sorted(SAMPLES.glob("*.header"))]
    payloads = [sample[HEADER_SIZE : len(sample) - HEADER_SIZE] for sample in samples]
    clone = NvList(
        (
            NvPair("name", NvType.STRING, "pool/clone"),
            NvPair("parentfromsnap", NvType.UINT64, 7),
            NvPair("props", NvType.NVLIST, NvList((NvPair("quota", NvType.UINT64, 1 << 30), NvPair("user:x", NvType.STRING, "y")))),
            NvPair("origin", NvType.UINT64, 0x1234),
            NvPair("snaps", NvType.NVLIST, NvList((NvPair("s1", NvType.UINT64, 0xAB),))),
            NvPair("snapprops", NvType.NVLIST, NvList((NvPair("s1", NvType.NVLIST, NvList((NvPair("user:y", NvType.STRING, "z"),))),))),
        )
    )
    synthetic = NvList(
        (
            NvPair("tosnap", NvType.STRING, "snap"),
            NvPair("not_recursive", NvType.BOOLEAN),
            NvPair("fss", NvType.NVLIST, NvList((NvPair("0xabc", NvType.NVLIST, clone),))),
        )
    )
    return (*[b"\0" + s for s in samples], *[bytes([AS_PAYLOAD]) + p for p in payloads], bytes([AS_PAYLOAD]) + encode_xdr(synthetic))


@functools.cache
def nvlist_xdr_seeds() -> tuple[bytes, ...]:
    # Imported here: fuzz.targets imports this module for its table.
    from fuzz.targets import every_type, nested_list

    seeds = [encode_xdr(every_type()), encode_xdr(every_type(), big_endian_host=True), encode_xdr(nested_list(4)), encode_xdr(NvList())]
    return (*seeds, *[seed[1:] for seed in replication_seeds() if seed[:1] == bytes([AS_PAYLOAD])])
