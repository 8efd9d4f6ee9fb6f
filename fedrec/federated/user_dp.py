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

With ``fl.user_dp.adaptive_clip`` (Andrew et al. 2021; privacy.dp.adaptive_clip) the clip follows a
quantile of the update norms: each client also reports its centred "unclipped" bit plus a noise share
of the count noise ``sigma_b`` (plaintext mode only), the aggregator releases the noised count and
moves the clip for the next round; updates are noised at ``sigma_delta`` so that update and count
together cost one Gaussian mechanism at the ledger's ``sigma``.

This module holds the pure parts the aggregator, the client tasks and the key-holding apply task
share: the resolved plan, the Poisson sample, a client's privatisation and the released mean.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec.config.schema import FLConfig
from fedrec.errors import ConfigError, FedrecError
from privacy.dp.adaptive_clip import (
    next_clip,
    noised_fraction,
    update_noise_multiplier,
)
from privacy.dp.dp_fedavg import (
    aggregate_noise_std,
    clip_update,
    fixed_denominator_average,
    min_survivors_for,
    noise_share_std,
)
from privacy.dp.noise import GaussianNoise

_SAMPLE_SALT = 0xD5  # keys the Poisson client sample: (seed, round, attempt, salt)
_NOISE_SALT = 0xD7  # keys a client's noise share: (seed, round, attempt, client, salt)
_COUNT_SALT = 0xD9  # keys a client's share of the clipped-count noise (fl.user_dp.adaptive_clip)


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
    # fl.user_dp.adaptive_clip: the update's multiplier sigma_delta > sigma and the count's sigma_b;
    # noise_multiplier stays the effective sigma the ledger accounts (None: fixed clipping).
    update_noise_multiplier: float | None = None
    count_noise_multiplier: float | None = None

    @property
    def update_sigma(self) -> float:
        """The multiplier of the noise on the update sum (sigma, or sigma_delta with adaptive clipping)."""
        return self.noise_multiplier if self.update_noise_multiplier is None else self.update_noise_multiplier


@dataclass(frozen=True)
class AdaptiveClipPlan:
    """``fl.user_dp.adaptive_clip`` resolved: the noise split and the quantile update's parameters."""

    target_quantile: float
    clip_lr: float
    count_noise_multiplier: float  # sigma_b
    update_noise_multiplier: float  # sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)
    initial_clip: float
    count_noise_source: str  # 'config' or 'expected clients / 20'


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
    adaptive: AdaptiveClipPlan | None = None

    @property
    def expected_clients(self) -> float:
        return self.client_sampling_rate * self.num_clients

    def round_noise(
        self,
        round_idx: int,
        attempt: int,
        *,
        num_sampled: int,
        min_completion_rate: float,
        run_key: int = 0,
        clip_norm: float | None = None,
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
            clip_norm=self.clip_norm if clip_norm is None else float(clip_norm),
            client_sampling_rate=self.client_sampling_rate,
            num_sampled=num_sampled,
            min_survivors=k,
            expected_clients=self.expected_clients,
            secure_mode=self.secure_mode,
            run_key=run_key,
            update_noise_multiplier=self.adaptive.update_noise_multiplier if self.adaptive else None,
            count_noise_multiplier=self.adaptive.count_noise_multiplier if self.adaptive else None,
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
            "adaptive_clip": dataclasses.asdict(self.adaptive) if self.adaptive else None,
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
    adaptive = resolve_adaptive(fl, sigma=sigma, expected_clients=q * num_clients)
    return UserDPPlan(
        adaptive=adaptive,
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


def resolve_adaptive(fl: FLConfig, *, sigma: float, expected_clients: float) -> AdaptiveClipPlan | None:
    """``fl.user_dp.adaptive_clip`` resolved for the run's sigma (ConfigError when 2 sigma_b <= sigma)."""
    from privacy.errors import PrivacyError

    assert fl.user_dp is not None
    cfg = fl.user_dp.adaptive_clip
    if cfg is None:
        return None
    if fl.secure:
        raise ConfigError(
            "config key 'fl.user_dp.adaptive_clip': not supported with fl.secure = true yet; "
            "set it to null or fl.secure = false"
        )
    if cfg.count_noise_multiplier is None:
        sigma_b, source = expected_clients / 20.0, "expected clients / 20"
    else:
        sigma_b, source = float(cfg.count_noise_multiplier), "config"
    try:
        sigma_delta = update_noise_multiplier(noise_multiplier=sigma, count_noise_multiplier=sigma_b)
    except PrivacyError as err:
        raise ConfigError(
            f"config key 'fl.user_dp.adaptive_clip.count_noise_multiplier' = {cfg.count_noise_multiplier!r} "
            f"({source}: {sigma_b:.4g}): {err}"
        ) from None
    return AdaptiveClipPlan(
        target_quantile=float(cfg.target_quantile),
        clip_lr=float(cfg.clip_lr),
        count_noise_multiplier=sigma_b,
        update_noise_multiplier=sigma_delta,
        initial_clip=float(fl.user_dp.clip_norm if cfg.initial_clip is None else cfg.initial_clip),
        count_noise_source=source,
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
    """Client ids ``0..num_clients-1``, each kept independently with probability ``rate``.

    The kept ids are walked by geometric gaps (``1 + floor(log(u) / log(1 - rate))`` for uniform
    ``u`` in (0, 1]), which is the same Bernoulli(rate) sample as one draw per client, at a cost of
    O(kept clients), not O(num_clients): a round of 100 out of a million users draws ~100 numbers.

    Without ``key``: the uniforms come from a generator keyed by (seed, round, attempt), reproducible
    and so predictable by anyone who knows the seed. With ``key`` (``fl.user_dp.secure_mode``: 32
    bytes from the OS CSPRNG, drawn when the aggregator starts and never written out): they come
    from HMAC-SHA256(key, "round:attempt:block") in counter mode (4 uniforms of 53 bits per block), a
    pseudorandom function of a secret key, so the sample that the accountant's amplification by
    sampling relies on stays secret. The sample of an attempt is computed once and cached (the
    aggregator draws it and the user-DP bookkeeping checks it).
    """
    if key is not None and len(key) < 16:
        raise ValueError("client-sampling key: expected at least 16 bytes")
    if not 0 < rate <= 1:
        raise ValueError(f"client_sampling_rate = {rate!r}: expected a number in (0, 1]")
    return list(_cached_sample(int(seed), int(round_idx), int(attempt), int(num_clients), float(rate), key))


@functools.lru_cache(maxsize=8)
def _cached_sample(
    seed: int, round_idx: int, attempt: int, num_clients: int, rate: float, key: bytes | None
) -> tuple[int, ...]:
    if rate >= 1.0:
        return tuple(range(num_clients))
    if key is None:
        rng = np.random.default_rng([seed, round_idx, attempt, _SAMPLE_SALT])

        def uniforms(block: int, count: int) -> np.ndarray:
            return 1.0 - rng.random(count)  # (0, 1]

    else:

        def uniforms(block: int, count: int) -> np.ndarray:
            digests = b"".join(
                hmac.new(key, f"{round_idx}:{attempt}:{block}:{i}".encode(), hashlib.sha256).digest()
                for i in range((count + 3) // 4)
            )
            words = np.frombuffer(digests, dtype="<u8")[:count]
            return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]

    log_miss = math.log1p(-rate)
    expected = rate * num_clients
    chunk = max(64, int(expected + 4.0 * math.sqrt(expected) + 16))
    kept: list[np.ndarray] = []
    position = -1  # id of the last kept client
    block = 0
    while True:
        gaps = 1 + np.floor(np.log(uniforms(block, chunk)) / log_miss)
        ids = position + np.cumsum(np.minimum(gaps, num_clients + 1).astype(np.int64))
        inside = ids[ids < num_clients]
        kept.append(inside)
        if len(inside) < chunk:
            break
        position = int(inside[-1])
        block += 1
    return tuple(int(c) for c in np.concatenate(kept))


def max_poisson_sample(rate: float, num_clients: int) -> int:
    """Clients an encrypted sum must hold: the mean plus 7 standard deviations of the Poisson sample
    size (exceeded with probability below 1e-11 per round), at most every client. A client beyond
    it is rejected by the aggregator and counts as a dropout."""
    mean = rate * num_clients
    return min(num_clients, math.ceil(mean + 7.0 * math.sqrt(mean * (1.0 - rate))) + 1)


def privatize(
    update: np.ndarray, noise: RoundNoise, *, seed: int, client_id: int, weight: float = 1.0
) -> tuple[np.ndarray, bool]:
    """Clip the whole update to ``S``, scale it by ``weight`` (at most 1) and add this client's share
    N(0, sigma^2 S^2 / k) on every coordinate.

    The computation of ``privacy.dp.dp_fedavg.privatize_update``, with its noise drawn from
    ``privacy.dp.noise.GaussianNoise``: seeded per (seed, round, attempt, client) for reproducible
    simulations, or from the OS CSPRNG with ``fl.user_dp.secure_mode``. ``weight`` is
    ``capped_weight`` (fl.user_dp.weight_cap); above 1 it would break the sensitivity ``S`` the noise
    is calibrated to, so it is refused. Returns (float64 update, whether it was clipped).
    """
    from privacy.errors import PrivacyError

    if not 0.0 <= weight <= 1.0:
        raise PrivacyError(
            f"client {client_id}: user weight {weight!r}: expected 0 <= weight <= 1 (sensitivity S)"
        )
    flat = torch.from_numpy(np.ascontiguousarray(update, dtype=np.float64))
    (clipped,), norm = clip_update([flat], clip_norm=noise.clip_norm)
    clipped = clipped * weight
    std = noise_share_std(
        noise_multiplier=noise.update_sigma, clip_norm=noise.clip_norm, min_survivors=noise.min_survivors
    )
    source = client_noise_source(noise, seed=seed, client_id=client_id, salt=_NOISE_SALT)
    shares = source.normal(tuple(clipped.shape), dtype=torch.float64) * std
    return (clipped + shares).numpy(), norm > noise.clip_norm


def client_noise_source(noise: RoundNoise, *, seed: int, client_id: int, salt: int) -> GaussianNoise:
    """A client's Gaussian source for one share: the OS CSPRNG with ``fl.user_dp.secure_mode``, else
    seeded per (seed, run, round, attempt, client, salt) for reproducible simulations."""
    if noise.secure_mode:
        return GaussianNoise(secure_mode=True)
    key = np.random.SeedSequence([seed, noise.run_key, noise.round_idx, noise.attempt, client_id, salt])
    return GaussianNoise(seed=int(key.generate_state(1, np.uint64)[0] >> np.uint64(2)))


NORM_BOUND_SIGMAS = 10.0  # slack of the server's norm bound on a noised update: P(honest above) < 1e-21


def update_norm_bound(noise: RoundNoise, size: int) -> float:
    """The largest L2 norm an honest client's noised update of ``size`` values has, but for ~1e-21.

    The clipped update has norm at most S; its noise share (std s on each coordinate) has norm
    s * chi_size, and P(chi_size > sqrt(size) + t) <= exp(-t^2 / 2) (Gaussian concentration of a
    1-Lipschitz function), so S + s (sqrt(size) + 10) bounds it. A plaintext server rejects more.
    """
    std = noise_share_std(
        min_survivors=noise.min_survivors,
        noise_multiplier=noise.update_sigma,  # adaptive clipping noises the update at sigma_delta
        clip_norm=noise.clip_norm,
    )
    return float(noise.clip_norm + std * (math.sqrt(size) + NORM_BOUND_SIGMAS))


def count_share(noise: RoundNoise, *, clipped: bool, seed: int, client_id: int) -> float:
    """fl.user_dp.adaptive_clip: this client's centred bit (+1/2 unclipped, -1/2 clipped) plus its share
    N(0, sigma_b^2 / k) of the count noise (the k survivors' shares sum to at least sigma_b^2)."""
    if noise.count_noise_multiplier is None:
        raise FedrecError(f"round {noise.round_idx}: no count noise: adaptive clipping is off")
    std = noise.count_noise_multiplier / math.sqrt(noise.min_survivors)
    source = client_noise_source(noise, seed=seed, client_id=client_id, salt=_COUNT_SALT)
    share = float(source.normal((1,), dtype=torch.float64)[0]) * std
    bit = -0.5 if clipped else 0.5  # privacy.dp.adaptive_clip.unclipped_bit of the update's norm
    return bit + share


def check_release(noise: RoundNoise, *, survivors: int) -> float:
    """The noise std of a round closed with ``survivors`` clients; PrivacyError when it must not be
    released (fewer than ``k`` survivors: less noise than the ledger accounts)."""
    from privacy.errors import PrivacyError

    if survivors < 1:
        raise PrivacyError(f"round {noise.round_idx}: no client survived; nothing may be released")
    return aggregate_noise_std(
        noise_multiplier=noise.update_sigma,
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


# --------------------------------------------------------------------------------------------------
# The aggregator's side of user-level rounds (the round engine calls these; any backend)
# --------------------------------------------------------------------------------------------------


class UserBudgetExhausted(Exception):
    """fl.user_dp: one more round would take the user-level epsilon past its budget; the run stops."""


class UserDPError(FedrecError):
    """The round does not match what fl.user_dp accounts for (its sample, its survivors)."""


def plan_for_run(
    fl: FLConfig,
    algorithm_cls: type[Any],
    num_clients: int,
    *,
    resume: bool,
    saved: dict[str, Any] | None,
) -> UserDPPlan:
    """fl.user_dp resolved and checked against the algorithm, the budget and the encryption grid.

    ``saved`` is the checkpoint's ``server_state['user_dp']`` on resume (None otherwise).
    """
    from fedrec.federated.worker import FederatedWorker

    if algorithm_cls.sample_neighbours is not FederatedWorker.sample_neighbours:
        raise ConfigError(
            f"config key 'fl.user_dp': algorithm {fl.algorithm!r} chooses its own clients "
            "(sample_neighbours); user-level accounting needs the built-in Poisson sampling"
        )
    assert fl.user_dp is not None
    extended = saved is not None and saved.get("planned_rounds") != fl.rounds
    if resume and fl.user_dp.target_epsilon is not None and extended:
        raise ConfigError(
            f"config key 'fl.rounds' = {fl.rounds}: this run's noise was computed from "
            f"fl.user_dp.target_epsilon for {saved.get('planned_rounds') if saved else None} rounds; "
            "it cannot be extended"
        )
    plan = resolve_plan(fl, num_clients)
    if not resume:
        check_plan_within_budget(plan)
    if fl.secure:
        # Size for a small Poisson sample (4 standard deviations below the mean), not the expected
        # one: fewer survivors mean larger shares, and a client whose noised update does not fit
        # refuses to send (a dropout that depends on its data).
        mean = plan.client_sampling_rate * num_clients
        low = max(1, math.floor(mean - 4.0 * math.sqrt(mean * (1.0 - plan.client_sampling_rate))))
        low_k = min_survivors_for(num_sampled=low, min_completion_rate=fl.min_completion_rate)
        needed = required_encryption_clip(plan, min_survivors=low_k)
        if fl.encryption.clip < needed:
            raise ConfigError(
                f"config key 'fl.encryption.clip' = {fl.encryption.clip!r}: below {needed:.3g}, the clip norm "
                f"{plan.clip_norm:g} plus 6 std of a noise share (noise_multiplier {plan.noise_multiplier:.3g}, "
                f"{low_k} survivors of a small sample of {low}); noised updates would not fit the encryption grid"
            )
    return plan


def check_resumed_plan(plan: UserDPPlan, saved: dict[str, Any] | None, path: str) -> None:
    """A resumed run keeps the noise it started with (target_epsilon was resolved for its rounds)."""
    if not saved or float(saved["noise_multiplier"]) != plan.noise_multiplier:
        raise ConfigError(
            f"{path}: --resume with another fl.user_dp noise multiplier "
            f"({plan.noise_multiplier:.6g}, the checkpoint has {saved.get('noise_multiplier') if saved else None})"
        )


class UserDPRounds:
    """Opens, checks and records the user-level rounds of one run (the aggregator's side).

    Args:
        plan: the resolved fl.user_dp plan.
        ledger: the run's privacy ledger (round records, the user-level budget).
        seed: the config seed (the Poisson sample outside secure mode).
        min_completion_rate: fl.min_completion_rate (fixes each round's ``k``).
        sample_key: fl.user_dp.secure_mode: the aggregator's secret sampling key.
        run_key: 64 bits of the config fingerprint (keys seeded noise shares to this config).
        server_state: the checkpoint's ``server_state['user_dp']`` (updated in place each round: the
            adaptive clip for the next round is saved with the round, so a resume continues exactly).
    """

    def __init__(
        self,
        plan: UserDPPlan,
        ledger: Any,
        *,
        seed: int,
        min_completion_rate: float,
        sample_key: bytes | None,
        run_key: int,
        server_state: dict[str, Any] | None = None,
    ):
        self.plan = plan
        self.ledger = ledger
        self.seed = seed
        self.min_completion_rate = min_completion_rate
        self.sample_key = sample_key
        self.run_key = run_key
        self.noise: RoundNoise | None = None  # the latest attempt's round parameters
        self.clipped: list[bool] = []  # per returned client of that attempt
        self.stopped_at_budget = False
        self.server_state = server_state if server_state is not None else {}
        self.count_sum = 0.0  # fl.user_dp.adaptive_clip: the returned clients' noised centred bits
        self.count_missing = False  # a returned client without its count share: the clip does not move
        if plan.adaptive is not None:
            self.server_state.setdefault("clip_norm", plan.adaptive.initial_clip)
        self.clip = float(self.server_state.get("clip_norm", plan.clip_norm))  # this round's clip

    def open_round(self, round_idx: int, attempt: int, sampled: Any) -> RoundNoise:
        """Before any client of this attempt trains: check the sample is the Poisson sample, fix the
        noise shares' ``k`` and record the round in the ledger (the budget may stop the run here)."""
        from privacy.ledger import BudgetExceededError

        plan = self.plan
        expected = poisson_sample(
            self.seed,
            round_idx,
            attempt,
            num_clients=plan.num_clients,
            rate=plan.client_sampling_rate,
            key=self.sample_key,
        )
        if sorted(int(c) for c in sampled) != expected:
            raise UserDPError(
                f"round {round_idx}: the algorithm's client sample is not the Poisson sample fl.user_dp accounts for"
            )
        sigma, q = plan.noise_multiplier, plan.client_sampling_rate
        if not self.ledger.can_afford_round(noise_multiplier=sigma, client_sampling_rate=q):
            raise UserBudgetExhausted(round_idx)
        noise = plan.round_noise(
            round_idx,
            attempt,
            num_sampled=len(expected),
            min_completion_rate=self.min_completion_rate,
            run_key=self.run_key,
            clip_norm=self.clip,
        )
        try:
            self.ledger.record_round(
                round=round_idx,
                noise_multiplier=sigma,  # with adaptive clipping: the effective sigma of update + count
                clip_norm=noise.clip_norm,
                client_sampling_rate=q,
                num_sampled=noise.num_sampled,
                min_survivors=noise.min_survivors,
                sampling="poisson",
            )
        except BudgetExceededError:
            raise UserBudgetExhausted(round_idx) from None
        self.noise, self.clipped = noise, []
        self.count_sum, self.count_missing = 0.0, False
        return noise

    def note_clipped(self, clipped: bool | None, count_share: float | None = None) -> None:
        if clipped is not None:
            self.clipped.append(bool(clipped))
        if self.plan.adaptive is not None:
            if count_share is None or not math.isfinite(count_share):
                self.count_missing = True
            else:
                self.count_sum += float(count_share)

    def advance_clip(self, noise: RoundNoise) -> dict[str, Any]:
        """fl.user_dp.adaptive_clip, when the round is released: the noised unclipped fraction from
        the survivors' count shares, and the clip of the next round (saved in ``server_state``)."""
        adaptive = self.plan.adaptive
        assert adaptive is not None
        if self.count_missing:
            # A client sent no share: the sum lacks noise or a bit; the count is not released.
            return {
                "clip_norm": noise.clip_norm,
                "next_clip_norm": noise.clip_norm,
                "unclipped_fraction": None,
            }
        fraction = noised_fraction(noised_centred_sum=self.count_sum, expected_clients=noise.expected_clients)
        new = next_clip(
            clip_norm=noise.clip_norm,
            unclipped_fraction=fraction,
            target_quantile=adaptive.target_quantile,
            clip_lr=adaptive.clip_lr,
        )
        self.clip = new
        self.server_state["clip_norm"] = new
        return {"clip_norm": noise.clip_norm, "next_clip_norm": new, "unclipped_fraction": fraction}

    def can_afford_another_round(self) -> bool:
        """Whether the ledger affords one more round after this one (always, without a budget)."""
        if self.plan.epsilon_budget is None:
            return True
        return bool(
            self.ledger.can_afford_round(
                noise_multiplier=self.plan.noise_multiplier,
                client_sampling_rate=self.plan.client_sampling_rate,
            )
        )

    def round_record(self, noise: RoundNoise, *, survivors: int) -> dict[str, Any]:
        """The round record's user-level part: epsilon over every recorded round attempt, and its noise."""
        clipped = self.clipped
        adaptive = self.advance_clip(noise) if self.plan.adaptive is not None else None
        return {
            "user_epsilon": self.ledger.user_level_epsilon(),
            "user_dp": {
                "noise_multiplier": noise.noise_multiplier,
                "update_noise_multiplier": noise.update_sigma,
                "clip_norm": noise.clip_norm,
                "adaptive_clip": adaptive,
                "min_survivors": noise.min_survivors,
                "survivors": survivors,
                "noise_std_on_mean": check_release(noise, survivors=survivors) / noise.expected_clients,
                "clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
                "rounds_recorded": len(self.ledger.rounds()),
            },
        }

    def summary(self) -> dict[str, Any]:
        """The summary's user-level privacy section."""
        return {
            "level": "user (DP-FedAvg: a client's whole contribution to every round)",
            "epsilon": self.ledger.user_level_epsilon(),
            "rounds_recorded": len(self.ledger.rounds()),
            "stopped_at_budget": self.stopped_at_budget,
            **self.plan.summary(),
        }
