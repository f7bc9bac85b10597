"""snapferry resume tokens (snapferry.zfs.codec.token): round trip, damaged and foreign tokens, describe()."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import string
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.errors import MalformedToken, Refused, SnapferryError
from snapferry.zfs.codec.token import TOKEN_PREFIX, ResumeToken
from snapferry_testkit.shared_data import OPENZFS_DATA
from snapferry_testkit.zfs_testbed import snapferry

DATA = OPENZFS_DATA
OPENZFS_TOKENS = sorted(DATA.glob("zfs-*/*.token"))
U64 = (1 << 64) - 1
AGAIN = "copy it again from `snapferry token DATASET`"

SAMPLE = ResumeToken(
    dataset="tank/dst",
    toguid=2887691134460246904,
    fromguid=0,
    checkpoint_guid=0xDEADBEEF12345678,
    seq=3,
    offset=3875236,
    fingerprint_from=312,
    fingerprint="0123456789abcdef",
)


def raw_token(body: bytes, crc: int | None = None) -> str:
    """A token built by hand around an arbitrary body, with correct check digits unless `crc` is given."""
    text = base64.urlsafe_b64encode(zlib.compress(body, 9)).decode().rstrip("=")
    return f"{TOKEN_PREFIX}{text}-{zlib.crc32(body) if crc is None else crc:08x}"


def fields_token(**changes: object) -> str:
    fields = {**dataclasses.asdict(SAMPLE), **changes}
    return raw_token(json.dumps(fields).encode())


dataset_names = st.from_regex(r"[A-Za-z0-9_.: -]{1,20}(/[A-Za-z0-9_.: -]{1,20}){0,3}", fullmatch=True)


@st.composite
def tokens(draw: st.DrawFn) -> ResumeToken:
    u64 = st.integers(min_value=0, max_value=U64)
    offset = draw(st.integers(min_value=1, max_value=U64))
    return ResumeToken(
        dataset=draw(dataset_names),
        toguid=draw(u64),
        fromguid=draw(u64),
        checkpoint_guid=draw(u64),
        seq=draw(u64),
        offset=offset,
        fingerprint_from=draw(st.integers(min_value=1, max_value=offset)),
        fingerprint=draw(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)),
    )


# --- round trip --------------------------------------------------------------------------------


def test_sample_roundtrip() -> None:
    text = SAMPLE.encode()
    assert text.startswith(TOKEN_PREFIX)
    assert ResumeToken.decode(text) == SAMPLE


@given(tokens())
@settings(max_examples=300, deadline=None)
def test_roundtrip(token: ResumeToken) -> None:
    text = token.encode()
    assert ResumeToken.decode(text) == token


@given(tokens())
@settings(max_examples=100, deadline=None)
def test_encoding_survives_copy_and_paste(token: ResumeToken) -> None:
    text = token.encode()
    # one word of URL-safe characters: no padding, no spaces, no shell metacharacters
    assert re.fullmatch(r"sf1-[A-Za-z0-9_-]+-[0-9a-f]{8}", text)
    assert text == token.encode()  # deterministic
    assert ResumeToken.decode(f"  {text}\n") == token


@given(dataset_names)
def test_any_dataset_name_roundtrips(name: str) -> None:
    token = dataclasses.replace(SAMPLE, dataset=name)
    assert ResumeToken.decode(token.encode()) == token


@pytest.mark.parametrize("name", ["", "tank/", "/tank", "tank//a", "tank/a@s", "tank/\udcff", "tank/é", "p/" + "x" * 254, "a\0b"])
def test_a_name_zfs_cannot_have_is_refused(name: str) -> None:
    with pytest.raises(MalformedToken, match="its destination is not a ZFS dataset name"):
        ResumeToken.decode(fields_token(dataset=name))


def test_extreme_values_roundtrip() -> None:
    token = ResumeToken("p/" + "x" * 250, U64, U64, U64, U64, U64, U64, "f" * 16)
    assert ResumeToken.decode(token.encode()) == token
    token = ResumeToken("p", 0, 0, 0, 0, 1, 1, "0" * 16)
    assert ResumeToken.decode(token.encode()) == token


# --- describe ----------------------------------------------------------------------------------


def test_describe() -> None:
    assert SAMPLE.describe() == {
        "dataset": "tank/dst",
        "toguid": "2887691134460246904",
        "fromguid": "0",
        "checkpoint_guid": str(0xDEADBEEF12345678),
        "seq": 3,
        "offset": 3875236,
        "fingerprint_from": 312,
        "fingerprint": "0123456789abcdef",
        "send_flags": "",
    }


@given(tokens())
def test_describe_prints_guids_as_decimal_strings(token: ResumeToken) -> None:
    described = token.describe()
    # A position (next_*) is shown only when the token has one.
    assert list(described) == [f.name for f in dataclasses.fields(ResumeToken) if getattr(token, f.name) is not None]
    for key in ("toguid", "fromguid", "checkpoint_guid"):
        assert described[key] == str(getattr(token, key))
        assert isinstance(described[key], str)
    for key in ("seq", "offset", "fingerprint_from"):
        assert described[key] == getattr(token, key)
    assert described["dataset"] == token.dataset
    assert described["fingerprint"] == token.fingerprint
    # describing must not touch the token itself
    assert isinstance(token.toguid, int)


def test_describe_is_json_serialisable() -> None:
    assert json.loads(json.dumps(SAMPLE.describe()))["toguid"] == "2887691134460246904"


# --- malformed tokens --------------------------------------------------------------------------


def test_malformed_token_is_a_refusal() -> None:
    assert issubclass(MalformedToken, Refused)
    assert issubclass(MalformedToken, SnapferryError)
    assert MalformedToken.exit_code == Refused.exit_code == 4


@pytest.mark.parametrize("text", ["", "   ", "hello", "sf2-abc-00000000", "SF1-abc-00000000", "-sf1-abc"])
def test_wrong_prefix(text: str) -> None:
    with pytest.raises(MalformedToken, match=re.escape("malformed token: it starts with neither 'sf1-'")) as info:
        ResumeToken.decode(text)
    assert "zfs send -t" not in str(info.value)


@pytest.mark.skipif(not OPENZFS_TOKENS, reason="OpenZFS fixtures not available")
@pytest.mark.parametrize("path", OPENZFS_TOKENS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cli_decodes_openzfs_tokens_as_zfs_send_nvt_does(path: Path) -> None:
    text = path.read_text()
    with pytest.raises(MalformedToken, match=r"nor '1-' \(OpenZFS's\)"):
        ResumeToken.decode("2" + text)
    decoded = snapferry("token", "--decode", text)
    assert decoded.returncode == 0, decoded.stderr
    expected = path.with_name(path.name + ".decoded.txt")
    if expected.exists():
        contents = expected.read_text().split("\n")
        block = "\n".join(contents[: next(i for i, line in enumerate(contents) if line and not line[0].isspace() and i > 1)]) + "\n"
        assert decoded.stdout.decode() == block
    fields = json.loads(snapferry("token", "--decode", "--json", text).stdout)
    assert fields["toname"] == "tank/src@s1" or fields["toname"] == "tank/src@s2"


def test_bad_check_digits() -> None:
    text = SAMPLE.encode()
    body, _, crc = text.rpartition("-")
    wrong = f"{(int(crc, 16) ^ 1):08x}"
    with pytest.raises(MalformedToken, match=re.escape(f"malformed token: check digits do not match; {AGAIN}")):
        ResumeToken.decode(f"{body}-{wrong}")


def test_check_digits_of_a_different_token() -> None:
    other = dataclasses.replace(SAMPLE, seq=4).encode()
    body = SAMPLE.encode().rpartition("-")[0]
    with pytest.raises(MalformedToken, match="check digits do not match"):
        ResumeToken.decode(f"{body}-{other.rpartition('-')[2]}")


def test_missing_check_digits() -> None:
    with pytest.raises(MalformedToken, match="malformed token"):
        ResumeToken.decode(SAMPLE.encode().rpartition("-")[0])


def test_flipped_character_in_the_middle() -> None:
    text = SAMPLE.encode()
    i = len(text) // 2
    flipped = text[:i] + ("B" if text[i] != "B" else "C") + text[i + 1 :]
    with pytest.raises(MalformedToken, match=re.escape(AGAIN)):
        ResumeToken.decode(flipped)


_B64 = string.ascii_letters + string.digits + "-_"


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_flipped_character_never_yields_another_token(data: st.DataObject) -> None:
    """A one-character change is refused, or (when it only touches bits the encoding ignores, such as
    base64 padding bits or deflate's final padding) decodes to the very same token; never anything else."""
    text = SAMPLE.encode()
    i = data.draw(st.integers(min_value=len(TOKEN_PREFIX), max_value=len(text) - 1))
    ch = data.draw(st.sampled_from(_B64 + "0123456789abcdef.=+/ ").filter(lambda c: c != text[i]))
    try:
        token = ResumeToken.decode(text[:i] + ch + text[i + 1 :])
    except MalformedToken as exc:
        assert str(exc).startswith("malformed token: ")
    else:
        assert token == SAMPLE


def test_flipped_check_digit() -> None:
    text = SAMPLE.encode()
    for i in range(len(text) - 8, len(text)):
        ch = "0" if text[i] != "0" else "1"
        with pytest.raises(MalformedToken, match="check digits do not match"):
            ResumeToken.decode(text[:i] + ch + text[i + 1 :])


@pytest.mark.parametrize("token", [SAMPLE, dataclasses.replace(SAMPLE, dataset="pool/" + "deep/" * 30 + "leaf")])
def test_every_truncation_is_refused(token: ResumeToken) -> None:
    text = token.encode()
    for n in range(len(text)):
        with pytest.raises(MalformedToken, match="^malformed token: "):
            ResumeToken.decode(text[:n])


@given(tokens(), st.data())
@settings(max_examples=100, deadline=None)
def test_truncation_is_refused(token: ResumeToken, data: st.DataObject) -> None:
    text = token.encode()
    n = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    with pytest.raises(MalformedToken, match="^malformed token: "):
        ResumeToken.decode(text[:n])


def test_extra_characters_are_refused() -> None:
    with pytest.raises(MalformedToken, match="check digits do not match"):
        ResumeToken.decode(SAMPLE.encode() + "0")


def test_not_zlib() -> None:
    body = base64.urlsafe_b64encode(b"plain text, not deflate").decode().rstrip("=")
    with pytest.raises(MalformedToken, match=re.escape(AGAIN)):
        ResumeToken.decode(f"{TOKEN_PREFIX}{body}-{zlib.crc32(b'plain'):08x}")


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2, 3]", b'"a string"', b"{}", b'{"dataset": "x"}'],
    ids=["not-json", "list", "string", "empty-object", "missing-fields"],
)
def test_valid_check_digits_but_not_a_token(body: bytes) -> None:
    with pytest.raises(MalformedToken, match=f"^malformed token: .*; {re.escape(AGAIN)}$"):
        ResumeToken.decode(raw_token(body))


def test_unknown_field() -> None:
    with pytest.raises(MalformedToken, match="malformed token: .*unexpected keyword argument 'extra'"):
        ResumeToken.decode(fields_token(extra=1))


@pytest.mark.parametrize(
    "changes",
    [
        {"toguid": -1},
        {"fromguid": 1 << 64},
        {"checkpoint_guid": "123"},
        {"seq": 1.5},
        {"offset": None},
        {"dataset": 7},
    ],
    ids=["negative", "too-big", "string-guid", "float", "null", "dataset-not-str"],
)
def test_field_out_of_range(changes: dict[str, object]) -> None:
    with pytest.raises(MalformedToken, match="^malformed token: a field is out of range$"):
        ResumeToken.decode(fields_token(**changes))


@pytest.mark.parametrize(
    "changes",
    [{"fingerprint_from": 0}, {"fingerprint_from": 1001, "offset": 1000}, {"offset": 0, "fingerprint_from": 0}],
    ids=["zero-start", "start-after-offset", "all-zero"],
)
def test_inconsistent_offsets(changes: dict[str, object]) -> None:
    with pytest.raises(MalformedToken, match="^malformed token: its offsets are inconsistent$"):
        ResumeToken.decode(fields_token(**changes))


@pytest.mark.parametrize("fingerprint", ["", "0123456789abcde", "0123456789abcdef0", 12345678])
def test_bad_fingerprint(fingerprint: object) -> None:
    with pytest.raises(MalformedToken, match="^malformed token: bad fingerprint$"):
        ResumeToken.decode(fields_token(fingerprint=fingerprint))


def test_encode_does_not_validate_but_decode_does() -> None:
    bad = dataclasses.replace(SAMPLE, offset=10, fingerprint_from=20)
    with pytest.raises(MalformedToken, match="offsets are inconsistent"):
        ResumeToken.decode(bad.encode())


def test_deeply_nested_body_is_malformed() -> None:
    text = raw_token(b"[" * 100_000 + b"]" * 100_000)
    assert len(text) < 400
    with pytest.raises(MalformedToken):
        ResumeToken.decode(text)
