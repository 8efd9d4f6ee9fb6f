"""Aggregation maths: the fixed-point running sum is exact, order-independent and equals FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.federated.aggregate import (
    FixedPointSum,
    apply_mean_update,
    completion_ok,
    proximal_step,
    to_fixed_point,
    weight_to_fixed_point,
    weighted_mean,
)

BITS = 24


def _sum(updates, weights, order):
    running = FixedPointSum(len(updates[0]), bits=BITS)
    for i in order:
        w = weights[i]
        running.add(
            to_fixed_point(np.float64(w) * updates[i].astype(np.float64), bits=BITS),
            weight_to_fixed_point(w, bits=BITS),
        )
    return running


updates_strategy = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(
        st.lists(
            st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=5, max_size=5),
            min_size=n,
            max_size=n,
        ),
        st.lists(st.integers(1, 500), min_size=n, max_size=n),
        st.permutations(range(n)),
    )
)


@settings(max_examples=60, deadline=None)
@given(updates_strategy)
def test_sum_is_bitwise_identical_in_any_order_and_matches_fedavg(case):
    raw_updates, weights, order = case
    updates = [np.asarray(u, dtype=np.float32) for u in raw_updates]
    forward = _sum(updates, weights, range(len(updates)))
    shuffled = _sum(updates, weights, order)
    assert np.array_equal(forward.total, shuffled.total)
    assert forward.weight == shuffled.weight
    assert np.array_equal(forward.mean(), shuffled.mean())
    # Each weighted update is rounded once by at most half a quantum.
    reference = weighted_mean(updates, weights)
    bound = len(updates) * 0.5 * 2.0**-BITS / (sum(weights)) + 1e-12
    assert np.max(np.abs(forward.mean() - reference)) <= bound


def test_float_summation_would_depend_on_order():
    # Why fixed point: the same numbers summed in float32 in two orders differ.
    values = np.array([1e8, 1.0, -1e8, 1.0], dtype=np.float32)
    assert np.float32(np.float32(values[0] + values[1]) + values[2]) + values[3] != (
        np.float32(values[0] + values[2]) + values[1] + values[3]
    )
    running_a, running_b = FixedPointSum(1, bits=8), FixedPointSum(1, bits=8)
    for v in values:
        running_a.add(to_fixed_point(np.array([v]), bits=8), 256)
    for v in values[[0, 2, 1, 3]]:
        running_b.add(to_fixed_point(np.array([v]), bits=8), 256)
    assert np.array_equal(running_a.total, running_b.total)


def test_sum_overflow_and_bad_inputs_are_errors():
    running = FixedPointSum(2, bits=40)
    big = to_fixed_point(np.array([8000.0, 0.0]), bits=40)  # close to 2**53, the largest one update may be
    with pytest.raises(OverflowError):
        for _ in range(600):  # 2**62 / 2**53 = 512 of them fit
            running.add(big, 1)
    assert 500 <= running.count < 600
    with pytest.raises(ValueError, match="too large"):
        to_fixed_point(np.array([2.0**14]), bits=40)
    with pytest.raises(ValueError, match="NaN"):
        to_fixed_point(np.array([np.nan]), bits=BITS)
    with pytest.raises(ValueError, match="shape"):
        FixedPointSum(3, bits=BITS).add(np.zeros(2, dtype=np.int64), 1)
    with pytest.raises(ValueError, match="zero total weight"):
        FixedPointSum(3, bits=BITS).mean()
    with pytest.raises(ValueError):
        weight_to_fixed_point(-1.0, bits=BITS)


def test_apply_mean_update_keeps_dtype_and_does_not_mutate():
    params = np.ones(4, dtype=np.float32)
    out = apply_mean_update(params, np.full(4, 0.5), server_lr=2.0)
    assert out.dtype == np.float32 and np.allclose(out, 2.0)
    assert np.all(params == 1.0)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 10.0), st.floats(0.0, 10.0), st.floats(-5, 5), st.floats(-5, 5))
def test_proximal_step_minimises_the_proximal_objective(lr, mu, w, anchor):
    # argmin_x 1/(2 lr) (x - w)^2 + mu/2 (x - anchor)^2
    x = proximal_step(np.float64(w), np.float64(anchor), lr=lr, mu=mu)
    if lr > 0:
        for probe in (x - 1e-3, x + 1e-3):
            objective = lambda v: (v - w) ** 2 / (2 * lr) + mu / 2 * (v - anchor) ** 2  # noqa: E731
            assert objective(x) <= objective(probe) + 1e-12
    t = proximal_step(torch.tensor([w]), torch.tensor([anchor]), lr=lr, mu=mu)
    assert float(t[0]) == pytest.approx(float(x), rel=1e-6, abs=1e-6)


def test_completion_rate():
    assert completion_ok(10, 8, min_completion_rate=0.8)
    assert not completion_ok(10, 7, min_completion_rate=0.8)
    assert not completion_ok(3, 0, min_completion_rate=0.1)  # at least one client
    assert completion_ok(100, 100, min_completion_rate=1.0)
