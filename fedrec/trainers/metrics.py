"""Evaluation metrics: AUC, log loss, accuracy (click-through); RMSE, MAE, HR@K, NDCG@K (ratings)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties get average ranks).

    Returns NaN when only one class is present.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    rank_sum = float(ranks[labels].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log1p(-p)))


def accuracy(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    labels = np.asarray(labels).ravel() > 0.5
    return float(np.mean((np.asarray(probabilities).ravel() >= threshold) == labels))


def rmse(targets: np.ndarray, predictions: np.ndarray) -> float:
    diff = np.asarray(predictions, dtype=np.float64).ravel() - np.asarray(targets, dtype=np.float64).ravel()
    return float(np.sqrt(np.mean(diff * diff)))


def mae(targets: np.ndarray, predictions: np.ndarray) -> float:
    diff = np.asarray(predictions, dtype=np.float64).ravel() - np.asarray(targets, dtype=np.float64).ravel()
    return float(np.mean(np.abs(diff)))


def hit_rate_and_ndcg(
    positive_scores: np.ndarray, negative_scores: np.ndarray, k: int = 10
) -> tuple[float, float]:
    """HR@k and NDCG@k when each held-out item is ranked against sampled negatives.

    Args:
        positive_scores: [N] score of each held-out (user, item).
        negative_scores: [N, M] scores of M sampled items the user never rated.

    Ties count against the positive item (a pessimistic rank), so a constant model scores 0.
    """
    positive_scores = np.asarray(positive_scores, dtype=np.float64).reshape(-1, 1)
    rank = (np.asarray(negative_scores, dtype=np.float64) >= positive_scores).sum(axis=1)  # 0 = top
    hits = rank < k
    ndcg = np.where(hits, 1.0 / np.log2(rank + 2.0), 0.0)
    return float(hits.mean()), float(ndcg.mean())


def sample_negatives(
    users: np.ndarray,
    rated_indptr: np.ndarray,
    rated_items: np.ndarray,
    num_items: int,
    num_negatives: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """For each user, ``num_negatives`` distinct-from-rated items drawn uniformly (with replacement).

    ``rated_indptr``/``rated_items`` are a CSR of each user's sorted rated items.

    Returns:
        (negatives [N, num_negatives], usable [N] bool): a user who left fewer than
        ``num_negatives`` items unrated cannot be ranked this way and is marked unusable.
    """
    return sample_unrated(
        users, RatedItems.from_csr(rated_indptr, rated_items, num_items), num_negatives, rng
    )


@dataclass(frozen=True)
class RatedItems:
    """Every rated (user, item) pair as one sorted int64 key ``user * num_items + item``, plus each
    user's count: membership of any batch of draws is one ``searchsorted``, built once per evaluator."""

    keys: np.ndarray  # sorted, distinct
    counts: np.ndarray  # [num_users] rated items per user
    num_items: int

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> RatedItems:
        keys = np.unique(np.asarray(users, dtype=np.int64) * num_items + np.asarray(items, dtype=np.int64))
        counts = np.bincount(keys // num_items, minlength=num_users).astype(np.int64)
        return cls(keys, counts, int(num_items))

    @classmethod
    def from_csr(cls, indptr: np.ndarray, items: np.ndarray, num_items: int) -> RatedItems:
        owner = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
        return cls.from_pairs(owner, items, len(indptr) - 1, num_items)


def sample_unrated(
    users: np.ndarray, rated: RatedItems, num_negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_negatives` on a :class:`RatedItems` (memory: the batch's draws, not the ratings)."""
    users = np.asarray(users, dtype=np.int64)
    num_items, rated_keys = rated.num_items, rated.keys
    usable = (num_items - rated.counts[users]) >= num_negatives
    out = rng.integers(0, num_items, size=(len(users), num_negatives))
    if len(rated_keys) == 0:
        return out, usable
    flat = out.reshape(-1)
    row_users = np.repeat(users, num_negatives)
    pending = np.flatnonzero(np.repeat(usable, num_negatives))
    while pending.size:
        keys = row_users[pending] * num_items + flat[pending]
        pos = np.minimum(np.searchsorted(rated_keys, keys), len(rated_keys) - 1)
        pending = pending[rated_keys[pos] == keys]  # drew an item the user rated: draw again
        flat[pending] = rng.integers(0, num_items, size=pending.size)
    return out, usable


RANKING_BATCH_ROWS = 4096  # held-out rows ranked at once (part of the metric's definition: it keys the draws)


def ranking_in_batches(
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    users: np.ndarray,
    items: np.ndarray,
    rated: RatedItems,
    *,
    num_negatives: int,
    seed: int,
    k: int = 10,
    batch_rows: int = RANKING_BATCH_ROWS,
) -> tuple[float, float]:
    """HR@k and NDCG@k of held-out (user, item) rows, ``batch_rows`` at a time.

    ``score(users [B], candidates [B, 1 + num_negatives])`` returns the candidates' scores. Batch
    ``b``'s negatives come from a generator keyed by (seed, b), so memory is one batch's candidates
    and scores whatever the number of users, and the figures do not depend on the machine.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    hits = ndcg = 0.0
    ranked = 0
    for batch, start in enumerate(range(0, len(users), batch_rows)):
        batch_users, batch_items = users[start : start + batch_rows], items[start : start + batch_rows]
        rng = np.random.default_rng([seed, 10_007, batch])
        negatives, usable = sample_unrated(batch_users, rated, num_negatives, rng)
        if not usable.any():
            continue
        candidates = np.concatenate([batch_items[usable, None], negatives[usable]], axis=1)
        scores = np.asarray(score(batch_users[usable], candidates), dtype=np.float64)
        rank = (scores[:, 1:] >= scores[:, :1]).sum(axis=1)  # ties count against the positive
        hit = rank < k
        hits += float(hit.sum())
        ndcg += float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).sum())
        ranked += int(usable.sum())
    if ranked == 0:
        return float("nan"), float("nan")
    return hits / ranked, ndcg / ranked


def sample_eval_users(num_users: int, eval_users: int | None, *, seed: int) -> np.ndarray | None:
    """The users an evaluation covers: ``eval_users`` of ``0..num_users-1`` drawn without replacement
    by a generator keyed by ``seed`` (sorted), or None for all of them."""
    if eval_users is None or eval_users >= num_users:
        return None
    rng = np.random.default_rng([seed, 0xE7A1])
    return np.sort(rng.choice(num_users, size=eval_users, replace=False))


def rated_csr(users: np.ndarray, items: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, sorted items) of the items each user rated."""
    order = np.lexsort((items, users))
    users_sorted = np.asarray(users)[order]
    items_sorted = np.asarray(items)[order]
    indptr = np.searchsorted(users_sorted, np.arange(num_users + 1))
    return indptr, items_sorted
