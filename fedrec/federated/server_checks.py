"""What the simulation's aggregator checks where it can see: plaintext update norms, weights, noise sources.

In plaintext mode (``fl.secure: false``) the aggregator sees each update and bounds its L2 norm; in
secure mode it sees ciphertexts only, and the per-coordinate ``fl.encryption.clip`` applied before
encryption is the only bound (docs/threat-model.md). Start-up checks refuse an encryption weight bound
that some client's FedAvg weight would exceed, before anything is spent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedrec.errors import ConfigError
from fedrec.federated.engine import ClientFailed
from fedrec.federated.user_dp import update_norm_bound
from fedrec.federated.worker import FederatedWorker
from fedrec.noise_source import CSPRNG_SOURCE, SEEDED_SOURCE


def noise_sources(fl: Any, privacy: Any) -> dict[str, str]:
    """The simulation's parties and where their privacy noise comes from (none without DP)."""
    sources = {}
    if fl.secure and privacy is not None:
        sources["clients (DP-SGD noise, Poisson batches)"] = (
            CSPRNG_SOURCE if privacy.secure_mode else SEEDED_SOURCE
        )
    if fl.user_dp is not None:
        secure = fl.user_dp.secure_mode
        sources["clients (user-level noise shares)"] = CSPRNG_SOURCE if secure else SEEDED_SOURCE
        sources["aggregator (user-level client sample)"] = (
            "a secret key from the OS CSPRNG" if secure else SEEDED_SOURCE
        )
    return sources


def norm_bound(fl: Any, user_dp_rounds: Any, size: int) -> float | None:
    """Plain mode: the largest L2 norm of an update the server accepts (None: no bound).

    ``fl.max_update_norm``, and with fl.user_dp the attempt's clip_norm with room for the noise
    share (:func:`~fedrec.federated.user_dp.update_norm_bound`), whichever is smaller. Encrypted
    updates cannot be seen: there the per-coordinate ``fl.encryption.clip`` is the only bound.
    """
    bounds = [fl.max_update_norm] if fl.max_update_norm is not None else []
    if user_dp_rounds is not None and user_dp_rounds.noise is not None:
        bounds.append(update_norm_bound(user_dp_rounds.noise, size))
    return min(bounds) if bounds else None


def check_plain_update(payload: Any, *, fl: Any, user_dp_rounds: Any, size: int) -> None:
    """Reject (a 'rejected' failure) a plaintext update above the norm bound, or a forged fl.user_dp weight."""
    delta, weight = payload
    if user_dp_rounds is not None and weight != 1.0:
        raise ClientFailed("rejected", f"weight {weight!r}: under fl.user_dp every client weighs 1")
    bound = norm_bound(fl, user_dp_rounds, size)
    if bound is None:
        return
    norm = float(np.linalg.norm(np.asarray(delta, dtype=np.float64)))
    if not norm <= bound:  # NaN is rejected too
        raise ClientFailed(
            "rejected",
            f"update L2 norm {norm:.4g} above the server's bound {bound:.4g} "
            "(fl.max_update_norm, or fl.user_dp.clip_norm with room for the noise)",
        )


def check_weights_encodable(
    fl: Any, algorithm_cls: type[FederatedWorker], sizes: np.ndarray, *, user_dp: bool
) -> None:
    """Refuse, at start-up, an ``fl.encryption.max_weight`` below the weight some client would send.

    With FedAvg's weights (a client's number of examples) every client's weight is known here; an
    algorithm with its own ``client_weight`` is checked by each client before its spend instead.
    Under fl.user_dp every client weighs 1.

    Raises:
        ConfigError: names the key, its value and the largest client.
    """
    max_weight = fl.encryption.max_weight
    if not max_weight or user_dp or algorithm_cls.client_weight is not FederatedWorker.client_weight:
        return
    largest = int(np.max(sizes)) if len(sizes) else 0
    if largest > max_weight:
        raise ConfigError(
            f"config key 'fl.encryption.max_weight' = {max_weight}: below the largest client's weight "
            f"({largest} examples; FedAvg weighs a client by its examples); raise it or set it to null "
            "(the largest client's size)"
        )
