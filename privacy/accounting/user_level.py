"""Epsilon from a history of sampled Gaussian mechanisms; user-level accounting for DP-FedAvg.

Both privacy notions this project reports reduce to the same mechanism, composed over a history of
``(noise_multiplier, sample_rate, steps)`` entries:

* example-level DP-SGD (Abadi et al. 2016): each step adds Gaussian noise of std
  ``noise_multiplier * max_grad_norm`` to a sum of per-example clipped gradients of a Poisson sample
  (rate ``sample_rate``) of one client's examples;
* user-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning differentially private
  recurrent language models", ICLR): each round samples every client independently with probability
  ``q``, sums the sampled clients' updates clipped to L2 norm ``S`` and adds Gaussian noise of std
  ``sigma * S``. One round is one step of the sampled Gaussian mechanism with noise multiplier
  ``sigma`` and sample rate ``q``, for neighbouring datasets that differ in one user's entire data.

Epsilon is computed with Opacus's accountants (RDP: Mironov, Talwar, Zhang 2019 with the RDP to
(epsilon, delta) conversion of Balle et al. 2020; PRV: Gopi, Lee, Wutschitz 2021; GDP: Dong, Roth, Su
2019, an approximation that can under-estimate, so 'gdp' here always means max(GDP, PRV): it is never
printed or budgeted below the tight accountant, and the raw approximation is only shown beside it).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from privacy.errors import PrivacyError

# Opacus is imported inside the functions that compute: importing it pulls in torch and all of
# Opacus (about 2 s), which a process that only records spends in the ledger does not need.

ACCOUNTANTS = ("rdp", "prv", "gdp")
# GDP (a central-limit approximation) can under-estimate epsilon: fine for a what-if, not for a budget.
BUDGET_ACCOUNTANTS = ("rdp", "prv")
# Opacus's RDPAccountant.DEFAULT_ALPHAS (a test checks they agree), so the reference value matches.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def validate_delta(delta: float, *, name: str = "delta") -> float:
    """Return ``delta`` as a float in (0, 1) or raise PrivacyError."""
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise PrivacyError(f"{name} = {delta!r}: expected a number in (0, 1)") from None
    if not 0.0 < value < 1.0 or not math.isfinite(value):
        raise PrivacyError(f"{name} = {delta!r}: expected a number in (0, 1)")
    return value


def validate_accountant(accountant: str, *, allowed: Sequence[str] = ACCOUNTANTS) -> str:
    """Return the accountant name or raise PrivacyError listing the known ones."""
    if accountant not in allowed:
        raise PrivacyError(f"accountant = {accountant!r}: expected one of {', '.join(allowed)}")
    return accountant


def validate_entry(*, noise_multiplier: float, sample_rate: float, steps: int) -> HistoryEntry:
    """Check one history entry: finite noise > 0 (zero noise is not DP), rate in (0, 1], steps >= 1."""
    try:
        sigma, rate = float(noise_multiplier), float(sample_rate)
    except (TypeError, ValueError):
        raise PrivacyError(
            f"noise_multiplier = {noise_multiplier!r}, sample_rate = {sample_rate!r}: expected numbers"
        ) from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise PrivacyError(f"noise_multiplier = {noise_multiplier!r}: expected a finite number > 0")
    if not math.isfinite(rate) or not 0.0 < rate <= 1.0:
        raise PrivacyError(f"sample_rate = {sample_rate!r}: expected a number in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise PrivacyError(f"steps = {steps!r}: expected a positive integer")
    return sigma, rate, int(steps)


def merge_history(history: Iterable[Sequence[Any]]) -> tuple[HistoryEntry, ...]:
    """Sum the steps of entries with the same (noise, rate); order does not change a composition."""
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for entry in history:
        sigma, rate, steps = validate_entry(noise_multiplier=entry[0], sample_rate=entry[1], steps=entry[2])
        steps_by_mechanism[(sigma, rate)] = steps_by_mechanism.get((sigma, rate), 0) + steps
    return tuple(sorted((sigma, rate, steps) for (sigma, rate), steps in steps_by_mechanism.items()))


@functools.lru_cache(maxsize=4096)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one sampled Gaussian step at every order of ``RDP_ORDERS`` (cached: it is additive)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    try:
        with np.errstate(over="ignore"):
            rdp = np.asarray(
                rdp_analysis.compute_rdp(
                    q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
                ),
                dtype=float,
            )
    except (ZeroDivisionError, OverflowError) as err:
        raise PrivacyError(
            f"noise_multiplier = {noise_multiplier!r}: too small to account for (RDP: {err}); no meaningful DP"
        ) from None
    rdp.setflags(write=False)
    return rdp


def rdp_of_history(history: Iterable[Sequence[float]]) -> np.ndarray:
    """Total RDP at every order of ``RDP_ORDERS`` of a composed history."""
    total = np.zeros(len(RDP_ORDERS))
    for sigma, rate, steps in merge_history(history):
        total = total + steps * rdp_per_step(sigma, rate)
    return total


def epsilon_from_rdp(rdp: np.ndarray, *, delta: float) -> float:
    """Convert an RDP curve over ``RDP_ORDERS`` to epsilon (Balle et al. 2020, as Opacus does)."""
    if not np.any(rdp):
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        # "optimal order is the largest/smallest alpha": the bound is valid, only possibly loose.
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    eps = float(eps)
    return math.inf if math.isnan(eps) else eps


def epsilon_from_history(
    history: Iterable[Sequence[float]], *, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of composing every ``(noise_multiplier, sample_rate, steps)`` entry, at ``delta``.

    An empty history spends nothing (0.0). A history so weak that the accountant overflows gives
    ``math.inf``. For ``gdp`` the result is never below the tight PRV value (see ``_epsilon_cached``).

    Raises:
        PrivacyError: bad delta, accountant or entry (noise multiplier <= 0 included); an accountant
            that cannot compute this history, or that gives a negative epsilon.
    """
    delta = validate_delta(delta)
    validate_accountant(accountant)
    merged = merge_history(history)
    if not merged:
        return 0.0
    return _epsilon_cached(merged, delta, accountant)


def epsilon_from_merged(merged: tuple[HistoryEntry, ...], *, delta: float, accountant: str = "rdp") -> float:
    """``epsilon_from_history`` for a history already in ``merge_history`` form (cached; for reports
    that compose many clients incrementally)."""
    if not merged:
        return 0.0
    return _epsilon_cached(tuple(sorted(merged)), validate_delta(delta), validate_accountant(accountant))


@functools.lru_cache(maxsize=8192)
def _epsilon_cached(merged: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    for sigma, rate, steps in merged:
        validate_entry(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    if accountant == "gdp":
        # GDP (a central-limit approximation) can under-estimate: it is reported, and budgeted, as
        # the larger of itself and the tight PRV value (Gopi et al. 2021), never below it.
        return max(
            _checked(_gdp_epsilon(merged, delta), "gdp", delta), tight_epsilon_of_merged(merged, delta)
        )
    return _checked(_raw_epsilon(merged, delta, accountant), accountant, delta)


def _checked(eps: float, accountant: str, delta: float) -> float:
    if math.isnan(eps) or eps < 0:
        raise PrivacyError(
            f"accountant {accountant!r} gave epsilon {eps:.4g} at delta {delta:g}: impossible (epsilon is never "
            "negative); the history or delta is wrong"
        )
    return float(eps)


def tight_epsilon_of_merged(merged: tuple[HistoryEntry, ...], delta: float) -> float:
    """The tight (PRV) epsilon of a merged history; RDP (a looser upper bound) where PRV cannot compute."""
    try:
        return _checked(_raw_epsilon(merged, delta, "prv"), "prv", delta)
    except PrivacyError:
        return _checked(_raw_epsilon(merged, delta, "rdp"), "rdp", delta)


def gdp_approximation(history: Iterable[Sequence[float]], *, delta: float) -> float:
    """Opacus's raw GDP approximation (may be BELOW the true epsilon): shown beside, never used alone."""
    merged = merge_history(history)
    if not merged:
        return 0.0
    return _checked(_gdp_epsilon(merged, validate_delta(delta)), "gdp", delta)


def _gdp_epsilon(merged: tuple[HistoryEntry, ...], delta: float) -> float:
    if len(merged) != 1:
        raise PrivacyError(
            f"accountant 'gdp' needs one constant (noise_multiplier, sample_rate); history has {len(merged)}"
        )
    from opacus.accountants.analysis import gdp as gdp_analysis

    sigma, rate, steps = merged[0]
    return float(
        gdp_analysis.compute_eps_poisson(steps=steps, noise_multiplier=sigma, sample_rate=rate, delta=delta)
    )


def _raw_epsilon(merged: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    if accountant == "rdp":
        return epsilon_from_rdp(rdp_of_history(merged), delta=delta)
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(sigma, rate, steps) for sigma, rate, steps in merged]
        try:
            with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                return float(prv.get_epsilon(delta=delta))
        except (ValueError, RuntimeError, OverflowError, FloatingPointError, ZeroDivisionError) as err:
            raise PrivacyError(
                f"PRV accountant cannot compute history {list(merged)!r} at delta {delta}: {err}"
            ) from None
    raise PrivacyError(f"accountant = {accountant!r}: expected one of {', '.join(ACCOUNTANTS)}")


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` sampled Gaussian steps (the what-if: ``--plan noise_multiplier=...``)."""
    entry = validate_entry(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return epsilon_from_history([entry], delta=delta, accountant=accountant)


def noise_multiplier_for(
    *, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier (to Opacus's 0.01 tolerance in epsilon) that keeps epsilon <= target.

    Delegates to the example-level accountants' search (one implementation of the binary search).

    Raises:
        PrivacyError: bad parameters, or a target that no noise level up to 1e6 reaches.
    """
    from privacy.accounting.accountants import noise_multiplier_for as search

    return search(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=int(steps),
        accountant=accountant,
    )


def user_level_epsilon(rounds: Iterable[Sequence[float]], *, delta: float, accountant: str = "rdp") -> float:
    """User-level epsilon of DP-FedAvg (McMahan et al. 2018) after the given rounds.

    Args:
        rounds: one ``(noise_multiplier, client_sampling_rate)`` pair per round that was (or may have
            been) released. ``noise_multiplier`` is the std of the noise on the sum of clipped updates
            divided by the clip norm S, as the round's clients actually added it (see
            ``privacy.dp.dp_fedavg``: with the minimum number of survivors).
        delta: target delta (user level: should be well below 1 / number of users).
        accountant: 'rdp', 'prv' or 'gdp'.
    """
    return epsilon_from_history([(sigma, q, 1) for sigma, q in rounds], delta=delta, accountant=accountant)


class UserLevelAccountant:
    """Stateful DP-FedAvg accountant: one ``step`` per round; state round-trips through ``state_dict``."""

    def __init__(self, *, delta: float, accountant: str = "rdp"):
        self.delta = validate_delta(delta)
        self.accountant = validate_accountant(accountant)
        self.rounds: list[tuple[float, float]] = []

    def step(self, *, noise_multiplier: float, client_sampling_rate: float) -> None:
        sigma, q, _ = validate_entry(
            noise_multiplier=noise_multiplier, sample_rate=client_sampling_rate, steps=1
        )
        self.rounds.append((sigma, q))

    def get_epsilon(self) -> float:
        return user_level_epsilon(self.rounds, delta=self.delta, accountant=self.accountant)

    def epsilon_if(self, *, noise_multiplier: float, client_sampling_rate: float) -> float:
        """Epsilon after one more round with these parameters (for a budget check before it starts)."""
        return user_level_epsilon(
            [*self.rounds, (noise_multiplier, client_sampling_rate)],
            delta=self.delta,
            accountant=self.accountant,
        )

    def state_dict(self) -> dict:
        return {"delta": self.delta, "accountant": self.accountant, "rounds": [list(r) for r in self.rounds]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("delta") != self.delta or state.get("accountant") != self.accountant:
            raise PrivacyError(
                f"user-level accountant state has delta {state.get('delta')!r}, accountant "
                f"{state.get('accountant')!r}; expected {self.delta!r}, {self.accountant!r}"
            )
        rounds = []
        for entry in state.get("rounds", []):
            sigma, q, _ = validate_entry(noise_multiplier=entry[0], sample_rate=entry[1], steps=1)
            rounds.append((sigma, q))
        self.rounds = rounds
