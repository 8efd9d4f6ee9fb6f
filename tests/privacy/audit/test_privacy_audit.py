"""Empirical audit: below the claim on correct DP-SGD, flags a broken one (no noise, no clipping)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privacy.accounting.user_level import epsilon
from privacy.audit import (
    AuditConfig,
    clopper_pearson_upper,
    epsilon_lower_bound,
    evaluate_statistic,
    run_audit,
)
from privacy.errors import PrivacyError


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_clopper_pearson_and_the_bound():
    # No successes in n trials: the exact one-sided upper bound is 1 - alpha^(1/n).
    assert clopper_pearson_upper(0, 1000, 0.025) == pytest.approx(1 - 0.025 ** (1 / 1000), rel=1e-9)
    assert clopper_pearson_upper(1000, 1000, 0.025) == 1.0
    eps, fpr_u, fnr_u = epsilon_lower_bound(
        false_positives=0, negatives=1000, false_negatives=0, positives=1000, delta=1e-5, alpha=0.05
    )
    assert fpr_u == fnr_u and eps == pytest.approx(math.log((1 - 1e-5 - fpr_u) / fnr_u))
    # A useless test (same rates in both worlds) proves nothing.
    eps, _, _ = epsilon_lower_bound(
        false_positives=500, negatives=1000, false_negatives=500, positives=1000, delta=1e-5, alpha=0.05
    )
    assert eps == 0.0


def test_identical_worlds_give_no_evidence():
    rng = np.random.default_rng(0)
    result = evaluate_statistic(
        "x", rng.normal(size=4000), rng.normal(size=4000), delta=1e-5, confidence=0.95
    )
    assert result.epsilon_lower_bound < 0.3


def test_correct_dp_sgd_stays_below_the_claim():
    result = run_audit(AuditConfig(trials=4000))
    assert result.claimed_epsilon == pytest.approx(
        epsilon(noise_multiplier=1.5, sample_rate=0.1, steps=50, delta=1e-5)
    )
    assert not result.violated
    assert result.epsilon_lower_bound < result.claimed_epsilon
    # The attack has power: it finds real (bounded) leakage, not nothing.
    assert result.epsilon_lower_bound > 0.2


def test_gaussian_mechanism_audit_is_valid_and_not_vacuous():
    """Full batch, one step: a single Gaussian mechanism whose tight epsilon PRV computes (~4.39)."""
    result = run_audit(AuditConfig(trials=20000, sample_rate=1.0, steps=1, noise_multiplier=1.0))
    tight = epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5, accountant="prv")
    assert 1.5 < result.epsilon_lower_bound < tight


@pytest.mark.parametrize("broken", ["no_noise", "no_clip"])
def test_broken_dp_sgd_is_flagged(broken):
    result = run_audit(AuditConfig(trials=4000, broken=broken))
    assert result.violated
    assert result.epsilon_lower_bound > result.claimed_epsilon + 1.0


def test_opacus_engine_flags_noise_zero():
    """The same audit through Opacus's GradSampleModule, DPOptimizer and Poisson DPDataLoader."""
    result = run_audit(
        AuditConfig(trials=100, steps=20, noise_multiplier=4.0, engine="opacus", broken="no_noise")
    )
    assert result.violated, result.to_dict()


@pytest.mark.parametrize("broken", [None, "no_noise"])
def test_project_dpsgd_with_lazy_row_noise(broken):
    """privacy.dp.optimizer.DPSGD (lazy embedding-row noise): passes when correct, flagged without noise."""
    result = run_audit(AuditConfig(trials=3000, engine="dpsgd", broken=broken))
    assert [r.statistic for r in result.results] == ["final"]
    assert result.violated == (broken is not None), result.to_dict()


def test_bad_audit_config():
    for bad in (
        dict(noise_multiplier=0.0),
        dict(trials=5),
        dict(broken="x"),
        dict(engine="opacus", broken="no_clip"),
    ):
        with pytest.raises(PrivacyError):
            AuditConfig(**bad)
