"""GDP is never printed, planned or budgeted below the tight accountant (issue 14, finding 5).

The attack run: ``--plan noise_multiplier=1 sample_rate=0.1 steps=100 delta=1e-5 accountant=gdp``
printed 6.0071 where PRV gives 7.057, and noise 0.7 printed 1.83 where PRV gives 4.00.
"""

from __future__ import annotations

import pytest

from privacy.accounting.accountants import Accountant, epsilon_for, noise_multiplier_for
from privacy.accounting.user_level import epsilon_from_history, gdp_approximation
from privacy.report.plan import parse_plan, run_plan

CASES = [(1.0, 0.1, 100), (0.7, 0.05, 50), (0.9, 0.5, 5)]


@pytest.mark.parametrize("sigma, rate, steps", CASES)
def test_gdp_epsilon_is_never_below_prv(sigma, rate, steps):
    prv = epsilon_for(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=1e-5, accountant="prv")
    gdp = epsilon_for(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=1e-5, accountant="gdp")
    assert gdp >= prv
    approx = gdp_approximation([(sigma, rate, steps)], delta=1e-5)
    assert gdp == pytest.approx(max(prv, approx), rel=1e-12)
    history = epsilon_from_history([(sigma, rate, steps)], delta=1e-5, accountant="gdp")
    assert history == gdp
    acc = Accountant(mechanism="gdp")
    acc.step(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    assert acc.epsilon(delta=1e-5) == gdp


def test_the_audited_plan_prints_the_tight_value():
    tokens = ["noise_multiplier=1", "sample_rate=0.1", "steps=100", "delta=1e-5"]
    gdp_line = run_plan(parse_plan([*tokens, "accountant=gdp"]))
    prv_line = run_plan(parse_plan([*tokens, "accountant=prv"]))
    gdp_value, prv_value = float(gdp_line.split()[2]), float(prv_line.split()[2])
    assert gdp_value >= prv_value == pytest.approx(7.057, abs=1e-3)
    assert "raw GDP approximation 6.0071, an under-estimate" in gdp_line


def test_gdp_noise_for_a_target_meets_the_target_under_prv_too():
    sigma = noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.1, steps=100, accountant="gdp")
    prv = epsilon_for(noise_multiplier=sigma, sample_rate=0.1, steps=100, delta=1e-5, accountant="prv")
    assert prv <= 3.0
