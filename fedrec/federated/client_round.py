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

from fedrec.errors import FedrecError

MAX_ATTEMPTS = 1 << 16  # attempts per round encoded in a tag
QUANTISATION_SALT = 0xE1  # the quantiser's stochastic rounding draws from [seed, round, client, salt]


def attempt_tag(round_idx: int, attempt: int) -> int:
    """A strictly increasing number for (round, attempt): the round binding of encrypted payloads."""
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise FedrecError(f"round attempt {attempt} out of range")
    return int(round_idx) * MAX_ATTEMPTS + int(attempt)


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """The seed of one client's local round: its batches and (non-secure-mode) DP noise."""
    return int(
        np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1, np.uint64)[0] >> np.uint64(2)
    )


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


def apply_mean_update(algorithm: Any, current: np.ndarray, mean: np.ndarray, *, round_idx: int) -> np.ndarray:
    """The next global model from the current one and the round's decoded mean update.

    The one place (simulation and datasites) where a mean update reaches the global model: the
    algorithm's server rule (``FederatedWorker.apply_aggregate``: ``w + server_lr * mean`` for FedAvg);
    a server optimiser plugs in here. Returns float32; a non-finite result is an error.
    """
    new_params = np.asarray(algorithm.apply_aggregate(current, mean), dtype=np.float32)
    if not np.all(np.isfinite(new_params)):
        raise FedrecError(
            f"round {round_idx}: the new global model has NaN or infinite values (lower train.lr?)"
        )
    return new_params
