"""The tree token fuzz target: `sf1r-` tokens (an interrupted -R transfer), their partial substream of either kind."""

from __future__ import annotations

import json

from fuzz.contract import attempt, check, outcome
from snapferry.core.seal import seal_body
from snapferry.errors import MalformedToken
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.codec.tree_token import TREE_TOKEN_PREFIX, NativePartial, TreeToken
from snapferry_testkit.shared_data import OPENZFS_DATA

# A first byte that asks for the rest to be sealed as a token body (JSON), so mutations reach the fields.
BODY = 0xFF


def tree_token_text(data: bytes) -> str:
    if data[:1] == bytes([BODY]):
        return seal_body(TREE_TOKEN_PREFIX, data[1:])
    return data.decode("utf-8", "surrogateescape")


def run_tree_token(data: bytes) -> str:
    token, error = attempt((MalformedToken,), lambda: TreeToken.decode(tree_token_text(data)))
    if token is not None:
        # An older token (guids without places) gains places ("" each) on its first re-encoding, then stays put.
        again = TreeToken.decode(token.encode())
        check(again.have == token.have and TreeToken.decode(again.encode()) == again, "tree token does not survive encode and decode")
        json.dumps(token.describe())
    return outcome(error)


def tree_token_seeds() -> tuple[bytes, ...]:
    kernel = (OPENZFS_DATA / "zfs-2.3.2" / "full_s1.token").read_text().strip()
    pieces = ResumeToken("tank/dst/t/a", 7, 0, 9, 2, 4096, 600, "0123456789abcdef")
    where = {1: "", 2: "/a", 3: "/a/b"}
    tokens = [
        TreeToken("tank/dst/t", "pool/t", "s3", None, False, frozenset(where), None, where),
        TreeToken("tank/dst/t", "pool/t", "s3", "s1", True, frozenset(where), pieces, where),
        TreeToken("tank/dst/t", "pool/t", "s3", "s1", False, frozenset(where), NativePartial("tank/dst/t/a", kernel), where),
    ]
    texts = [t.encode().encode() for t in tokens]
    old = {"target": "tank/t", "root": "p/t", "tosnap": "s2", "fromsnap": None, "intermediates": False, "have": ["1"], "partial": None}
    return (*texts, bytes([BODY]) + json.dumps(old).encode())
