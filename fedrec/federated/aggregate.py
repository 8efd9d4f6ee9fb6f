"""The arithmetic of federated averaging, as pure functions over NumPy arrays.

FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629) replaces the global model ``w`` by
``w + eta * sum_c n_c d_c / sum_c n_c`` where ``d_c`` is client c's update (local minus global) and
``n_c`` its weight (usually its number of training examples).

The sum is taken in *fixed point*: each weighted update is rounded once to an integer multiple of
``2**-bits`` (by the client, before it is sent) and the aggregator adds 64-bit integers. Integer
addition is associative, so the running sum (one vector, whatever the number of clients) is the
same bit for bit in any arrival order: the final model does not depend on how many ranks ran the
clients or which finished first. Rounding costs at most ``2**-(bits+1)`` per coordinate of each
weighted update; with the default 24 bits that is below float32's resolution at 1.0. BFV encryption
of integer-quantised updates gives the same exactness in secure mode.

FedProx's proximal term (Li et al. 2020, https://arxiv.org/abs/1812.06127) is applied here as the
exact proximal step of ``mu/2 ||w - w_global||^2`` after each local optimiser step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# |sum| must stay below 2**62 so that adding one more in-range vector cannot wrap around.
SUM_LIMIT = 2**62


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 52:
        raise ValueError(f"fixed point bits = {bits!r}: expected an integer in [1, 52]")
    return bits


def to_fixed_point(values: np.ndarray, *, bits: int) -> np.ndarray:
    """``round(values * 2**bits)`` as int64; values too large for the sum's headroom are an error."""
    check_bits(bits)
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(2**bits))
    if scaled.size and not np.all(np.isfinite(scaled)):
        raise ValueError("update contains NaN or infinity")
    if scaled.size and float(np.max(np.abs(scaled))) >= 2.0**53:
        raise ValueError(
            f"update value {float(np.max(np.abs(values))):.3g} too large for {bits} fixed-point bits"
        )
    return scaled.astype(np.int64)


def weight_to_fixed_point(weight: float, *, bits: int) -> int:
    """A client's (non-negative, finite) weight in the same fixed point as its update."""
    check_bits(bits)
    weight = float(weight)
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"client weight = {weight!r}: expected a finite number >= 0")
    return round(weight * 2**bits)


class FixedPointSum:
    """A running, exact, order-independent sum of fixed-point weighted updates and their weights.

    Memory is one int64 vector of the model's size, however many clients are added.
    """

    def __init__(self, size: int, *, bits: int):
        self.bits = check_bits(bits)
        self.total = np.zeros(int(size), dtype=np.int64)
        self.weight = 0  # Python int: exact and unbounded
        self.count = 0

    def add(self, fixed_update: np.ndarray, fixed_weight: int) -> None:
        """Add one client's ``to_fixed_point(weight * update)`` and ``weight_to_fixed_point(weight)``."""
        fixed_update = np.asarray(fixed_update)
        if fixed_update.dtype != np.int64 or fixed_update.shape != self.total.shape:
            raise ValueError(
                f"fixed-point update of dtype {fixed_update.dtype} and shape {fixed_update.shape}: "
                f"expected int64 of shape {self.total.shape}"
            )
        if int(fixed_weight) < 0:
            raise ValueError(f"fixed-point weight {fixed_weight}: expected >= 0")
        if fixed_update.size and (
            int(np.max(np.abs(self.total))) + int(np.max(np.abs(fixed_update))) >= SUM_LIMIT
        ):
            raise OverflowError(
                f"fixed-point sum would exceed 2^62 after {self.count} clients: lower fl.fixed_point_bits"
            )
        self.total += fixed_update
        self.weight += int(fixed_weight)
        self.count += 1

    def mean(self) -> np.ndarray:
        """The weighted mean update (float64); an empty or zero-weight sum is an error."""
        return fixed_point_mean(self.total, self.weight, bits=self.bits)


def fixed_point_mean(total: np.ndarray, weight: int, *, bits: int) -> np.ndarray:
    """``sum_c n_c d_c / sum_c n_c`` from the fixed-point sums (the 2**bits scales cancel)."""
    check_bits(bits)
    if int(weight) <= 0:
        raise ValueError("the aggregate has zero total weight: no client contributed")
    return np.asarray(total, dtype=np.float64) / float(int(weight))


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Reference FedAvg mean in float64, ``sum_c w_c u_c / sum_c w_c`` (for tests and comparisons)."""
    if len(updates) != len(weights) or not updates:
        raise ValueError(
            f"{len(updates)} updates and {len(weights)} weights: expected equal, non-zero counts"
        )
    total_weight = float(np.sum(np.asarray(weights, dtype=np.float64)))
    if total_weight <= 0:
        raise ValueError("total weight must be > 0")
    out = np.zeros_like(np.asarray(updates[0], dtype=np.float64))
    for update, weight in zip(updates, weights):
        out += float(weight) * np.asarray(update, dtype=np.float64)
    return out / total_weight


def apply_mean_update(global_params: np.ndarray, mean_update: np.ndarray, *, server_lr: float) -> np.ndarray:
    """New global parameters ``w + server_lr * mean_update``, in the global model's dtype (a new array)."""
    global_params = np.asarray(global_params)
    if global_params.shape != np.shape(mean_update):
        raise ValueError(
            f"update of shape {np.shape(mean_update)} for a model of shape {global_params.shape}"
        )
    out = global_params.astype(np.float64) + float(server_lr) * np.asarray(mean_update, dtype=np.float64)
    return out.astype(global_params.dtype)


def proximal_step(params: Any, anchor: Any, *, lr: float, mu: float) -> Any:
    """Exact proximal step of ``mu/2 ||w - anchor||^2`` with step ``lr``: ``(w + lr mu anchor) / (1 + lr mu)``.

    Works on NumPy arrays and torch tensors alike (returns a new one).
    """
    if lr < 0 or mu < 0:
        raise ValueError(f"lr = {lr!r}, mu = {mu!r}: expected both >= 0")
    return (params + (lr * mu) * anchor) / (1.0 + lr * mu)


def completion_ok(num_sampled: int, num_completed: int, *, min_completion_rate: float) -> bool:
    """True when at least ``ceil(min_completion_rate * sampled)`` (and at least one) client returned."""
    needed = max(1, int(np.ceil(min_completion_rate * num_sampled - 1e-9)))
    return num_completed >= needed
