"""Split a training set among simulated clients: IID, Dirichlet non-IID over labels, natural per user.

A :class:`Partition` is two integer arrays: ``order`` (row indices of the training split, grouped by
client) and ``offsets`` (client ``c`` owns ``order[offsets[c]:offsets[c + 1]]``). That is all the
state a simulation of any number of clients keeps; a client's rows are read only when it trains.
When the rows are already grouped by client (one client per user over the MovieLens splits), ``order``
is the identity and is not stored (``None``): a partition of a million users is then its offsets and
user ids, 16 bytes per user, not also 4 bytes per training row.
Partitions are deterministic given the seed and are saved as ``.npz`` (no pickle) so that every MPI
rank memory-maps the same one.

- ``iid``: a seeded permutation cut into near-equal parts.
- ``dirichlet``: each client draws its label distribution from Dirichlet(alpha * p), p the global
  label distribution, and fills an equal share of the data from it (Hsu, Qi, Brown 2019,
  https://arxiv.org/abs/1909.06335), the seed's way to mimic users on Criteo. Small alpha gives
  clients dominated by one label; large alpha approaches IID. Ratings are binned to integers.
- ``natural``: one client per user (MovieLens), or users grouped into ``num_clients`` clients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrec.data.file_rows import read_rows, scan_rows
from fedrec.errors import ConfigError, DataError

PARTITION_KINDS = ("iid", "dirichlet", "natural")


@dataclass
class Partition:
    """Rows of a training split grouped by client."""

    kind: str
    order: np.ndarray | None  # row indices into the training split, grouped by client; None: identity
    offsets: np.ndarray  # [num_clients + 1]; client c owns order[offsets[c]:offsets[c + 1]]
    users: np.ndarray | None = (
        None  # natural partitions: the users of client c are users[user_offsets[c]:...]
    )
    user_offsets: np.ndarray | None = None  # None (with users): client c owns users[c] alone

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_rows(self) -> int:
        """Training rows the partition covers."""
        return int(self.offsets[-1])

    def client_rows(self, client: int) -> np.ndarray:
        """Training-split row indices of ``client`` (sorted, so memory-mapped reads are sequential)."""
        self._check_client(client)
        start, stop = int(self.offsets[client]), int(self.offsets[client + 1])
        if self.order is None:
            return np.arange(start, stop, dtype=np.int64)
        return np.sort(np.asarray(self.order[start:stop]))

    def client_span(self, client: int) -> tuple[int, int] | None:
        """``(start, stop)``: the client's rows as one contiguous range, when the order is the identity."""
        self._check_client(client)
        if self.order is not None:
            return None
        return int(self.offsets[client]), int(self.offsets[client + 1])

    def client_size(self, client: int) -> int:
        self._check_client(client)
        return int(self.offsets[client + 1] - self.offsets[client])

    def client_users(self, client: int) -> np.ndarray:
        """Users owned by ``client`` (natural partitions only)."""
        self._check_client(client)
        if self.users is None:
            raise DataError(f"a {self.kind!r} partition does not assign users to clients")
        if self.user_offsets is None:
            return np.asarray(self.users[client : client + 1])
        return np.asarray(self.users[self.user_offsets[client] : self.user_offsets[client + 1]])

    def sizes(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def _check_client(self, client: int) -> None:
        if not 0 <= int(client) < self.num_clients:
            raise DataError(f"client {client} out of range: the partition has {self.num_clients} clients")

    def save(self, path: str) -> None:
        """Write ``path`` (.npz) atomically."""
        arrays: dict[str, Any] = {"kind": np.array(self.kind), "offsets": np.asarray(self.offsets)}
        if self.order is not None:
            arrays["order"] = np.asarray(self.order)
        if self.users is not None:
            arrays["users"] = np.asarray(self.users)
        if self.users is not None and self.user_offsets is not None:
            arrays["user_offsets"] = np.asarray(self.user_offsets)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Partition:
        """Read a partition written by :meth:`save` (no pickle)."""
        if not os.path.isfile(path):
            raise DataError(f"{path}: partition file not found")
        try:
            with np.load(path, allow_pickle=False) as npz:
                kind = str(npz["kind"])
                offsets = npz["offsets"]
                order = npz["order"] if "order" in npz.files else None
                users = npz["users"] if "users" in npz.files else None
                user_offsets = npz["user_offsets"] if "user_offsets" in npz.files else None
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: not a partition file ({err})") from None
        if (
            kind not in PARTITION_KINDS
            or offsets.ndim != 1
            or len(offsets) < 2
            or (order is not None and offsets[-1] != len(order))
            or (users is not None and user_offsets is None and len(users) != len(offsets) - 1)
        ):
            raise DataError(f"{path}: inconsistent partition file")
        return cls(kind, order, offsets, users, user_offsets)


def _group(client_of_row: np.ndarray, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets) grouping row indices by their client id (stable: rows keep their order)."""
    order = np.argsort(client_of_row, kind="stable")
    counts = np.bincount(client_of_row, minlength=num_clients)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    index_dtype = np.int32 if len(client_of_row) < 2**31 else np.int64
    return order.astype(index_dtype), offsets


def _check_counts(num_rows: int, num_clients: int, what: str) -> None:
    if num_clients < 1:
        raise ConfigError(f"--num_workers {num_clients}: expected at least 1 client")
    if num_clients > num_rows:
        raise ConfigError(
            f"--num_workers {num_clients}: the training split has only {num_rows} {what}, "
            "too few to give each worker a sample"
        )


def equal_sizes(num_rows: int, num_clients: int) -> np.ndarray:
    """Near-equal client sizes summing to ``num_rows`` (the first ``num_rows % num_clients`` get one more)."""
    sizes = np.full(num_clients, num_rows // num_clients, dtype=np.int64)
    sizes[: num_rows % num_clients] += 1
    return sizes


def iid_partition(num_rows: int, num_clients: int, *, seed: int) -> Partition:
    """A seeded random permutation cut into near-equal client shares."""
    _check_counts(num_rows, num_clients, "rows")
    rng = np.random.default_rng([seed, 0x11D])
    client_of_row = np.empty(num_rows, dtype=np.int64)
    client_of_row[rng.permutation(num_rows)] = np.repeat(
        np.arange(num_clients), equal_sizes(num_rows, num_clients)
    )
    order, offsets = _group(client_of_row, num_clients)
    return Partition("iid", order, offsets)


def label_classes(labels: np.ndarray) -> np.ndarray:
    """Integer class of each row: binary clicks as they are, ratings rounded to the nearest integer."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64)
    return np.rint(labels.astype(np.float64)).astype(np.int64)


def dirichlet_partition(labels: np.ndarray, num_clients: int, *, alpha: float, seed: int) -> Partition:
    """Non-IID over labels: client c's label mix ~ Dirichlet(alpha * p), equal client sizes.

    Clients are filled in turn; when a label runs out, the client's remaining quota is drawn from
    the labels left, in proportion to its own mix (the last clients therefore get what is left).
    """
    labels = label_classes(labels)
    num_rows = len(labels)
    _check_counts(num_rows, num_clients, "rows")
    if not alpha > 0:
        raise ConfigError(f"config key 'fl.dirichlet_alpha' = {alpha!r}: expected a number > 0")
    rng = np.random.default_rng([seed, 0xD1])
    classes, class_of_row = np.unique(labels, return_inverse=True)
    num_classes = len(classes)
    pools = [rng.permutation(np.flatnonzero(class_of_row == k)) for k in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    prior = np.array([len(p) for p in pools], dtype=np.float64) / num_rows
    mixes = None
    if num_classes > 1:
        mixes = rng.dirichlet(alpha * prior, size=num_clients)
        degenerate = ~np.all(np.isfinite(mixes), axis=1)  # every gamma draw underflowed (tiny alpha)
        if degenerate.any():
            mixes[degenerate] = np.eye(num_classes)[
                rng.choice(num_classes, size=int(degenerate.sum()), p=prior)
            ]
    client_of_row = np.empty(num_rows, dtype=np.int64)
    for client, size in enumerate(equal_sizes(num_rows, num_clients)):
        remaining = np.array([len(p) for p in pools], dtype=np.int64) - taken
        want = np.zeros(num_classes, dtype=np.int64)
        if mixes is None:
            want[0] = size
        else:
            want = rng.multinomial(size, mixes[client])
        want = np.minimum(want, remaining)
        short = int(size - want.sum())
        while short > 0:  # top up from the labels that still have rows, by this client's own mix
            room = remaining - want
            weights = (mixes[client] if mixes is not None else np.ones(num_classes)) * (room > 0)
            if weights.sum() <= 0:
                weights = (room > 0).astype(np.float64)
            extra = np.minimum(rng.multinomial(short, weights / weights.sum()), room)
            if extra.sum() == 0:
                extra[int(np.argmax(room))] = min(short, int(room.max()))
            want += extra
            short = int(size - want.sum())
        for k in np.flatnonzero(want):
            rows = pools[k][taken[k] : taken[k] + want[k]]
            client_of_row[rows] = client
            taken[k] += want[k]
    order, offsets = _group(client_of_row, num_clients)
    return Partition("dirichlet", order, offsets)


def natural_partition(users: np.ndarray, num_clients: int | None, *, seed: int) -> Partition:
    """Each user's rows go to one client: one client per user, or users grouped into ``num_clients``.

    Users are listed in ascending id; with grouping, a seeded permutation deals users round-robin.
    """
    run_starts = _sorted_run_starts(users)
    if run_starts is not None:  # rows already grouped by user (the MovieLens splits): no sort, no int64 copy
        distinct = read_items_sorted(users, run_starts)
    else:
        users = np.asarray(users).astype(np.int64)
        distinct = np.unique(users)
    if num_clients is None:
        num_clients = len(distinct)
    if num_clients > len(distinct):
        raise ConfigError(
            f"--num_workers {num_clients}: the training split has only {len(distinct)} users, "
            "too few to give each worker a sample (natural partition: one or more users per client)"
        )
    _check_counts(len(users), num_clients, "rows")
    if run_starts is not None and num_clients == len(distinct):
        # One client per user over grouped rows: client c owns rows offsets[c]:offsets[c + 1] in order
        # (what the stable sort below gives), found by binary search, O(users log rows); the row order
        # is the identity and client c's user is distinct[c], so neither is stored.
        offsets = np.r_[run_starts, len(users)].astype(np.int64)
        return Partition("natural", None, offsets, distinct, None)
    if num_clients == len(distinct):
        client_of_user = np.arange(len(distinct))
    else:
        rng = np.random.default_rng([seed, 0x05E])
        client_of_user = np.empty(len(distinct), dtype=np.int64)
        client_of_user[rng.permutation(len(distinct))] = np.arange(len(distinct)) % num_clients
    client_of_row = client_of_user[np.searchsorted(distinct, users.astype(np.int64))]
    order, offsets = _group(client_of_row, num_clients)
    user_order, user_offsets = _group(client_of_user, num_clients)
    return Partition("natural", order, offsets, distinct[user_order], user_offsets)


def _sorted_run_starts(users: np.ndarray) -> np.ndarray | None:
    """First row of each run of equal users when ``users`` never decreases, else None; read in chunks
    (a memory-mapped column is read, not mapped: the peak holds one chunk, not the column)."""
    starts: list[np.ndarray] = []
    previous = None
    for start, chunk in scan_rows(users):
        if len(chunk) and previous is not None and chunk[0] < previous:
            return None
        if len(chunk) > 1 and bool(np.any(chunk[1:] < chunk[:-1])):
            return None
        changed = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
        if previous is None or (len(chunk) and chunk[0] != previous):
            changed = np.r_[0, changed]
        starts.append(changed.astype(np.int64) + start)
        if len(chunk):
            previous = chunk[-1]
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


def read_items_sorted(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` (int64) for sorted ``rows``, reading the column chunk by chunk."""
    out = np.empty(len(rows), dtype=np.int64)
    for start, chunk in scan_rows(values):
        lo, hi = np.searchsorted(rows, [start, start + len(chunk)])
        out[lo:hi] = chunk[rows[lo:hi] - start]
    return out


def make_partition(
    kind: str,
    train_arrays: dict[str, np.ndarray],
    num_clients: int | None,
    *,
    seed: int,
    alpha: float = 0.5,
) -> Partition:
    """Partition a training split (its named arrays) by ``kind``; input errors name the key at fault."""
    labels = train_arrays["label"]
    if kind == "natural":
        if "user" not in train_arrays:
            raise ConfigError(
                "config key 'fl.partition' = 'natural': the data has no users (natural needs movielens)"
            )
        return natural_partition(train_arrays["user"], num_clients, seed=seed)
    if num_clients is None:
        raise ConfigError(
            f"config key 'fl.num_workers' = null: only the natural partition allows it, not {kind!r}"
        )
    if kind == "iid":
        return iid_partition(len(labels), num_clients, seed=seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha=alpha, seed=seed)
    raise ConfigError(f"config key 'fl.partition' = {kind!r}: expected one of {', '.join(PARTITION_KINDS)}")


STATISTICS_BLOCK_ROWS = 1 << 20  # rows per block of clients: the statistics' temporaries stay this small


def _client_blocks(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive client ranges [c0, c1) of about STATISTICS_BLOCK_ROWS rows (at least one client each)."""
    blocks, c0, num_clients = [], 0, len(offsets) - 1
    while c0 < num_clients:
        c1 = int(np.searchsorted(offsets, offsets[c0] + STATISTICS_BLOCK_ROWS, side="right")) - 1
        c1 = min(max(c1, c0 + 1), num_clients)
        blocks.append((c0, c1))
        c0 = c1
    return blocks


def _block_classes(partition: Partition, labels: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Label classes of the rows ``start:stop`` in client order."""
    if partition.order is None:
        chunk = read_rows(labels, start, stop)
    else:
        chunk = np.asarray(labels[np.asarray(partition.order[start:stop])])
    return chunk if np.issubdtype(chunk.dtype, np.integer) else label_classes(chunk)


def partition_statistics(partition: Partition, labels: np.ndarray) -> dict[str, Any]:
    """Figures for summary.json: client sizes, label skew (mean total-variation distance to the global mix)."""
    sizes = partition.sizes()
    offsets = np.asarray(partition.offsets)
    # Two passes over blocks of clients (~1M rows each): the global label mix, then per client one
    # segment sum per class: array speed, and temporaries of one block for a million clients.
    blocks = _client_blocks(offsets)
    totals: dict[int, int] = {}
    for c0, c1 in blocks:
        block_values, block_counts = np.unique(
            _block_classes(partition, labels, int(offsets[c0]), int(offsets[c1])), return_counts=True
        )
        for value, count in zip(block_values.tolist(), block_counts.tolist()):
            totals[int(value)] = totals.get(int(value), 0) + int(count)
    values = np.array(sorted(totals), dtype=np.int64)
    global_counts = np.array([totals[int(v)] for v in values], dtype=np.int64)
    global_mix = global_counts / max(int(global_counts.sum()), 1)
    tv_sum, single_label = 0.0, 0
    for c0, c1 in blocks:
        start, stop = int(offsets[c0]), int(offsets[c1])
        classes = _block_classes(partition, labels, start, stop)
        block_sizes = sizes[c0:c1]
        counts = np.zeros((c1 - c0, len(values)), dtype=np.int64)
        if len(classes):
            starts = np.minimum(offsets[c0:c1] - start, len(classes) - 1)
            for k, value in enumerate(values):
                counts[:, k] = np.add.reduceat((classes == value).astype(np.int32), starts)
            counts[block_sizes == 0] = 0  # reduceat gives an empty segment the row at its start
        mixes = counts / np.maximum(block_sizes[:, None], 1)
        tv_sum += float((0.5 * np.abs(mixes - global_mix[None, :]).sum(axis=1)).sum())
        single_label += int(((counts > 0).sum(axis=1) == 1).sum())
    stats: dict[str, Any] = {
        "kind": partition.kind,
        "num_clients": partition.num_clients,
        "rows": int(sizes.sum()),
        "client_rows": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "mean": float(sizes.mean()),
            "max": int(sizes.max()),
        },
        "label_values": [int(v) for v in values],
        "global_label_mix": [float(x) for x in global_mix],
        "mean_tv_distance_to_global_mix": tv_sum / max(partition.num_clients, 1),
        "single_label_clients": single_label,
    }
    if partition.users is not None:
        if partition.user_offsets is None:
            stats["users_per_client"] = {"min": 1, "max": 1}
        else:
            users_per_client = np.diff(np.asarray(partition.user_offsets))
            stats["users_per_client"] = {
                "min": int(users_per_client.min()),
                "max": int(users_per_client.max()),
            }
    return stats
