"""Streaming encrypted aggregator: adds client ciphertexts as they arrive, never able to decrypt.

Bound to one public context, one update schema and one round. Memory is one running encrypted sum per
chunk (the size of one aggregate), never the set of updates; a client that never delivers costs nothing.
Every payload is fully validated (header binding, round, duplicate, headroom, SEAL deserialisation and
ciphertext shape) before anything is added, and the sum is replaced only by a freshly computed one, so a
rejected payload leaves the aggregate exactly as it was. Failures are errors (``EncryptionError``) the
caller records as data, in the spirit of Flower's ``aggregate_fit(results, failures)``.

Weights are public: each update's header carries its FedAvg weight in the clear (in [1, max_weight]),
and the aggregator multiplies the ciphertexts by it (double-and-add of ciphertexts: exact in BFV and
CKKS, no scale change, noise grows by the weight, which the parameter planner budgets). A key holder
can therefore neither claim a weight other than the one applied nor send a negative one; the aggregate
lists every contributor with its weight, and the decrypting party divides by their public total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from privacy.encryption import wire
from privacy.encryption.client import max_ciphertext_bytes
from privacy.encryption.context import load_context
from privacy.encryption.schema import UpdateSchema
from privacy.errors import EncryptionError


@dataclass(frozen=True)
class ClosedRound:
    """The round's encrypted aggregate and who is in it.

    ``clients`` delivered every chunk; ``partial_clients`` delivered some chunks only (each chunk's sum
    and weight then cover its own contributors; clients decrypt with ``allow_partial=True``).
    """

    aggregate: bytes
    clients: tuple[int, ...]
    num_clients: int
    partial_clients: tuple[int, ...]


class StreamingAggregator:
    """Adds encrypted updates of one round into a running sum; holds only the public context.

    Args:
        public_context: the key authority's public context bytes (a secret one is refused).
        schema: the update schema the clients encrypt.
        round_idx: the round this aggregator accepts (payloads of other rounds are replays).
        n_threads: TenSEAL threads.
        role: ``"public"`` (the aggregator); ``"secret"`` only for a key holder that recomputes the
            sum of signed contributions before decrypting (:mod:`privacy.encryption.signing`).
    """

    def __init__(
        self,
        public_context: bytes,
        schema: UpdateSchema,
        *,
        round_idx: int,
        n_threads: int = 1,
        role: str = "public",
    ) -> None:
        loaded = load_context(public_context, role=role, n_threads=n_threads)
        if not isinstance(schema, UpdateSchema):
            raise EncryptionError(f"schema of type {type(schema).__name__}: expected an UpdateSchema")
        if isinstance(round_idx, bool) or not isinstance(round_idx, int) or not 0 <= round_idx < 2**64:
            raise EncryptionError(f"round_idx={round_idx!r}: expected an integer in [0, 2**64)")
        self.spec = loaded.spec
        self.schema = schema
        self.round_idx = round_idx
        self._context = loaded.context
        self._layout = self.spec.chunk_layout(schema.size)
        self._first_parms_id = list(self._context.seal_context().data.first_parms_id())
        self._max_ciphertext = max_ciphertext_bytes(self.spec)
        self._sums: list[Any] = [None] * len(self._layout)
        self._contributors: list[list[int]] = [[] for _ in self._layout]
        self._weights: dict[int, int] = {}
        self._closed = False

    @property
    def context(self) -> Any:
        """The public TenSEAL context (no secret key)."""
        return self._context

    @property
    def delivered(self) -> tuple[int, ...]:
        """Clients whose every chunk has been added so far."""
        complete = set(self._contributors[0])
        for contributors in self._contributors[1:]:
            complete &= set(contributors)
        return tuple(sorted(complete))

    def add(self, payload: bytes) -> int:
        """Validate one chunk payload and add it to the running sum; returns the sender's client id.

        Raises:
            EncryptionError: closed round; malformed, truncated or oversized payload; other parameters,
                schema or round; bad chunk index/count or ciphertext count; duplicate (client, chunk);
                max_clients reached; ciphertexts SEAL rejects or of the wrong shape. The aggregate is
                unchanged whenever this is raised.
        """
        if self._closed:
            raise EncryptionError(f"round {self.round_idx} is closed: no more updates are accepted")
        max_body = max(n_ct for _, _, n_ct in self._layout) * (self._max_ciphertext + 4)
        header, body = wire.decode(payload, max_body=max_body)
        if header.kind != wire.KIND_UPDATE:
            raise EncryptionError(f"payload kind {header.kind}: expected an update ({wire.KIND_UPDATE})")
        wire.check_binding(header, self.spec, self.schema, self.round_idx)
        if header.chunk_count != len(self._layout) or not 0 <= header.chunk_index < header.chunk_count:
            raise EncryptionError(
                f"chunk {header.chunk_index} of {header.chunk_count}: expected an index below "
                f"{len(self._layout)} chunks"
            )
        index = header.chunk_index
        expected_cts = self._layout[index][2]
        if header.num_ciphertexts != expected_cts:
            raise EncryptionError(
                f"chunk {index} has {header.num_ciphertexts} ciphertexts: expected {expected_cts}"
            )
        contributors = self._contributors[index]
        if header.client_id in contributors:
            raise EncryptionError(
                f"client {header.client_id} already delivered chunk {index} of round {self.round_idx}"
            )
        if len(contributors) >= self.spec.quant.max_clients:
            raise EncryptionError(
                f"chunk {index} already holds max_clients={self.spec.quant.max_clients} updates: one more "
                "could wrap the encrypted sum around"
            )
        weight = header.weight
        if not 1 <= weight <= self.spec.quant.max_weight:
            raise EncryptionError(
                f"client {header.client_id} chunk {index}: public weight {weight} outside "
                f"[1, max_weight={self.spec.quant.max_weight}]"
            )
        if self._weights.get(header.client_id, weight) != weight:
            raise EncryptionError(
                f"client {header.client_id} chunk {index}: weight {weight} differs from the "
                f"{self._weights[header.client_id]} of its earlier chunks"
            )
        pieces = wire.split_ciphertexts(body, expected_cts, max_ciphertext=self._max_ciphertext)
        vector = self._load(pieces, index)
        current = self._sums[index]
        try:
            weighted = scale_by(vector, weight)
            total = weighted if current is None else current + weighted
        except (ValueError, RuntimeError, TypeError) as err:
            raise EncryptionError(f"chunk {index}: TenSEAL could not add it ({err})") from None
        self._sums[index] = total
        contributors.append(header.client_id)
        self._weights[header.client_id] = weight
        return header.client_id

    def close(self) -> ClosedRound:
        """End the round: the encrypted aggregate plus the clients in it. No further adds."""
        self._closed = True
        delivered = self.delivered
        everyone = set().union(*map(set, self._contributors))
        chunks = []
        for vector, contributors in zip(self._sums, self._contributors):
            pairs = [(client, self._weights[client]) for client in sorted(contributors)]
            chunks.append((pairs, b"" if vector is None else vector.serialize()))
        header = wire.Header(
            kind=wire.KIND_AGGREGATE,
            scheme=self.spec.params.scheme,
            param_hash=self.spec.param_hash,
            schema_hash=self.schema.hash,
            round_idx=self.round_idx,
            client_id=0,
            chunk_index=0,
            chunk_count=len(self._layout),
            num_ciphertexts=sum(n_ct for _, _, n_ct in self._layout),
        )
        return ClosedRound(
            aggregate=wire.encode(header, wire.encode_aggregate_body(chunks)),
            clients=delivered,
            num_clients=len(delivered),
            partial_clients=tuple(sorted(everyone - set(delivered))),
        )

    def _load(self, pieces: list[bytes], index: int) -> Any:
        import tenseal as ts

        params = self.spec.params
        try:
            if params.scheme == "bfv":
                vector = ts.bfv_vector_from(self._context, wire.tenseal_vector_proto(pieces, params.slots))
            else:
                scale = 2.0**params.scale_bits
                proto = wire.tenseal_vector_proto(pieces, params.slots, scale=scale)
                vector = ts.ckks_vector_from(self._context, proto)
            ciphertexts = vector.ciphertext()
        except (ValueError, RuntimeError, TypeError) as err:
            raise EncryptionError(f"chunk {index}: SEAL rejected a ciphertext ({err})") from None
        for i, ct in enumerate(ciphertexts):
            wrong = (
                ct.size() != 2
                or list(ct.parms_id()) != self._first_parms_id
                or ct.is_ntt_form() != (params.scheme == "ckks")
                or ct.is_transparent()
                or (params.scheme == "ckks" and ct.scale != 2.0**params.scale_bits)
            )
            if wrong:
                raise EncryptionError(
                    f"chunk {index} ciphertext {i}: expected a fresh 2-part ciphertext at the first data level "
                    f"of these parameters (size {ct.size()}, ntt {ct.is_ntt_form()}, scale {ct.scale})"
                )
        return vector


def scale_by(vector: Any, weight: int) -> Any:
    """``weight * vector`` by double-and-add of ciphertexts (exact integer multiple, same scale/level)."""
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise EncryptionError(f"weight={weight!r}: expected a positive integer")
    result, power = None, vector
    while True:
        if weight & 1:
            result = power if result is None else result + power
        weight >>= 1
        if not weight:
            return result
        power = power + power
