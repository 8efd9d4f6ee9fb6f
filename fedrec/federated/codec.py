"""How a client's update travels and is summed: in plaintext fixed point, or encrypted (secure mode).

Both codecs have the same three sides:

- client: ``encode(update, ...)`` -> (payload, bytes on the wire);
- aggregator: ``new_sum(tag)``, ``add(running, payload)``, ``contributors(running)``, ``close(running)``
  -> aggregate payload;
  the aggregator side of :class:`SecureCodec` holds only the public context;
- key holders (clients): ``decode_mean(aggregate, tag)`` -> the weighted mean update.

Every sum is exact and independent of arrival order (int64 fixed point; BFV integers), so the
simulation's final model does not depend on the number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrec.federated.aggregate import FixedPointSum, fixed_point_mean, to_fixed_point, weight_to_fixed_point
from fedrec.federated.worker import ClientUpdate, ParamLayout


@dataclass(frozen=True)
class DecodedAggregate:
    mean: np.ndarray  # float64 weighted mean update
    total_weight: float
    num_clients: int
    error_bound: float  # per-value bound on |mean - plaintext FedAvg| (0 for plain fixed point, ~quantum)
    uniform: bool = True  # every value summed over the same clients (False: a client delivered some chunks)


class RowWeightedSum(FixedPointSum):
    """A :class:`FixedPointSum` plus, per embedding-table row, the fixed-point weight of the clients
    whose update touched that row (``fl.row_normalize``)."""

    def __init__(self, size: int, *, bits: int, table_rows: int):
        super().__init__(size, bits=bits)
        self.row_weight = np.zeros(int(table_rows), dtype=np.int64)


class PlainCodec:
    """Plaintext updates (float32) summed by the aggregator in int64 fixed point of ``2**-bits``.

    With ``row_normalize`` (``fl.row_normalize``) the aggregator also sums, per row of each embedding
    table, the fixed-point weight of the clients whose update of that row is non-zero; the mean of a
    table row is then its weighted sum over that touched weight (0 for a row nobody touched) instead of
    over every client's weight.
    """

    secure = False

    def __init__(self, layout: ParamLayout, *, bits: int, row_normalize: bool = False):
        self.layout = layout
        self.bits = bits
        self.row_normalize = bool(row_normalize)
        self.spans = layout.row_spans() if self.row_normalize else []
        self.table_rows = sum(rows for _, rows, _ in self.spans)

    # client
    def encode(self, update: ClientUpdate, *, tag: int, rng: np.random.Generator) -> tuple[Any, int]:
        delta = np.ascontiguousarray(update.delta, dtype=np.float32)
        return (delta, float(update.weight)), delta.nbytes + 8

    # aggregator
    def new_sum(self, tag: int) -> FixedPointSum:
        if self.row_normalize:
            return RowWeightedSum(self.layout.size, bits=self.bits, table_rows=self.table_rows)
        return FixedPointSum(self.layout.size, bits=self.bits)

    def touched_rows(self, delta: np.ndarray) -> np.ndarray:
        """Per row of every table (concatenated): whether ``delta`` changes it."""
        parts = [
            (delta[start : start + rows * dim].reshape(rows, dim) != 0).any(axis=1)
            for start, rows, dim in self.spans
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def add(self, running: FixedPointSum, payload: Any) -> None:
        delta, weight = payload
        delta = np.asarray(delta)
        if delta.dtype != np.float32 or delta.shape != (self.layout.size,):
            raise ValueError(
                f"update of dtype {delta.dtype} and shape {delta.shape}: expected float32 ({self.layout.size},)"
            )
        weighted = np.float64(weight) * delta.astype(np.float64)
        fixed_weight = weight_to_fixed_point(weight, bits=self.bits)
        running.add(to_fixed_point(weighted, bits=self.bits), fixed_weight)
        if isinstance(running, RowWeightedSum):
            running.row_weight += self.touched_rows(delta) * np.int64(fixed_weight)

    def contributors(self, running: FixedPointSum) -> int:
        return int(running.count)

    def close(self, running: FixedPointSum) -> tuple[Any, int]:
        payload: tuple[Any, ...] = (running.total, int(running.weight), int(running.count))
        if isinstance(running, RowWeightedSum):
            return (*payload, running.row_weight), running.total.nbytes + running.row_weight.nbytes + 16
        return payload, running.total.nbytes + 16

    # key holders
    def decode_mean(self, aggregate: Any, *, tag: int) -> DecodedAggregate:
        total, weight, count = aggregate[:3]
        mean = fixed_point_mean(total, weight, bits=self.bits)
        if self.row_normalize:
            mean = self.row_normalized(mean, total, np.asarray(aggregate[3]))
        return DecodedAggregate(mean, weight / 2.0**self.bits, int(count), 0.5 * count / max(weight, 1))

    def row_normalized(self, mean: np.ndarray, total: np.ndarray, row_weight: np.ndarray) -> np.ndarray:
        """``mean`` with each table row's sum divided by the weight of the clients that touched it."""
        out = mean.copy()
        first = 0
        for start, rows, dim in self.spans:
            weights = row_weight[first : first + rows].astype(np.float64)
            sums = np.asarray(total[start : start + rows * dim], dtype=np.float64).reshape(rows, dim)
            rows_mean = np.divide(sums, weights[:, None], out=np.zeros_like(sums), where=weights[:, None] > 0)
            out[start : start + rows * dim] = rows_mean.reshape(-1)
            first += rows
        return out


class SecureCodec:
    """Encrypted updates (TenSEAL BFV/CKKS via privacy.encryption).

    Clients hold the secret context; the aggregator's :class:`~privacy.encryption.StreamingAggregator`
    holds the public one and can only add. The encryption round binding is the attempt tag, so a late
    payload from an abandoned attempt is rejected by the next.
    """

    secure = True

    def __init__(
        self, layout: ParamLayout, *, public_context: bytes | None = None, secret_context: bytes | None = None
    ):
        from privacy.encryption.schema import UpdateSchema

        self.layout = layout
        self.schema = UpdateSchema(layout.entries)
        self.public_context = public_context
        self._secret_context = secret_context
        self._client: Any = None

    def _encryption_client(self) -> Any:
        from privacy.encryption.client import EncryptionClient

        if self._secret_context is None:
            raise RuntimeError("this side of the secure codec holds no secret context")
        if self._client is None:
            self._client = EncryptionClient(self._secret_context, self.schema)
        return self._client

    # client
    def encode(self, update: ClientUpdate, *, tag: int, rng: np.random.Generator) -> tuple[Any, int]:
        client = self._encryption_client()
        weight = round(update.weight)
        payloads = client.encrypt_update(
            np.asarray(update.delta, dtype=np.float64),
            weight=weight,
            round_idx=tag,
            client_id=int(update.client_id),
            rng=rng,
        )
        return payloads, sum(len(p) for p in payloads)

    def clip(self) -> float:
        return float(self._encryption_client().spec.quant.clip)

    def check_encodable(self, update: ClientUpdate) -> None:
        """Refuse, before any spend is recorded, an update :meth:`encode` would refuse.

        Raises:
            EncryptionError: a weight outside [1, max_weight], a wrong size or a non-finite value.
        """
        from privacy.errors import EncryptionError

        max_weight = self._encryption_client().spec.quant.max_weight
        weight = round(update.weight) if math.isfinite(update.weight) else update.weight
        if not 1 <= weight <= max_weight:
            raise EncryptionError(
                f"client {update.client_id}: weight {update.weight:g} outside [1, fl.encryption.max_weight = "
                f"{max_weight}]; nothing is recorded or sent (raise fl.encryption.max_weight)"
            )
        delta = np.asarray(update.delta)
        if delta.size != self.layout.size or not np.all(np.isfinite(delta)):
            raise EncryptionError(
                f"client {update.client_id}: update of {delta.size} values for a model of {self.layout.size}, "
                "or non-finite values; nothing is recorded or sent"
            )

    # aggregator
    def new_sum(self, tag: int) -> Any:
        import tenseal.sealapi  # noqa: F401  (registers SEAL's types; loading a context in a fresh process needs them)

        from privacy.encryption.aggregator import StreamingAggregator

        if self.public_context is None:
            raise RuntimeError("the aggregator side of the secure codec needs the public context")
        return StreamingAggregator(self.public_context, self.schema, round_idx=tag)

    def add(self, running: Any, payload: Any) -> None:
        for chunk in payload:
            running.add(chunk)

    def contributors(self, running: Any) -> int:
        """Clients that delivered every chunk so far."""
        return len(running.delivered)

    def close(self, running: Any) -> tuple[Any, int]:
        closed = running.close()
        return closed.aggregate, len(closed.aggregate)

    # key holders
    def decode_mean(self, aggregate: Any, *, tag: int) -> DecodedAggregate:
        # allow_partial: a client whose later chunk was rejected still sits in its earlier chunks' sums;
        # each chunk is then the exact FedAvg of its own contributors.
        result = self._encryption_client().decrypt_aggregate(aggregate, round_idx=tag, allow_partial=True)
        return DecodedAggregate(
            np.asarray(result.average, dtype=np.float64),
            float(result.total_weight),
            int(result.num_clients),
            float(result.error_bound),
            uniform=len(set(result.chunk_clients)) == 1 and len(set(result.chunk_weights)) == 1,
        )
