"""Synthetic data written in the real raw formats, with a planted signal, deterministic by seed.

- Criteo Kaggle ``train.txt``: a hidden logistic model. Each integer field is
  floor(exp(mu + sigma * z)) of a standard normal z (so log(1 + x) is about linear in z) and adds
  w * z to the logit; each categorical field draws a category from a Zipf-like law over
  ``vocab_size`` values (written as 8 hex digits) and adds that category's hidden weight. Missing
  fields follow rates close to the real Kaggle data (I12 is 76 % empty, C22 76 %, ...), and I2 is
  sometimes negative as in the real data. The intercept makes about 25 % of labels 1 (Kaggle:
  25.6 %). A model that learns the weights approaches the planted model's AUC (``oracle_auc`` in
  the returned facts, around 0.8); a model that ignores the features gets 0.5.
- MovieLens ml-100k ``u.data``: with ``synthetic.preset`` (ml-100k, ml-1m, population-1m), the
  realistic sets of ``fedrec.data.synthetic_movielens`` (the real sets' sizes, long tails, noise
  floor and drift). Without one, the old planted generator: rating = clip(round(mu + b_user +
  b_item + p_user . q_item + noise), 1, 5) with rank-``rank`` factors, popularity-skewed items,
  heavy-tailed user activity and timestamps increasing down the file (far easier than real ratings).

Lines are formatted with vectorised numpy (fixed-width digit windows compressed by a mask), so a
million Criteo lines take seconds. Everything is drawn from ``numpy.random.default_rng`` streams
keyed by the seed (and, for Criteo, the chunk number), so the bytes depend only on the arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from fedrec.data.processed import locked, remove_stale
from fedrec.data.synthetic_movielens import MOVIELENS_GENERATOR_VERSION, MovieLensPreset, resolve_preset
from fedrec.data.synthetic_movielens import generate as generate_movielens
from fedrec.data.synthetic_movielens import summary_statistics as movielens_statistics
from fedrec.errors import ConfigError

GENERATOR_VERSION = 1
CRITEO_CHUNK_ROWS = 1 << 16  # rows drawn from one random stream (part of the output's definition)
FORMAT_ROWS = 4096
CRITEO_POSITIVE_RATE = 0.25
MAX_INT_VALUE = 99_999_999  # 8 digits, the widest integer the Kaggle data has (I5)

# Fraction of empty fields, close to the Kaggle train.txt figures.
INT_MISSING = (0.45, 0.0, 0.21, 0.22, 0.026, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.76, 0.22)
CAT_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0,
               0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44)  # fmt: skip
NEGATIVE_RATE = (0.0, 0.1) + (0.0,) * 11  # I2 holds small negative values in the real data
ZIPF_EXPONENT = 1.1
INFORMATIVE_CATS = 10  # categorical fields whose categories carry hidden weight

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# byte -> its 2 hex digits, and 0..9999 -> its 4 decimal digits, as one uint16 / uint32 each
_HEX2 = np.frombuffer("".join(f"{i:02x}" for i in range(256)).encode(), dtype=np.uint16)
_DIGITS4 = np.frombuffer("".join(f"{i:04d}" for i in range(10**4)).encode(), dtype=np.uint32)
_POW10 = 10 ** np.arange(12, dtype=np.int64)  # 10^0 .. 10^11


# ----------------------------------------------------------------------------- formatting


def _int_field(values: np.ndarray, present: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned decimal text of ``values`` (|value| < 10^12) in ``width`` bytes and the mask
    of bytes to keep; built from 4-digit chunks of a lookup table (few integer divisions)."""
    magnitude = np.abs(values)
    chunks = np.stack((magnitude // 10**8, (magnitude // 10**4) % 10**4, magnitude % 10**4), axis=-1)
    chars = _DIGITS4[chunks].view(np.uint8).reshape(*values.shape, 12)[..., 12 - width :]
    ndigits = 1 + np.searchsorted(_POW10[1:], magnitude, side="right")
    negative = values < 0
    slot = np.arange(width)
    keep = slot >= (width - ndigits - negative)[..., None]
    sign_slot = (width - ndigits - 1)[..., None] == slot
    chars = np.where(sign_slot & negative[..., None], np.uint8(45), chars)
    keep &= present[..., None]
    return chars, keep


def _hex_field(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8 lowercase hex digits of uint32 ``values``, or nothing where not ``present``."""
    big_endian = values.astype(">u4").view(np.uint8).reshape(*values.shape, 4)
    chars = _HEX2[big_endian].view(np.uint8).reshape(*values.shape, 8)
    keep = np.broadcast_to(present[..., None], chars.shape)
    return chars, keep


def _assemble(fields: list[tuple[np.ndarray, np.ndarray]], sep: int) -> bytes:
    """Join per-row fields (``chars [n, k, w]``, ``keep [n, k, w]``) with ``sep``, one line per row."""
    n = fields[0][0].shape[0]
    chars, keep = [], []
    for i, (c, k) in enumerate(fields):
        c = c.reshape(n, -1, c.shape[-1])
        k = k.reshape(n, -1, k.shape[-1])
        seps = np.full((n, c.shape[1], 1), sep, dtype=np.uint8)
        if i == len(fields) - 1:
            seps[:, -1, 0] = 10
        chars.append(np.concatenate((c, seps), axis=2).reshape(n, -1))
        keep.append(np.concatenate((k, np.ones((n, k.shape[1], 1), dtype=bool)), axis=2).reshape(n, -1))
    return np.concatenate(chars, axis=1)[np.concatenate(keep, axis=1)].tobytes()


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: a bijection, so distinct inputs give distinct category ids."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


# ----------------------------------------------------------------------------- Criteo

# Generator version of the Criteo rows (part of the cache directory's name): 2 added field
# cardinalities shaped like Kaggle's, pairwise interactions and the calibrated ~0.80 ceiling.
CRITEO_GENERATOR_VERSION = 2
# Distinct values per categorical field in the Kaggle train.txt (C1..C26); a field keeps
# min(this, vocab_size) categories, so small fields (C9: 3, C20: 4) stay small as in the real data.
KAGGLE_CARDINALITY = (1460, 583, 10_131_227, 2_202_608, 305, 24, 12_517, 633, 3, 93_145, 5_683,
                      8_351_593, 3_194, 27, 14_992, 5_461_306, 10, 5_652, 2_173, 4, 7_046_547, 18,
                      15, 286_181, 105, 142_572)  # fmt: skip
TARGET_ORACLE_AUC = 0.80  # expected AUC of the planted logit (the Bayes-optimal score)
INTERACTION_RANK = 4  # rank of the planted pairwise category interactions
INTERACTION_PAIRS = 8  # categorical field pairs whose categories interact
INTERACTION_SHARE = (
    0.15  # share of the planted logit's variance from the interactions (Kaggle: LR ~0.02 AUC below DLRM)
)


def expected_auc(probability: np.ndarray, score: np.ndarray) -> float:
    """AUC of ``score`` in expectation over labels drawn as Bernoulli(``probability``).

    Each pair (i, j) counts with weight p_i (1 - p_j) when i scores above j (ties count half):
    the ceiling any model reaches on rows drawn from the planted model, without label noise.
    """
    order = np.argsort(score, kind="mergesort")
    p = np.asarray(probability, dtype=np.float64)[order]
    s = np.asarray(score)[order]
    _, start = np.unique(s, return_index=True)
    neg = 1.0 - p
    neg_group = np.add.reduceat(neg, start)
    pos_group = np.add.reduceat(p, start)
    neg_below = np.concatenate(([0.0], np.cumsum(neg_group)[:-1]))
    wins = np.sum(pos_group * neg_below + 0.5 * pos_group * neg_group - 0.5 * np.add.reduceat(p * neg, start))
    return float(wins / (p.sum() * neg.sum() - np.sum(p * neg)))


class CriteoSignal:
    """The hidden model of the synthetic Criteo data (all drawn from ``seed``).

    logit = bias + sum_f w_f z_f [integer f present] + sum_f cat_weight_f[c_f] [C_f present]
            + sum_(f,g) s_fg <u_f[c_f], u_g[c_g]> [both present]

    Integer field f is floor(exp(mu_f + sigma_f z_f)) (I2 sometimes small and negative), empty at the
    Kaggle rates (I1 45 %, I10 45 %, I12 76 %, ...). Categorical field f has min(vocab_size, Kaggle
    cardinality) categories drawn from a Zipf law (exponent ZIPF_EXPONENT: a small head holds most
    occurrences, a long tail of categories is seen a few times). Ten informative fields carry a weight
    per category; eight field pairs interact through rank-4 category factors (what DLRM's dot
    interaction can learn and logistic regression cannot). The weights are scaled so that the
    planted logit's expected AUC is TARGET_ORACLE_AUC (0.80) and the intercept so that 25 % of labels
    are 1 (Kaggle: 25.6 %). Rare categories and missing fields make the ceiling hard to reach.
    """

    def __init__(self, *, seed: int, vocab_size: int):
        if vocab_size > 1 << 26:
            raise ConfigError(f"config key 'synthetic.vocab_size' = {vocab_size}: expected at most {1 << 26}")
        rng = np.random.default_rng([seed, 0x5EED, CRITEO_GENERATOR_VERSION])
        self.seed = seed
        self.vocab_size = vocab_size
        self.cardinality = np.minimum(np.array(KAGGLE_CARDINALITY, dtype=np.int64), vocab_size)
        self.mu = rng.uniform(0.5, 5.0, 13)
        self.sigma = rng.uniform(0.8, 1.8, 13)
        self.dense_weight = rng.normal(0.0, 0.35, 13)
        informative = rng.permutation(26)[:INFORMATIVE_CATS]
        self.cat_scale = np.zeros(26)
        self.cat_scale[informative] = rng.uniform(0.35, 0.7, INFORMATIVE_CATS)
        self.cat_weight = rng.normal(0.0, 1.0, (26, vocab_size)) * self.cat_scale[:, None]
        pairs = [(f, g) for f in range(26) for g in range(f + 1, 26)]
        chosen = rng.choice(len(pairs), INTERACTION_PAIRS, replace=False)
        self.pairs = np.array([pairs[i] for i in sorted(chosen)], dtype=np.int64)
        self.factors = rng.normal(0.0, 1.0, (26, vocab_size, INTERACTION_RANK)) / np.sqrt(INTERACTION_RANK)
        self.pair_scale = np.ones(INTERACTION_PAIRS)
        self.id_salt = np.uint32(rng.integers(0, 1 << 32, dtype=np.uint64))
        self.bias = 0.0
        # Scale the parts to a fixed interaction share and a fixed ceiling, so that the signal (and the
        # AUC a model can reach) does not depend on the seed's luck.
        calibration = self.draw(rng, 40_000)
        additive, interaction = calibration["additive"], calibration["interaction"]
        share = np.sqrt(INTERACTION_SHARE / (1 - INTERACTION_SHARE)) * additive.std() / interaction.std()
        self.pair_scale *= share
        interaction = interaction * share
        scale = self._calibrate_scale(additive + interaction)
        self.dense_weight *= scale
        self.cat_weight *= scale
        self.pair_scale *= scale
        self.bias = self._calibrate_bias((additive + interaction) * scale)

    def category_ids(self, field: int, ranks: np.ndarray) -> np.ndarray:
        """The 32-bit value written (as hex) for category ``ranks`` of ``field``."""
        return _fmix32((np.uint32(field) << np.uint32(26)) | ranks.astype(np.uint32)) ^ self.id_salt

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """One chunk of rows: raw integers (with presence), category ranks (with presence), logits, labels."""
        z = rng.standard_normal((n, 13))
        ints = np.minimum(np.floor(np.exp(self.mu + self.sigma * z)), MAX_INT_VALUE).astype(np.int64)
        int_present = rng.random((n, 13)) >= np.array(INT_MISSING)
        negative = rng.random((n, 13)) < np.array(NEGATIVE_RATE)
        ints = np.where(negative, -rng.integers(1, 4, (n, 13)), ints)
        informative_z = np.where(int_present & ~negative, z, 0.0)
        # Zipf law over each field's own categories (inverse CDF of a continuous power law).
        a = 1.0 - ZIPF_EXPONENT
        top = (self.cardinality + 1.0) ** a
        ranks = (np.floor((1.0 + rng.random((n, 26)) * (top - 1.0)) ** (1.0 / a)) - 1).astype(np.int64)
        ranks = np.clip(ranks, 0, self.cardinality - 1)
        cat_present = rng.random((n, 26)) >= np.array(CAT_MISSING)
        cat_logit = np.where(cat_present, self.cat_weight[np.arange(26), ranks], 0.0)
        additive = informative_z @ self.dense_weight + cat_logit.sum(axis=1)
        f, g = self.pairs[:, 0], self.pairs[:, 1]
        both = cat_present[:, f] & cat_present[:, g]
        products = np.einsum("npk,npk->np", self.factors[f, ranks[:, f]], self.factors[g, ranks[:, g]])
        interaction = np.where(both, products, 0.0) @ self.pair_scale
        logit = self.bias + additive + interaction
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
        return {"ints": ints, "int_present": int_present, "ranks": ranks, "cat_present": cat_present,
                "logit": logit, "label": label, "additive": additive, "interaction": interaction}  # fmt: skip

    @staticmethod
    def _calibrate_bias(logit: np.ndarray) -> float:
        """The intercept that makes the mean click probability CRITEO_POSITIVE_RATE."""
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < CRITEO_POSITIVE_RATE:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    @classmethod
    def _calibrate_scale(cls, logit: np.ndarray) -> float:
        """The factor on the (centred) logit whose expected AUC, at the calibrated intercept, is the target."""
        lo, hi = 0.01, 100.0
        for _ in range(40):
            mid = np.sqrt(lo * hi)
            scaled = logit * mid
            p = 1.0 / (1.0 + np.exp(-(scaled + cls._calibrate_bias(scaled))))
            if expected_auc(p, scaled) < TARGET_ORACLE_AUC:
                lo = mid
            else:
                hi = mid
        return float(np.sqrt(lo * hi))

    def format(self, rows: dict[str, np.ndarray]) -> bytes:
        n = len(rows["label"])
        label = ((rows["label"] + 48).astype(np.uint8)[:, None], np.ones((n, 1), dtype=bool))
        ints = _int_field(rows["ints"], rows["int_present"], 8)
        cat_values = np.stack([self.category_ids(f, rows["ranks"][:, f]) for f in range(26)], axis=1)
        cats = _hex_field(cat_values, rows["cat_present"])
        return _assemble([label, ints, cats], sep=9)


def write_criteo(path: str, *, rows: int, seed: int, vocab_size: int) -> dict[str, Any]:
    """Write ``rows`` lines of synthetic Criteo ``train.txt`` to ``path``.

    Returns facts about the planted model (on the first million rows): positive rate, the AUC of the
    true logits on the drawn labels (``oracle_auc``) and in expectation over labels
    (``expected_oracle_auc``, about TARGET_ORACLE_AUC).
    """
    signal = CriteoSignal(seed=seed, vocab_size=vocab_size)
    logits, labels = [], []
    with open(path, "wb") as fh:
        for chunk, start in enumerate(range(0, rows, CRITEO_CHUNK_ROWS)):
            n = min(CRITEO_CHUNK_ROWS, rows - start)
            drawn = signal.draw(np.random.default_rng([seed, chunk]), n)
            for lo in range(0, n, FORMAT_ROWS):  # small pieces keep the temporaries in cache
                fh.write(signal.format({key: value[lo : lo + FORMAT_ROWS] for key, value in drawn.items()}))
            if start < 1_000_000:
                logits.append(drawn["logit"])
                labels.append(drawn["label"])
    logit, label = np.concatenate(logits), np.concatenate(labels)
    return {
        "positive_rate": float(label.mean()),
        "oracle_auc": auc(label, logit),
        "expected_oracle_auc": expected_auc(1.0 / (1.0 + np.exp(-logit)), logit),
    }


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half), by ranks."""
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average the ranks of tied scores.
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    tied = counts > 1
    for s, c in zip(start[tied], counts[tied]):
        ranks[order[s : s + c]] = s + (c + 1) / 2
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


# ----------------------------------------------------------------------------- MovieLens


def write_movielens(path: str, *, rows: int, seed: int, users: int, items: int, rank: int) -> dict[str, Any]:
    """Write ``rows`` ratings in ml-100k ``u.data`` format (``user \\t item \\t rating \\t timestamp``).

    Returns facts about the planted model: its RMSE (rounded ratings vs the noiseless values) and
    the global mean's RMSE, the floor and ceiling a rating model should land between.
    """
    if rows < users:
        raise ConfigError(
            f"config key 'synthetic.rows' = {rows}: expected at least synthetic.users ({users})"
        )
    if rows > users * items // 2:
        raise ConfigError(
            f"config key 'synthetic.rows' = {rows}: expected at most half of users x items ({users * items // 2})"
        )
    rng = np.random.default_rng([seed, 0x3117])
    # Heavy-tailed activity, at least min(20, rows // users) ratings each (ml-100k: at least 20).
    floor = min(20, rows // users)
    weight = rng.lognormal(0.0, 1.0, users)
    counts = floor + np.floor(weight / weight.sum() * (rows - floor * users)).astype(np.int64)
    counts = np.minimum(counts, items)
    while counts.sum() < rows:
        room = np.flatnonzero(counts < items)
        extra = min(rows - int(counts.sum()), len(room))
        counts[rng.choice(room, extra, replace=False)] += 1
    popularity = np.log(1.0 / np.arange(1, items + 1) ** 0.9)[rng.permutation(items)]
    user_col, item_col = [], []
    per_chunk = max(1, (4 << 20) // items)
    for lo in range(0, users, per_chunk):
        hi = min(users, lo + per_chunk)
        keys = popularity + rng.gumbel(size=(hi - lo, items))  # Gumbel top-k: sampling without replacement
        order = np.argsort(-keys, axis=1)
        take = np.arange(items) < counts[lo:hi, None]
        user_col.append(np.broadcast_to(np.arange(lo, hi)[:, None], order.shape)[take])
        item_col.append(order[take])
    user = np.concatenate(user_col)
    item = np.concatenate(item_col)
    p = rng.normal(0.0, 1.0, (users, rank)) / np.sqrt(rank)
    q = rng.normal(0.0, 1.0, (items, rank))
    user_bias = rng.normal(0.0, 0.35, users)
    item_bias = rng.normal(0.0, 0.45, items)
    mean = 3.55
    clean = mean + user_bias[user] + item_bias[item] + 0.8 * np.einsum("ij,ij->i", p[user], q[item])
    rating = np.clip(np.rint(clean + rng.normal(0.0, 0.45, len(user))), 1, 5).astype(np.int64)
    order = rng.permutation(len(user))
    user, item, rating = user[order], item[order], rating[order]
    timestamp = 874_724_710 + np.cumsum(rng.integers(1, 120, len(user)))
    ones = np.ones((len(user), 1), dtype=bool)
    text = _assemble(
        [
            _int_field(user + 1, ones[:, 0], 8),
            _int_field(item + 1, ones[:, 0], 8),
            ((rating + 48).astype(np.uint8)[:, None], ones),
            _int_field(timestamp, ones[:, 0], 10),
        ],
        sep=9,
    )
    with open(path, "wb") as fh:
        fh.write(text)
    clean_clipped = np.clip(clean, 1, 5)[order]
    return {
        "planted_rmse": float(np.sqrt(np.mean((rating - clean_clipped) ** 2))),
        "global_mean_rmse": float(np.std(rating)),
    }


def movielens_cache_name(s: Any) -> str:
    """Directory name of a synthetic MovieLens file: every setting that shapes its bytes."""
    if s.preset is None:
        return f"synthetic_movielens_r{s.rows}_s{s.seed}_u{s.users}_i{s.items}_k{s.rank}_g{GENERATOR_VERSION}"
    return (
        f"synthetic_movielens_{s.preset}_r{s.rows}_s{s.seed}_u{s.users}_i{s.items}_k{s.rank}"
        f"_g{MOVIELENS_GENERATOR_VERSION}"
    )


def write_movielens_for(path: str, s: Any) -> dict[str, Any]:
    """The MovieLens file for ``synthetic`` settings ``s``: a realistic preset, or the old generator."""
    if s.preset is None:
        return write_movielens(path, rows=s.rows, seed=s.seed, users=s.users, items=s.items, rank=s.rank)
    preset = resolve_preset(s.preset, users=s.users, items=s.items, rows=s.rows, rank=s.rank)
    return write_movielens_preset(path, preset, seed=s.seed)


def write_movielens_preset(path: str, preset: MovieLensPreset, *, seed: int) -> dict[str, Any]:
    """Write a realistic MovieLens set (``fedrec.data.synthetic_movielens``) as ml-100k ``u.data``;
    returns its summary statistics (mean, sd, activity and popularity ranges)."""
    users, items, ratings = [], [], []
    with open(path, "wb") as fh:
        for chunk in generate_movielens(preset, seed):
            n = len(chunk["rating"])
            for lo in range(0, n, 1 << 18):  # small pieces keep the text temporaries small
                hi = min(n, lo + (1 << 18))
                ones = np.ones(hi - lo, dtype=bool)
                fh.write(
                    _assemble(
                        [
                            _int_field(chunk["user"][lo:hi] + 1, ones, 8),
                            _int_field(chunk["item"][lo:hi] + 1, ones, 8),
                            ((chunk["rating"][lo:hi] + 48).astype(np.uint8)[:, None], ones[:, None]),
                            _int_field(chunk["timestamp"][lo:hi], ones, 10),
                        ],
                        sep=9,
                    )
                )
            users.append(chunk["user"].astype(np.int32))
            items.append(chunk["item"].astype(np.int32))
            ratings.append(chunk["rating"].astype(np.int8))
    stats = movielens_statistics(np.concatenate(users), np.concatenate(items), np.concatenate(ratings))
    return {
        key: value for key, value in stats.items() if key in ("mean", "sd", "density", "user_max", "item_max")
    }


# ----------------------------------------------------------------------------- cache


def synthetic_path(dataset: str, preproc: Any) -> str:
    """Where the synthetic raw file for these settings lives under ``preproc.cache_dir``."""
    s = preproc.synthetic
    if dataset == "criteo":
        name, filename = (
            f"synthetic_criteo_r{s.rows}_s{s.seed}_v{s.vocab_size}_g{CRITEO_GENERATOR_VERSION}",
            "train.txt",
        )
    elif dataset == "movielens":
        name = movielens_cache_name(s)
        filename = "u.data"
    else:
        raise ConfigError(
            f"config key 'model.preproc.dataset' = {dataset!r}: no synthetic generator (criteo, movielens)"
        )
    return os.path.join(os.path.abspath(preproc.cache_dir), name, filename)


def ensure_synthetic_file(dataset: str, preproc: Any, *, log: Callable[[str], Any] = print) -> str:
    """Generate the synthetic raw file once (atomically); later calls return the existing file."""
    path = synthetic_path(dataset, preproc)
    if os.path.isfile(path):
        return path
    directory, filename = os.path.split(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"config key 'model.preproc.cache_dir' = {preproc.cache_dir!r}: cannot create "
            f"{directory} ({err.strerror})"
        ) from None
    with locked(path):
        if os.path.isfile(path):
            return path
        remove_stale(directory, filename)
        tmp = os.path.join(directory, f".{filename}.tmp-{os.getpid()}-w")
        s = preproc.synthetic
        try:
            if dataset == "criteo":
                facts = write_criteo(tmp, rows=s.rows, seed=s.seed, vocab_size=s.vocab_size)
            else:
                facts = write_movielens_for(tmp, s)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    details = ", ".join(f"{k} {v:.3f}" for k, v in facts.items())
    log(f"{dataset}: generated synthetic {path} ({s.rows} rows, seed {s.seed}; {details})")
    return path
