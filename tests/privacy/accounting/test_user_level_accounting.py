"""User-level (DP-FedAvg) and composed accounting: Opacus's reference, an independent RDP computation,
and monotonicity properties (Hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import integrate, special

from privacy.accounting.accountants import epsilon_for
from privacy.accounting.user_level import (
    RDP_ORDERS,
    UserLevelAccountant,
    epsilon,
    epsilon_from_history,
    noise_multiplier_for,
    user_level_epsilon,
)
from privacy.errors import PrivacyError

# ------------------------------------------------------------------ an independent implementation
# Mironov, Talwar, Zhang 2019, "Renyi differential privacy of the sampled Gaussian mechanism", Sec. 3.3:
# for integer alpha, A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)),
# and the RDP at order alpha is log(A_alpha) / (alpha - 1). Written here from the paper, in log space.


def independent_sgm_rdp(q: float, sigma: float, alpha: int) -> float:
    if q == 1.0:
        return alpha / (2 * sigma**2)
    terms = [
        math.lgamma(alpha + 1)
        - math.lgamma(k + 1)
        - math.lgamma(alpha - k + 1)
        + (alpha - k) * math.log1p(-q)
        + k * math.log(q)
        + (k * k - k) / (2 * sigma**2)
        for k in range(alpha + 1)
    ]
    return float(special.logsumexp(terms)) / (alpha - 1)


def integrated_sgm_rdp(q: float, sigma: float, alpha: int) -> float:
    """The RDP definition integrated numerically: D_alpha((1-q) N(0,s^2) + q N(1,s^2) || N(0,s^2))."""

    log_keep = math.log1p(-q) if q < 1 else -math.inf

    def integrand(z: float) -> float:
        # N(0, s^2) density times (mixture / N(0, s^2))^alpha, in log space (no underflow in the tails).
        log_ratio = np.logaddexp(log_keep, math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return math.exp(
            -(z**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi)) + alpha * log_ratio
        )

    value, _ = integrate.quad(integrand, -30 * sigma, 30 * sigma + alpha, limit=500, epsabs=0, epsrel=1e-11)
    return math.log(value) / (alpha - 1)


def independent_epsilon(rdp_by_order: dict[int, float], delta: float) -> float:
    """RDP -> (eps, delta): Balle et al. 2020, Theorem 21, minimised over the given orders."""
    return min(
        rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a, rdp in rdp_by_order.items()
    )


INTEGER_ORDERS = list(range(2, 64))


# ------------------------------------------------------------------ tests


def test_reference_value_from_opacus():
    assert epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5) == pytest.approx(
        7.3291, abs=5e-5
    )
    assert epsilon_from_history([(1.5, 0.04, 1000), (1.5, 0.04, 1250)], delta=1e-5) == pytest.approx(
        7.3291, abs=5e-5
    )


def test_orders_are_opacus_defaults():
    assert list(RDP_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


def test_matches_the_example_level_accountants_module():
    for sigma, q, steps in [(1.1, 0.01, 5000), (0.8, 0.2, 30), (3.0, 1.0, 10)]:
        for accountant in ("rdp", "prv"):
            mine = epsilon(
                noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-6, accountant=accountant
            )
            theirs = epsilon_for(
                noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-6, accountant=accountant
            )
            assert mine == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("q, sigma", [(0.01, 1.1), (0.1, 1.0), (0.3, 2.0), (1.0, 1.5)])
def test_sgm_rdp_matches_an_independent_computation(q, sigma):
    for alpha in (2, 3, 5, 8, 16, 32, 63):
        ours = independent_sgm_rdp(q, sigma, alpha)
        theirs = float(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0])
        assert ours == pytest.approx(theirs, rel=1e-9)
    for alpha in (2, 4, 8):  # the definition itself, by quadrature
        assert integrated_sgm_rdp(q, sigma, alpha) == pytest.approx(
            independent_sgm_rdp(q, sigma, alpha), rel=1e-6
        )


@pytest.mark.parametrize(
    "sigma, q, rounds, delta", [(1.0, 0.01, 1000, 1e-5), (0.8, 0.05, 200, 1e-6), (2.0, 0.3, 50, 1e-5)]
)
def test_user_level_dp_fedavg_matches_an_independent_computation(sigma, q, rounds, delta):
    """McMahan et al. 2018: `rounds` rounds of the sampled Gaussian mechanism at (sigma, q)."""
    ours = user_level_epsilon([(sigma, q)] * rounds, delta=delta)
    independent = independent_epsilon(
        {a: rounds * independent_sgm_rdp(q, sigma, a) for a in INTEGER_ORDERS}, delta=delta
    )
    # Our orders include every integer order 2..63 plus fractional ones: at most the integer-only
    # value, and within a few percent of it.
    assert ours <= independent + 1e-9
    assert ours >= 0.95 * independent
    # Restricted to the same orders, Opacus's computation and ours agree to rounding.
    rdp = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=INTEGER_ORDERS))
    eps, _ = opacus_rdp.get_privacy_spent(orders=INTEGER_ORDERS, rdp=rdp, delta=delta)
    assert float(eps) == pytest.approx(independent, rel=1e-9)


def test_user_level_is_the_composed_history():
    rounds = [(1.0, 0.02)] * 30 + [(1.2, 0.02)] * 20
    expected = epsilon_from_history([(1.0, 0.02, 30), (1.2, 0.02, 20)], delta=1e-5)
    assert user_level_epsilon(rounds, delta=1e-5) == pytest.approx(expected, rel=1e-12)
    accountant = UserLevelAccountant(delta=1e-5)
    for sigma, q in rounds:
        accountant.step(noise_multiplier=sigma, client_sampling_rate=q)
    assert accountant.get_epsilon() == pytest.approx(expected, rel=1e-12)
    restored = UserLevelAccountant(delta=1e-5)
    restored.load_state_dict(accountant.state_dict())
    assert restored.get_epsilon() == accountant.get_epsilon()
    with pytest.raises(PrivacyError, match="delta"):
        UserLevelAccountant(delta=1e-6).load_state_dict(accountant.state_dict())


def test_prv_is_tighter_than_rdp_and_matches_opacus():
    history = [(1.0, 0.05, 300), (1.3, 0.05, 100)]
    prv = epsilon_from_history(history, delta=1e-5, accountant="prv")
    reference = PRVAccountant()
    reference.history = history
    assert prv == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert prv < epsilon_from_history(history, delta=1e-5, accountant="rdp")


def test_noise_multiplier_search_reaches_the_target():
    sigma = noise_multiplier_for(target_epsilon=3.0, sample_rate=0.01, steps=5000, delta=1e-6)
    reached = epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=5000, delta=1e-6)
    assert 3.0 - 0.02 <= reached <= 3.0


def test_edge_cases_and_bad_input():
    assert epsilon_from_history([], delta=1e-5) == 0.0
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=1e-5)  # zero noise is not DP
    with pytest.raises(PrivacyError, match="gdp"):
        epsilon_from_history([(1.0, 0.1, 10), (2.0, 0.1, 10)], delta=1e-5, accountant="gdp")
    for bad in (
        dict(delta=0.0),
        dict(delta=1.5),
        dict(accountant="moments"),
        dict(sample_rate=0.0),
        dict(steps=0),
    ):
        params = {**dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5), **bad}
        with pytest.raises(PrivacyError):
            epsilon(**params)


# ------------------------------------------------------------------ properties

_sigma = st.floats(min_value=0.5, max_value=5.0)
_rate = st.floats(min_value=1e-3, max_value=0.5)
_steps = st.integers(min_value=1, max_value=3000)
_TOL = 1e-9


@settings(deadline=None, max_examples=25)
@given(sigma=_sigma, q=_rate, steps=_steps, more=st.integers(min_value=1, max_value=3000))
def test_epsilon_never_decreases_with_more_steps(sigma, q, steps, more):
    base = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert (
        epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps + more, delta=1e-5) >= base - _TOL * base
    )


@settings(deadline=None, max_examples=25)
@given(sigma=_sigma, q=_rate, steps=_steps, factor=st.floats(min_value=1.01, max_value=10.0))
def test_epsilon_never_decreases_with_a_higher_sample_rate(sigma, q, steps, factor):
    higher = min(1.0, q * factor)
    base = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert epsilon(noise_multiplier=sigma, sample_rate=higher, steps=steps, delta=1e-5) >= base - _TOL * base


@settings(deadline=None, max_examples=25)
@given(sigma=_sigma, q=_rate, steps=_steps, factor=st.floats(min_value=1.01, max_value=4.0))
def test_epsilon_never_increases_with_more_noise(sigma, q, steps, factor):
    base = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert (
        epsilon(noise_multiplier=sigma * factor, sample_rate=q, steps=steps, delta=1e-5) <= base + _TOL * base
    )
