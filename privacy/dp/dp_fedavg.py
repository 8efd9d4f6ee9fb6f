"""User-level DP-FedAvg on the client side: clip the whole update, add this client's share of noise.

McMahan, Ramage, Talwar, Zhang 2018, "Learning differentially private recurrent language models"
(ICLR): each round samples clients, clips each client's whole model update to L2 norm ``S`` and adds
Gaussian noise of std ``sigma * S`` to the sum of clipped updates. Here nobody may see the un-noised
sum (it is aggregated under encryption), so each client adds a *share* of that noise before it
encrypts: independent Gaussian shares with variance ``sigma^2 S^2 / k`` sum, over ``k`` clients, to
noise of variance exactly ``sigma^2 S^2``.

Dropouts. The number of clients whose updates reach the aggregate is known only when the round
closes, but the shares are drawn before. Each client therefore adds the share for the *minimum*
number of survivors ``k`` the round accepts (``min_survivors``, fixed when the round opens from the
number sampled and the minimum completion rate). With ``s >= k`` survivors the sum carries noise of
std ``sigma * S * sqrt(s / k) >= sigma * S``: the accountant, which composes ``sigma`` per round (the
ledger's round record), is exact at ``s = k`` and conservative above. A round with ``s < k``
survivors carries less noise than accounted and must not be decrypted or released:
``aggregate_noise_std`` raises for it.

Sensitivity. Adding or removing one user changes the sum of clipped updates by at most ``S`` only if
each client's update enters the sum with weight at most 1: sum clipped updates unweighted (or with
weights capped at 1) and divide by a fixed denominator (``fixed_denominator_average``: the expected
number of clients, McMahan et al.'s estimator ``f_f``), not by the actual count, which is itself
data-dependent and un-noised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from privacy.errors import PrivacyError


def _positive(value: float, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise PrivacyError(f"{name} = {value!r}: expected a finite number > 0")
    return float(value)


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise PrivacyError(f"{name} = {value!r}: expected an integer >= 1")
    return int(value)


@dataclass(frozen=True)
class DPFedAvgConfig:
    """User-level DP parameters of a federated run (validated at construction)."""

    noise_multiplier: float  # sigma: noise std on the sum of clipped updates, in units of clip_norm
    clip_norm: float  # S: L2 bound on one client's whole update
    client_sampling_rate: float  # q: each client takes part in a round with this probability
    min_completion_rate: float = 1.0  # the round is released only if this fraction of the sampled report

    def __post_init__(self) -> None:
        _positive(self.noise_multiplier, "noise_multiplier")
        _positive(self.clip_norm, "clip_norm")
        q = self.client_sampling_rate
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
            raise PrivacyError(f"client_sampling_rate = {q!r}: expected a number in (0, 1]")
        rate = self.min_completion_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
            raise PrivacyError(f"min_completion_rate = {rate!r}: expected a number in (0, 1]")

    def min_survivors(self, num_sampled: int) -> int:
        return min_survivors_for(num_sampled=num_sampled, min_completion_rate=self.min_completion_rate)


def min_survivors_for(*, num_sampled: int, min_completion_rate: float) -> int:
    """The fewest clients a round of ``num_sampled`` may close with: ``ceil(rate * num_sampled)``, >= 1."""
    _count(num_sampled, "num_sampled")
    if not 0 < min_completion_rate <= 1:
        raise PrivacyError(f"min_completion_rate = {min_completion_rate!r}: expected a number in (0, 1]")
    # The small tolerance keeps 0.8 * 10 at 8, not 9 from floating-point error.
    return max(1, math.ceil(min_completion_rate * num_sampled - 1e-9))


def poisson_sample_clients(clients: Sequence, *, rate: float, rng: np.random.Generator) -> list:
    """Each client independently with probability ``rate`` (the sampling the accountant assumes)."""
    if not 0 < rate <= 1:
        raise PrivacyError(f"client_sampling_rate = {rate!r}: expected a number in (0, 1]")
    chosen = rng.random(len(clients)) < rate
    return [client for client, keep in zip(clients, chosen) if keep]


def update_norm(update: Sequence[torch.Tensor]) -> float:
    """L2 norm of a whole update (all tensors together), computed in float64."""
    total = sum(float(torch.sum(t.detach().to(torch.float64) ** 2)) for t in update)
    return math.sqrt(total)


def clip_update(update: Sequence[torch.Tensor], *, clip_norm: float) -> tuple[list[torch.Tensor], float]:
    """Scale the whole update to L2 norm at most ``clip_norm``; returns (new tensors, original norm).

    The input tensors are not modified. A non-finite norm is an error, never passed on.
    """
    clip = _positive(clip_norm, "clip_norm")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise PrivacyError(f"update norm is {norm}: the update has non-finite values and cannot be clipped")
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [t.detach() * factor for t in update], norm


def noise_share_std(*, noise_multiplier: float, clip_norm: float, min_survivors: int) -> float:
    """Std of one client's noise share: ``sigma * S / sqrt(min_survivors)``."""
    sigma = _positive(noise_multiplier, "noise_multiplier")
    clip = _positive(clip_norm, "clip_norm")
    k = _count(min_survivors, "min_survivors")
    return sigma * clip / math.sqrt(k)


def aggregate_noise_std(
    *, noise_multiplier: float, clip_norm: float, min_survivors: int, survivors: int
) -> float:
    """Std of the noise on the sum of ``survivors`` clients' shares: ``sigma * S * sqrt(s / k)``.

    Raises:
        PrivacyError: ``survivors < min_survivors``: the sum carries less noise than the accountant
            assumes; the round must not be released.
    """
    share = noise_share_std(
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, min_survivors=min_survivors
    )
    s = _count(survivors, "survivors")
    if s < min_survivors:
        raise PrivacyError(
            f"survivors = {s}: fewer than min_survivors = {min_survivors}; the aggregate carries less noise than "
            "accounted and must not be released"
        )
    return share * math.sqrt(s)


def effective_noise_multiplier(*, noise_multiplier: float, min_survivors: int, survivors: int) -> float:
    """The noise multiplier the round actually had: ``sigma * sqrt(s / k)`` (>= the accounted sigma)."""
    return aggregate_noise_std(
        noise_multiplier=noise_multiplier, clip_norm=1.0, min_survivors=min_survivors, survivors=survivors
    )


def add_noise_share(
    clipped: Sequence[torch.Tensor],
    *,
    noise_multiplier: float,
    clip_norm: float,
    min_survivors: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Return ``clipped`` plus independent N(0, sigma^2 S^2 / k) noise on every coordinate (new tensors).

    ``generator``: for reproducible simulations; in deployment leave it None (or pass a generator
    seeded from ``os.urandom``) so nobody can predict, and subtract, the noise.
    """
    std = noise_share_std(noise_multiplier=noise_multiplier, clip_norm=clip_norm, min_survivors=min_survivors)
    noised = []
    for tensor in clipped:
        if not tensor.is_floating_point():
            raise PrivacyError(f"update tensor of dtype {tensor.dtype}: expected a floating-point tensor")
        noise = torch.normal(
            0.0, std, size=tuple(tensor.shape), generator=generator, dtype=tensor.dtype, device=tensor.device
        )
        noised.append(tensor.detach() + noise)
    return noised


@dataclass(frozen=True)
class PrivatizedUpdate:
    """A client's update after clipping and its noise share; ready to quantise and encrypt."""

    tensors: list[torch.Tensor]
    norm: float  # L2 norm before clipping (stays with the client: it is not private)
    clipped: bool


def privatize_update(
    update: Sequence[torch.Tensor],
    *,
    noise_multiplier: float,
    clip_norm: float,
    min_survivors: int,
    generator: torch.Generator | None = None,
) -> PrivatizedUpdate:
    """Clip the whole update to ``clip_norm`` and add this client's noise share (for ``min_survivors``).

    Record the round in the privacy ledger before the returned tensors leave the client.
    """
    clipped, norm = clip_update(update, clip_norm=clip_norm)
    tensors = add_noise_share(
        clipped,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        min_survivors=min_survivors,
        generator=generator,
    )
    return PrivatizedUpdate(tensors, norm, norm > clip_norm)


def capped_weight(num_examples: int, *, weight_cap: float | None) -> float:
    """McMahan et al.'s client weight ``min(n / w_hat, 1)``: at most 1, so a weighted clipped update
    still changes the sum by at most ``S``; ``weight_cap=None`` weighs every client 1."""
    count = int(num_examples)
    if count < 0:
        raise PrivacyError(f"num_examples = {num_examples!r}: expected an integer >= 0")
    if weight_cap is None:
        return 1.0
    cap = _positive(weight_cap, "weight_cap")
    return min(count / cap, 1.0)


def fixed_denominator_average(
    noised_sum: Sequence[torch.Tensor], *, expected_clients: float
) -> list[torch.Tensor]:
    """Average with the fixed denominator ``q * N`` (McMahan et al.'s ``f_f``): post-processing only."""
    denominator = _positive(expected_clients, "expected_clients")
    return [t / denominator for t in noised_sum]
