"""DP-SGD noise has the law the accountant assumes: N(0, (sigma * C)^2) per coordinate, over N q.

Parameters sit away from 1 (sigma 1.7, C 2.5, lr 0.05 then 0.02, N q = 10) so that a dropped or
swapped factor changes the measured standard deviation by far more than the tolerance. With an
empty Poisson batch the update is pure noise: ``w_after - w_before = -sum_s lr_s / (N q) * z_s`` with
``z_s ~ N(0, (sigma C)^2)``; dividing by its std must give standard normal values. The tolerances are
statistical: over n coordinates the sample std of N(0, 1) values has standard error 1/sqrt(2n) and
the mean 1/sqrt(n); we allow 6 standard errors (a false alarm about once in 10^8 runs) and the
smallest factor error we must catch (a 1/2 or a missing 2.5) is far outside that band.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from privacy.dp.optimizer import DPSGD

SIGMA, CLIP, N, Q = 1.7, 2.5, 50, 0.2
LRS = (0.05, 0.05, 0.02)  # lr * sigma * C far from 1: a variance not squared shows
TOLERANCE_SE = 6.0


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(300, 8, mode="sum")
        self.lin = nn.Linear(60, 40)


def pure_noise_update(*, lazy: bool, secure: bool, seed: int | None = 5) -> tuple[np.ndarray, np.ndarray]:
    """(dense-layer, embedding-table) changes after len(LRS) empty-batch steps, in units of their std."""
    torch.manual_seed(0)
    model = Model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0])
    dp = DPSGD(
        model,
        opt,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        sample_rate=Q,
        num_examples=N,
        lazy_noise=lazy,
        secure_mode=secure,
        seed=None if secure else seed,
    )
    for lr in LRS:
        opt.param_groups[0]["lr"] = lr
        dp.step(torch.zeros(0))
    dp.flush()
    # Hand-computed law of the sum of the per-step updates.
    std = SIGMA * CLIP / (N * Q) * math.sqrt(sum(lr**2 for lr in LRS))
    change = {
        name: (p.detach() - before[name]).double().numpy().ravel() / std
        for name, p in model.named_parameters()
    }
    dense = np.concatenate([change["lin.weight"], change["lin.bias"]])
    return dense, change["bag.weight"]


def assert_standard_normal(values: np.ndarray, label: str) -> None:
    n = values.size
    std, mean = float(values.std()), float(values.mean())
    assert abs(std - 1.0) < TOLERANCE_SE / math.sqrt(2 * n), (
        f"{label}: std {std:.4f} of {n} values, expected 1"
    )
    assert abs(mean) < TOLERANCE_SE / math.sqrt(n), f"{label}: mean {mean:.4f}, expected 0"
    assert stats.kstest(values, "norm").pvalue > 1e-6, label


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "dense"])
def test_noise_is_sigma_times_clip_over_expected_batch(lazy, secure):
    dense, table = pure_noise_update(lazy=lazy, secure=secure)
    assert_standard_normal(dense, "dense layer")
    assert_standard_normal(table, "embedding table")


def test_the_check_has_power_against_a_missing_clip_factor():
    """With C = 2.5 a noise std of sigma (not sigma * C) is 0.4 of the expected: 5x outside the band."""
    dense, _ = pure_noise_update(lazy=True, secure=False)
    n = dense.size
    assert abs(dense.std() / CLIP - 1.0) > 5 * TOLERANCE_SE / math.sqrt(2 * n)


def test_seeded_streams_differ_between_seeds_and_secure_runs_differ():
    a, _ = pure_noise_update(lazy=True, secure=False, seed=1)
    b, _ = pure_noise_update(lazy=True, secure=False, seed=1)
    c, _ = pure_noise_update(lazy=True, secure=False, seed=2)
    d, _ = pure_noise_update(lazy=True, secure=True)
    e, _ = pure_noise_update(lazy=True, secure=True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(d, e)
