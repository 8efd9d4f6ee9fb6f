"""Example-level privacy accounting for DP-SGD: thin, validated wrappers over Opacus's accountants.

Three accountants for the Poisson-subsampled Gaussian mechanism, all from Opacus 1.6:

- ``rdp``: Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019), converted to (epsilon, delta) with
  Balle et al. 2020, Theorem 21. A safe upper bound; the default.
- ``prv``: numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz 2021,
  https://arxiv.org/abs/2106.02848); tighter than RDP, returns the upper end of its error band.
- ``gdp``: Gaussian DP through the central limit theorem (Dong, Roth, Su 2019; Bu et al. 2020). An
  approximation that can *underestimate* epsilon (noise 0.7: 1.83 where PRV gives 4.00), so here
  ``gdp`` always means max(GDP, PRV): it is never printed, planned or budgeted below the tight
  accountant; ``gdp_approximation`` gives the raw value to show beside it. Noise and sample rate
  must stay constant.

All three assume Poisson sampling: every example is in a batch independently with probability
``sample_rate``. Shuffled fixed-size batches are a different mechanism (see privacy.dp.sampling).

Every parameter is keyword-only and validated; a bad one raises :class:`privacy.errors.PrivacyError`
with a one-line message. State round-trips through ``state_dict``/``load_state_dict`` as plain JSON-able
data, so epsilon survives a restart.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from opacus.accountants.utils import get_noise_multiplier

from privacy.accounting.user_level import epsilon_from_history
from privacy.errors import PrivacyError

ACCOUNTANTS = ("rdp", "prv", "gdp")


# ---------------------------------------------------------------------------------------------------
# Validation (one line per error: the parameter, its value, what was expected)
# ---------------------------------------------------------------------------------------------------


def check_accountant(name: Any) -> str:
    """Return ``name`` if it is a known accountant, else raise PrivacyError."""
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"accountant = {name!r}: expected one of {', '.join(ACCOUNTANTS)}")
    return str(name)


def check_noise_multiplier(noise_multiplier: Any) -> float:
    """A finite noise multiplier > 0 (zero noise is not DP)."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, int | float):
        raise PrivacyError(f"noise_multiplier = {noise_multiplier!r}: expected a number > 0")
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise PrivacyError(f"noise_multiplier = {noise_multiplier!r}: expected a finite number > 0")
    return float(noise_multiplier)


def check_sample_rate(sample_rate: Any) -> float:
    """A Poisson sampling probability in (0, 1]."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float):
        raise PrivacyError(f"sample_rate = {sample_rate!r}: expected a number in (0, 1]")
    if not (0.0 < sample_rate <= 1.0):
        raise PrivacyError(f"sample_rate = {sample_rate!r}: expected a number in (0, 1]")
    return float(sample_rate)


def check_delta(delta: Any, *, num_examples: int | None = None) -> float:
    """Delta in (0, 1), and below 1/N when the number of training examples N is known.

    A delta of 1/N or more allows a mechanism that publishes one whole random example outright, so
    it protects nobody; the usual advice is delta well below 1/N.
    """
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not math.isfinite(delta):
        raise PrivacyError(f"delta = {delta!r}: expected a number in (0, 1)")
    if not (0.0 < delta < 1.0):
        raise PrivacyError(f"delta = {delta!r}: expected a number in (0, 1)")
    if num_examples is not None:
        if num_examples < 1:
            raise PrivacyError(f"num_examples = {num_examples!r}: expected a positive integer")
        if delta >= 1.0 / num_examples:
            raise PrivacyError(
                f"delta = {delta!r}: expected below 1/N = {1.0 / num_examples:.3g} "
                f"for N = {num_examples} training examples"
            )
    return float(delta)


def check_epsilon(epsilon: Any, *, key: str = "target_epsilon") -> float:
    """A finite epsilon > 0."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not math.isfinite(epsilon):
        raise PrivacyError(f"{key} = {epsilon!r}: expected a finite number > 0")
    if epsilon <= 0:
        raise PrivacyError(f"{key} = {epsilon!r}: expected a finite number > 0")
    return float(epsilon)


def check_steps(steps: Any, *, key: str = "steps", allow_zero: bool = False) -> int:
    """A non-negative (or positive) integer step count."""
    low = 0 if allow_zero else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < low:
        raise PrivacyError(f"{key} = {steps!r}: expected an integer >= {low}")
    return int(steps)


# ---------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------


def _epsilon_of_history(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    # One implementation for the ledger, the trainer and the report (gdp: never below PRV).
    return epsilon_from_history(history, delta=delta, accountant=name)


def epsilon_for(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon spent after ``steps`` Poisson-subsampled Gaussian steps at fixed noise and rate.

    Raises:
        PrivacyError: a parameter is out of range or the accountant is unknown.
    """
    accountant = check_accountant(accountant)
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    sample_rate = check_sample_rate(sample_rate)
    steps = check_steps(steps, allow_zero=True)
    delta = check_delta(delta)
    return _epsilon_of_history(accountant, [(noise_multiplier, sample_rate, steps)] if steps else [], delta)


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon after ``steps`` is <= target.

    Uses Opacus's ``get_noise_multiplier`` binary search; its result always satisfies the target.

    Raises:
        PrivacyError: bad parameters, or a target so small that no noise below 1e6 reaches it.
    """
    accountant = check_accountant(accountant)
    target_epsilon = check_epsilon(target_epsilon)
    delta = check_delta(delta)
    sample_rate = check_sample_rate(sample_rate)
    steps = check_steps(steps)
    # gdp means max(GDP, PRV): the noise must reach the target under both.
    searches = ("gdp", "prv") if accountant == "gdp" else (accountant,)
    sigmas = []
    for search in searches:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sigmas.append(
                    get_noise_multiplier(
                        target_epsilon=target_epsilon,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=steps,
                        accountant=search,
                        epsilon_tolerance=epsilon_tolerance,
                    )
                )
        except ValueError as err:
            raise PrivacyError(
                f"target_epsilon = {target_epsilon!r}: unreachable with delta={delta}, sample_rate={sample_rate}, "
                f"steps={steps} ({err})"
            ) from None
    return float(max(sigmas))


def largest_within(upper: int, within: Callable[[int], bool]) -> int:
    """Largest ``n`` in [0, upper] with ``within(n)``, for a ``within`` that holds at 0 and, once false,
    stays false (epsilon never decreases with more steps): a binary search."""
    if upper <= 0 or within(upper):
        return max(upper, 0)
    low, high = 0, upper  # within(low) holds, within(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        if within(mid):
            low = mid
        else:
            high = mid
    return low


def max_steps_within(
    *,
    epsilon_budget: float,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    accountant: str = "rdp",
    upper: int,
) -> int:
    """Largest step count in [0, upper] whose epsilon stays within ``epsilon_budget``.

    Epsilon is non-decreasing in the number of steps, so a binary search is exact.
    """
    epsilon_budget = check_epsilon(epsilon_budget, key="epsilon_budget")
    upper = check_steps(upper, key="upper", allow_zero=True)

    def within(steps: int) -> bool:
        eps = epsilon_for(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            accountant=accountant,
        )
        return eps <= epsilon_budget

    return largest_within(upper, within)


def check_budget(
    *,
    epsilon_budget: float,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Raise unless one step fits in ``epsilon_budget``; return the epsilon of one step."""
    epsilon_budget = check_epsilon(epsilon_budget, key="epsilon_budget")
    one_step = epsilon_for(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=1,
        delta=delta,
        accountant=accountant,
    )
    if one_step > epsilon_budget:
        raise PrivacyError(
            f"epsilon_budget = {epsilon_budget!r}: below the cost of a single step ({one_step:.4g} with "
            f"noise_multiplier={noise_multiplier}, sample_rate={sample_rate}, delta={delta}, {accountant})"
        )
    return one_step


# ---------------------------------------------------------------------------------------------------
# Stateful accountant
# ---------------------------------------------------------------------------------------------------


class Accountant:
    """Tracks the (noise multiplier, sample rate, steps) history of one DP-SGD run.

    Args:
        mechanism: ``rdp`` (default), ``prv`` or ``gdp``.
    """

    def __init__(self, *, mechanism: str = "rdp") -> None:
        self.mechanism = check_accountant(mechanism)
        self.history: list[tuple[float, float, int]] = []

    @property
    def steps(self) -> int:
        """Total steps recorded."""
        return sum(n for _, _, n in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps at the given noise multiplier and Poisson sample rate."""
        noise_multiplier = check_noise_multiplier(noise_multiplier)
        sample_rate = check_sample_rate(sample_rate)
        steps = check_steps(steps)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, rate, count = self.history[-1]
            self.history[-1] = (sigma, rate, count + steps)
            return
        if self.mechanism == "gdp" and self.history:
            raise PrivacyError(
                f"accountant = 'gdp': noise_multiplier and sample_rate must stay constant "
                f"(had {self.history[-1][:2]}, got {(noise_multiplier, sample_rate)}); use 'rdp' or 'prv'"
            )
        self.history.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, *, delta: float) -> float:
        """Epsilon spent so far for ``delta`` (0 before the first step)."""
        delta = check_delta(delta)
        return _epsilon_of_history(self.mechanism, self.history, delta)

    def epsilon_after(
        self, *, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon if ``steps`` more steps were taken (the state is not changed)."""
        delta = check_delta(delta)
        trial = Accountant(mechanism=self.mechanism)
        trial.history = list(self.history)
        trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return _epsilon_of_history(self.mechanism, trial.history, delta)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state."""
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state written by :meth:`state_dict` (validated: it may come from a file)."""
        if not isinstance(state, dict) or set(state) != {"mechanism", "history"}:
            raise PrivacyError(
                f"accountant state = {state!r:.80}: expected a mapping with keys 'mechanism' and 'history'"
            )
        if state["mechanism"] != self.mechanism:
            raise PrivacyError(
                f"accountant state mechanism = {state['mechanism']!r}: expected {self.mechanism!r}"
            )
        history = state["history"]
        if not isinstance(history, list):
            raise PrivacyError(f"accountant state history = {history!r:.80}: expected a list")
        restored: list[tuple[float, float, int]] = []
        for entry in history:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise PrivacyError(
                    f"accountant state history entry = {entry!r}: expected [noise, rate, steps]"
                )
            restored.append(
                (check_noise_multiplier(entry[0]), check_sample_rate(entry[1]), check_steps(entry[2]))
            )
        self.history = restored

    def __repr__(self) -> str:
        return f"Accountant(mechanism={self.mechanism!r}, steps={self.steps})"
