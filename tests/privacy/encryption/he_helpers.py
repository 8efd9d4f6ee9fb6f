"""Helpers and constants of the encryption tests (a uniquely named module; the fixtures are in conftest)."""

from __future__ import annotations

import numpy as np

from privacy.encryption import StreamingAggregator, UpdateSchema, wire

# Headroom of the main BFV key: up to 50 clients, weights 1..1000 (very unequal), 12-bit grid.
MAX_CLIENTS = 50
MAX_WEIGHT = 1000
CLIP = 1.0
PRECISION_BITS = 12


def flat_schema(length: int) -> UpdateSchema:
    return UpdateSchema([("w", (length,))])


def run_round(client, keys, schema, updates, weights, *, round_idx=0, order=None, seed=0):
    """Encrypt every update, add them (in ``order``) and return (closed round, decrypted result)."""
    rng = np.random.default_rng(seed)
    payloads = [
        client.encrypt_update(u, weight=w, round_idx=round_idx, client_id=i, rng=rng)
        for i, (u, w) in enumerate(zip(updates, weights))
    ]
    aggregator = StreamingAggregator(keys.public_context, schema, round_idx=round_idx)
    for i in order if order is not None else range(len(payloads)):
        for payload in payloads[i]:
            aggregator.add(payload)
    closed = aggregator.close()
    return closed, client.decrypt_aggregate(closed.aggregate, round_idx=round_idx)


def fedavg(updates, weights, clip):
    stacked = np.clip(np.asarray(updates, dtype=np.float64), -clip, clip)
    return np.average(stacked, axis=0, weights=np.asarray(weights, dtype=np.float64))


def rewrite_header(payload: bytes, **changes) -> bytes:
    """Re-encode ``payload`` with some header fields changed and the body kept."""
    header, body = wire.decode(payload, max_body=len(payload))
    return wire.encode(header._replace(**changes), bytes(body))
