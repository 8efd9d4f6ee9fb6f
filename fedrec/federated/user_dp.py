"""User-level DP-FedAvg in the federated simulation (``fl.user_dp``).

McMahan, Ramage, Talwar, Zhang 2018, "Learning differentially private recurrent language models"
(ICLR). Each round samples every client independently with probability ``q`` (Poisson sampling,
which the accountant assumes), each sampled client clips its whole update to L2 norm ``S`` and the
sum carries Gaussian noise of std ``sigma * S``; the average divides by the expected number of
clients ``q N``, never by the realised count. One round is one sampled Gaussian step for neighbouring
datasets that differ in one user's entire data (privacy.accounting.user_level).

Nobody may see the un-noised sum, so the noise comes from the clients: each adds an independent
share for the round's minimum number of survivors ``k`` (privacy.dp.dp_fedavg), fixed when the round
opens and recorded in the privacy ledger before any client trains. A round that closes with fewer
than ``k`` survivors carries less noise than accounted and is never released (retried or stopped).

This module holds the pure parts the aggregator, the client tasks and the key-holding apply task
share: the resolved plan, the Poisson sample, a client's privatisation and the released mean.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec.config.schema import FLConfig
from fedrec.errors import ConfigError
from privacy.dp.dp_fedavg import (
    aggregate_noise_std,
    clip_update,
    fixed_denominator_average,
    min_survivors_for,
    noise_share_std,
    poisson_sample_clients,
)
from privacy.dp.noise import GaussianNoise

_SAMPLE_SALT = 0xD5  # keys the Poisson client sample: (seed, round, attempt, salt)
_NOISE_SALT = 0xD7  # keys a client's noise share: (seed, round, attempt, client, salt)


@dataclass(frozen=True)
class RoundNoise:
    """A round attempt's user-level parameters, fixed when it opens (the ledger's round record)."""

    round_idx: int
    attempt: int
    noise_multiplier: float  # sigma: noise std on the sum over clip_norm, with min_survivors shares
    clip_norm: float  # S
    client_sampling_rate: float  # q
    num_sampled: int
    min_survivors: int  # k: each client adds the share for k survivors
    expected_clients: float  # q N: the fixed denominator
    secure_mode: bool  # noise shares from the OS CSPRNG
    # Seeded shares: 64 bits of the run's config fingerprint, so that two runs that differ in any
    # config setting (noise, clip, learning rate, data file, ...) never draw the same shares (the same config
    # on changed data does: docs/federated.md).
    run_key: int = 0


@dataclass(frozen=True)
class UserDPPlan:
    """``fl.user_dp`` resolved for a run of ``num_clients`` clients and ``planned_rounds`` rounds."""

    noise_multiplier: float
    clip_norm: float
    client_sampling_rate: float
    num_clients: int
    delta: float
    accountant: str
    epsilon_budget: float | None
    planned_rounds: int
    planned_epsilon: float
    noise_source: str  # 'config' or 'target_epsilon'
    delta_source: str  # 'config' or '0.1/N'
    secure_mode: bool

    @property
    def expected_clients(self) -> float:
        return self.client_sampling_rate * self.num_clients

    def round_noise(
        self, round_idx: int, attempt: int, *, num_sampled: int, min_completion_rate: float, run_key: int = 0
    ) -> RoundNoise:
        """The round's parameters; an empty sample gets ``min_survivors = 1`` (it can never be released)."""
        k = (
            min_survivors_for(num_sampled=num_sampled, min_completion_rate=min_completion_rate)
            if num_sampled
            else 1
        )
        return RoundNoise(
            round_idx=round_idx,
            attempt=attempt,
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            client_sampling_rate=self.client_sampling_rate,
            num_sampled=num_sampled,
            min_survivors=k,
            expected_clients=self.expected_clients,
            secure_mode=self.secure_mode,
            run_key=run_key,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "noise_source": self.noise_source,
            "clip_norm": self.clip_norm,
            "client_sampling_rate": self.client_sampling_rate,
            "expected_clients_per_round": self.expected_clients,
            "num_clients": self.num_clients,
            "delta": self.delta,
            "delta_source": self.delta_source,
            "accountant": self.accountant,
            "epsilon_budget": self.epsilon_budget,
            "planned_rounds": self.planned_rounds,
            "planned_epsilon": self.planned_epsilon,
            "secure_mode": self.secure_mode,
        }


def client_sampling_rate(client_num_per_round: int, num_clients: int) -> float:
    """``q = fl.client_num_per_round / clients``: the expected clients per round is ``client_num_per_round``."""
    if num_clients < 1 or not 1 <= client_num_per_round <= num_clients:
        raise ConfigError(
            f"config key 'fl.client_num_per_round' = {client_num_per_round!r}: expected 1 to the "
            f"number of clients ({num_clients})"
        )
    return client_num_per_round / num_clients


def user_delta(fl: FLConfig, num_clients: int) -> tuple[float, str]:
    """``fl.user_dp.delta`` (or 0.1/N), checked to be below 1/N for N clients."""
    assert fl.user_dp is not None
    delta = fl.user_dp.delta
    source = "config"
    if delta is None:
        delta, source = 0.1 / num_clients, "0.1/N"
    if not 0 < delta < 1.0 / num_clients:
        raise ConfigError(
            f"config key 'fl.user_dp.delta' = {delta!r}: expected below 1/number of clients = "
            f"{1.0 / num_clients:.3g} ({num_clients} clients)"
        )
    return delta, source


def resolve_plan(fl: FLConfig, num_clients: int, *, planned_rounds: int | None = None) -> UserDPPlan:
    """Noise multiplier (given, or for ``fl.user_dp.target_epsilon`` over the planned rounds), q, delta.

    Raises:
        ConfigError: a delta at or above 1/N, a target no noise reaches, a budget below one round.
    """
    from privacy.accounting.user_level import noise_multiplier_for, user_level_epsilon
    from privacy.errors import PrivacyError

    user_dp = fl.user_dp
    assert user_dp is not None
    rounds = fl.rounds if planned_rounds is None else planned_rounds
    q = client_sampling_rate(fl.client_num_per_round, num_clients)
    delta, delta_source = user_delta(fl, num_clients)
    if user_dp.noise_multiplier is not None:
        sigma, noise_source = float(user_dp.noise_multiplier), "config"
    else:
        assert user_dp.target_epsilon is not None
        try:
            sigma = noise_multiplier_for(
                target_epsilon=user_dp.target_epsilon,
                sample_rate=q,
                steps=rounds,
                delta=delta,
                accountant=user_dp.accountant,
            )
        except PrivacyError as err:
            raise ConfigError(f"config key 'fl.user_dp.target_epsilon': {err}") from None
        noise_source = "target_epsilon"
    try:
        planned = user_level_epsilon([(sigma, q)] * rounds, delta=delta, accountant=user_dp.accountant)
    except (PrivacyError, MemoryError, ValueError, OverflowError) as err:
        raise ConfigError(
            f"config key 'fl.user_dp.accountant' = {user_dp.accountant!r}: cannot account {rounds} rounds at "
            f"noise_multiplier {sigma:.4g}, q {q:.4g} ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "try accountant rdp or more noise"
        ) from None
    budget = user_dp.epsilon_budget
    if budget is not None:
        one_round = user_level_epsilon([(sigma, q)], delta=delta, accountant=user_dp.accountant)
        if one_round > budget:
            raise ConfigError(
                f"config key 'fl.user_dp.epsilon_budget' = {budget!r}: below the cost of one round "
                f"({one_round:.4g} with noise_multiplier {sigma:.4g}, q {q:.4g}, delta {delta:.3g})"
            )
    return UserDPPlan(
        noise_multiplier=sigma,
        clip_norm=float(user_dp.clip_norm),
        client_sampling_rate=q,
        num_clients=num_clients,
        delta=delta,
        accountant=user_dp.accountant,
        epsilon_budget=budget,
        planned_rounds=rounds,
        planned_epsilon=planned,
        noise_source=noise_source,
        delta_source=delta_source,
        secure_mode=user_dp.secure_mode,
    )


def check_plan_within_budget(plan: UserDPPlan) -> None:
    """A fresh run whose planned rounds exceed ``fl.user_dp.epsilon_budget`` does not start."""
    budget = plan.epsilon_budget
    if budget is not None and plan.planned_epsilon > budget:
        raise ConfigError(
            f"config key 'fl.user_dp.epsilon_budget' = {budget!r}: the plan ({plan.planned_rounds} rounds, "
            f"noise_multiplier {plan.noise_multiplier:.4g}, q {plan.client_sampling_rate:.4g}) reaches user-level "
            f"epsilon {plan.planned_epsilon:.4g}; lower fl.rounds or raise the noise"
        )


def poisson_sample(
    seed: int, round_idx: int, attempt: int, *, num_clients: int, rate: float, key: bytes | None = None
) -> list[int]:
    """Client ids ``0..num_clients-1``, each kept with probability ``rate``.

    Without ``key``: keyed by (seed, round, attempt), reproducible, and so predictable by anyone who
    knows the seed. With ``key`` (``fl.user_dp.secure_mode``: 32 bytes from the OS CSPRNG, drawn when
    the aggregator starts and never written out): client ``c`` is kept when the first 64 bits of
    HMAC-SHA256(key, "round:attempt:c") fall below ``rate * 2^64``, a pseudorandom function of a secret
    key, so the sample that the amplification by sampling in the accountant relies on stays secret.
    """
    if key is not None:
        if len(key) < 16:
            raise ValueError("client-sampling key: expected at least 16 bytes")
        threshold = rate * 2.0**64
        kept = []
        for client in range(num_clients):
            digest = hmac.new(key, f"{round_idx}:{attempt}:{client}".encode(), hashlib.sha256).digest()
            if int.from_bytes(digest[:8], "little") < threshold:
                kept.append(client)
        return kept
    rng = np.random.default_rng([seed, round_idx, attempt, _SAMPLE_SALT])
    return [int(c) for c in poisson_sample_clients(range(num_clients), rate=rate, rng=rng)]


def max_poisson_sample(rate: float, num_clients: int) -> int:
    """Clients an encrypted sum must hold: the mean plus 7 standard deviations of the Poisson sample
    size (exceeded with probability below 1e-11 per round), at most every client. A client beyond
    it is rejected by the aggregator and counts as a dropout."""
    mean = rate * num_clients
    return min(num_clients, math.ceil(mean + 7.0 * math.sqrt(mean * (1.0 - rate))) + 1)


def privatize(update: np.ndarray, noise: RoundNoise, *, seed: int, client_id: int) -> tuple[np.ndarray, bool]:
    """Clip the whole update to ``S`` and add this client's share N(0, sigma^2 S^2 / k) on every coordinate.

    The computation of ``privacy.dp.dp_fedavg.privatize_update``, with its noise drawn from
    ``privacy.dp.noise.GaussianNoise``: seeded per (seed, round, attempt, client) for reproducible
    simulations, or from the OS CSPRNG with ``fl.user_dp.secure_mode``. Returns (float64 update,
    whether it was clipped).
    """
    flat = torch.from_numpy(np.ascontiguousarray(update, dtype=np.float64))
    (clipped,), norm = clip_update([flat], clip_norm=noise.clip_norm)
    std = noise_share_std(
        noise_multiplier=noise.noise_multiplier, clip_norm=noise.clip_norm, min_survivors=noise.min_survivors
    )
    if noise.secure_mode:
        source = GaussianNoise(secure_mode=True)
    else:
        key = np.random.SeedSequence(
            [seed, noise.run_key, noise.round_idx, noise.attempt, client_id, _NOISE_SALT]
        )
        source = GaussianNoise(seed=int(key.generate_state(1, np.uint64)[0] >> np.uint64(2)))
    shares = source.normal(tuple(clipped.shape), dtype=torch.float64) * std
    return (clipped + shares).numpy(), norm > noise.clip_norm


def check_release(noise: RoundNoise, *, survivors: int) -> float:
    """The noise std of a round closed with ``survivors`` clients; PrivacyError when it must not be
    released (fewer than ``k`` survivors: less noise than the ledger accounts)."""
    from privacy.errors import PrivacyError

    if survivors < 1:
        raise PrivacyError(f"round {noise.round_idx}: no client survived; nothing may be released")
    return aggregate_noise_std(
        noise_multiplier=noise.noise_multiplier,
        clip_norm=noise.clip_norm,
        min_survivors=noise.min_survivors,
        survivors=survivors,
    )


def released_mean(mean: np.ndarray, total_weight: float, noise: RoundNoise) -> np.ndarray:
    """The noised sum over the fixed denominator ``q N`` (every client weighs 1, so sum = mean x weight)."""
    noised_sum = torch.from_numpy(np.asarray(mean, dtype=np.float64) * float(total_weight))
    (average,) = fixed_denominator_average([noised_sum], expected_clients=noise.expected_clients)
    return average.numpy()


def required_encryption_clip(plan: UserDPPlan, *, min_survivors: int) -> float:
    """Per-coordinate encryption clip that holds a clipped update plus 6 std of a noise share.

    A coordinate beyond ``fl.encryption.clip`` would be clamped before encryption, which is not the
    Gaussian mechanism the ledger accounts; a client whose noised update does not fit refuses to send.
    """
    return plan.clip_norm * (1.0 + 6.0 * plan.noise_multiplier / math.sqrt(max(1, min_survivors)))
