"""Weight forgery by a key-holding client (issue 14, item 4), replayed against public weights.

Every client holds the secret key, so it can encrypt any integers it likes. In wire format 1 the FedAvg
weight travelled inside the ciphertext and the decrypting party divided by the decrypted total: a client
could send a negative weight (the audit cut the total from 504 to 19, a 26.5x amplification of every
update) or claim weight 1 while scaling its values. Now the weight is public (header), the aggregator
applies it, and the decrypting party divides by the public total it recomputes; the encrypted unit
values must decrypt to that total or the aggregate is refused.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from he_helpers import CLIP, PRECISION_BITS, flat_schema, rewrite_header

from privacy.encryption import EncryptionClient, StreamingAggregator, wire
from privacy.encryption.params import META_VALUES
from privacy.errors import EncryptionError

HONEST_WEIGHTS = [100, 200, 204]  # total 504, as in the audit


def forge(client: EncryptionClient, ints: np.ndarray, units: list[int], *, weight: int, client_id: int):
    """What a key holder can send: arbitrary integers and unit values under an honest-looking header."""
    payloads = []
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "ct")
        for index, (start, stop, n_ct) in enumerate(client._layout):
            values = np.concatenate([ints[start:stop], np.asarray(units, dtype=np.int64)])
            body = wire.join_ciphertexts(client._encrypt_values(values, n_ct, path))
            header = wire.Header(
                kind=wire.KIND_UPDATE, scheme=client.spec.params.scheme, param_hash=client.spec.param_hash,
                schema_hash=client.schema.hash, round_idx=0, client_id=client_id, chunk_index=index,
                chunk_count=len(client._layout), num_ciphertexts=n_ct, weight=weight,
            )  # fmt: skip
            payloads.append(wire.encode(header, body))
    return payloads


@pytest.fixture(scope="module")
def honest(bfv_keys):
    schema = flat_schema(300)
    client = EncryptionClient(bfv_keys.secret_context, schema)
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-0.1, 0.1, schema.size) for _ in HONEST_WEIGHTS]
    payloads = [
        client.encrypt_update(u, weight=w, round_idx=0, client_id=i, rng=rng)
        for i, (u, w) in enumerate(zip(updates, HONEST_WEIGHTS))
    ]
    return client, schema, updates, payloads


def _aggregate(bfv_keys, schema, payload_lists):
    aggregator = StreamingAggregator(bfv_keys.public_context, schema, round_idx=0)
    for payloads in payload_lists:
        for p in payloads:
            aggregator.add(p)
    return aggregator.close()


def test_negative_encrypted_weight_no_longer_shrinks_the_divisor(bfv_keys, honest):
    """The audit's attack: weight field -485 so the divisor becomes 504 + 1 - 485 = 20. Refused now."""
    client, schema, _, payloads = honest
    ints = np.full(schema.size, 2**PRECISION_BITS // 2, dtype=np.int64)
    forged = forge(client, ints, [-485] * META_VALUES, weight=1, client_id=9)
    closed = _aggregate(bfv_keys, schema, [*payloads, forged])
    with pytest.raises(EncryptionError, match="disagree with the public total weight 505"):
        client.decrypt_aggregate(closed.aggregate, round_idx=0)


def test_public_weight_is_the_one_applied_and_bounded(bfv_keys, honest):
    """A header weight outside [1, max_weight] is refused before anything is added; the weight a
    client states is exactly the multiplier and the divisor (no encrypted weight to disagree with)."""
    client, schema, updates, payloads = honest
    aggregator = StreamingAggregator(bfv_keys.public_context, schema, round_idx=0)
    for bad in (0, bfv_keys.spec.quant.max_weight + 1, 2**32 - 1):
        with pytest.raises(EncryptionError, match="public weight"):
            aggregator.add(rewrite_header(payloads[0][0], weight=bad))
    assert aggregator.delivered == ()
    closed = _aggregate(bfv_keys, schema, payloads)
    result = client.decrypt_aggregate(closed.aggregate, round_idx=0)
    assert result.total_weight == sum(HONEST_WEIGHTS)
    expected = np.average(np.clip(updates, -CLIP, CLIP), axis=0, weights=HONEST_WEIGHTS)
    assert np.abs(result.average - expected).max() <= result.error_bound


def test_scaled_values_are_bounded_by_the_aggregate_clip_check(bfv_keys, honest):
    """What public weights do not stop: a weight-1 key holder encrypting values scaled up. Its pull on
    the average is bounded only by the decrypting party's per-coordinate check (|average| <= clip):
    past it the aggregate is refused; below it the forgery goes through (no range proofs)."""
    client, schema, _, payloads = honest
    total = sum(HONEST_WEIGHTS) + 1
    over = np.full(schema.size, 2 * total * 2**PRECISION_BITS, dtype=np.int64)
    closed = _aggregate(
        bfv_keys, schema, [*payloads, forge(client, over, [1] * META_VALUES, weight=1, client_id=9)]
    )
    with pytest.raises(EncryptionError, match="exceed the clip bound"):
        client.decrypt_aggregate(closed.aggregate, round_idx=0)
    under = np.full(schema.size, 172 * 2**PRECISION_BITS, dtype=np.int64)
    closed = _aggregate(
        bfv_keys, schema, [*payloads, forge(client, under, [1] * META_VALUES, weight=1, client_id=9)]
    )
    result = client.decrypt_aggregate(closed.aggregate, round_idx=0)
    assert result.total_weight == total  # the divisor is still the public one
    assert np.abs(result.average).max() <= CLIP
