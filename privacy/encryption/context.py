"""Keys and contexts: the key authority, and loading contexts with their role checked.

The key authority (not the aggregator) runs :func:`generate_keys` once per federation. It returns the
secret context bytes (for clients: they encrypt and decrypt) and the public context bytes (for the
aggregator: TenSEAL ``is_private()`` is False, no secret key, no relinearisation or Galois keys; it can
only add ciphertexts). Both carry the same :class:`~privacy.encryption.params.AggregationSpec` in a
small envelope, so a context from another key generation or with other parameters is refused.

Envelope (little-endian): ``"FRHK" | version u16 | role u8 (1 secret, 2 public) | u32 spec length |
spec JSON | u64 context length | TenSEAL context bytes`` (TenSEAL's protobuf, never pickle).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from privacy.encryption.params import (
    DEFAULT_CIPHERTEXTS_PER_CHUNK,
    AggregationSpec,
    QuantSpec,
    SchemeParams,
    plan_bfv,
    plan_ckks,
)
from privacy.errors import EncryptionError

_MAGIC = b"FRHK"
_VERSION = 1
ROLE_SECRET = 1
ROLE_PUBLIC = 2
_ROLE_NAMES = {ROLE_SECRET: "secret", ROLE_PUBLIC: "public"}
_PREFIX = struct.Struct("<4sHBI")
_U64 = struct.Struct("<Q")
_MAX_SPEC_BYTES = 1 << 16


class KeyMaterial:
    """What the key authority hands out: secret context to clients, public context to the aggregator.

    A plain class (not a dataclass) so that no printer walks into the key bytes.
    """

    __slots__ = ("public_context", "secret_context", "spec")

    def __init__(self, *, secret_context: bytes, public_context: bytes, spec: AggregationSpec) -> None:
        self.secret_context = secret_context
        self.public_context = public_context
        self.spec = spec

    def __repr__(self) -> str:
        return f"KeyMaterial(scheme={self.spec.params.scheme}, param_hash={self.spec.param_hash.hex()[:12]})"


@dataclass(frozen=True)
class LoadedContext:
    """A TenSEAL context whose role and parameters were checked against its spec."""

    spec: AggregationSpec
    context: Any  # tenseal.Context
    role: int

    @property
    def is_secret(self) -> bool:
        return self.role == ROLE_SECRET


def generate_keys(
    *,
    max_clients: int,
    scheme: str = "bfv",
    max_weight: int = 1,
    clip: float = 1.0,
    precision_bits: int = 16,
    poly_modulus_degree: int | None = None,
    ciphertexts_per_chunk: int = DEFAULT_CIPHERTEXTS_PER_CHUNK,
    params: SchemeParams | None = None,
    n_threads: int = 1,
) -> KeyMaterial:
    """Key authority: plan parameters for the declared headroom, generate keys, split the contexts.

    Args:
        max_clients: most clients one aggregate may hold (checked by the aggregator; more is an error).
        scheme: ``"bfv"`` (default: exact integers, several values per slot) or ``"ckks"``.
        max_weight: largest integer weight a client may fold in (e.g. a capped sample count).
        clip: per-coordinate bound of the update values.
        precision_bits: grid ``quantum = clip * 2**-precision_bits``.
        poly_modulus_degree: force N (BFV planner; CKKS default 8192).
        ciphertexts_per_chunk: ciphertexts per payload message.
        params: explicit scheme parameters instead of the planner's (still checked).
        n_threads: TenSEAL threads for key generation.

    Raises:
        EncryptionError: insecure parameters or no parameters with the requested headroom.
    """
    import tenseal as ts

    quant = QuantSpec(
        clip=clip, precision_bits=precision_bits, max_clients=max_clients, max_weight=max_weight
    )
    if params is None:
        if scheme == "bfv":
            params = plan_bfv(quant, poly_modulus_degree=poly_modulus_degree)
        elif scheme == "ckks":
            params = plan_ckks(quant, poly_modulus_degree=poly_modulus_degree or 8192)
        else:
            raise EncryptionError(f"scheme={scheme!r}: expected 'bfv' or 'ckks'")
    elif params.scheme != scheme:
        raise EncryptionError(f"params.scheme={params.scheme!r} does not match scheme={scheme!r}")
    spec = AggregationSpec(params=params, quant=quant, ciphertexts_per_chunk=ciphertexts_per_chunk)
    try:
        if params.scheme == "bfv":
            context = ts.context(
                ts.SCHEME_TYPE.BFV,
                poly_modulus_degree=params.poly_modulus_degree,
                plain_modulus=params.plain_modulus,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
                n_threads=n_threads,
            )
        else:
            context = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
                n_threads=n_threads,
            )
            context.global_scale = 2.0**params.scale_bits
    except (ValueError, RuntimeError, TypeError) as err:
        raise EncryptionError(f"TenSEAL rejected {params}: {err}") from None
    _check_context_matches(context, spec)
    secret = context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return KeyMaterial(
        secret_context=_envelope(ROLE_SECRET, spec, secret),
        public_context=_envelope(ROLE_PUBLIC, spec, public),
        spec=spec,
    )


def load_context(data: bytes, *, role: str, n_threads: int = 1) -> LoadedContext:
    """Load a context envelope, insisting on ``role`` (``"secret"`` or ``"public"``).

    Raises:
        EncryptionError: malformed envelope, wrong role, a public context holding a secret key,
            insecure parameters, or a TenSEAL context whose parameters differ from its spec.
    """
    import tenseal as ts

    expected = {"secret": ROLE_SECRET, "public": ROLE_PUBLIC}.get(role)
    if expected is None:
        raise EncryptionError(f"role={role!r}: expected 'secret' or 'public'")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncryptionError(f"{role} context of type {type(data).__name__}: expected bytes")
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise EncryptionError(f"{role} context of {len(data)} bytes: too short for the envelope")
    magic, version, found, spec_length = _PREFIX.unpack_from(data, 0)
    if magic != _MAGIC or version != _VERSION:
        raise EncryptionError(
            f"{role} context: magic {magic!r} version {version}, expected {_MAGIC!r} {_VERSION}"
        )
    if found != expected:
        raise EncryptionError(
            f"context role {_ROLE_NAMES.get(found, found)!r}: expected a {role} context "
            "(the aggregator gets the public one, clients the secret one)"
        )
    offset = _PREFIX.size
    if spec_length > _MAX_SPEC_BYTES or offset + spec_length + _U64.size > len(data):
        raise EncryptionError(f"{role} context: spec length {spec_length} exceeds the envelope")
    spec = AggregationSpec.from_json(data[offset : offset + spec_length].decode("utf-8", errors="strict"))
    offset += spec_length
    (context_length,) = _U64.unpack_from(data, offset)
    offset += _U64.size
    if offset + context_length != len(data):
        raise EncryptionError(
            f"{role} context: envelope says {context_length} context bytes, got {len(data) - offset}"
        )
    try:
        context = ts.context_from(data[offset:], n_threads=n_threads)
    except (ValueError, RuntimeError, TypeError) as err:
        raise EncryptionError(f"{role} context: TenSEAL could not load it ({err})") from None
    _check_context_matches(context, spec)
    if expected == ROLE_PUBLIC and (context.is_private() or context.has_secret_key()):
        raise EncryptionError("public context holds a secret key: the aggregator must never receive one")
    if expected == ROLE_SECRET and not context.has_secret_key():
        raise EncryptionError(
            "secret context has no secret key: clients need the key authority's secret context"
        )
    if spec.params.scheme == "ckks":
        context.global_scale = 2.0**spec.params.scale_bits
    return LoadedContext(spec=spec, context=context, role=expected)


# Larger than any context this project makes (N=32768 secret contexts are a few MiB).
MAX_CONTEXT_FILE_BYTES = 256 << 20


def read_context_file(path: str | os.PathLike, *, role: str, n_threads: int = 1) -> LoadedContext:
    """Read and load a context file (``public.ctx``, ``secret.ctx``), with one-line errors naming it.

    Raises:
        EncryptionError: the file is missing, not a regular file, unreadable, too large, or its
            content is refused by :func:`load_context` (wrong role, malformed, other parameters).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EncryptionError(
            f"{path}: {role} context file not found (the key authority writes it; regenerate or restore it)"
        )
    if not os.path.isfile(path):
        raise EncryptionError(f"{path}: not a regular file, expected the {role} context")
    try:
        size = os.path.getsize(path)
        if size > MAX_CONTEXT_FILE_BYTES:
            raise EncryptionError(f"{path}: {size} bytes, larger than any {role} context")
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise EncryptionError(f"{path}: cannot read the {role} context ({err.strerror})") from None
    try:
        return load_context(data, role=role, n_threads=n_threads)
    except EncryptionError as err:
        raise EncryptionError(f"{path}: {err}") from None


def check_key_pair(secret: LoadedContext, public: LoadedContext) -> None:
    """Refuse a secret and a public context from different key generations, at load, before any spend.

    Compares the specs (key id and parameters) and then proves the pair: a known vector encrypted
    under the public key must decrypt to itself under the secret key (a swapped secret.ctx whose
    envelope was copied from the right one still fails here).

    Raises:
        EncryptionError: the contexts' roles, specs or keys do not belong together.
    """
    import tenseal as ts

    if not secret.is_secret or public.is_secret:
        raise EncryptionError("check_key_pair: expected a secret context and a public context")
    if secret.spec.param_hash != public.spec.param_hash:
        raise EncryptionError(
            f"secret context (key id {secret.spec.key_id[:12]}) and public context (key id "
            f"{public.spec.key_id[:12]}) come from different key generations; use the pair the key "
            "authority generated together"
        )
    probe = [1, 2, 3, 5, 8, 13, 21, 34]
    try:
        if secret.spec.params.scheme == "bfv":
            ciphertext = ts.bfv_vector(public.context, probe).serialize()
            decrypted = [int(v) for v in ts.bfv_vector_from(secret.context, ciphertext).decrypt()]
        else:
            ciphertext = ts.ckks_vector(public.context, [float(v) for v in probe]).serialize()
            decrypted = [round(v) for v in ts.ckks_vector_from(secret.context, ciphertext).decrypt()]
    except (ValueError, RuntimeError, TypeError) as err:
        raise EncryptionError(f"secret and public contexts do not work together ({err})") from None
    if decrypted[: len(probe)] != probe:
        raise EncryptionError(
            "secret context does not decrypt what the public context encrypts: the secret key belongs to "
            "another key generation (swapped secret.ctx?)"
        )


def _envelope(role: int, spec: AggregationSpec, context_bytes: bytes) -> bytes:
    spec_bytes = spec.to_json().encode()
    return (
        _PREFIX.pack(_MAGIC, _VERSION, role, len(spec_bytes))
        + spec_bytes
        + _U64.pack(len(context_bytes))
        + context_bytes
    )


def _check_context_matches(context: Any, spec: AggregationSpec) -> None:
    # Importing the SEAL bindings registers seal::Modulus & co.; without it a fresh process that only
    # loads a context cannot read the parameters back ("Unregistered type").
    import tenseal.sealapi  # noqa: F401

    parms = context.seal_context().data.key_context_data().parms()
    params = spec.params
    actual = {
        "scheme": parms.scheme().name.lower(),
        "poly_modulus_degree": int(parms.poly_modulus_degree()),
        "coeff_primes": tuple(int(m.value()) for m in parms.coeff_modulus()),
        "plain_modulus": int(parms.plain_modulus().value()) if params.scheme == "bfv" else 0,
    }
    wanted = {
        "scheme": params.scheme,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_primes": params.coeff_primes,
        "plain_modulus": params.plain_modulus,
    }
    for key, value in wanted.items():
        if actual[key] != value:
            raise EncryptionError(
                f"TenSEAL context {key}={actual[key]!r} does not match its spec ({value!r})"
            )
