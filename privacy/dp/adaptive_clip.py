"""Adaptive clipping for user-level DP-FedAvg (Andrew, Thakkar, McMahan, Ramaswamy 2021,
"Differentially Private Learning with Adaptive Clipping", NeurIPS; as TFF and Flower ship it).

Each round every sampled client reports one bit, ``b = 1`` when its update's L2 norm was at most the
round's clip ``C``. The bits are centred (``b - 1/2``, so that adding or removing one user moves their
sum by at most 1/2) and their sum carries Gaussian noise of std ``sigma_b``; the noised fraction is

    b_bar = (sum(b_i - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2

with ``q N`` the expected number of clients (never the realised count), and the clip moves
geometrically towards the ``gamma`` quantile of the update norms:

    C <- C * exp(-eta_C * (b_bar - gamma)).

The count is a second Gaussian mechanism on the same users in the same round. Theorem 1 of the paper:
releasing the update sum with noise multiplier ``sigma_delta`` and the count with ``sigma_b`` has the
privacy of one Gaussian mechanism with multiplier ``sigma`` when

    sigma^-2 = sigma_delta^-2 + (2 sigma_b)^-2,   i.e.  sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2),

which needs ``2 sigma_b > sigma``. The ledger therefore accounts each round at ``sigma`` (unchanged),
while clients noise their updates at the larger ``sigma_delta``. Pure functions only; the round logic
lives in fedrec.federated.user_dp.
"""

from __future__ import annotations

import math

from privacy.errors import PrivacyError


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 < value < math.inf):
        raise PrivacyError(f"{name} = {value!r}: expected a finite number > 0")
    return value


def update_noise_multiplier(*, noise_multiplier: float, count_noise_multiplier: float) -> float:
    """``sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``: the update's multiplier so that the update
    and the clipped-count release together cost one Gaussian mechanism with multiplier ``sigma``.

    Raises:
        PrivacyError: a non-positive or non-finite multiplier, or ``2 sigma_b <= sigma`` (the count
            alone would then cost at least the whole budget).
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier)
    sigma_b = _check_positive("count_noise_multiplier", count_noise_multiplier)
    if not 2.0 * sigma_b > sigma:
        raise PrivacyError(
            f"count_noise_multiplier = {sigma_b!r}: expected above noise_multiplier / 2 = {sigma / 2:.6g} "
            "(2 sigma_b > sigma, Andrew et al. 2021 Theorem 1)"
        )
    remaining = sigma**-2 - (2.0 * sigma_b) ** -2
    if not remaining > 0.0:  # rounding at the boundary
        raise PrivacyError(f"count_noise_multiplier = {sigma_b!r}: too close to noise_multiplier / 2")
    return remaining**-0.5


def effective_noise_multiplier(*, update_noise_multiplier: float, count_noise_multiplier: float) -> float:
    """The inverse: ``sigma = (sigma_delta^-2 + (2 sigma_b)^-2)^(-1/2)``."""
    sigma_delta = _check_positive("update_noise_multiplier", update_noise_multiplier)
    sigma_b = _check_positive("count_noise_multiplier", count_noise_multiplier)
    return float((sigma_delta**-2 + (2.0 * sigma_b) ** -2) ** -0.5)


def check_quantile_params(*, target_quantile: float, clip_lr: float) -> None:
    """``gamma`` in (0, 1), ``eta_C`` finite and > 0 (PrivacyError otherwise)."""
    if not 0.0 < float(target_quantile) < 1.0:
        raise PrivacyError(f"target_quantile = {target_quantile!r}: expected a number in (0, 1)")
    _check_positive("clip_lr", clip_lr)


def unclipped_bit(norm: float, clip_norm: float) -> float:
    """A client's centred bit: ``+1/2`` when its update norm was at most ``C``, ``-1/2`` otherwise."""
    return 0.5 if float(norm) <= float(clip_norm) else -0.5


def noised_fraction(*, noised_centred_sum: float, expected_clients: float) -> float:
    """``b_bar = noised sum of (b - 1/2) / (q N) + 1/2``, clamped to [0, 1] (post-processing)."""
    expected = _check_positive("expected_clients", expected_clients)
    if not math.isfinite(noised_centred_sum):
        raise PrivacyError(f"noised clipped count = {noised_centred_sum!r}: expected a finite number")
    return min(1.0, max(0.0, float(noised_centred_sum) / expected + 0.5))


def next_clip(
    *, clip_norm: float, unclipped_fraction: float, target_quantile: float, clip_lr: float
) -> float:
    """The geometric update ``C * exp(-eta_C * (b_bar - gamma))``."""
    clip = _check_positive("clip_norm", clip_norm)
    check_quantile_params(target_quantile=target_quantile, clip_lr=clip_lr)
    if not 0.0 <= float(unclipped_fraction) <= 1.0:
        raise PrivacyError(f"unclipped_fraction = {unclipped_fraction!r}: expected a number in [0, 1]")
    new = clip * math.exp(-float(clip_lr) * (float(unclipped_fraction) - float(target_quantile)))
    return _check_positive("next clip_norm", new)
