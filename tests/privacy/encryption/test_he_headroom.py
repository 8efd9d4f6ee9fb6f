"""BFV aggregation at the headroom extreme: max_clients clients at max_weight sending +-clip decrypt exactly.

The packing puts several values in one plaintext slot as digits of base ``2 * sum_bound + 1``; the
sums a full aggregate can reach, ``+-max_clients * max_weight * 2**precision_bits`` per value, must
fit one digit without carrying into the next and the slot must not wrap modulo the plain modulus.
Only sums at the extreme test that: an off-by-one in the base or a headroom sized for one client or
for weight 1 decrypts wrongly (or is refused as corrupt) exactly here. Weights, counts and the clip
sit away from 1 so that a dropped factor shows.
"""

from __future__ import annotations

import numpy as np
import pytest
from he_helpers import flat_schema, run_round

from privacy.encryption import EncryptionClient, generate_keys
from privacy.encryption.params import QuantSpec, check_headroom, plan_bfv
from privacy.errors import EncryptionError

MAX_CLIENTS, MAX_WEIGHT, CLIP, PRECISION_BITS = 3, 7, 1.5, 6


@pytest.fixture(scope="module")
def extreme():
    keys = generate_keys(
        max_clients=MAX_CLIENTS, max_weight=MAX_WEIGHT, clip=CLIP, precision_bits=PRECISION_BITS,
        ciphertexts_per_chunk=1,
    )  # fmt: skip
    # Several values share a slot, so a digit that overflows corrupts its neighbour.
    assert keys.spec.params.digits_per_slot >= 2
    schema = flat_schema(keys.spec.params.values_per_ciphertext + 40)  # two ciphertexts
    return keys, schema, EncryptionClient(keys.secret_context, schema)


def pattern(kind: str, size: int, client: int) -> np.ndarray:
    if kind == "all-minus":
        return np.full(size, -CLIP)
    if kind == "all-plus":
        return np.full(size, CLIP)
    # Alternating signs, shifted per client: neighbouring digits at opposite extremes.
    signs = np.where((np.arange(size) + (client if kind == "shifted" else 0)) % 2 == 0, 1.0, -1.0)
    return signs * CLIP


@pytest.mark.parametrize("kind", ["all-minus", "all-plus", "alternating", "shifted"])
def test_max_clients_at_max_weight_at_the_clip_decrypt_exactly(extreme, kind):
    keys, schema, client = extreme
    updates = [pattern(kind, schema.size, c) for c in range(MAX_CLIENTS)]
    weights = [MAX_WEIGHT] * MAX_CLIENTS
    closed, result = run_round(client, keys, schema, updates, weights, seed=3)
    assert closed.num_clients == MAX_CLIENTS
    assert result.total_weight == MAX_CLIENTS * MAX_WEIGHT and result.num_clients == MAX_CLIENTS
    expected = np.mean(np.stack(updates), axis=0)  # equal weights: the plain mean
    # +-clip lies on the grid, so the release is exact (no stochastic rounding happened).
    np.testing.assert_array_equal(result.average, expected)


def test_extreme_sums_with_unequal_weights_match_plaintext_fedavg(extreme):
    keys, schema, client = extreme
    updates = [
        pattern("all-minus", schema.size, 0),
        pattern("all-minus", schema.size, 1),
        pattern("shifted", schema.size, 2),
    ]
    weights = [MAX_WEIGHT, MAX_WEIGHT - 2, 3]
    _, result = run_round(client, keys, schema, updates, weights, seed=4)
    expected = np.average(np.stack(updates), axis=0, weights=weights)
    assert np.abs(result.average - expected).max() <= 1e-12


def test_noise_budget_is_sized_for_max_clients_ciphertexts_scaled_by_max_weight():
    """Same digit base, more noise: parameters planned for one unweighted client are refused for 1024
    ciphertexts, and for one ciphertext the aggregator multiplies by a public weight of up to 1024."""
    one = QuantSpec(clip=CLIP, precision_bits=PRECISION_BITS + 10, max_clients=1, max_weight=1)
    many = QuantSpec(clip=CLIP, precision_bits=PRECISION_BITS, max_clients=1024, max_weight=1)
    weighted = QuantSpec(clip=CLIP, precision_bits=PRECISION_BITS, max_clients=1, max_weight=1024)
    assert one.digit_base == many.digit_base == weighted.digit_base  # packing alone cannot tell them apart
    params = plan_bfv(one)
    check_headroom(params, one)
    with pytest.raises(EncryptionError, match="max_clients=1024"):
        check_headroom(params, many)
    with pytest.raises(EncryptionError, match="max_weight=1024"):
        check_headroom(params, weighted)
    check_headroom(plan_bfv(weighted), weighted)
