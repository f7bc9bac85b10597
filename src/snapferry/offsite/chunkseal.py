"""What a chunk object holds: the stream's bytes as they are, or sealed with AES-256-GCM; and every chunk's fingerprint."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from snapferry.errors import StoredChunkDamaged, UsageError

NONCE_SIZE = 12
KEY_MATERIAL_MIN = 32
ENCRYPTION = "aes-256-gcm"


def read_key_file(path: Path) -> bytes:
    """A key file's secret: at least 32 bytes of anything (`head -c 32 /dev/urandom > KEYFILE`)."""
    try:
        material = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    if len(material) < KEY_MATERIAL_MIN:
        raise UsageError(f"the key file {path} holds {len(material)} bytes; it needs at least {KEY_MATERIAL_MIN} (head -c 32 /dev/urandom)")
    return material


class ChunkSeal:
    """Turns a chunk's plain bytes into the object stored, and back, checking its fingerprint on the way back.

    Without a key the object is the plain bytes and the fingerprint their SHA-256, so that `sha256sum` checks
    a chunk by hand. With a key the object is nonce + AES-256-GCM ciphertext (a fresh random nonce per chunk,
    the chunk's key as associated data so that chunks cannot be swapped), and the fingerprint an HMAC-SHA256
    under a second key derived from the same secret: a plain hash would let anyone holding the bucket test a
    guess of the contents.
    """

    def __init__(self, key_material: bytes | None) -> None:
        self.encryption = ENCRYPTION if key_material is not None else None
        self._aead = None
        self._mac_key: bytes | None = None
        if key_material is not None:
            # cryptography costs 30 ms of start-up; only an encrypted backup loads it.
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF

            def derive(purpose: bytes) -> bytes:
                return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"snapferry offsite " + purpose).derive(key_material)

            self._aead = AESGCM(derive(b"chunk encryption"))
            self._mac_key = derive(b"chunk fingerprint")

    def fingerprint(self, plain: bytes | bytearray | memoryview) -> str:
        if self._mac_key is None:
            return hashlib.sha256(plain).hexdigest()
        return hmac.new(self._mac_key, plain, hashlib.sha256).hexdigest()

    def seal(self, plain: bytes | bytearray | memoryview, name: str) -> bytes | bytearray | memoryview:
        if self._aead is None:
            return plain  # no copy: a chunk in flight is held once
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, bytes(plain), name.encode())

    def open(self, stored: bytes, name: str, fingerprint: str) -> bytes:
        """The plain bytes of a stored chunk; StoredChunkDamaged naming it when they are not what was stored."""
        plain = stored
        if self._aead is not None:
            from cryptography.exceptions import InvalidTag

            try:
                plain = self._aead.decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], name.encode())
            except (InvalidTag, ValueError):
                raise StoredChunkDamaged(
                    f"stored chunk {name} does not decrypt: it was damaged in the bucket, or the key file is not the one it was made with"
                ) from None
        if not hmac.compare_digest(self.fingerprint(plain), fingerprint):
            raise StoredChunkDamaged(f"stored chunk {name} is damaged: its checksum does not match the one it was stored with")
        return plain
