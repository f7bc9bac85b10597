"""Token sealing: fields packed into one word that survives copy and paste, and checked when unpacked."""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any


def seal(prefix: str, fields: dict[str, object]) -> str:
    """`prefix` + base64 of zlib(JSON of fields) + "-" + crc32: one word that survives copy and paste."""
    return seal_body(prefix, json.dumps(fields, separators=(",", ":"), sort_keys=True).encode())


def seal_body(prefix: str, body: bytes) -> str:
    """`prefix` + base64 of zlib(body) + "-" + crc32 of body (the fuzz targets seal bodies that are no JSON at all)."""
    text = base64.urlsafe_b64encode(zlib.compress(body, 9)).decode().rstrip("=")
    return f"{prefix}{text}-{zlib.crc32(body):08x}"


# What unseal raises on a damaged text; a token class turns it into its own one-line refusal.
UNSEAL_ERRORS = (ValueError, TypeError, RecursionError, binascii.Error, zlib.error)


def unseal(prefix: str, text: str, max_body: int) -> Any:
    """The JSON seal() packed into `text` (which starts with `prefix`), inflating at most max_body bytes.

    Raises one of UNSEAL_ERRORS on a damaged text.
    """
    body_text, _, crc_text = text[len(prefix) :].rpartition("-")
    inflater = zlib.decompressobj()
    body = inflater.decompress(base64.urlsafe_b64decode(body_text + "=" * (-len(body_text) % 4)), max_body + 1)
    if len(body) > max_body:
        raise ValueError(f"it inflates to more than {max_body} bytes")
    if not inflater.eof:
        raise ValueError("its compressed body is cut short")
    if f"{zlib.crc32(body):08x}" != crc_text:
        raise ValueError("check digits do not match")
    return json.loads(body)
