"""Server optimisers and per-round learning-rate schedules, as pure functions over NumPy arrays.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR, https://arxiv.org/abs/2003.00295),
Algorithm 2: the round's mean client update ``d_t`` (local minus global) is treated as a
pseudo-gradient (its negative) and the global model ``x`` moves by an adaptive step::

    m_t = beta1 m_{t-1} + (1 - beta1) d_t
    FedAdagrad: v_t = v_{t-1} + d_t^2
    FedAdam:    v_t = beta2 v_{t-1} + (1 - beta2) d_t^2
    FedYogi:    v_t = v_{t-1} - (1 - beta2) d_t^2 sign(v_{t-1} - d_t^2)
    x_{t+1} = x_t + eta_t m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the paper's initialisation; no bias correction).
``sgd`` is FedAvg's rule ``x + eta_t d_t`` (no state).

Where it runs: the optimiser is applied where the mean update is decoded (in secure mode by a
key-holding client, never by the aggregator), so encryption stays end to end. Its state is a
deterministic function of the sequence of released means: every party that applies the same
sequence holds the same state, bit for bit. The simulation keeps it in client storage beside the
global model and its digest in the aggregator's checkpoint (``fedrec.federated.clients``).

Schedules (``lr_at``): ``constant``, ``cosine`` (from ``lr`` down to ``lr * min_factor`` over the
planned rounds), ``exponential`` (``lr * decay^round``) and ``step`` (``lr * decay^(round // step_rounds)``);
the same function scales the clients' local learning rate (``train.lr``) per round.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fedrec.errors import ConfigError

SERVER_OPTIMIZERS = ("sgd", "fedadagrad", "fedadam", "fedyogi")
SCHEDULES = ("constant", "cosine", "exponential", "step")


@dataclass
class LRScheduleConfig:
    """A per-round learning-rate schedule (``fl.server_lr_schedule``, ``fl.client_lr_schedule``)."""

    kind: Literal["constant", "cosine", "exponential", "step"] = "constant"
    min_factor: float = 0.0  # cosine: the last round's lr as a fraction of the first
    decay: float = 0.5  # exponential: factor per round; step: factor per step_rounds rounds
    step_rounds: int = 10  # step: rounds between decays
    warmup_rounds: int = 0  # rounds of linear warm-up (round r uses (r + 1) / (warmup + 1) of the lr)

    def validate(self, path: str) -> None:
        if not 0.0 <= self.min_factor <= 1.0:
            raise ConfigError(
                f"config key '{path}.min_factor' = {self.min_factor!r}: expected a value in [0, 1]"
            )
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"config key '{path}.decay' = {self.decay!r}: expected a value in (0, 1]")
        if self.step_rounds < 1:
            raise ConfigError(
                f"config key '{path}.step_rounds' = {self.step_rounds!r}: expected a positive integer"
            )
        if self.warmup_rounds < 0:
            raise ConfigError(f"config key '{path}.warmup_rounds' = {self.warmup_rounds!r}: expected >= 0")


@dataclass
class ServerOptimizerConfig:
    """``fl.server_optimizer``: the rule that moves the global model by the round's mean update."""

    name: Literal["sgd", "fedadagrad", "fedadam", "fedyogi"] = "sgd"
    beta1: float = 0.9  # momentum of the mean update (Reddi et al.: 0.9)
    beta2: float = 0.99  # FedAdam / FedYogi second-moment decay (Reddi et al.: 0.99)
    tau: float = 1e-3  # adaptivity: added to sqrt(v); also sqrt of v's initial value
    schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)  # of fl.server_lr

    def validate(self, path: str) -> None:
        if not 0.0 <= self.beta1 < 1.0:
            raise ConfigError(f"config key '{path}.beta1' = {self.beta1!r}: expected a value in [0, 1)")
        if not 0.0 <= self.beta2 < 1.0:
            raise ConfigError(f"config key '{path}.beta2' = {self.beta2!r}: expected a value in [0, 1)")
        if not (0.0 < self.tau < float("inf")):
            raise ConfigError(f"config key '{path}.tau' = {self.tau!r}: expected a finite number > 0")

    @property
    def stateful(self) -> bool:
        """Whether the rule keeps state across rounds (every adaptive optimiser does)."""
        return self.name != "sgd"


def lr_at(lr: float, schedule: LRScheduleConfig, *, round_idx: int, rounds: int) -> float:
    """The learning rate of round ``round_idx`` (0-based) of ``rounds`` under ``schedule``."""
    if round_idx < 0:
        raise ValueError(f"round {round_idx}: expected >= 0")
    factor = 1.0
    if schedule.kind == "cosine":
        span = max(1, rounds - 1)
        progress = min(1.0, round_idx / span)
        factor = schedule.min_factor + (1.0 - schedule.min_factor) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )
    elif schedule.kind == "exponential":
        factor = schedule.decay**round_idx
    elif schedule.kind == "step":
        factor = schedule.decay ** (round_idx // schedule.step_rounds)
    if round_idx < schedule.warmup_rounds:
        factor *= (round_idx + 1) / (schedule.warmup_rounds + 1)
    return float(lr) * factor


@dataclass
class ServerOptState:
    """The optimiser's state after ``rounds`` released means: first and second moments (float64)."""

    rounds: int
    m: np.ndarray
    v: np.ndarray

    @classmethod
    def initial(cls, size: int, *, tau: float) -> ServerOptState:
        return cls(0, np.zeros(int(size)), np.full(int(size), float(tau) ** 2))

    def digest(self) -> str:
        """SHA-256 over the round count and both moments (what the checkpoint records)."""
        h = hashlib.sha256(str(int(self.rounds)).encode())
        h.update(np.ascontiguousarray(self.m, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.v, dtype=np.float64).tobytes())
        return h.hexdigest()

    def save(self, path: str) -> str:
        """Write the state (``.npz``, no pickle) to ``path`` atomically; returns its digest."""
        import os

        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, rounds=np.array(self.rounds, dtype=np.int64), m=self.m, v=self.v)
        os.replace(tmp, path)
        return self.digest()

    @classmethod
    def load(cls, path: str, *, digest: str | None = None) -> ServerOptState:
        """Read a state written by ``save``; with ``digest`` a state that does not match is an error."""
        with np.load(path, allow_pickle=False) as data:
            state = cls(
                int(data["rounds"]),
                np.array(data["m"], dtype=np.float64),
                np.array(data["v"], dtype=np.float64),
            )
        if digest is not None and state.digest() != digest:
            raise ValueError(f"{path}: server optimiser state does not match the recorded digest")
        return state


def server_step(
    params: np.ndarray,
    mean_update: np.ndarray,
    state: ServerOptState | None,
    *,
    config: ServerOptimizerConfig,
    lr: float,
) -> tuple[np.ndarray, ServerOptState | None]:
    """One server update: the new global parameters (in ``params``' dtype) and the new state.

    ``mean_update`` is the round's released mean of client updates (local minus global); ``lr`` the
    round's server learning rate (``lr_at`` of ``fl.server_lr``). ``state`` is None for ``sgd``.
    """
    params = np.asarray(params)
    delta = np.asarray(mean_update, dtype=np.float64)
    if params.shape != delta.shape:
        raise ValueError(f"update of shape {delta.shape} for a model of shape {params.shape}")
    if config.name == "sgd":
        return (params.astype(np.float64) + lr * delta).astype(params.dtype), None
    if state is None:
        state = ServerOptState.initial(params.size, tau=config.tau)
    if state.m.shape != delta.shape or state.v.shape != delta.shape:
        raise ValueError(f"server optimiser state of size {state.m.size} for a model of size {delta.size}")
    m = config.beta1 * state.m + (1.0 - config.beta1) * delta
    square = delta * delta
    if config.name == "fedadagrad":
        v = state.v + square
    elif config.name == "fedadam":
        v = config.beta2 * state.v + (1.0 - config.beta2) * square
    elif config.name == "fedyogi":
        v = state.v - (1.0 - config.beta2) * square * np.sign(state.v - square)
    else:
        raise ValueError(f"server optimiser {config.name!r}: expected one of {', '.join(SERVER_OPTIMIZERS)}")
    new_params = params.astype(np.float64) + lr * m / (np.sqrt(v) + config.tau)
    return new_params.astype(params.dtype), ServerOptState(state.rounds + 1, m, v)


def uses_server_rule(fl: Any) -> bool:
    """Whether ``fl`` asks for more than the algorithm's own rule: a stateful optimiser or a schedule."""
    opt: ServerOptimizerConfig = fl.server_optimizer
    return opt.stateful or opt.schedule.kind != "constant" or opt.schedule.warmup_rounds > 0


def check_server_optimizer(fl: Any, *, custom_rule: bool, deployment: bool) -> None:
    """Refuse, before round 0, a server optimiser that cannot be applied where the mean is decoded.

    Args:
        fl: the ``fl`` config section.
        custom_rule: the algorithm overrides ``apply_aggregate`` (its own server rule).
        deployment: the datasite deployment, whose owners apply each aggregate without keeping state.

    Raises:
        ConfigError: naming the key.
    """
    opt: ServerOptimizerConfig = fl.server_optimizer
    client: LRScheduleConfig = fl.client_lr_schedule
    if not uses_server_rule(fl):
        if deployment and (client.kind != "constant" or client.warmup_rounds > 0):
            raise ConfigError(
                f"config key 'fl.client_lr_schedule.kind' = {client.kind!r}: per-round client learning rates "
                "are not supported in deployment yet; use 'constant' or scripts/train_fl.py"
            )
        return
    if deployment:
        # The coordinator must never hold the decoded mean, and each owner's apply step is stateless
        # (it receives the sealed model only): no party may keep the optimiser's moments.
        raise ConfigError(
            f"config key 'fl.server_optimizer.name' = {opt.name!r} (schedule {opt.schedule.kind!r}): in deployment "
            "no party may hold the decoded mean between rounds (the coordinator never decrypts; owners apply "
            "each aggregate statelessly); use name 'sgd' with a constant schedule, or scripts/train_fl.py"
        )
    if custom_rule:
        raise ConfigError(
            f"config key 'fl.server_optimizer.name' = {opt.name!r}: the algorithm (fl.algorithm) has its own "
            "server rule (apply_aggregate); use 'sgd' with a constant schedule, or the algorithm's own options"
        )


def apply_server_rule(
    algorithm: Any,
    current: np.ndarray,
    mean: np.ndarray,
    *,
    fl: Any,
    round_idx: int,
    state: ServerOptState | None,
) -> tuple[np.ndarray, ServerOptState | None]:
    """The next global model (and optimiser state) from the round's decoded mean update.

    Without a server optimiser or schedule this is the algorithm's own rule
    (``algorithm.apply_aggregate``: ``w + fl.server_lr * mean`` for FedAvg); otherwise ``server_step``
    at the round's scheduled ``fl.server_lr``.
    """
    if not uses_server_rule(fl):
        return np.asarray(algorithm.apply_aggregate(current, mean)), None
    opt: ServerOptimizerConfig = fl.server_optimizer
    lr = lr_at(float(fl.server_lr), opt.schedule, round_idx=round_idx, rounds=int(fl.rounds))
    return server_step(current, mean, state, config=opt, lr=lr)


def state_path(global_model_path: str) -> str:
    """Where the optimiser state after a round lives: beside that round's global model (client storage)."""
    stem = global_model_path[:-4] if global_model_path.endswith(".npy") else global_model_path
    return f"{stem}.server_opt.npz"
