"""Wire format of encrypted updates and aggregates: a versioned binary header plus ciphertext bytes.

No pickle anywhere: headers are ``struct``-packed fields, ciphertexts are SEAL's own serialisation
(parsed by SEAL with the receiver's context, which validates them), and the only container format
is TenSEAL's ``BFVVectorProto``/``CKKSVectorProto`` message (written here by hand: two or three fields).

Header (little-endian, 112 bytes)::

    magic "FRHE" | version u16 | kind u8 (1 update, 2 aggregate) | scheme u8 (1 bfv, 2 ckks)
    | parameter hash 32 B | schema hash 32 B | round u64 | client id u64
    | chunk index u32 | chunk count u32 | ciphertext count u32 | weight u32 | body length u64

``weight`` is the sender's public FedAvg weight (an update's example count, capped; 0 in an aggregate).
It travels in the clear and the aggregator multiplies the ciphertexts by it, so no key holder can
claim one weight and encrypt another (format version 2: version 1 carried the weight encrypted).

Update body: per ciphertext ``u32 length`` + SEAL ciphertext (seeded: ``c1`` travels as a PRNG seed).
Aggregate body: per chunk ``u32 contributors`` + per contributor its id and public weight (``u64``
each) + ``u64 length`` + the TenSEAL vector bytes of that chunk's encrypted weighted sum.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from privacy.encryption.params import AggregationSpec
from privacy.encryption.schema import UpdateSchema
from privacy.errors import EncryptionError

MAGIC = b"FRHE"
VERSION = 2
KIND_UPDATE = 1
KIND_AGGREGATE = 2
SCHEME_CODES = {"bfv": 1, "ckks": 2}
SCHEME_NAMES = {code: name for name, code in SCHEME_CODES.items()}

_HEADER = struct.Struct("<4sHBB32s32sQQIIIIQ")
HEADER_SIZE = _HEADER.size
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# SEAL's SEALHeader: magic 0xA15E, header size 16, version major/minor, compression mode, reserved, size.
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E


class Header(NamedTuple):
    kind: int
    scheme: str
    param_hash: bytes
    schema_hash: bytes
    round_idx: int
    client_id: int
    chunk_index: int
    chunk_count: int
    num_ciphertexts: int
    weight: int = 0


def encode(header: Header, body: bytes) -> bytes:
    """Header + body."""
    for name, value, bits in (
        ("round_idx", header.round_idx, 64),
        ("client_id", header.client_id, 64),
        ("chunk_index", header.chunk_index, 32),
        ("chunk_count", header.chunk_count, 32),
        ("num_ciphertexts", header.num_ciphertexts, 32),
        ("weight", header.weight, 32),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
            raise EncryptionError(f"{name}={value!r}: expected an integer in [0, 2**{bits})")
    packed = _HEADER.pack(
        MAGIC,
        VERSION,
        header.kind,
        SCHEME_CODES[header.scheme],
        header.param_hash,
        header.schema_hash,
        header.round_idx,
        header.client_id,
        header.chunk_index,
        header.chunk_count,
        header.num_ciphertexts,
        header.weight,
        len(body),
    )
    return packed + body


def decode(payload: bytes, *, max_body: int) -> tuple[Header, memoryview]:
    """Parse and check the header; the body must be exactly as long as it says and at most max_body.

    Raises:
        EncryptionError: not bytes, too short, bad magic/version/kind/scheme, truncated or oversized.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise EncryptionError(f"payload of type {type(payload).__name__}: expected bytes")
    view = memoryview(payload).cast("B")
    if len(view) < HEADER_SIZE:
        raise EncryptionError(f"payload of {len(view)} bytes: shorter than the {HEADER_SIZE}-byte header")
    fields = _HEADER.unpack_from(view, 0)
    magic, version, kind, scheme, param_hash, schema_hash, round_idx, client_id = fields[:8]
    chunk_index, chunk_count, num_ciphertexts, weight, body_length = fields[8:]
    if magic != MAGIC:
        raise EncryptionError(f"payload magic {bytes(magic)!r}: expected {MAGIC!r}")
    if version != VERSION:
        raise EncryptionError(f"payload format version {version}: expected {VERSION}")
    if kind not in (KIND_UPDATE, KIND_AGGREGATE):
        raise EncryptionError(f"payload kind {kind}: expected {KIND_UPDATE} (update) or {KIND_AGGREGATE}")
    if scheme not in SCHEME_NAMES:
        raise EncryptionError(f"payload scheme code {scheme}: expected one of {sorted(SCHEME_NAMES)}")
    actual = len(view) - HEADER_SIZE
    if body_length != actual:
        state = "truncated" if actual < body_length else "oversized"
        raise EncryptionError(f"payload {state}: header says {body_length} body bytes, got {actual}")
    if body_length > max_body:
        raise EncryptionError(f"payload body of {body_length} bytes: expected at most {max_body}")
    header = Header(
        kind, SCHEME_NAMES[scheme], bytes(param_hash), bytes(schema_hash), round_idx, client_id,
        chunk_index, chunk_count, num_ciphertexts, weight,
    )  # fmt: skip
    return header, view[HEADER_SIZE:]


def check_binding(header: Header, spec: AggregationSpec, schema: UpdateSchema, round_idx: int) -> None:
    """Refuse a payload bound to other encryption parameters, another model schema or another round.

    The round binding is the attempt tag (``fedrec.federated.client_round.attempt_tag``), so a late
    payload of an abandoned attempt is a replay. Raises EncryptionError naming the mismatch.
    """
    if header.scheme != spec.params.scheme:
        raise EncryptionError(f"payload scheme {header.scheme!r}: expected {spec.params.scheme!r}")
    if header.param_hash != spec.param_hash:
        raise EncryptionError(
            f"payload parameter hash {header.param_hash.hex()[:12]}: expected {spec.param_hash.hex()[:12]} "
            "(other encryption parameters or keys)"
        )
    if header.schema_hash != schema.hash:
        raise EncryptionError(
            f"payload schema hash {header.schema_hash.hex()[:12]}: expected {schema.hash.hex()[:12]} (other model)"
        )
    if header.round_idx != round_idx:
        raise EncryptionError(
            f"payload round {header.round_idx}: expected round {round_idx} (replay or stale)"
        )


def join_ciphertexts(ciphertexts: list[bytes]) -> bytes:
    """Update body: length-prefixed SEAL ciphertexts."""
    return b"".join(_U32.pack(len(c)) + c for c in ciphertexts)


def split_ciphertexts(body: memoryview, count: int, *, max_ciphertext: int) -> list[bytes]:
    """Inverse of :func:`join_ciphertexts`; every piece must be one whole SEAL object, nothing left over."""
    out, offset = [], 0
    for index in range(count):
        if offset + _U32.size > len(body):
            raise EncryptionError(f"ciphertext {index}: body truncated before its length field")
        (length,) = _U32.unpack_from(body, offset)
        offset += _U32.size
        if length > max_ciphertext or offset + length > len(body):
            raise EncryptionError(
                f"ciphertext {index}: length {length} exceeds the body or the {max_ciphertext}-byte limit"
            )
        piece = bytes(body[offset : offset + length])
        check_seal_object(piece, f"ciphertext {index}")
        out.append(piece)
        offset += length
    if offset != len(body):
        raise EncryptionError(f"update body has {len(body) - offset} bytes after {count} ciphertexts")
    return out


def check_seal_object(data: bytes, what: str) -> None:
    """SEAL header sanity: magic, header size, compression mode, and a size field equal to the length."""
    if len(data) < _SEAL_HEADER.size:
        raise EncryptionError(f"{what}: {len(data)} bytes, shorter than SEAL's 16-byte header")
    magic, header_size, _major, _minor, compr_mode, _reserved, size = _SEAL_HEADER.unpack_from(data, 0)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or compr_mode > 2:
        raise EncryptionError(f"{what}: not a SEAL object (magic {magic:#x}, header size {header_size})")
    if size != len(data):
        raise EncryptionError(f"{what}: SEAL header says {size} bytes, got {len(data)}")


def encode_aggregate_body(chunks: list[tuple[list[tuple[int, int]], bytes]]) -> bytes:
    """Aggregate body: per chunk its ``(contributor, public weight)`` pairs and its sum's vector bytes."""
    parts = []
    for contributors, vector in chunks:
        parts.append(_U32.pack(len(contributors)))
        for client, weight in contributors:
            parts.append(_U64.pack(client) + _U64.pack(weight))
        parts.append(_U64.pack(len(vector)))
        parts.append(vector)
    return b"".join(parts)


def decode_aggregate_body(body: memoryview, chunk_count: int) -> list[tuple[list[tuple[int, int]], bytes]]:
    """Inverse of :func:`encode_aggregate_body`."""
    out, offset = [], 0
    for index in range(chunk_count):
        if offset + _U32.size > len(body):
            raise EncryptionError(f"aggregate chunk {index}: truncated before its contributor count")
        (n,) = _U32.unpack_from(body, offset)
        offset += _U32.size
        if offset + 2 * n * _U64.size + _U64.size > len(body):
            raise EncryptionError(f"aggregate chunk {index}: truncated in its {n} contributor ids")
        ids = [
            (
                _U64.unpack_from(body, offset + 2 * i * _U64.size)[0],
                _U64.unpack_from(body, offset + (2 * i + 1) * _U64.size)[0],
            )
            for i in range(n)
        ]
        offset += 2 * n * _U64.size
        (length,) = _U64.unpack_from(body, offset)
        offset += _U64.size
        if offset + length > len(body):
            raise EncryptionError(f"aggregate chunk {index}: vector of {length} bytes exceeds the body")
        out.append((ids, bytes(body[offset : offset + length])))
        offset += length
    if offset != len(body):
        raise EncryptionError(f"aggregate body has {len(body) - offset} bytes after {chunk_count} chunks")
    return out


def tenseal_vector_proto(ciphertexts: list[bytes], slots: int, *, scale: float | None = None) -> bytes:
    """A ``BFVVectorProto`` (sizes=1, ciphertexts=2) or, with ``scale``, a ``CKKSVectorProto`` (scale=3).

    Lets TenSEAL's ``bfv_vector_from``/``ckks_vector_from`` load SEAL ciphertexts, seeded ones included.
    """
    sizes = b"".join(_varint(slots) for _ in ciphertexts)
    parts = [b"\x0a", _varint(len(sizes)), sizes]
    for c in ciphertexts:
        parts += [b"\x12", _varint(len(c)), c]
    if scale is not None:
        parts += [b"\x19", struct.pack("<d", scale)]
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
