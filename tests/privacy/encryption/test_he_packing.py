"""Quantisation and balanced-digit packing: bounds, unbiasedness, no carry between digits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.encryption.packing import pack_digits, quantise, unpack_digits
from privacy.errors import EncryptionError


@settings(deadline=None, max_examples=30)
@given(
    digits=st.integers(1, 4),
    half=st.integers(1, 2**13),
    slots=st.integers(1, 64),
    clients=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_of_packed_slots_unpacks_to_the_sum_of_values(digits, half, slots, clients, seed):
    """Packing is linear and carry-free as long as every digit's sum stays within the base's half."""
    base = 2 * half + 1
    rng = np.random.default_rng(seed)
    per_client = half // clients
    n = int(rng.integers(1, digits * slots + 1))
    values = rng.integers(-per_client, per_client + 1, size=(clients, n))
    packed = sum(pack_digits(v, digits=digits, base=base, slots=slots) for v in values)
    assert np.abs(packed).max(initial=0) <= (base**digits - 1) // 2
    out = unpack_digits(packed, digits=digits, base=base)
    np.testing.assert_array_equal(out[:n], values.sum(axis=0))
    assert not out[n:].any()


def test_pack_rejects_values_beyond_the_digit_bound_and_overflow():
    with pytest.raises(EncryptionError, match="digit bound"):
        pack_digits(np.array([6]), digits=2, base=11, slots=4)
    with pytest.raises(EncryptionError, match="do not fit"):
        pack_digits(np.zeros(9, dtype=np.int64), digits=2, base=11, slots=4)
    with pytest.raises(EncryptionError, match="int64"):
        pack_digits(np.zeros(1, dtype=np.int64), digits=3, base=2**21 + 1, slots=4)


def test_unpack_detects_out_of_range_slots():
    with pytest.raises(EncryptionError, match="packing range"):
        unpack_digits(np.array([11**2]), digits=2, base=11)


@settings(deadline=None, max_examples=30)
@given(
    weight=st.integers(1, 1000),
    precision=st.integers(1, 20),
    clip=st.floats(1e-3, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantise_stays_on_the_grid_within_one_quantum(weight, precision, clip, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3 * clip, 3 * clip, 257)
    x[:4] = [clip, -clip, 0.0, 2 * clip]
    q = quantise(x, weight=weight, clip=clip, grid_clip=clip, precision_bits=precision, rng=rng)
    quantum = clip * 2.0**-precision
    target = weight * np.clip(x, -clip, clip) / quantum
    assert q.dtype == np.int64
    assert np.abs(q).max() <= weight * 2**precision
    assert np.all(np.abs(q - target) < 1 + 1e-9)


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(7)
    x = np.full(200_000, 0.3 * 2.0**-8)  # 0.3 of a quantum
    q = quantise(x, weight=1, clip=1.0, grid_clip=1.0, precision_bits=8, rng=rng)
    assert set(np.unique(q)) == {0, 1}
    assert abs(q.mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / x.size)


def test_smaller_client_clip_uses_the_shared_grid():
    q = quantise(
        np.array([0.9, -0.9]),
        weight=1,
        clip=0.5,
        grid_clip=1.0,
        precision_bits=4,
        rng=np.random.default_rng(0),
    )
    np.testing.assert_array_equal(q, [8, -8])  # 0.5 on a 1/16 grid


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantise_rejects_non_finite(bad):
    with pytest.raises(EncryptionError, match="finite"):
        quantise(
            np.array([0.0, bad]),
            weight=1,
            clip=1.0,
            grid_clip=1.0,
            precision_bits=8,
            rng=np.random.default_rng(0),
        )
