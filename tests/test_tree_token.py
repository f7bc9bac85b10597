"""Tree tokens (`sf1r-`) whose partial substream is the kernel's (native mode) or a piece chain's."""

from __future__ import annotations

import pytest

from snapferry.core.seal import seal
from snapferry.errors import MalformedToken
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.codec.tree_token import TREE_TOKEN_PREFIX, NativePartial, TreeToken
from snapferry_testkit.shared_data import OPENZFS_DATA

KERNEL = (OPENZFS_DATA / "zfs-2.3.2" / "full_s1.token").read_text().strip()
PIECES = ResumeToken("tank/dst/tree/a", 7, 0, 9, 2, 4096, 600, "0123456789abcdef")


def _tree(partial: NativePartial | ResumeToken | None) -> TreeToken:
    return TreeToken("tank/dst/tree", "pool/tree", "s3", "s1", True, frozenset({1, 2, 3}), partial, {1: "", 2: "/a", 3: "/a/b"})


@pytest.mark.parametrize("partial", [None, PIECES, NativePartial("tank/dst/tree/a", KERNEL)])
def test_roundtrip(partial: NativePartial | ResumeToken | None) -> None:
    token = _tree(partial)
    assert TreeToken.decode(token.encode()) == token


def test_a_native_partial_is_described_with_its_kernel_token() -> None:
    described = _tree(NativePartial("tank/dst/tree/a", KERNEL)).describe()["partial"]
    kernel = OpenZfsToken.decode(KERNEL)
    assert described["mode"] == "native" and described["dataset"] == "tank/dst/tree/a" and described["token"] == KERNEL
    assert described["toname"] == kernel.toname and described["toguid"] == kernel.toguid


def test_a_pieces_partial_is_described_as_before() -> None:
    described = _tree(PIECES).describe()["partial"]
    assert described == {"mode": "pieces", **PIECES.describe()}


def test_a_native_partial_needs_a_sound_kernel_token_and_dataset() -> None:
    with pytest.raises(MalformedToken):
        TreeToken.decode(_tree(NativePartial("tank/dst/tree/a", KERNEL[:-4] + "0000")).encode())
    with pytest.raises(MalformedToken):
        TreeToken.decode(_tree(NativePartial("tank/../x@y", KERNEL)).encode())


def test_a_token_of_an_older_snapferry_lists_guids_alone() -> None:
    """Before it said where each snapshot is, a tree token listed the guids: it still decodes, with no places."""
    old = seal(TREE_TOKEN_PREFIX, {"target": "tank/t", "root": "p/t", "tosnap": "s2", "fromsnap": None, "intermediates": False,
                                   "have": ["1", "a"], "partial": None})  # fmt: skip
    token = TreeToken.decode(old)
    assert (token.have, token.where) == (frozenset({1, 10}), {})


def test_a_place_outside_the_target_is_refused() -> None:
    bad = seal(TREE_TOKEN_PREFIX, {"target": "tank/t", "root": "p/t", "tosnap": "s2", "fromsnap": None, "intermediates": False,
                                   "have_at": {"/../x": ["1"]}, "partial": None})  # fmt: skip
    with pytest.raises(MalformedToken, match="is not a file system below tank/t"):
        TreeToken.decode(bad)
