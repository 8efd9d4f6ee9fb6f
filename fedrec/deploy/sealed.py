"""The encrypted global model: float32 parameters sealed with AES-256-GCM under the owners' model key.

In deployment the coordinator forwards the global model between datasites but must never read it.
Homomorphic encryption is needed only where the coordinator computes (the sum of updates); the
global model is only stored and forwarded, so an authenticated cipher does: exact float32 values,
4 bytes per parameter plus 40 bytes, and any change to the bytes (or a model of another run or
round presented as this one) fails authentication instead of decrypting to something else.

The model key is generated with the encryption keys by the key authority and held by data owners
only (like the BFV secret key). Format (little-endian)::

    magic "FRGM" | version u16 | round u64 | values u64 | nonce 12 B | ciphertext + 16 B GCM tag

The associated data binds the header and the run id: a sealed model opens only for the run and
round it was sealed for.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from fedrec.deploy.errors import DeployError

MODEL_KEY_BYTES = 32
MAGIC = b"FRGM"
VERSION = 1
_HEADER = struct.Struct("<4sHQQ")
_NONCE_BYTES = 12
_TAG_BYTES = 16
OVERHEAD = _HEADER.size + _NONCE_BYTES + _TAG_BYTES


def new_model_key() -> bytes:
    """A fresh random 256-bit model key (OS entropy)."""
    return os.urandom(MODEL_KEY_BYTES)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != MODEL_KEY_BYTES:
        raise DeployError(
            f"model key of {len(key) if isinstance(key, bytes) else type(key).__name__}: "
            f"expected {MODEL_KEY_BYTES} bytes"
        )


def _associated_data(header: bytes, run_id: str) -> bytes:
    return header + run_id.encode("utf-8")


def seal_global_model(params: np.ndarray, *, key: bytes, run_id: str, round_idx: int) -> bytes:
    """Encrypt and authenticate the flat float32 ``params`` of the global model of ``round_idx``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_key(key)
    values = np.ascontiguousarray(params, dtype=np.float32)
    if values.ndim != 1:
        raise DeployError(f"global model of shape {values.shape}: expected a flat vector")
    header = _HEADER.pack(MAGIC, VERSION, int(round_idx), values.size)
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, values.astype("<f4").tobytes(), _associated_data(header, run_id))
    return header + nonce + ciphertext


def sealed_round(blob: bytes) -> int:
    """The round a sealed model says it belongs to (unauthenticated; ``open_global_model`` checks it)."""
    if not isinstance(blob, bytes) or len(blob) < OVERHEAD:
        raise DeployError("sealed global model: too short or not bytes")
    return int(_HEADER.unpack_from(blob, 0)[2])


def open_global_model(blob: bytes, *, key: bytes, run_id: str, round_idx: int, size: int) -> np.ndarray:
    """Decrypt a sealed global model; refuses another run, round, size, or any altered byte.

    Raises:
        DeployError: malformed bytes, wrong round or size, or failed authentication.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_key(key)
    if not isinstance(blob, bytes) or len(blob) < OVERHEAD:
        raise DeployError(
            f"sealed global model of {len(blob) if isinstance(blob, bytes) else type(blob).__name__}: "
            f"expected at least {OVERHEAD} bytes"
        )
    magic, version, sealed_for, values = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC or version != VERSION:
        raise DeployError(
            f"sealed global model: magic {magic!r} version {version}, expected {MAGIC!r} {VERSION}"
        )
    if sealed_for != round_idx:
        raise DeployError(f"sealed global model of round {sealed_for}: expected round {round_idx}")
    if values != size or len(blob) != OVERHEAD + 4 * size:
        raise DeployError(
            f"sealed global model of {values} values ({len(blob)} bytes): expected {size} values "
            f"({OVERHEAD + 4 * size} bytes)"
        )
    header = blob[: _HEADER.size]
    nonce = blob[_HEADER.size : _HEADER.size + _NONCE_BYTES]
    try:
        plain = AESGCM(key).decrypt(
            nonce, blob[_HEADER.size + _NONCE_BYTES :], _associated_data(header, run_id)
        )
    except InvalidTag:
        raise DeployError(
            f"sealed global model of round {round_idx}: authentication failed (another key or run, or altered bytes)"
        ) from None
    return np.frombuffer(plain, dtype="<f4").astype(np.float32)
