"""Client side of encrypted FedAvg: quantise, pack and encrypt an update; decrypt the aggregate.

Clients hold the secret key (TenSEAL has no threshold decryption), so they encrypt with it: SEAL's
symmetric encryption sends ``c1`` as a PRNG seed, which halves the upload, and its fresh noise has a small
worst-case bound (21 per coefficient), so exact sums are guaranteed with little modulus to spare and
several values fit per BFV slot.

Weights are public: a client quantises its unweighted update and states its integer weight ``w_i`` in
the clear (payload header); the aggregator multiplies the ciphertexts by it. Each chunk also carries two
encrypted unit values (1 each), so the aggregate holds ``sum_i w_i * round(x_i / quantum)`` and twice
``W = sum_i w_i``. The decrypting party recomputes ``W`` from the public weights listed in the
aggregate, refuses if the decrypted units disagree, and releases ``sum * quantum / W``: the decrypted
sum is an integer on the quantum grid (exact for BFV; for CKKS rounded to the grid, and refused if its
noise exceeds a quarter quantum, following Li and Micciancio, 2021), and
``|released - plaintext FedAvg of the clipped values| <= quantum`` (each client's rounding error is
below one quantum), plus float64 rounding of the final division. A key holder cannot lie about its
weight (the encrypted weight field of format version 1 let one claim weight 1 and scale its values, or
send a negative weight); what it encrypts is still unchecked, so one forged contribution can move the
average only as far as the per-coordinate clip check on the decrypted sum allows.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.encryption import wire
from privacy.encryption.context import load_context
from privacy.encryption.packing import pack_digits, quantise, unpack_digits
from privacy.encryption.params import META_VALUES, AggregationSpec
from privacy.encryption.schema import UpdateSchema
from privacy.errors import EncryptionError


@dataclass(frozen=True)
class AggregateResult:
    """A decrypted round: the weighted average and what it was computed from.

    ``total_weight``/``num_clients`` are those of every chunk (they differ only when a client delivered
    some chunks and not others: see ``chunk_weights``/``chunk_clients`` and ``allow_partial``).
    ``error_bound`` bounds ``|average - plaintext weighted FedAvg of the clipped updates|`` per value; it
    is a constant of the configuration (quantum plus float64 slack), never derived from the plaintext.
    """

    average: Any  # np.ndarray (flat, float64) or dict[str, np.ndarray]
    total_weight: int
    num_clients: int
    clients: tuple[int, ...]
    error_bound: float
    chunk_weights: tuple[int, ...]
    chunk_clients: tuple[int, ...]


class EncryptionClient:
    """Holds the secret context and the update schema; encrypts updates and decrypts aggregates.

    Args:
        secret_context: the key authority's secret context bytes.
        schema: the update schema every client and the aggregator share.
        n_threads: TenSEAL threads for decryption.
    """

    def __init__(self, secret_context: bytes, schema: UpdateSchema, *, n_threads: int = 1) -> None:
        import tenseal.sealapi as sealapi

        loaded = load_context(secret_context, role="secret", n_threads=n_threads)
        if not isinstance(schema, UpdateSchema):
            raise EncryptionError(f"schema of type {type(schema).__name__}: expected an UpdateSchema")
        self.spec: AggregationSpec = loaded.spec
        self.schema = schema
        self._context = loaded.context
        self._layout = self.spec.chunk_layout(schema.size)
        seal_context = self._context.seal_context().data
        self._encryptor = sealapi.Encryptor(seal_context, self._context.secret_key().data)
        if self.spec.params.scheme == "bfv":
            self._encoder: Any = sealapi.BatchEncoder(seal_context)
        else:
            self._encoder = sealapi.CKKSEncoder(seal_context)
        self._plaintext_type = sealapi.Plaintext

    @property
    def num_chunks(self) -> int:
        return len(self._layout)

    def encrypt_update(
        self,
        update: Mapping[str, Any] | np.ndarray,
        *,
        weight: int,
        round_idx: int,
        client_id: int,
        clip: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[bytes]:
        """Clip, weight, quantise, pack and encrypt ``update``: one payload per chunk.

        Args:
            update: ``name -> tensor/array`` in the schema's names and shapes, or a flat array.
            weight: integer weight in [1, max_weight] (e.g. the capped local sample count).
            round_idx: the round this update belongs to (the aggregator rejects other rounds).
            client_id: this client's id, unique in the federation (0 <= id < 2**64).
            clip: per-coordinate clip, at most the spec's clip (default: the spec's clip).
            rng: source of the stochastic rounding (default: fresh OS entropy).

        Raises:
            EncryptionError: non-finite values, wrong keys/shapes, weight/clip/ids out of range.
        """
        quant = self.spec.quant
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | np.integer)
            or not 1 <= weight <= quant.max_weight
        ):
            raise EncryptionError(
                f"weight={weight!r}: expected an integer in [1, max_weight={quant.max_weight}]"
            )
        weight = int(weight)
        if clip is None:
            clip = quant.clip
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip <= quant.clip:
            raise EncryptionError(
                f"clip={clip!r}: expected a number in (0, {quant.clip}] (the key authority's clip)"
            )
        for name, value in (("round_idx", round_idx), ("client_id", client_id)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < 2**64:
                raise EncryptionError(f"{name}={value!r}: expected an integer in [0, 2**64)")
        flat = self.schema.flatten(update)
        ints = quantise(
            flat,
            weight=1,  # the public weight is applied by the aggregator
            clip=float(clip),
            grid_clip=quant.clip,
            precision_bits=quant.precision_bits,
            rng=rng if rng is not None else np.random.default_rng(),
        )
        meta = np.ones(META_VALUES, dtype=np.int64)
        payloads = []
        with tempfile.TemporaryDirectory(prefix="fedrec-he-", dir=_scratch_dir()) as scratch:
            path = os.path.join(scratch, "ciphertext")
            for index, (start, stop, n_ct) in enumerate(self._layout):
                ciphertexts = self._encrypt_values(np.concatenate([ints[start:stop], meta]), n_ct, path)
                header = wire.Header(
                    kind=wire.KIND_UPDATE,
                    scheme=self.spec.params.scheme,
                    param_hash=self.spec.param_hash,
                    schema_hash=self.schema.hash,
                    round_idx=int(round_idx),
                    client_id=int(client_id),
                    chunk_index=index,
                    chunk_count=len(self._layout),
                    num_ciphertexts=n_ct,
                    weight=weight,
                )
                payloads.append(wire.encode(header, wire.join_ciphertexts(ciphertexts)))
        return payloads

    def decrypt_aggregate(
        self, aggregate: bytes, *, round_idx: int, as_dict: bool = False, allow_partial: bool = False
    ) -> AggregateResult:
        """Decrypt a closed round's aggregate into the weighted average (rounded to the quantum grid).

        Args:
            aggregate: :attr:`ClosedRound.aggregate` bytes from the aggregator.
            round_idx: the round expected (an aggregate of another round is refused).
            as_dict: return ``name -> array`` instead of the flat vector.
            allow_partial: accept chunks with different contributors (a client that delivered only
                some chunks); each chunk is then the FedAvg of its own contributors.

        Raises:
            EncryptionError: wrong parameters/schema/round, malformed bytes, a chunk nobody contributed
                to, decrypted counts or weights inconsistent with the header, or excess CKKS noise.
        """
        spec = self.spec
        header, body = wire.decode(aggregate, max_body=self._max_aggregate_body())
        if header.kind != wire.KIND_AGGREGATE:
            raise EncryptionError(
                f"payload kind {header.kind}: expected an aggregate ({wire.KIND_AGGREGATE})"
            )
        wire.check_binding(header, spec, self.schema, round_idx)
        if header.chunk_count != len(self._layout):
            raise EncryptionError(f"aggregate has {header.chunk_count} chunks: expected {len(self._layout)}")
        chunks = wire.decode_aggregate_body(body, header.chunk_count)
        quantum = spec.quant.quantum
        average = np.empty(self.schema.size, dtype=np.float64)
        weights, counts, id_sets = [], [], []
        for index, ((start, stop, n_ct), (pairs, vector_bytes)) in enumerate(zip(self._layout, chunks)):
            ids = [client for client, _ in pairs]
            if not ids:
                raise EncryptionError(f"aggregate chunk {index}: no client contributed to it")
            if len(set(ids)) != len(ids) or len(ids) > spec.quant.max_clients:
                raise EncryptionError(
                    f"aggregate chunk {index}: {len(ids)} contributors, expected unique ids and at most "
                    f"max_clients={spec.quant.max_clients}"
                )
            if any(not 1 <= w <= spec.quant.max_weight for _, w in pairs):
                raise EncryptionError(
                    f"aggregate chunk {index}: a listed weight is outside [1, max_weight={spec.quant.max_weight}]"
                )
            # The divisor is the public total the decrypting party recomputes, never a decrypted value.
            weight = sum(w for _, w in pairs)
            k = len(ids)
            values = self._decrypt_chunk(vector_bytes, n_ct, index)
            count = stop - start
            sums, units = values[:count], values[count : count + META_VALUES]
            if values[count + META_VALUES :].any():
                raise EncryptionError(f"aggregate chunk {index}: padding decrypted to non-zero values")
            if (units != weight).any():
                raise EncryptionError(
                    f"aggregate chunk {index}: decrypted unit sums {units.tolist()} disagree with the public "
                    f"total weight {weight} of the {k} contributors listed"
                )
            if sums.size and int(np.abs(sums).max()) > weight * 2**spec.quant.precision_bits:
                raise EncryptionError(f"aggregate chunk {index}: decrypted sums exceed the clip bound")
            average[start:stop] = sums * quantum / weight
            weights.append(weight)
            counts.append(k)
            id_sets.append(set(ids))
        if not allow_partial and (len(set(weights)) > 1 or any(s != id_sets[0] for s in id_sets)):
            raise EncryptionError(
                f"aggregate chunks have different contributors (weights {weights}): a client delivered only "
                "some chunks; pass allow_partial=True to accept per-chunk averages"
            )
        # float64 division adds at most one rounding (relative 2**-53) to each value, and |average| is at
        # most clip + quantum. The bound is a constant of the configuration: nothing derived from the
        # plaintext may leave with it (a data-dependent slack leaked max|average| to ~7 digits).
        float_slack = 2.0**-52 * (spec.quant.clip + quantum)
        return AggregateResult(
            average=self.schema.unflatten(average) if as_dict else average,
            total_weight=min(weights),
            num_clients=min(counts),
            clients=tuple(sorted(set.intersection(*id_sets))),
            error_bound=quantum + float_slack,
            chunk_weights=tuple(weights),
            chunk_clients=tuple(counts),
        )

    def check_contribution(self, payloads: list[bytes], *, round_idx: int) -> str | None:
        """Why one client's update is malformed, or None: for the decrypting party, before it decrypts.

        Decrypts each chunk of this one update inside the caller and keeps only the verdict: the units
        must be 1, the padding 0, every value within one client's grid bound ``2**precision_bits``
        (the clip; no key holder can scale its values past it), and SEAL must load and decrypt it. This
        isolates a contribution that passes every header check but would poison the aggregate's
        decryption (a spliced ciphertext, forged units, values beyond the clip). The decrypted values
        never leave this method.
        """
        quant = self.spec.quant
        try:
            if not payloads or len(payloads) != len(self._layout):
                return f"{len(payloads) if payloads else 0} chunks, expected {len(self._layout)}"
            max_ct = max_ciphertext_bytes(self.spec)
            for index, ((start, stop, n_ct), payload) in enumerate(zip(self._layout, payloads)):
                header, body = wire.decode(payload, max_body=n_ct * (max_ct + 4))
                wire.check_binding(header, self.spec, self.schema, round_idx)
                if (
                    header.kind != wire.KIND_UPDATE
                    or header.chunk_index != index
                    or header.num_ciphertexts != n_ct
                ):
                    return f"chunk {index}: header does not match the layout"
                pieces = wire.split_ciphertexts(body, n_ct, max_ciphertext=max_ct)
                scale = None if self.spec.params.scheme == "bfv" else 2.0**self.spec.params.scale_bits
                proto = wire.tenseal_vector_proto(pieces, self.spec.params.slots, scale=scale)
                values = self._decrypt_chunk(proto, n_ct, index)
                count = stop - start
                if (values[count : count + META_VALUES] != 1).any() or values[count + META_VALUES :].any():
                    return f"chunk {index}: unit or padding values are not the format's"
                if count and int(np.abs(values[:count]).max()) > 2**quant.precision_bits:
                    return f"chunk {index}: values beyond the clip"
        except EncryptionError as err:
            return str(err)
        return None

    def _encrypt_values(self, values: np.ndarray, n_ct: int, path: str) -> list[bytes]:
        params = self.spec.params
        slots = params.slots
        if params.scheme == "bfv":
            packed = pack_digits(
                values, digits=params.digits_per_slot, base=self.spec.quant.digit_base, slots=n_ct * slots
            )
        else:
            packed = np.zeros(n_ct * slots, dtype=np.float64)
            packed[: values.size] = values
        ciphertexts = []
        scale = 2.0**params.scale_bits
        for i in range(n_ct):
            plaintext = self._plaintext_type()
            part = packed[i * slots : (i + 1) * slots]
            if params.scheme == "bfv":
                self._encoder.encode(part, plaintext)
            else:
                self._encoder.encode(part, scale, plaintext)
            # Serializable ciphertext: saved with c1 as its PRNG seed (half the bytes).
            self._encryptor.encrypt_symmetric(plaintext).save(path)
            with open(path, "rb") as handle:
                ciphertexts.append(handle.read())
        return ciphertexts

    def _decrypt_chunk(self, vector_bytes: bytes, n_ct: int, index: int) -> np.ndarray:
        import tenseal as ts

        params = self.spec.params
        try:
            if params.scheme == "bfv":
                vector = ts.bfv_vector_from(self._context, vector_bytes)
            else:
                vector = ts.ckks_vector_from(self._context, vector_bytes)
            decrypted = vector.decrypt()
        except (ValueError, RuntimeError, TypeError) as err:
            raise EncryptionError(
                f"aggregate chunk {index}: TenSEAL could not load or decrypt it ({err})"
            ) from None
        if len(decrypted) != n_ct * params.slots:
            raise EncryptionError(
                f"aggregate chunk {index}: {len(decrypted)} slots, expected {n_ct * params.slots}"
            )
        if params.scheme == "bfv":
            slots = np.asarray(decrypted, dtype=np.int64)
            return unpack_digits(slots, digits=params.digits_per_slot, base=self.spec.quant.digit_base)
        approx = np.asarray(decrypted, dtype=np.float64)
        rounded = np.rint(approx)
        # Release only grid values; noise near half a quantum would make rounding leak it.
        if not np.isfinite(approx).all() or np.abs(approx - rounded).max() > 0.25:
            raise EncryptionError(
                f"aggregate chunk {index}: CKKS noise exceeds a quarter quantum; refusing to release"
            )
        return rounded.astype(np.int64)

    def _max_aggregate_body(self) -> int:
        per_ct = max_ciphertext_bytes(self.spec)
        k = self.spec.quant.max_clients
        return sum(4 + 8 * k + 8 + n_ct * (per_ct + 16) + 64 for _, _, n_ct in self._layout)


def max_ciphertext_bytes(spec: AggregationSpec) -> int:
    """Upper bound of one serialized (unseeded, uncompressed) ciphertext under ``spec``."""
    params = spec.params
    return 2 * params.poly_modulus_degree * (len(params.coeff_primes) - 1) * 8 + 1024


def _scratch_dir() -> str | None:
    # SEAL's Serializable saves to a path; RAM-backed /dev/shm keeps that off the disk.
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
