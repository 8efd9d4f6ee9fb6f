"""Epsilon as TensorBoard scalars, for trainers to call after each round or checkpoint."""

from __future__ import annotations

import math
import statistics
from typing import Any

from privacy.ledger import PrivacyLedger

TAG_PREFIX = "privacy"


def log_epsilon(writer: Any, *, step: int, epsilon: float, tag: str = f"{TAG_PREFIX}/epsilon") -> None:
    """Write one epsilon scalar (an infinite epsilon is written as NaN: TensorBoard shows the gap)."""
    writer.add_scalar(tag, epsilon if math.isfinite(epsilon) else float("nan"), global_step=step)


def log_ledger_epsilon(
    writer: Any, ledger: PrivacyLedger, *, step: int, user_level: bool = True
) -> dict[str, float]:
    """Write the ledger's epsilons: example-level max/median/min over clients and user-level.

    ``writer`` is a ``torch.utils.tensorboard.SummaryWriter``; ``user_level=False`` leaves the
    user-level epsilon to a caller that writes it already. Returns what was written.
    """
    written: dict[str, float] = {}
    epsilons = list(ledger.epsilons().values())
    if epsilons:
        written[f"{TAG_PREFIX}/example_epsilon_max"] = max(epsilons)
        written[f"{TAG_PREFIX}/example_epsilon_median"] = float(statistics.median(epsilons))
        written[f"{TAG_PREFIX}/example_epsilon_min"] = min(epsilons)
    if user_level and ledger.rounds():
        written[f"{TAG_PREFIX}/user_level_epsilon"] = ledger.user_level_epsilon()
    for tag, value in written.items():
        log_epsilon(writer, step=step, epsilon=value, tag=tag)
    writer.flush()
    return written
