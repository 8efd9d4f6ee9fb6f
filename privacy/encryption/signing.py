"""Signed contributions: whoever decrypts checks who is in the aggregate (Ed25519, RFC 8032).

Every client holds the secret key, and the public context carries the public key, so an aggregator
that could add ciphertexts of its own making could pass any minimum-contributor check with forged
"clients" (count 1 each) and use a key holder as a decryption oracle. So each data owner gets an
Ed25519 signing key when it joins the federation (the key authority lists every owner's public key
for every owner), signs the hash of its round's payloads (their headers bind the round attempt, the
client id and the chunk), and the decrypting party:

1. verifies every contribution's signature against the registered key of the client id its headers
   name (unregistered ids, bad signatures and mixed ids are refused);
2. recomputes the encrypted weighted sum itself from those payloads (additions and public-weight
   doublings only: cheap next to the decryption);
3. decrypts only if at least its ``min_aggregate_clients`` distinct registered owners are in it.

What it does not give: proof that a signer's plaintext is well formed (no range proofs), nor protection
against an owner that signs a zero update to help an aggregator isolate another (a colluding owner).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from privacy.encryption import wire
from privacy.encryption.aggregator import ClosedRound, StreamingAggregator
from privacy.encryption.schema import UpdateSchema
from privacy.errors import EncryptionError

SIGNING_KEY_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_DOMAIN = b"fedrec-signed-contribution-v1\x00"


def new_signing_key() -> bytes:
    """A fresh Ed25519 private key (32 raw bytes, from the OS CSPRNG)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(signing_key: bytes) -> bytes:
    """The 32-byte public key of a raw Ed25519 private key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _private(signing_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def contribution_digest(payloads: Sequence[bytes]) -> bytes:
    """SHA-256 over the payloads' own SHA-256s (their headers carry round, client id and chunk)."""
    if not isinstance(payloads, list | tuple) or not payloads:
        raise EncryptionError("contribution: expected a non-empty list of payloads")
    outer = hashlib.sha256(_DOMAIN)
    for payload in payloads:
        if not isinstance(payload, bytes | bytearray):
            raise EncryptionError(f"contribution payload of type {type(payload).__name__}: expected bytes")
        outer.update(hashlib.sha256(payload).digest())
    return outer.digest()


def sign_contribution(signing_key: bytes, payloads: Sequence[bytes]) -> bytes:
    """The owner's 64-byte signature over :func:`contribution_digest` of its payloads."""
    return _private(signing_key).sign(contribution_digest(payloads))


def verify_contribution(public: bytes, payloads: Sequence[bytes], signature: Any, *, client_id: int) -> None:
    """Raise EncryptionError unless ``signature`` is ``client_id``'s registered key's over ``payloads``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise EncryptionError(f"client {client_id}: signature must be {SIGNATURE_BYTES} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, contribution_digest(payloads))
    except (InvalidSignature, ValueError):
        raise EncryptionError(
            f"client {client_id}: signature does not verify under its registered key (forged or altered)"
        ) from None


def recompute_aggregate(
    context: bytes,
    schema: UpdateSchema,
    *,
    round_idx: int,
    contributions: Mapping[int, tuple[Sequence[bytes], bytes]],
    registered: Mapping[int, bytes],
    role: str = "secret",
) -> tuple[ClosedRound, tuple[int, ...]]:
    """Verify every signed contribution and add them into a fresh encrypted sum.

    Args:
        context: the decrypting party's own context (``role``: secret for a key holder).
        contributions: ``client id -> (payloads, signature)`` as the aggregator received them.
        registered: ``client id -> Ed25519 public key`` registered when the owners joined.

    Returns:
        The closed round (aggregate of exactly these contributions) and the distinct signers in it.

    Raises:
        EncryptionError: an unregistered or mismatched client id, a bad signature, or a payload the
            aggregator's own checks refuse (wrong round, parameters, weight, malformed ciphertext).
    """
    aggregator = StreamingAggregator(context, schema, round_idx=round_idx, role=role)
    signers = []
    for client_id, (payloads, signature) in sorted(contributions.items()):
        if client_id not in registered:
            raise EncryptionError(f"client {client_id}: not a registered owner of this federation")
        verify_contribution(registered[client_id], list(payloads), signature, client_id=client_id)
        for payload in payloads:
            header, _ = wire.decode(payload, max_body=len(payload))
            if header.client_id != client_id:
                raise EncryptionError(
                    f"client {client_id} signed a payload of client {header.client_id}: refused"
                )
            aggregator.add(bytes(payload))
        signers.append(client_id)
    closed = aggregator.close()
    return closed, tuple(c for c in signers if c in set(closed.clients))


def _private(signing_key: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(signing_key, bytes) or len(signing_key) != SIGNING_KEY_BYTES:
        raise EncryptionError(f"signing key must be {SIGNING_KEY_BYTES} raw bytes")
    return Ed25519PrivateKey.from_private_bytes(signing_key)
