"""Adaptive clipping's pure maths (privacy.dp.adaptive_clip): the noise split and quantile tracking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privacy.dp.adaptive_clip import (
    check_quantile_params,
    effective_noise_multiplier,
    next_clip,
    noised_fraction,
    unclipped_bit,
    update_noise_multiplier,
)
from privacy.errors import PrivacyError


@pytest.mark.parametrize(
    ("sigma", "sigma_b", "expected"),
    [
        # sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2), by hand:
        (1.0, 1.0, 1.0 / math.sqrt(1.0 - 0.25)),  # (1 - 1/4)^(-1/2) = 1.1547005...
        (1.0, 5.0, 1.0 / math.sqrt(1.0 - 0.01)),  # (1 - 1/100)^(-1/2) = 1.0050378...
        (2.0, 2.0, 1.0 / math.sqrt(0.25 - 1.0 / 16.0)),  # (1/4 - 1/16)^(-1/2) = 2.3094011...
    ],
)
def test_noise_split_matches_a_hand_computation(sigma, sigma_b, expected):
    got = update_noise_multiplier(noise_multiplier=sigma, count_noise_multiplier=sigma_b)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > sigma  # the update carries more noise than the effective mechanism
    assert effective_noise_multiplier(
        update_noise_multiplier=got, count_noise_multiplier=sigma_b
    ) == pytest.approx(sigma, rel=1e-12)
    assert update_noise_multiplier(noise_multiplier=1.0, count_noise_multiplier=1.0) == pytest.approx(
        1.1547005384
    )


@pytest.mark.parametrize(
    ("sigma", "sigma_b", "message"),
    [
        (1.0, 0.5, "2 sigma_b > sigma"),  # the count alone costs the whole budget
        (1.0, 0.4, "2 sigma_b > sigma"),
        (0.0, 1.0, "noise_multiplier"),
        (1.0, -1.0, "count_noise_multiplier"),
        (1.0, float("nan"), "count_noise_multiplier"),
        (float("inf"), 1.0, "noise_multiplier"),
    ],
)
def test_noise_split_fails_closed(sigma, sigma_b, message):
    with pytest.raises(PrivacyError, match=message):
        update_noise_multiplier(noise_multiplier=sigma, count_noise_multiplier=sigma_b)


def test_keyword_only_and_bad_quantile_parameters():
    with pytest.raises(TypeError):
        update_noise_multiplier(1.0, 2.0)  # type: ignore[misc]
    for quantile, lr in ((0.0, 0.2), (1.0, 0.2), (0.5, 0.0), (0.5, -1.0), (0.5, float("inf"))):
        with pytest.raises(PrivacyError):
            check_quantile_params(target_quantile=quantile, clip_lr=lr)
    with pytest.raises(PrivacyError, match="unclipped_fraction"):
        next_clip(clip_norm=1.0, unclipped_fraction=1.5, target_quantile=0.5, clip_lr=0.2)


def test_geometric_update_and_centred_fraction():
    # Everyone unclipped at target 0.5: the clip shrinks by exp(-0.2 * 0.5).
    assert next_clip(
        clip_norm=2.0, unclipped_fraction=1.0, target_quantile=0.5, clip_lr=0.2
    ) == pytest.approx(2.0 * math.exp(-0.1))
    assert next_clip(clip_norm=2.0, unclipped_fraction=0.5, target_quantile=0.5, clip_lr=0.2) == 2.0
    assert unclipped_bit(1.0, 1.0) == 0.5 and unclipped_bit(1.01, 1.0) == -0.5
    # 7 of 10 expected clients unclipped, 3 clipped, no noise: sum of centred bits = 2, fraction 0.7.
    assert noised_fraction(noised_centred_sum=7 * 0.5 - 3 * 0.5, expected_clients=10.0) == pytest.approx(0.7)
    assert noised_fraction(noised_centred_sum=100.0, expected_clients=10.0) == 1.0  # clamped


@pytest.mark.parametrize(("quantile", "seed"), [(0.5, 0), (0.8, 1), (0.2, 2)])
def test_clip_tracks_the_target_quantile_of_synthetic_norms(quantile, seed):
    """Poisson-sampled clients with log-normal update norms, noised counts (sigma_b = qN / 20): after
    many rounds the clip sits near the target quantile of the norm distribution, from far away."""
    rng = np.random.default_rng(seed)
    clients, q, rounds = 2000, 0.05, 600
    norms = rng.lognormal(mean=0.0, sigma=1.0, size=clients)
    target = float(np.quantile(norms, quantile))
    expected = q * clients
    sigma_b = expected / 20.0
    clip, history = 20.0 * target, []  # start 20x too large
    for _ in range(rounds):
        sampled = norms[rng.random(clients) < q]
        centred = sum(unclipped_bit(n, clip) for n in sampled) + rng.normal(0.0, sigma_b)
        fraction = noised_fraction(noised_centred_sum=centred, expected_clients=expected)
        clip = next_clip(clip_norm=clip, unclipped_fraction=fraction, target_quantile=quantile, clip_lr=0.2)
        history.append(clip)
    settled = np.array(history[-200:])
    assert abs(float(np.median(settled)) / target - 1.0) < 0.15
    achieved = float(np.mean(norms[None, :] <= settled[:, None]))  # fraction unclipped at the settled clips
    assert abs(achieved - quantile) < 0.05
    assert history[50] < 20.0 * target / 2  # it moved geometrically from the start
