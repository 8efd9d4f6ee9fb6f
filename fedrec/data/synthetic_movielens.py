"""Realistic MovieLens-like ratings: the statistics of the real sets, with their noise floor and drift.

Presets (``PRESETS``) are shaped like GroupLens ml-100k (100,000 ratings, 943 users, 1,682 items),
ml-1m (1,000,209 ratings, 6,040 users, 3,706 items) and a 1M-user population with ml-100k's
per-user law over ml-1m's catalogue. One draw, all from ``numpy.random.default_rng`` streams keyed
by the seed:

- **Activity**: every user rates at least ``min_ratings`` items (20, as GroupLens kept only such
  users); the rest follows a gamma law with shape ``activity_shape`` (a long tail: a few users rate
  hundreds of items), scaled so the total is exactly ``rows`` and capped at ``max_share`` of the items.
- **Popularity**: item weights are log-normal (``popularity_sigma``, head cut at
  ``popularity_clip`` sd). Each user's items are drawn by weight without replacement in rounds: an
  i.i.d. weighted stream (Walker's alias table), its distinct items, and a uniformly random subset
  where a user got more than needed; no users x items matrix, so memory follows the ratings. Items
  then get 1 to a few hundred ratings (a power-law-like tail); every item is rated at least once.
- **Ratings**: a latent score ``b_user + b_item + p_user . q_item + drift_user * tau + noise``, cut
  at the quantiles of ``rating_shares`` (ml-100k's shares of 1..5 stars: mean 3.53, sd 1.13).
  Popular items score higher (``popularity_quality``), as in the real data.
- **Time**: each user rates over one session-like span; ``tau`` runs 0..1 down the user's history.
  Users meet popular items first (``popular_first``: MovieLens asked new users to rate well-known
  films), so the latest ratings are on rarer, less-known items, and each user's taste drifts
  (``drift_sd``): the last rating is harder to predict than a random one, as in the real sets.

The noise and drift were calibrated against scikit-surprise on the ml-100k preset
(bench/mf_movielens.py, seeds 0 and 1): the global mean scores RMSE 1.126 on a random 5-fold split, SVD 0.942-0.945 (real
ml-100k: 0.935), and 1.04-1.07 when each user's last rating is held out (real: 1.057).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedrec.errors import ConfigError

MOVIELENS_GENERATOR_VERSION = 2
ML100K_RATING_SHARES = (0.0611, 0.1137, 0.2715, 0.3417, 0.2120)  # 1..5 stars in the real u.data
CHUNK_RATINGS = 1 << 22  # ratings drawn per chunk of users (part of the output's definition)
START_TIME = 874_724_710  # the real ml-100k's first timestamp (1997-09-20)


@dataclass(frozen=True)
class MovieLensPreset:
    """The shape of one synthetic MovieLens set (sizes, laws, noise)."""

    name: str
    users: int
    items: int
    rows: int
    min_ratings: int = 20
    activity_shape: float = 0.65  # gamma shape of ratings beyond the minimum (smaller = longer tail)
    max_share: float = 0.44  # a user rates at most this share of the items (ml-100k: 737 / 1682)
    popularity_sigma: float = 1.8  # log-normal spread of item weights
    popularity_clip: float = 2.4  # weights above this many sd are cut to it
    rank: int = 10
    factor_sd: float = 0.55  # sd of the planted interaction p_user . q_item
    user_bias_sd: float = 0.45
    item_bias_sd: float = 0.45
    popularity_quality: float = 0.45  # correlation of an item's bias with its log popularity
    drift_sd: float = 1.0  # sd of a user's bias change from their first to their last rating
    noise_sd: float = 0.70
    popular_first: float = 1.0  # how strongly a user's history runs from popular to rare items
    span_days: float = 215.0  # the window the users' sessions start in (ml-100k: ~7 months)
    rating_shares: tuple[float, ...] = ML100K_RATING_SHARES


PRESETS: dict[str, MovieLensPreset] = {
    "ml-100k": MovieLensPreset(name="ml-100k", users=943, items=1682, rows=100_000),
    "ml-1m": MovieLensPreset(
        name="ml-1m",
        users=6040,
        items=3706,
        rows=1_000_209,
        activity_shape=0.6,
        max_share=0.62,
        span_days=1038.0,
    ),
    "population-1m": MovieLensPreset(
        name="population-1m",
        users=1_000_000,
        items=3706,
        rows=105_000_000,
        max_share=0.2,
        span_days=1038.0,
    ),
}


def resolve_preset(
    name: str, *, users: int | None = None, items: int | None = None, rows: int | None = None,
    rank: int | None = None,
) -> MovieLensPreset:  # fmt: skip
    """The preset ``name`` with the given sizes overriding its own.

    With ``users`` set and ``rows`` null, the count scales with the users (the same per-user law).
    """
    if name not in PRESETS:
        raise ConfigError(
            f"config key 'model.preproc.synthetic.preset' = {name!r}: expected one of {', '.join(PRESETS)} or null"
        )
    preset = PRESETS[name]
    n_users = preset.users if users is None else users
    n_items = preset.items if items is None else items
    n_rows = round(preset.rows * n_users / preset.users) if rows is None else rows
    resolved = replace(
        preset, users=n_users, items=n_items, rows=n_rows, rank=preset.rank if rank is None else rank
    )
    check_sizes(resolved)
    return resolved


def check_sizes(preset: MovieLensPreset) -> None:
    """One-line ConfigErrors for sizes the per-user law cannot meet."""
    key = "model.preproc.synthetic"
    for name in ("users", "items", "rows", "rank"):
        if getattr(preset, name) < 1:
            raise ConfigError(
                f"config key '{key}.{name}' = {getattr(preset, name)!r}: expected a positive integer"
            )
    cap = user_cap(preset)
    floor = min(preset.min_ratings, cap)
    if preset.rows < floor * preset.users:
        raise ConfigError(
            f"config key '{key}.rows' = {preset.rows}: expected at least {floor} ratings per user "
            f"({floor * preset.users} for {preset.users} users, preset {preset.name})"
        )
    if preset.rows > cap * preset.users:
        raise ConfigError(
            f"config key '{key}.rows' = {preset.rows}: expected at most {cap * preset.users} "
            f"({cap} of {preset.items} items per user, preset {preset.name})"
        )


def user_cap(preset: MovieLensPreset) -> int:
    return max(1, int(preset.max_share * preset.items))


# ----------------------------------------------------------------------------- the laws


def activity_counts(rng: np.random.Generator, preset: MovieLensPreset) -> np.ndarray:
    """Ratings per user: at least ``min_ratings``, a gamma tail, exactly ``rows`` in all."""
    users, rows, cap = preset.users, preset.rows, user_cap(preset)
    floor = min(preset.min_ratings, cap)
    weight = rng.gamma(preset.activity_shape, 1.0, users)
    counts = np.full(users, floor, dtype=np.int64)
    free = np.ones(users, dtype=bool)
    # Share the ratings beyond the floor by weight; users that hit the cap give their excess back.
    for _ in range(50):
        left = rows - int(counts.sum())
        if left <= 0 or not free.any():
            break
        share = weight * free
        add = np.floor(share / share.sum() * left).astype(np.int64)
        counts = np.minimum(counts + add, cap)
        free = counts < cap
        if add.sum() == 0:
            break
    left = rows - int(counts.sum())
    if left > 0:  # the rounding remainder: one more rating for the heaviest users with room
        room = np.flatnonzero(counts < cap)
        counts[room[np.argsort(-weight[room], kind="stable")[:left]]] += 1
    return counts


class AliasTable:
    """Walker's alias method: O(1) draws from a fixed discrete law (Vose's construction)."""

    def __init__(self, weight: np.ndarray):
        n = len(weight)
        scaled = weight / weight.sum() * n
        self.accept = np.ones(n)
        self.alias = np.arange(n)
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:
            s, big = small.pop(), large.pop()
            self.accept[s] = scaled[s]
            self.alias[s] = big
            scaled[big] -= 1.0 - scaled[s]
            (small if scaled[big] < 1.0 else large).append(big)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        slot = rng.integers(0, len(self.accept), size)
        return np.where(rng.random(size) < self.accept[slot], slot, self.alias[slot])


def sample_items(
    rng: np.random.Generator, counts: np.ndarray, alias: AliasTable
) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) pairs, grouped by user: ``counts[u]`` distinct items for user u, drawn by weight.

    Each round draws an i.i.d. weighted stream for the users still short, keeps the distinct new
    items and, where a user got more than needed, a uniformly random subset of them. No users x
    items matrix is formed, so a million users cost seconds per few million ratings.
    """
    items = len(alias.accept)
    n_users = len(counts)
    chosen = np.zeros(0, dtype=np.int64)  # keys user * items + item
    have = np.zeros(n_users, dtype=np.int64)
    for attempt in range(200):
        short = np.flatnonzero(have < counts)
        if len(short) == 0:
            break
        need = counts[short] - have[short]
        draws = np.ceil(need * (1.4 + attempt) + 4).astype(np.int64)
        stream_user = np.repeat(short, draws)
        new = np.unique(stream_user * items + alias.draw(rng, len(stream_user)))
        if attempt:
            new = new[~np.isin(new, chosen)]
        user = new // items
        # A random subset of each user's new items, as many as the user still needs.
        order = np.argsort(user + rng.random(len(new)), kind="stable")
        new, user = new[order], user[order]
        starts = np.concatenate(([0], np.cumsum(np.bincount(user, minlength=n_users))[:-1]))
        keep = np.arange(len(new)) - starts[user] < (counts - have)[user]
        chosen = np.concatenate((chosen, new[keep]))
        have += np.bincount(user[keep], minlength=n_users)
    else:
        raise ConfigError("synthetic MovieLens: could not draw distinct items (lower synthetic.rows)")
    chosen.sort()
    return chosen // items, chosen % items


def cover_items(rng: np.random.Generator, item: np.ndarray, items: int) -> np.ndarray:
    """Give every unrated item one rating, taken from a random rating of an item with more than
    enough (the real sets list only rated items); the user cannot already have the unrated item."""
    counts = np.bincount(item, minlength=items)
    unrated = np.flatnonzero(counts == 0)
    if len(unrated) == 0:
        return item
    donors = np.flatnonzero(counts[item] > len(unrated))  # none of these items can drop to zero
    if len(donors) < len(unrated):
        return item
    item = item.copy()
    item[rng.choice(donors, len(unrated), replace=False)] = unrated
    return item


@dataclass
class ItemLaw:
    """Item-side draws shared by every chunk of users."""

    log_weight: np.ndarray
    alias: AliasTable
    bias: np.ndarray
    factors: np.ndarray


def draw_items(preset: MovieLensPreset, seed: int) -> ItemLaw:
    rng = np.random.default_rng([seed, 0x3117, 1])
    # Log-normal weights with the head cut at ``popularity_clip`` sd: many rare items, and the most
    # popular film is rated by about 60 % of ml-100k's users, not all of them.
    z = rng.standard_normal(preset.items)
    log_weight = preset.popularity_sigma * np.minimum(z, preset.popularity_clip)
    weight = np.exp(log_weight - log_weight.max())
    rho = preset.popularity_quality
    bias = preset.item_bias_sd * (rho * z + np.sqrt(1 - rho**2) * rng.standard_normal(preset.items))
    factors = np.asfortranarray(rng.standard_normal((preset.items, preset.rank)))
    return ItemLaw(log_weight=log_weight, alias=AliasTable(weight), bias=bias, factors=factors)


def draw_chunk(
    preset: MovieLensPreset, seed: int, law: ItemLaw, counts: np.ndarray, first_user: int, chunk: int
) -> dict[str, np.ndarray]:
    """Ratings of users ``first_user .. first_user + len(counts) - 1``: latent scores and times."""
    rng = np.random.default_rng([seed, 0x3117, 2, chunk])
    n_users = len(counts)
    local_user, item = sample_items(rng, counts, law.alias)
    if chunk == 0:
        item = cover_items(rng, item, len(law.log_weight))
    n = len(item)
    # Order each user's history: popular items first, with noise (one float key: user + a (0, 1) rank).
    order_key = -preset.popular_first * law.log_weight[item] + rng.gumbel(size=n)
    order = np.argsort(local_user + 1.0 / (1.0 + np.exp(-order_key / 4.0)), kind="stable")
    local_user, item = local_user[order], item[order]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    position = np.arange(n) - starts[local_user]
    tau = position / np.maximum(counts[local_user] - 1, 1)
    user_bias = rng.normal(0.0, preset.user_bias_sd, n_users)
    drift = rng.normal(0.0, preset.drift_sd, n_users)
    p = rng.standard_normal((n_users, preset.rank))
    interaction = np.zeros(n)
    for k in range(preset.rank):  # one factor at a time: no n x rank temporaries
        interaction += p[local_user, k] * law.factors[item, k]
    interaction *= preset.factor_sd / np.sqrt(preset.rank)
    latent = (
        user_bias[local_user]
        + law.bias[item]
        + interaction
        + drift[local_user] * (tau - 0.5)
        + rng.normal(0.0, preset.noise_sd, n)
    )
    # Sessions: a start in the window and a log-normal length (most users rate within a day or two).
    start = START_TIME + rng.random(n_users) * preset.span_days * 86400
    length = np.minimum(np.exp(rng.normal(np.log(3 * 86400), 2.0, n_users)), preset.span_days * 86400)
    timestamp = (start[local_user] + tau * length[local_user]).astype(
        np.int64
    ) + position  # strictly increasing
    return {"user": local_user + first_user, "item": item, "latent": latent, "timestamp": timestamp}


def thresholds(latent: np.ndarray, shares: tuple[float, ...]) -> np.ndarray:
    """Cut points that give ``shares`` of 1..5 stars on ``latent``."""
    return np.quantile(latent, np.cumsum(shares)[:-1])


def to_stars(latent: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    return (1 + np.searchsorted(cuts, latent, side="right")).astype(np.int64)


def generate(preset: MovieLensPreset, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of ratings (``user``, ``item``, ``rating`` 1..5, ``timestamp``), users in order,
    each chunk in a shuffled order (as the real u.data). Bounded memory for any size."""
    check_sizes(preset)
    law = draw_items(preset, seed)
    counts = activity_counts(np.random.default_rng([seed, 0x3117, 0]), preset)
    ends = np.cumsum(counts)
    cuts: np.ndarray | None = None
    first_user = 0
    chunk = 0
    while first_user < preset.users:
        last = int(
            np.searchsorted(ends, (ends[first_user - 1] if first_user else 0) + CHUNK_RATINGS, side="right")
        )
        last = max(last, first_user + 1)
        drawn = draw_chunk(preset, seed, law, counts[first_user:last], first_user, chunk)
        if cuts is None:  # the first chunk sets the cut points (for ml-100k and ml-1m: all ratings)
            cuts = thresholds(drawn["latent"], preset.rating_shares)
        shuffle = np.random.default_rng([seed, 0x3117, 3, chunk]).permutation(len(drawn["item"]))
        yield {
            "user": drawn["user"][shuffle],
            "item": drawn["item"][shuffle],
            "rating": to_stars(drawn["latent"], cuts)[shuffle],
            "timestamp": drawn["timestamp"][shuffle],
        }
        first_user = last
        chunk += 1


def draw_all(preset: MovieLensPreset, seed: int) -> dict[str, np.ndarray]:
    """Every rating of ``preset`` in memory (for tests and benches on the smaller presets)."""
    chunks = list(generate(preset, seed))
    return {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}


def summary_statistics(user: np.ndarray, item: np.ndarray, rating: np.ndarray) -> dict[str, Any]:
    """The figures the presets are shaped by (sizes, density, rating moments, activity, popularity)."""
    per_user = np.bincount(user)
    per_user = per_user[per_user > 0]
    per_item = np.bincount(item)
    per_item = per_item[per_item > 0]
    return {
        "ratings": len(rating),
        "users": len(per_user),
        "items": len(per_item),
        "density": float(len(rating) / (len(per_user) * len(per_item))),
        "mean": float(rating.mean()),
        "sd": float(rating.std()),
        "user_min": int(per_user.min()),
        "user_median": float(np.median(per_user)),
        "user_max": int(per_user.max()),
        "item_min": int(per_item.min()),
        "item_median": float(np.median(per_item)),
        "item_max": int(per_item.max()),
    }
