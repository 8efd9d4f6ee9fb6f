"""Early stopping of a federated run (``train.early_stopping`` under scripts/train_fl.py).

The global model is validated every ``fl.eval_every`` rounds (and at the last round); the run stops
after ``patience`` validations without an improvement of at least ``min_delta`` in the metric, and
with ``restore_best`` it ends with the best validated round's global model: a key-holding client
keeps a copy of that model (``LOGDIR/fl/clients/global/best.npy``) and reports the test metrics on it.

The tracking is a pure function of the rounds' records (:func:`track`), so a resumed run recovers
the best round and the patience count from its checkpoint's history without new state.

Per-user rows kept on the clients (MF without ``fl.reconstruction``) move on after the best round and
are not versioned per round, so ``restore_best`` is refused there before training starts; with
``fl.reconstruction`` (rows rebuilt from the global model) or a model without per-user rows the
global model is the whole model. Each client's local trainer never early-stops (it has no
validation split): the setting applies to the rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedrec.config.schema import EARLY_STOPPING_METRICS, EarlyStoppingConfig
from fedrec.errors import ConfigError
from fedrec.trainers.base_trainer import TASK_METRICS


@dataclass(frozen=True)
class Tracking:
    """Where the validations so far leave the run."""

    best_round: int | None  # the round whose published model validated best (record["round"])
    best_value: float | None
    best_digest: str | None  # that model's digest (record["global_digest"])
    validations: int  # validations seen
    since_best: int  # validations since the best one

    def should_stop(self, cfg: EarlyStoppingConfig) -> bool:
        return self.best_round is not None and self.since_best >= cfg.patience


def improves(cfg: EarlyStoppingConfig, value: float, best: float | None) -> bool:
    """``value`` beats ``best`` by more than ``cfg.min_delta`` in the metric's direction."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    gain = (value - best) if EARLY_STOPPING_METRICS[cfg.metric] else (best - value)
    return gain > cfg.min_delta


def track(cfg: EarlyStoppingConfig, history: Sequence[Mapping[str, Any]]) -> Tracking:
    """The best validated round and the patience count after the rounds in ``history``."""
    best_round: int | None = None
    best_value: float | None = None
    best_digest: str | None = None
    validations = since = 0
    for record in history:
        val = record.get("val") or {}
        if cfg.metric not in val:
            continue
        validations += 1
        value = float(val[cfg.metric])
        if improves(cfg, value, best_value):
            best_round, best_value, best_digest, since = (
                int(record["round"]),
                value,
                record["global_digest"],
                0,
            )
        else:
            since += 1
    return Tracking(best_round, best_value, best_digest, validations, since)


def check_federated_early_stopping(
    cfg: EarlyStoppingConfig | None,
    *,
    task: str,
    val_rows: int,
    stored_private_rows: bool,
    supported: bool = True,
    where: str = "scripts/train_fl.py",
) -> None:
    """Before round 0: the metric fits the task, there is a validation split, the best model can be restored."""
    if cfg is None:
        return
    if not supported:
        raise ConfigError(f"config key 'train.early_stopping' is not supported by {where}; set it to null")
    known = TASK_METRICS.get(task, ())
    if cfg.metric not in known:
        raise ConfigError(
            f"config key 'train.early_stopping.metric' = {cfg.metric!r}: a {task} model reports {', '.join(known)}"
        )
    if val_rows == 0:
        raise ConfigError(
            "config key 'train.early_stopping' is set but the data has no validation split ('val' is empty): "
            "set train.early_stopping=null or use a split that holds out validation rows"
        )
    if stored_private_rows and cfg.restore_best:
        raise ConfigError(
            "config key 'train.early_stopping.restore_best' = true: the per-user rows kept on the clients "
            "move on after the best round and are not kept per round, so that round's model cannot be "
            "restored; use fl.reconstruction (rows rebuilt from the global model) or set restore_best=false"
        )
