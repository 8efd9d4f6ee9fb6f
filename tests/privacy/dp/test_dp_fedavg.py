"""User-level DP-FedAvg: whole-update clipping, noise shares, and the noise the accountant assumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privacy.accounting.user_level import user_level_epsilon
from privacy.dp.dp_fedavg import (
    DPFedAvgConfig,
    aggregate_noise_std,
    clip_update,
    effective_noise_multiplier,
    fixed_denominator_average,
    min_survivors_for,
    noise_share_std,
    poisson_sample_clients,
    privatize_update,
    update_norm,
)
from privacy.errors import PrivacyError
from privacy.ledger import PrivacyLedger, ledger_path


def test_clip_whole_update_without_mutating_it():
    update = [torch.full((3, 4), 2.0), torch.full((5,), -1.0)]
    original = [t.clone() for t in update]
    clipped, norm = clip_update(update, clip_norm=1.5)
    assert norm == pytest.approx(math.sqrt(12 * 4 + 5))
    assert update_norm(clipped) == pytest.approx(1.5)
    # Direction is kept: the whole update is scaled by one factor.
    assert torch.allclose(clipped[0] / update[0], torch.full((3, 4), 1.5 / norm))
    assert all(torch.equal(a, b) for a, b in zip(update, original))
    small = [torch.tensor([0.3, 0.4])]
    kept, _ = clip_update(small, clip_norm=1.0)
    assert torch.equal(kept[0], small[0])


def test_non_finite_update_is_refused():
    with pytest.raises(PrivacyError, match="non-finite"):
        clip_update([torch.tensor([1.0, float("nan")])], clip_norm=1.0)


@pytest.mark.parametrize("k", [1, 2, 7, 10, 1000])
def test_shares_of_min_survivors_sum_to_exactly_the_accounted_noise(k):
    sigma, clip = 1.3, 0.7
    share = noise_share_std(noise_multiplier=sigma, clip_norm=clip, min_survivors=k)
    # Variances add: k independent shares of variance share^2 carry sigma^2 S^2 in total.
    assert k * share**2 == pytest.approx((sigma * clip) ** 2, rel=1e-12)
    assert aggregate_noise_std(
        noise_multiplier=sigma, clip_norm=clip, min_survivors=k, survivors=k
    ) == pytest.approx(sigma * clip, rel=1e-12)
    assert effective_noise_multiplier(noise_multiplier=sigma, min_survivors=k, survivors=k) == pytest.approx(
        sigma
    )


def test_dropouts_only_add_noise_and_too_few_survivors_cannot_be_released():
    sigma, clip, k = 1.0, 1.0, 8
    for survivors in (9, 10, 16):
        std = aggregate_noise_std(
            noise_multiplier=sigma, clip_norm=clip, min_survivors=k, survivors=survivors
        )
        assert std == pytest.approx(sigma * clip * math.sqrt(survivors / k))
        assert std > sigma * clip
    with pytest.raises(PrivacyError, match="must not be released"):
        aggregate_noise_std(noise_multiplier=sigma, clip_norm=clip, min_survivors=k, survivors=k - 1)


def test_empirical_sum_of_noise_shares_matches_the_ledger_and_accountant(tmp_path):
    """Clients' noise shares, summed as the encrypted aggregate would be, carry std sigma * S; the
    ledger's round record carries exactly that sigma, and its epsilon is the accountant's."""
    config = DPFedAvgConfig(
        noise_multiplier=1.2, clip_norm=0.5, client_sampling_rate=0.1, min_completion_rate=0.8
    )
    num_sampled = 10
    k = config.min_survivors(num_sampled)
    assert k == 8
    generator = torch.Generator().manual_seed(7)
    dim = 200_000
    total = torch.zeros(dim, dtype=torch.float64)
    for _ in range(k):  # exactly the minimum survive; updates are zero so only noise is summed
        private = privatize_update(
            [torch.zeros(dim, dtype=torch.float64)],
            noise_multiplier=config.noise_multiplier,
            clip_norm=config.clip_norm,
            min_survivors=k,
            generator=generator,
        )
        total += private.tensors[0]
    empirical_std = float(total.std())
    # Standard error of a std estimate from 200k samples is ~0.16%; allow 1%.
    assert empirical_std == pytest.approx(config.noise_multiplier * config.clip_norm, rel=0.01)

    with PrivacyLedger.open(ledger_path(tmp_path), delta=1e-5) as ledger:
        for round_index in range(5):
            ledger.record_round(
                round=round_index,
                noise_multiplier=config.noise_multiplier,
                clip_norm=config.clip_norm,
                client_sampling_rate=config.client_sampling_rate,
                num_sampled=num_sampled,
                min_survivors=k,
            )
        record = ledger.rounds()[0]
        # The noise on the released sum, in units of the clip norm, is what the ledger accounts.
        assert empirical_std / record.clip_norm == pytest.approx(record.noise_multiplier, rel=0.01)
        assert ledger.user_level_epsilon() == pytest.approx(
            user_level_epsilon([(1.2, 0.1)] * 5, delta=1e-5), rel=1e-12
        )


def test_privatized_update_is_clipped_then_noised():
    update = [torch.full((1000,), 1.0)]
    a = privatize_update(
        update,
        noise_multiplier=0.5,
        clip_norm=2.0,
        min_survivors=4,
        generator=torch.Generator().manual_seed(1),
    )
    b = privatize_update(
        update,
        noise_multiplier=0.5,
        clip_norm=2.0,
        min_survivors=4,
        generator=torch.Generator().manual_seed(1),
    )
    assert a.clipped and a.norm == pytest.approx(math.sqrt(1000))
    assert torch.equal(a.tensors[0], b.tensors[0])  # reproducible with a seeded generator
    noise = a.tensors[0] - update[0] * (2.0 / math.sqrt(1000))
    assert float(noise.std()) == pytest.approx(0.5 * 2.0 / 2, rel=0.1)


def test_sampling_and_average_helpers():
    assert min_survivors_for(num_sampled=10, min_completion_rate=0.8) == 8
    assert min_survivors_for(num_sampled=10, min_completion_rate=0.81) == 9
    assert min_survivors_for(num_sampled=3, min_completion_rate=0.1) == 1
    rng = np.random.default_rng(0)
    counts = [len(poisson_sample_clients(list(range(1000)), rate=0.05, rng=rng)) for _ in range(200)]
    assert np.mean(counts) == pytest.approx(50, rel=0.05)
    averaged = fixed_denominator_average([torch.full((2,), 10.0)], expected_clients=4.0)
    assert torch.equal(averaged[0], torch.full((2,), 2.5))


@pytest.mark.parametrize(
    "bad",
    [
        dict(noise_multiplier=0.0),
        dict(clip_norm=-1.0),
        dict(client_sampling_rate=0.0),
        dict(min_completion_rate=1.5),
    ],
)
def test_bad_config_is_refused(bad):
    params = {**dict(noise_multiplier=1.0, clip_norm=1.0, client_sampling_rate=0.1), **bad}
    with pytest.raises(PrivacyError):
        DPFedAvgConfig(**params)


def test_capped_weight_is_n_over_the_cap_at_most_one():
    from privacy.dp.dp_fedavg import capped_weight

    assert capped_weight(30, weight_cap=None) == 1.0
    assert capped_weight(30, weight_cap=120.0) == 0.25
    assert capped_weight(500, weight_cap=120.0) == 1.0
    assert capped_weight(0, weight_cap=120.0) == 0.0
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(PrivacyError, match="weight_cap"):
            capped_weight(30, weight_cap=bad)
    with pytest.raises(PrivacyError, match="num_examples"):
        capped_weight(-1, weight_cap=10.0)
