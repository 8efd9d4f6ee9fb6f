"""privacy.accounting.accountants: Opacus's reference values, inverse search, validation, state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from privacy.accounting.accountants import (
    Accountant,
    check_budget,
    check_delta,
    epsilon_for,
    max_steps_within,
    noise_multiplier_for,
)
from privacy.errors import PrivacyError


def test_rdp_reproduces_opacus_reference_value():
    # Opacus's documented example: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> epsilon 7.3291.
    eps = epsilon_for(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.3291, abs=5e-5)


def test_stateful_accountant_matches_opacus_directly():
    ours = Accountant(mechanism="rdp")
    theirs = RDPAccountant()
    for _ in range(30):
        ours.step(noise_multiplier=1.1, sample_rate=0.01)
        theirs.step(noise_multiplier=1.1, sample_rate=0.01)
    ours.step(noise_multiplier=0.9, sample_rate=0.02, steps=5)
    for _ in range(5):
        theirs.step(noise_multiplier=0.9, sample_rate=0.02)
    assert ours.steps == 35
    assert ours.epsilon(delta=1e-6) == pytest.approx(theirs.get_epsilon(delta=1e-6), rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_noise_for_target_epsilon_meets_target(accountant):
    sigma = noise_multiplier_for(
        target_epsilon=3.0, delta=1e-5, sample_rate=0.04, steps=500, accountant=accountant
    )
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=0.04, steps=500, delta=1e-5, accountant=accountant)
    assert 3.0 - 0.05 <= eps <= 3.0
    # PRV is tighter than RDP: the same target needs no more noise
    if accountant == "prv":
        rdp_sigma = noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.04, steps=500)
        assert sigma <= rdp_sigma


def test_unreachable_target_is_an_error():
    with pytest.raises(PrivacyError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=1e-9, delta=1e-9, sample_rate=1.0, steps=10**6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_validation_errors_are_one_line(kwargs, match):
    params = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5, "accountant": "rdp"}
    params.update(kwargs)
    with pytest.raises(PrivacyError, match=match) as info:
        epsilon_for(**params)
    assert "\n" not in str(info.value)


def test_delta_must_be_below_one_over_n():
    assert check_delta(1e-6, num_examples=100_000) == 1e-6
    with pytest.raises(PrivacyError, match="1/N"):
        check_delta(1e-5, num_examples=100_000)  # exactly 1/N
    with pytest.raises(PrivacyError, match="1/N"):
        check_delta(1e-3, num_examples=100_000)


def test_keyword_only():
    with pytest.raises(TypeError):
        epsilon_for(1.0, 0.01, 10, 1e-5)  # type: ignore[misc]


def test_budget_checks():
    one = check_budget(epsilon_budget=5.0, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
    assert one > 0
    with pytest.raises(PrivacyError, match="single step"):
        check_budget(epsilon_budget=one / 2, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
    steps = max_steps_within(
        epsilon_budget=2.0, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5, upper=100_000
    )
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.01, steps=steps, delta=1e-5) <= 2.0
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.01, steps=steps + 1, delta=1e-5) > 2.0
    assert (
        max_steps_within(epsilon_budget=50.0, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5, upper=7)
        == 7
    )


def test_state_round_trip_through_json():
    acc = Accountant(mechanism="prv")
    acc.step(noise_multiplier=1.2, sample_rate=0.02, steps=100)
    acc.step(noise_multiplier=1.0, sample_rate=0.02, steps=10)
    restored = Accountant(mechanism="prv")
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history
    assert restored.epsilon(delta=1e-5) == acc.epsilon(delta=1e-5)
    with pytest.raises(PrivacyError, match="mechanism"):
        Accountant(mechanism="rdp").load_state_dict(acc.state_dict())
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        restored.load_state_dict({"mechanism": "prv", "history": [[0.0, 0.02, 3]]})


def test_gdp_refuses_changing_parameters():
    acc = Accountant(mechanism="gdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=3)
    with pytest.raises(PrivacyError, match="constant"):
        acc.step(noise_multiplier=2.0, sample_rate=0.01)


def test_epsilon_after_does_not_change_state():
    acc = Accountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    ahead = acc.epsilon_after(delta=1e-5, noise_multiplier=1.0, sample_rate=0.01, steps=10)
    assert ahead == pytest.approx(epsilon_for(noise_multiplier=1.0, sample_rate=0.01, steps=20, delta=1e-5))
    assert acc.steps == 10


@settings(max_examples=10, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    rate=st.floats(1e-4, 0.5),
    steps=st.integers(1, 2000),
    extra=st.integers(1, 500),
)
def test_epsilon_monotone_in_steps_and_noise(sigma, rate, steps, extra):
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=1e-6)
    assert eps > 0
    assert epsilon_for(noise_multiplier=sigma, sample_rate=rate, steps=steps + extra, delta=1e-6) >= eps
    assert epsilon_for(noise_multiplier=sigma * 1.5, sample_rate=rate, steps=steps, delta=1e-6) <= eps
