"""What every client runs in a round, in the simulation and on a datasite alike.

One module so that ``scripts/train_fl.py`` and a deployment compute the same rounds bit for bit:
the per-(round, client) seed of local training, the local DP-SGD trainer, the public initialisation
of round 0's global model, the round binding tag (the encryption's round field), the quantisation
generator's salt, and the one place where a decoded mean update is applied to the global model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedrec.config.schema import ReconstructionConfig
from fedrec.errors import ConfigError, FedrecError
from fedrec.federated.server_opt import ServerOptState, apply_server_rule
from fedrec.trainers.base_trainer import move_batch

MAX_ATTEMPTS = 1 << 16  # attempts per round encoded in a tag
QUANTISATION_SALT = 0xE1  # the quantiser's stochastic rounding draws from [seed, round, client, salt]


def attempt_tag(round_idx: int, attempt: int) -> int:
    """A strictly increasing number for (round, attempt): the round binding of encrypted payloads."""
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise FedrecError(f"round attempt {attempt} out of range")
    return int(round_idx) * MAX_ATTEMPTS + int(attempt)


RECONSTRUCTION_PHASE = 1  # client_seed phase of fl.reconstruction's 'steps' (training is phase 0)


def client_seed(seed: int, round_idx: int, client_id: int, phase: int = 0) -> int:
    """The seed of one client's local round: its batches and (non-secure-mode) DP noise.

    ``phase`` > 0 keys another local phase of the same round (fl.reconstruction's steps), so that two
    phases never draw the same batches or noise.
    """
    entropy = [seed, round_idx, client_id] + ([phase] if phase else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(2))


def quantisation_rng(seed: int, round_idx: int, client_id: int) -> np.random.Generator:
    """The generator of a client's stochastic rounding when it quantises (encrypts) its update."""
    return np.random.default_rng([seed, round_idx, client_id, QUANTISATION_SALT])


def local_dp_trainer_class() -> type:
    """DPTrainer for one client's local epochs (its spend goes to the ledger from the client's task)."""
    from fedrec.trainers.dp_trainer import DPTrainer  # Opacus: loaded only where a client trains with DP

    class LocalDPTrainer(DPTrainer):
        """DPTrainer for one client's local epochs; its spend goes to the ledger from the client task."""

        def flush_noise(self) -> None:
            self.dp.flush()

        def finish(self) -> None:
            self.dp.close()  # flush pending row noise, remove the hooks from the (reused) model

        def update_extra(self) -> dict[str, Any]:
            return {
                "noise_multiplier": float(self.params["noise_multiplier"]),
                "sample_rate": float(self.params["sample_rate"]),
                "dp_steps": int(self.dp.steps),
                "clipped_fraction": float(self.last_stats.clipped_fraction) if self.last_stats else 0.0,
            }

    return LocalDPTrainer


def public_initialisation(model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Secure mode: a global rating bias initialised from the data's mean is not private; use the midpoint."""
    bias = getattr(model, "global_bias", None)
    if isinstance(bias, torch.Tensor) and "rating_min" in meta and "rating_max" in meta:
        with torch.no_grad():
            bias.fill_((float(meta["rating_min"]) + float(meta["rating_max"])) / 2.0)


def apply_mean_update(
    algorithm: Any,
    current: np.ndarray,
    mean: np.ndarray,
    *,
    round_idx: int,
    fl: Any = None,
    state: ServerOptState | None = None,
) -> tuple[np.ndarray, ServerOptState | None]:
    """The next global model (and server-optimiser state) from the round's decoded mean update.

    The one place (simulation and datasites) where a mean update reaches the global model: the
    algorithm's server rule (``FederatedWorker.apply_aggregate``: ``w + server_lr * mean`` for FedAvg),
    or, with ``fl.server_optimizer`` / a server lr schedule, ``server_opt.apply_server_rule`` from the
    optimiser state after the previous round. Returns float32; a non-finite result is an error.
    """
    if fl is None:
        new_params, state = np.asarray(algorithm.apply_aggregate(current, mean)), None
    else:
        new_params, state = apply_server_rule(
            algorithm, current, mean, fl=fl, round_idx=round_idx, state=state
        )
    new_params = np.asarray(new_params, dtype=np.float32)
    if not np.all(np.isfinite(new_params)):
        raise FedrecError(
            f"round {round_idx}: the new global model has NaN or infinite values (lower train.lr?)"
        )
    return new_params, state


# --------------------------------------------------------------------------------------------------
# Federated Reconstruction (Singhal et al. 2021, "Federated Reconstruction: Partially Local Federated
# Learning", NeurIPS; https://arxiv.org/abs/2102.03448): per-user rows rebuilt every round
# --------------------------------------------------------------------------------------------------


def local_users(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A client's users (sorted ids) and its rows with ``user`` renumbered 0..n-1 in that order."""
    users = np.unique(arrays["user"])
    local = dict(arrays)
    local["user"] = np.searchsorted(users, arrays["user"]).astype(arrays["user"].dtype)
    return users, local


def ridge_user_rows(model: torch.nn.Module, arrays: dict[str, np.ndarray], *, ridge: float) -> None:
    """Set every user's rows of an MF model to the closed-form ridge solve from its ratings.

    For user u with ratings r_ui: ``argmin_{p_u, b_u} sum_i (r_ui - mu - b_i - b_u - <p_u, q_i>)^2 +
    ridge (|p_u|^2 + b_u^2)`` given the item rows q_i, item biases b_i and mu (float64). Users without
    ratings get zero rows. Without ``use_bias`` only p_u is solved.
    """
    for name in ("user_embedding", "item_embedding", "user_bias", "item_bias", "global_bias"):
        if not hasattr(model, name):
            raise ConfigError(
                f"config key 'fl.reconstruction.method' = 'ridge': model {type(model).__name__} has no {name} "
                "(the closed-form solve is for matrix factorisation; use 'steps')"
            )
    mf: Any = model
    use_bias = bool(mf.config.use_bias)
    items_q = mf.item_embedding.weight.detach().double().cpu().numpy()
    item_b = mf.item_bias.weight.detach().double().cpu().numpy()[:, 0]
    mu = float(mf.global_bias.detach().double().cpu()[0])
    users = np.asarray(arrays["user"], dtype=np.int64)
    items = np.asarray(arrays["item"], dtype=np.int64)
    target = np.asarray(arrays["label"], dtype=np.float64) - mu - item_b[items]
    num_users, dim = mf.user_embedding.weight.shape
    width = dim + 1 if use_bias else dim
    rows = np.zeros((num_users, width))
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(num_users + 1))
    for user in range(num_users):
        picked = order[bounds[user] : bounds[user + 1]]
        if len(picked) == 0:
            continue
        features = items_q[items[picked]]
        if use_bias:
            features = np.hstack([features, np.ones((len(picked), 1))])
        gram = features.T @ features + ridge * np.eye(width)
        rows[user] = np.linalg.solve(gram, features.T @ target[picked])
    with torch.no_grad():
        weight = mf.user_embedding.weight
        weight.copy_(torch.from_numpy(rows[:, :dim]).to(weight.dtype))
        if use_bias:
            bias = mf.user_bias.weight
            bias.copy_(torch.from_numpy(rows[:, dim:]).to(bias.dtype))


def reconstruct(worker: Any, config: ReconstructionConfig) -> int:
    """Rebuild a trainer's per-user rows before its local training; returns the DP-SGD steps spent.

    ``ridge``: the closed-form solve from the global model's item rows (no steps). ``steps``: local
    steps from the fresh rows with the round's trainer at ``RECONSTRUCTION_PHASE`` (its own seed),
    then the shared parameters go back to the global model (only the user rows are kept). In secure
    mode these are DP-SGD steps of the same mechanism as training, so the ledger adds them.
    """
    if config.method == "ridge":
        ridge_user_rows(worker.model, worker.data.arrays, ridge=config.ridge)
        return 0
    trainer = worker.make_trainer(worker, phase=RECONSTRUCTION_PHASE)
    steps, epoch = 0, 0
    try:
        while steps < config.steps:
            for batch in trainer.train_batches(epoch):
                if steps >= config.steps:
                    break
                loss = trainer.training_step(move_batch(batch, trainer.device))
                steps += 1
                if not np.isfinite(loss):
                    raise FedrecError(
                        f"client {worker.worker_id}: reconstruction diverged in round {worker.round_idx} "
                        "(lower train.lr?)"
                    )
            epoch += 1
        extra = dict(getattr(trainer, "update_extra", dict)())
    finally:
        finish = getattr(trainer, "finish", None)
        if callable(finish):
            finish()
    worker.layout.load_into(worker.model, worker.global_model.params)
    return int(extra.get("dp_steps", 0))
