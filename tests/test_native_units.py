"""Pure parts of native mode and modern streams: raw chaining, stream sniffing, stderr classes, policy, plan."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapferry.cli.serve import Policy
from snapferry.core.streamio import Prefixed
from snapferry.errors import PartialReceiveInTheWay, Refused, StreamFormatError, StreamTruncated, TransferInterrupted
from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.records import FEATURE_RAW, HEADER_SIZE, Begin, chained_begin_payload
from snapferry.zfs.codec.stream import read_header
from snapferry.zfs.engine.command import Snapshot, classify_failure
from snapferry.zfs.plan import Step, next_step
from snapferry_testkit.shared_data import OPENZFS_DATA


def _raw_begin(fromguid: int = 0) -> Begin:
    return Begin((FEATURE_RAW << 2) | 1, 0, 2, 0xC, 0x1234, fromguid, "tank/secret@s1")


def _keydata(*extra: NvPair) -> bytes:
    keys = NvList((NvPair("DSL_CRYPTO_SUITE", NvType.UINT64, 8), NvPair("to_ivset_guid", NvType.UINT64, 0xABCDEF), *extra))
    return nvlist.encode(NvList((NvPair("crypt_keydata", NvType.NVLIST, keys),)))


def _ivset(payload: bytes) -> tuple[int | None, int | None]:
    keys = nvlist.decode(payload).get("crypt_keydata")
    assert keys is not None and isinstance(keys.value, NvList)
    found = [keys.value.get(name) for name in ("from_ivset_guid", "to_ivset_guid")]
    return found[0].value if found[0] else None, found[1].value if found[1] else None  # type: ignore[return-value]


def test_a_chained_raw_piece_names_the_streams_to_ivset_guid_as_its_from() -> None:
    chained = chained_begin_payload(_raw_begin(), _keydata())
    assert _ivset(chained) == (0xABCDEF, 0xABCDEF)
    # An incremental's own from_ivset_guid is replaced, and chaining twice changes nothing more.
    incremental = _keydata(NvPair("from_ivset_guid", NvType.UINT64, 0x777))
    once = chained_begin_payload(_raw_begin(5), incremental)
    assert _ivset(once) == (0xABCDEF, 0xABCDEF)
    assert chained_begin_payload(_raw_begin(5), once) == once


def test_other_streams_keep_their_payload() -> None:
    plain = Begin(0x11, 0, 2, 0xC, 1, 0, "tank/a@s")
    payload = _keydata()
    assert chained_begin_payload(plain, payload) is payload
    assert chained_begin_payload(_raw_begin(), b"") == b""


def test_a_raw_stream_without_keydata_is_refused() -> None:
    empty = nvlist.encode(NvList((NvPair("other", NvType.UINT64, 1),)))
    with pytest.raises(StreamFormatError, match="raw stream without crypt_keydata"):
        chained_begin_payload(_raw_begin(), empty)
    no_ivset = nvlist.encode(NvList((NvPair("crypt_keydata", NvType.NVLIST, NvList()),)))
    with pytest.raises(StreamFormatError, match="without to_ivset_guid"):
        chained_begin_payload(_raw_begin(), no_ivset)


@pytest.mark.parametrize(
    ("name", "flags", "resumes"),
    [("full_s1.stream", "", True), ("incr_s1_s2.stream", "ec", True), ("incr_s1_s2.resume.stream", "ec", True)],
)
def test_what_a_modern_stream_tells_about_its_sender(name: str, flags: str, resumes: bool) -> None:
    header = (OPENZFS_DATA / "zfs-2.3.2" / name).read_bytes()[:HEADER_SIZE]
    begin = Begin.decode(header)
    assert begin.send_flags == flags
    assert begin.sender_can_resume is resumes
    assert not begin.is_raw


def test_a_v23_sender_cannot_resume() -> None:
    # zfs-fuse (pool v23) sets no BEGIN flags; OpenZFS always sets FREERECORDS.
    assert not Begin(1, 0, 2, 0, 1, 0, "pool/fs@s").sender_can_resume
    assert Begin(1, 0, 2, 4, 1, 0, "pool/fs@s").sender_can_resume


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 2000), st.integers(1, 700))
def test_prefixed_gives_back_every_byte_in_order(data: bytes, chunk: int) -> None:
    source = io.BytesIO(data)
    header = read_header(source)
    stream, out = Prefixed(header, source), bytearray()
    buffer = memoryview(bytearray(chunk))
    while n := stream.readinto(buffer):
        out += buffer[:n]
    assert bytes(out) == data


def test_read_header_of_short_input() -> None:
    with pytest.raises(StreamFormatError, match=r"no ZFS stream on input \(it was empty\)"):
        read_header(io.BytesIO(b""))
    with pytest.raises(StreamTruncated, match=r"input ended inside the BEGIN record \(100 of 312 bytes\)"):
        read_header(io.BytesIO(bytes(100)))


# Exact stderr of OpenZFS 2.3.2 (../shared/data/openzfs/zfs-2.3.2/full_recv_error.txt) and OpenZFS's refusal.
SAVED = (OPENZFS_DATA / "zfs-2.3.2" / "full_recv_error.txt").read_text()
IN_THE_WAY = 'cannot receive new filesystem stream: destination tank/dst contains partially-complete state from "zfs receive -s".\n'


def test_openzfs_receive_failures_are_classified() -> None:
    saved = classify_failure("cannot receive into tank/dst", SAVED)
    assert isinstance(saved, TransferInterrupted)
    assert str(saved) == (
        "cannot receive into tank/dst: the stream stopped early (cannot receive new filesystem stream: checksum mismatch "
        "or incomplete stream.); the kernel kept what arrived"
    )
    assert isinstance(classify_failure("x", IN_THE_WAY), PartialReceiveInTheWay)


def test_serve_answers_the_native_question_only_through_status() -> None:
    """sync used to ask a pool's features with raw zpool and zfs commands; now `snapferry status` says it."""
    policy = Policy(("tank/backup",), read_only=True)
    with pytest.raises(Refused, match="zpool is not allowed"):
        policy.check("zpool get -H -o value feature@extensible_dataset tank")
    with pytest.raises(Refused, match="zfs is not allowed"):
        policy.check("zfs get -H -o value receive_resume_token tank")
    assert policy.check("snapferry status --json tank/backup/fs")[-1] == "tank/backup/fs"
    with pytest.raises(Refused, match="dataset tank is outside --allow"):
        policy.check("snapferry status --json tank")
    assert Policy(("tank/backup",), read_only=False).check("snapferry receive -s --mode native tank/backup/fs")[-1] == "tank/backup/fs"


def test_a_native_token_is_resumed_first_and_described() -> None:
    token = OpenZfsToken.decode((OPENZFS_DATA / "zfs-2.3.2" / "full_s1.token").read_text())
    step = next_step([Snapshot("tank/src@s1", token.toguid, 1)], [], token, no_stream=False, force=False)
    assert step == Step(token=token)
    assert step.describe() == "resume the interrupted receive of tank/src@s1 after 3812696 bytes (native)"
