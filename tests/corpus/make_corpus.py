"""Regenerates the damaged-input corpus beside it, deterministically: `python3 -m tests.corpus.make_corpus` (from the root).

Each file is one malicious or damaged input; expected.json says which parser must refuse it, with
which exception and a regex its one-line message matches. The ZFS streams are cut from the OpenZFS
2.3.2 fixture `incr_s1_s2.stream` (one record of each kind it has), so they need the shared data;
the btrfs ones (btrfs_cases.py) are built from synthetic streams.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard
from fuzz.targets import Split, resize, serialize, split_stream

from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType
from snapferry.zfs.codec.nvlist_xdr import encode_xdr
from snapferry.zfs.codec.openzfs_token import OpenZfsToken, to_nvlist
from snapferry.zfs.codec.records import COMPOUNDSTREAM, FEATURE_DEDUP, HEADER_SIZE, RecordType, record_type
from snapferry.zfs.codec.replication import compound_begin, header_records
from snapferry.zfs.codec.token import ResumeToken
from snapferry_testkit.shared_data import OPENZFS_DATA

HERE = Path(__file__).resolve().parent
SOURCE = OPENZFS_DATA / "zfs-2.3.2" / "incr_s1_s2.stream"
R_SAMPLE = HERE.parent / "data" / "zfs-fuse-R" / "r_full.header"


@dataclass(frozen=True)
class Case:
    name: str
    target: str
    exception: str
    message: str
    data: bytes


def base_split() -> Split:
    """BEGIN, the first record of each kind the fixture has (an OBJECT with a bonus buffer), WRITE cut to 512 bytes, END."""
    split = split_stream(SOURCE.read_bytes())
    picked: dict[RecordType, tuple[bytes, bytes]] = {}
    for header, payload in split.records:
        kind = record_type(header, 0)
        if kind not in picked and (kind != RecordType.OBJECT or payload):
            picked[kind] = (resize(header, 512), payload[:512]) if kind == RecordType.WRITE else (header, payload)
    order = [RecordType.OBJECT, RecordType.FREE, RecordType.WRITE, RecordType.FREEOBJECTS, RecordType.WRITE_EMBEDDED, RecordType.END]
    return Split(split.begin, tuple(picked[kind] for kind in order))


def _set(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _with_record(split: Split, index: int, header: bytes, payload: bytes | None = None) -> Split:
    records = list(split.records)
    records[index] = (header, records[index][1] if payload is None else payload)
    return Split(split.begin, tuple(records))


def _offset_of(split: Split, index: int) -> int:
    return len(split.begin) + sum(HEADER_SIZE + len(p) for _, p in split.records[:index])


def stream_cases() -> list[Case]:
    base = base_split()
    good = serialize(base)
    write = 2  # index of the WRITE record
    write_at = _offset_of(base, write)
    begin = base.begin
    cases = [
        Case(
            "zfs-stream-huge-payload.bin",
            "stream",
            "StreamFormatError",
            r"^WRITE record at byte \d+ claims a 1099511627776-byte payload \(limit 16777216\): corrupt stream$",
            serialize(_with_record(base, write, _set(base.records[write][0], 32, "<Q", 1 << 40))),
        ),
        Case(
            "zfs-stream-huge-begin-payload.bin",
            "stream",
            "StreamFormatError",
            r"^BEGIN record at byte 0 claims a 4294967295-byte payload \(limit 1048576\)",
            _set(good, 4, "<I", 0xFFFF_FFFF),
        ),
        Case(
            "zfs-stream-huge-bonus.bin",
            "stream",
            "StreamFormatError",
            r"^OBJECT record at byte 312 claims a 2147483647-byte payload",
            serialize(_with_record(base, 0, _set(base.records[0][0], 36, "<I", 0x7FFF_FFFF))),
        ),
        Case(
            "zfs-stream-huge-embedded.bin",
            "stream",
            "StreamFormatError",
            r"^WRITE_EMBEDDED record at byte \d+ claims a 4096-byte payload \(limit 112\)",
            serialize(_with_record(base, 4, _set(base.records[4][0], 52, "<I", 4096))),
        ),
        Case(
            "zfs-stream-odd-payload.bin",
            "stream",
            "StreamFormatError",
            r"^OBJECT record at byte 312 has a payload of 13 bytes, not whole words",
            serialize(_with_record(base, 0, _set(base.records[0][0], 36, "<I", 13), bytes(13))),
        ),
        Case(
            "zfs-stream-begin-inside.bin",
            "stream",
            "StreamFormatError",
            r"^BEGIN record at byte \d+ inside a stream: corrupt or concatenated wrongly$",
            serialize(Split(begin, (*base.records[:2], (begin, b""), *base.records[2:]))),
        ),
        Case(
            "zfs-stream-dedup.bin",
            "stream",
            "StreamFormatError",
            r"^deduplicated stream \(zfs send -D\) is not supported: send without -D$",
            serialize(Split(_set(begin, 16, "<Q", struct.unpack_from("<Q", begin, 16)[0] | FEATURE_DEDUP << 2), base.records)),
        ),
        Case(
            "zfs-stream-write-byref.bin",
            "stream",
            "StreamFormatError",
            r"^deduplicated stream \(zfs send -D\) is not supported",
            serialize(_with_record(base, write, _set(base.records[write][0], 0, "<I", RecordType.WRITE_BYREF), b"")),
        ),
        Case(
            "zfs-stream-compound-R.bin",
            "stream",
            "StreamFormatError",
            r"^compound stream \(zfs send -R\) header where one dataset's stream should start",
            serialize(Split(_set(begin, 16, "<Q", (struct.unpack_from("<Q", begin, 16)[0] & ~3) | COMPOUNDSTREAM), base.records)),
        ),
        Case(
            "zfs-stream-unknown-header-type.bin",
            "stream",
            "StreamFormatError",
            r"^unknown stream header type 3 in BEGIN record$",
            serialize(Split(_set(begin, 16, "<Q", struct.unpack_from("<Q", begin, 16)[0] | 3), base.records)),
        ),
        Case(
            "zfs-stream-bad-magic.bin",
            "stream",
            "StreamFormatError",
            r"^bad magic 0x2f5bacbad in BEGIN record: not a ZFS send stream$",
            _set(good, 8, "<Q", 0x2F5BACBAD),
        ),
        Case(
            "zfs-stream-byteswapped.bin",
            "stream",
            "StreamFormatError",
            r"^stream was written by a host of the other byte order",
            _set(good, 8, ">Q", 0x2F5BACBAC),
        ),
        Case(
            "zfs-stream-not-begin.bin",
            "stream",
            "StreamFormatError",
            r"^stream does not start with a BEGIN record \(record type 3\)",
            good[write_at:],
        ),
        Case(
            "zfs-stream-no-snapshot-name.bin",
            "stream",
            "StreamFormatError",
            r"^BEGIN record names no snapshot \(toname 'pool/fs'\)",
            serialize(Split(begin[:56] + b"pool/fs".ljust(256, b"\0"), base.records)),
        ),
        Case(
            "zfs-stream-unknown-record-type.bin",
            "stream",
            "StreamFormatError",
            r"^unknown record type 77 at byte 312: not a ZFS send stream, or corrupt$",
            serialize(_with_record(base, 0, _set(base.records[0][0], 0, "<I", 77))),
        ),
        Case(
            "zfs-stream-truncated-header.bin",
            "stream",
            "StreamTruncated",
            r"^input ended inside the BEGIN record \(100 of 312 bytes\)$",
            good[:100],
        ),
        Case(
            "zfs-stream-truncated-record-header.bin",
            "stream",
            "StreamTruncated",
            rf"^input ended at stream byte {write_at + 200}, inside a record header$",
            good[: write_at + 200],
        ),
        Case(
            "zfs-stream-truncated-payload.bin",
            "stream",
            "StreamTruncated",
            rf"^input ended inside the WRITE record at stream byte {write_at}$",
            good[: write_at + HEADER_SIZE + 100],
        ),
        Case(
            "zfs-stream-no-end.bin",
            "stream",
            "StreamTruncated",
            r"^input ended at stream byte \d+, before the END record$",
            good[:-HEADER_SIZE],
        ),
        Case(
            "zfs-stream-bitflip-payload.bin",
            "stream",
            "StreamIntegrityError",
            rf"^checksum mismatch in the record at stream byte {write_at + HEADER_SIZE + 512}: "
            rf"bytes {write_at + HEADER_SIZE}-\d+ were corrupted in transit$",
            _flip(good, write_at + HEADER_SIZE + 200),
        ),
        Case(
            "zfs-stream-bitflip-header.bin",
            "stream",
            "StreamIntegrityError",
            rf"^checksum mismatch in the record at stream byte {write_at}:",
            _flip(good, write_at + 8),
        ),
        Case(
            "zfs-stream-bad-end-checksum.bin",
            "stream",
            "StreamIntegrityError",
            r"^stream checksum mismatch at END \(stream byte \d+\)",
            _flip(serialize(base, stamps="zero"), write_at + HEADER_SIZE + 10),
        ),
        Case(
            "zfs-stream-duplicated-record.bin",
            "stream",
            "StreamIntegrityError",
            r"^checksum mismatch in the record at stream byte \d+",
            good[:write_at] + good[write_at : write_at + HEADER_SIZE + 512] * 2 + good[write_at + HEADER_SIZE + 512 :],
        ),
        Case(
            "zfs-stream-trailing-garbage.bin",
            "stream",
            "StreamTruncated",
            r"^input ended inside the BEGIN record \(20 of 312 bytes\)$",
            good + bytes(range(20)),
        ),
        Case(
            "zfs-stream-trusting-bad-first-stamp.bin",
            "stream-trusting",
            "StreamIntegrityError",
            r"^checksum mismatch in the record at stream byte 312: the stream's start was corrupted$",
            _flip(good, 312 + 300),
        ),
        Case(
            "zfs-stream-trusting-bad-end.bin",
            "stream-trusting",
            "StreamIntegrityError",
            r"^stream checksum mismatch at END",
            _flip(serialize(base, stamps="zero"), write_at + HEADER_SIZE + 10),
        ),
    ]
    compressed = _zstd(good)
    cases += [
        Case(
            "zstd-garbage.bin",
            "wire",
            "StreamFormatError",
            r"^corrupt zstd-compressed stream: zstd decompress error: ",
            bytes.fromhex("28b52ffd") + bytes(range(1, 200, 3)),
        ),
        Case(
            "zstd-trailing-garbage.bin", "wire", "StreamFormatError", r"^corrupt zstd-compressed stream: ", compressed + b"not a zstd frame"
        ),
        Case(
            "zstd-truncated.bin",
            "wire",
            "StreamTruncated",
            r"^input ended inside a zstd frame, at stream byte \d+: cut short in transit$",
            compressed[: len(compressed) // 2],
        ),
        Case(
            "zstd-magic-only.bin",
            "wire",
            "StreamTruncated",
            r"^input ended inside a zstd frame, at stream byte 0: cut short in transit$",
            compressed[:4],
        ),
        # Two frames, the second cut short: this read as one complete substream and a clean end before the fix.
        Case(
            "zstd-second-frame-cut.bin",
            "wire",
            "StreamTruncated",
            rf"^input ended inside a zstd frame, at stream byte {len(good)}: cut short",
            compressed + compressed[:-1],
        ),
        Case("zstd-bitflip.bin", "wire", "StreamFormatError", r"^corrupt zstd-compressed stream: ", _flip(compressed, 12)),
    ]
    return cases


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x10
    return bytes(out)


def _zstd(data: bytes) -> bytes:
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
    writer.write(data)
    writer.flush(zstandard.FLUSH_FRAME)
    return out.getvalue()


def _sf1(body: bytes, crc: int | None = None) -> bytes:
    text = base64.urlsafe_b64encode(zlib.compress(body, 9)).decode().rstrip("=")
    return f"sf1-{text}-{zlib.crc32(body) if crc is None else crc:08x}\n".encode()


def _openzfs(packed: bytes, *, compressed: bytes | None = None, length: int | None = None, checksum: int | None = None) -> bytes:
    compressed = zlib.compress(packed, 6) if compressed is None else compressed
    words = struct.unpack_from(f"<{len(compressed) // 4}I", compressed)
    checksum = sum(words) & ((1 << 64) - 1) if checksum is None else checksum
    return f"1-{checksum:x}-{len(packed) if length is None else length:x}-{compressed.hex()}\n".encode()


def token_cases() -> list[Case]:
    token = ResumeToken("pool/fs", 11, 0, 12, 1, 1 << 20, 312, "0123456789abcdef")
    body = json.dumps(token.fields(), separators=(",", ":"), sort_keys=True).encode()
    good = token.encode()
    again = r"; copy it again from `snapferry token DATASET`$"
    openzfs = OpenZfsToken(object=5, offset=1 << 20, bytes=3 << 20, toguid=0xABC, toname="pool/fs@s1", fromguid=0xDEF, compressok=True)
    packed = nvlist.encode(to_nvlist(openzfs))
    missing = nvlist.encode(NvList(tuple(p for p in to_nvlist(openzfs) if p.name != "toguid")))
    bomb = zlib.compress(bytes(2 << 20), 9)
    return [
        Case(
            "token-sf1-bad-crc.txt",
            "token",
            "MalformedToken",
            r"^malformed token: check digits do not match" + again,
            (good[:-1] + ("0" if good[-1] != "0" else "1")).encode() + b"\n",
        ),
        Case(
            "token-sf1-zlib-bomb.txt",
            "token",
            "MalformedToken",
            r"^malformed token: it inflates to more than 65536 bytes" + again,
            _sf1(bytes(8 << 20)),
        ),
        Case("token-sf1-not-base64.txt", "token", "MalformedToken", r"^malformed token: .*" + again, b"sf1-%%%%not*base64%%%%-00000000\n"),
        Case(
            "token-sf1-cut-short.txt",
            "token",
            "MalformedToken",
            r"^malformed token: its compressed body is cut short" + again,
            ("sf1-" + base64.urlsafe_b64encode(zlib.compress(body, 9)[:-6]).decode().rstrip("=") + f"-{zlib.crc32(body):08x}\n").encode(),
        ),
        Case(
            "token-sf1-offsets.txt",
            "token",
            "MalformedToken",
            r"^malformed token: its offsets are inconsistent$",
            _sf1(body.replace(b'"fingerprint_from":312', b'"fingerprint_from":1048577')),
        ),
        Case(
            "token-sf1-negative-guid.txt",
            "token",
            "MalformedToken",
            r"^malformed token: a field is out of range$",
            _sf1(body.replace(b'"toguid":11', b'"toguid":-11')),
        ),
        Case(
            "token-sf1-deep-json.txt", "token", "MalformedToken", r"^malformed token: maximum recursion depth exceeded", _sf1(b"[" * 60000)
        ),
        Case(
            "token-sf1-not-an-object.txt",
            "token",
            "MalformedToken",
            r"^malformed token: .*argument after \*\* must be a mapping",
            _sf1(b"[1,2]"),
        ),
        Case(
            "token-openzfs-bad-ck.txt",
            "openzfs-token",
            "MalformedOpenZfsToken",
            r"^malformed OpenZFS resume token: checksum mismatch",
            _openzfs(packed, checksum=0x1234),
        ),
        Case(
            "token-openzfs-length-mismatch.txt",
            "openzfs-token",
            "MalformedOpenZfsToken",
            rf"^malformed OpenZFS resume token: its payload decompresses to {len(packed):#x} bytes, "
            rf"not its stated length {len(packed) + 8:#x}",
            _openzfs(packed, length=len(packed) + 8),
        ),
        Case(
            "token-openzfs-missing-field.txt",
            "openzfs-token",
            "MalformedOpenZfsToken",
            r"^malformed OpenZFS resume token: field 'toguid' is missing",
            _openzfs(missing),
        ),
        Case(
            "token-openzfs-version-2.txt",
            "openzfs-token",
            "MalformedOpenZfsToken",
            r"^malformed OpenZFS resume token: version 2 is not supported, only 1 \(made by a newer OpenZFS\?\)$",
            b"2" + _openzfs(packed)[1:],
        ),
        Case(
            "token-openzfs-zlib-bomb.txt",
            "openzfs-token",
            "MalformedOpenZfsToken",
            r"^malformed OpenZFS resume token: its payload decompresses to more than its stated length 0x100000",
            _openzfs(b"", compressed=bomb, length=1 << 20),
        ),
        Case(
            "token-openzfs-garbage-nvlist.txt",
            "openzfs-token",
            "MalformedOpenZfsToken",
            r"^malformed OpenZFS resume token: its nvlist is damaged: ",
            _openzfs(packed[:-8] + b"\xff" * 8),
        ),
    ]


def _pair_header(size: int, name: bytes, nelem: int, kind: int) -> bytes:
    return struct.pack("<ihhii", size, len(name) + 1, 0, nelem, kind) + (name + b"\0").ljust(8, b"\0")


def nvlist_cases() -> list[Case]:
    nested = NvList((NvPair("leaf", NvType.UINT64, 1),))
    for _ in range(20):
        nested = NvList((NvPair("n", NvType.NVLIST, nested),))
    deep = nvlist.encode(nested)
    # Encode refuses to nest deeper than MAX_DEPTH: add one more level by hand around a 20-deep list.
    deeper = deep[:12] + _pair_header(16 + 8 + 24, b"n", 1, NvType.NVLIST) + struct.pack("<iIQIi", 0, 1, 0, 0, 0) + deep[12:] + bytes(4)
    head = bytes([0, 1, 0, 0]) + struct.pack("<iI", 0, 1)
    huge_count = head + _pair_header(32, b"arr", 0x7FFF_FFFF, NvType.UINT64_ARRAY) + bytes(8) + bytes(4)
    good = nvlist.encode(NvList((NvPair("a", NvType.UINT64, 1), NvPair("s", NvType.STRING, "x"))))
    return [
        Case(
            "nvlist-deep-nesting.bin",
            "nvlist",
            "NvlistError",
            r"^malformed nvlist: pair 'n' \(NVLIST\) at byte \d+ nests lists more than 20 deep$",
            deeper,
        ),
        Case(
            "nvlist-huge-count.bin",
            "nvlist",
            "NvlistError",
            r"^malformed nvlist: pair 'arr' \(UINT64_ARRAY\) at byte 12 needs 17179869176 bytes for its 2147483647 elements, has 8$",
            huge_count,
        ),
        Case(
            "nvlist-xdr-native-body.bin",
            "nvlist",
            "NvlistError",
            r"^malformed nvlist: the name of the pair at byte 12 claims 16777216 bytes, with 56 left$",
            bytes([1, 1, 0, 0]) + good[4:],
        ),
        Case(
            "nvlist-trailing-bytes.bin",
            "nvlist",
            "NvlistError",
            rf"^malformed nvlist: 7 bytes follow its end at byte {len(good)}$",
            good + bytes(7),
        ),
        Case(
            "nvlist-pair-size-overflow.bin",
            "nvlist",
            "NvlistError",
            r"^malformed nvlist: the pair at byte 12 claims 2147483647 bytes",
            _set(good, 12, "<i", 0x7FFF_FFFF),
        ),
        Case(
            "nvlist-negative-count.bin",
            "nvlist",
            "NvlistError",
            r"^malformed nvlist: pair 'arr' \(UINT64_ARRAY\) at byte 12 has -1 elements",
            head + _pair_header(32, b"arr", -1, NvType.UINT64_ARRAY) + bytes(8) + bytes(4),
        ),
        Case(
            "nvlist-bad-boolean.bin",
            "nvlist",
            "NvlistError",
            r"^malformed nvlist: pair 'b' \(BOOLEAN_VALUE\) at byte 12 holds 2, not a boolean$",
            head + _pair_header(32, b"b", 1, NvType.BOOLEAN_VALUE) + struct.pack("<i4x", 2) + bytes(4),
        ),
        Case(
            "nvlist-no-end-mark.bin",
            "nvlist",
            "NvlistError",
            r"^malformed nvlist: it ends at byte \d+, inside a list \(its end mark is missing\)$",
            good[:-4],
        ),
    ]


def chained_cases() -> list[Case]:
    def payload(*keys: NvPair) -> bytes:
        return nvlist.encode(NvList((NvPair("crypt_keydata", NvType.NVLIST, NvList(keys)),)))

    return [
        Case(
            "begin-raw-ivset-string.bin",
            "chained-begin",
            "StreamFormatError",
            r"^raw stream whose to_ivset_guid is a STRING, not a UINT64: corrupt stream$",
            payload(NvPair("to_ivset_guid", NvType.STRING, "7")),
        ),
        Case(
            "begin-raw-ivset-array.bin",
            "chained-begin",
            "StreamFormatError",
            r"^raw stream whose to_ivset_guid is a UINT64_ARRAY, not a UINT64",
            payload(NvPair("to_ivset_guid", NvType.UINT64_ARRAY, (1, 2))),
        ),
        Case(
            "begin-raw-no-keydata.bin",
            "chained-begin",
            "StreamFormatError",
            r"^raw stream without crypt_keydata in its BEGIN record: corrupt stream$",
            nvlist.encode(NvList((NvPair("x", NvType.UINT64, 1),))),
        ),
        Case(
            "begin-raw-no-to-ivset.bin",
            "chained-begin",
            "StreamFormatError",
            r"^raw stream without to_ivset_guid: sent by an OpenZFS too old",
            payload(NvPair("crypt", NvType.UINT64, 8)),
        ),
        Case(
            "begin-raw-bad-nvlist.bin",
            "chained-begin",
            "NvlistError",
            r"^malformed nvlist: ",
            payload(NvPair("crypt", NvType.UINT64, 8))[:-4],
        ),
    ]


def replication_cases() -> list[Case]:
    """Compound BEGINs of `zfs send -R` streams, cut from the zfs-fuse sample or built around a damaged payload."""
    sample = R_SAMPLE.read_bytes()
    tosnap = NvPair("tosnap", NvType.STRING, "s")

    def framed(payload: bytes) -> bytes:
        return header_records(compound_begin("pool/fs@s"), payload)

    deep = NvList((NvPair("leaf", NvType.UINT64, 1),))
    for _ in range(20):
        deep = NvList((NvPair("n", NvType.NVLIST, deep),))
    inner = encode_xdr(deep)[4:]
    # Encode refuses to nest deeper than MAX_DEPTH: one more level by hand, its sizes as libnvpair states them.
    wrapper = struct.pack(">iiI", 4 + 4 + 8 + 4 + 4 + len(inner), 48, 1) + b"n\0\0\0" + struct.pack(">ii", NvType.NVLIST, 1) + inner
    deeper = b"\1\1\0\0" + struct.pack(">iI", 0, 1) + wrapper + bytes(8)
    flipped = bytearray(sample)
    flipped[HEADER_SIZE + 100] ^= 0x10
    fss = NvPair("fss", NvType.NVLIST, NvList((NvPair("tank", NvType.NVLIST, NvList()),)))
    return [
        Case(
            "replication-not-xdr.bin",
            "replication-header",
            "StreamFormatError",
            r"^the compound BEGIN's payload is not an XDR-encoded nvlist: corrupt stream$",
            framed(nvlist.encode(NvList((tosnap,)))),
        ),
        Case(
            "replication-bad-end-checksum.bin",
            "replication-header",
            "StreamIntegrityError",
            r"^the -R header's END checksum does not match its BEGIN record and payload$",
            bytes(flipped),
        ),
        Case(
            "replication-truncated.bin",
            "replication-header",
            "StreamTruncated",
            r"^input ended inside the -R header at byte 1000, before its END record at byte 1396$",
            sample[:1000],
        ),
        Case(
            "replication-deep-nesting.bin",
            "replication-header",
            "NvlistError",
            r"^malformed nvlist: pair 'n' \(NVLIST\) at byte \d+ nests lists more than 20 deep$",
            framed(deeper),
        ),
        Case(
            "replication-fss-not-a-guid.bin",
            "replication-header",
            "StreamFormatError",
            r"^the -R header's fss holds 'tank', not a file system guid: corrupt stream$",
            framed(encode_xdr(NvList((tosnap, fss)))),
        ),
    ]


def build() -> list[Case]:
    from tests.corpus.btrfs_cases import btrfs_cases

    return [*stream_cases(), *token_cases(), *nvlist_cases(), *chained_cases(), *replication_cases(), *btrfs_cases(Case)]


def main() -> None:
    cases = build()
    for path in HERE.iterdir():
        if path.suffix in (".bin", ".txt"):
            path.unlink()
    for case in cases:
        (HERE / case.name).write_bytes(case.data)
    expected = {c.name: {"target": c.target, "exception": c.exception, "message": c.message} for c in cases}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"{len(cases)} files in {HERE}")


if __name__ == "__main__":
    main()
