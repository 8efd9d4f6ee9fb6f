"""Encrypted FedAvg with TenSEAL: key separation, compact BFV packing, safe wire format, streaming sum.

Roles and calls (see docs/threat-model.md for who may learn what)::

    # key authority (not the aggregator), once per federation
    keys = generate_keys(max_clients=100, max_weight=64, clip=1.0, precision_bits=16)  # scheme="bfv"
    keys.secret_context  -> clients only;  keys.public_context -> aggregator

    schema = UpdateSchema.from_update(model.state_dict())      # or UpdateSchema([(name, shape), ...])

    # client, every round
    client = EncryptionClient(keys.secret_context, schema)
    payloads = client.encrypt_update(update, weight=n_samples, round_idx=r, client_id=cid)  # list[bytes]

    # aggregator, every round (holds the public context only: it cannot decrypt)
    agg = StreamingAggregator(keys.public_context, schema, round_idx=r)
    for p in received: agg.add(p)           # EncryptionError on a bad payload; the sum is left untouched
    closed = agg.close()                     # ClosedRound(aggregate, clients, num_clients, partial_clients)

    # clients again
    result = client.decrypt_aggregate(closed.aggregate, round_idx=r)   # AggregateResult
    result.average, result.total_weight, result.num_clients, result.error_bound

The default scheme is BFV with clients' symmetric (seeded) encryption and several fixed-point values
per slot, planned from the declared headroom (max_clients, max_weight, clip, precision_bits) so a sum
can never wrap; CKKS (one quantised value per slot, release rounded to the grid) is supported too.
The released average is within ``num_clients * quantum / total_weight`` (<= quantum) of plaintext
weighted FedAvg of the clipped updates, ``quantum = clip * 2**-precision_bits``.
"""

from privacy.encryption.aggregator import ClosedRound, StreamingAggregator
from privacy.encryption.client import AggregateResult, EncryptionClient
from privacy.encryption.context import KeyMaterial, generate_keys, load_context
from privacy.encryption.params import (
    MAX_COEFF_BITS_128,
    AggregationSpec,
    QuantSpec,
    SchemeParams,
    check_headroom,
    check_security,
    plan_bfv,
    plan_ckks,
)
from privacy.encryption.schema import UpdateSchema

__all__ = [
    "MAX_COEFF_BITS_128",
    "AggregateResult",
    "AggregationSpec",
    "ClosedRound",
    "EncryptionClient",
    "KeyMaterial",
    "QuantSpec",
    "SchemeParams",
    "StreamingAggregator",
    "UpdateSchema",
    "check_headroom",
    "check_security",
    "generate_keys",
    "load_context",
    "plan_bfv",
    "plan_ckks",
]
