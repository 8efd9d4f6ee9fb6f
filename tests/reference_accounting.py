"""Independent privacy accounting for tests: epsilon of a spend history without privacy.accounting.

Two computations of the Poisson-subsampled Gaussian mechanism's (epsilon, delta):

- :func:`opacus_rdp_epsilon`: Opacus's RDP analysis functions called directly (``compute_rdp`` per
  (sigma, q, steps) entry, summed, ``get_privacy_spent`` over Opacus's default orders): what the
  project's RDP accountant must report, to floating-point accuracy.
- :func:`integer_order_rdp_epsilon`: a from-scratch implementation at integer orders only (Mironov,
  Talwar, Zhang 2019, https://arxiv.org/abs/1908.10530, section 3.3: the binomial expansion for
  integer alpha) with the conversion of Balle et al. 2020 (Theorem 21). Restricting the orders can
  only raise the bound, so it lies at or slightly above the first: a check that the first is not
  computed on wrong inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.special import gammaln, logsumexp

History = Sequence[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)


def opacus_rdp_epsilon(history: History, delta: float) -> float:
    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, as in the project
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log E[(mu_1/mu_0)^alpha] for the sampled Gaussian: sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 s^2))."""
    if q == 1.0:
        return alpha * (alpha - 1) / (2 * sigma**2)
    k = np.arange(alpha + 1)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    return float(logsumexp(terms))


def integer_order_rdp_epsilon(history: History, delta: float, orders: Sequence[int] = range(2, 256)) -> float:
    best = math.inf
    for alpha in orders:
        rdp = sum(steps * _log_a_integer(q, sigma, alpha) / (alpha - 1) for sigma, q, steps in history)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return max(best, 0.0)
