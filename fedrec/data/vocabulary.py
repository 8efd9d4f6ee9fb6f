"""Categorical values -> embedding indices: a vectorised hash-table vocabulary, or hashing.

Keys are ``(field + 1) << 32 | value`` (0 = empty), as ``fedrec.data.criteo_parser`` produces them,
so all fields share one open-addressing table (linear probing, multiplicative hashing). Each slot
is one uint64 holding ``key << 27 | id``: a lookup reads one word. Ids count per field from 1 in
order of first appearance, so they depend on the data order only, never on the table layout.
Slot 0 is reserved for the empty key (it is never claimed), so empty fields look up id 0 on the
fast path like any other key.
"""

from __future__ import annotations

import numpy as np

from fedrec.errors import DataError

ID_BITS = 27
ID_MASK = np.uint64((1 << ID_BITS) - 1)
_NEW = ID_MASK  # id of a slot claimed in the current batch, before ids are handed out
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_KEY_SHIFT = np.uint64(ID_BITS)
_FIELD_SHIFT = np.uint64(32)
MAX_LOAD = 0.4
WARM_UP_KEYS = 4096


class Vocabulary:
    """Ids of categorical keys for ``num_fields`` fields, in order of first appearance per field."""

    def __init__(self, num_fields: int, *, bits: int = 14):
        self.num_fields = num_fields
        self.sizes = np.zeros(num_fields, dtype=np.int64)  # distinct keys per field
        self._alloc(bits)

    def _alloc(self, bits: int) -> None:
        self.bits = bits
        self.table = np.zeros(1 << bits, dtype=np.uint64)
        self._shift = np.uint64(64 - bits)

    @property
    def size(self) -> int:
        return int(self.sizes.sum())

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        h = keys * _GOLDEN
        h >>= self._shift
        return h.view(np.int64)

    def _fast(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids found in a key's home slot or the next one, positions of the keys not found there)."""
        h = self._hash(keys)
        slots = self.table[h]
        ids = (slots & ID_MASK).astype(np.int32)
        miss = np.flatnonzero((slots >> _KEY_SHIFT) != keys)
        if len(miss):
            h = h[miss]
            h += 1
            h &= (1 << self.bits) - 1
            slots = self.table[h]
            found = (slots >> _KEY_SHIFT) == keys[miss]
            ids[miss[found]] = (slots[found] & ID_MASK).astype(np.int32)
            miss = miss[~found]
        return ids, miss

    def _probe(self, keys: np.ndarray, *, insert: bool) -> np.ndarray:
        """Slot index of each key (claiming free slots with id _NEW when ``insert``), -1 if absent."""
        mask = (1 << self.bits) - 1
        found = np.full(len(keys), -1, dtype=np.int64)
        pending = np.arange(len(keys))
        h = self._hash(keys)
        k = keys
        while len(pending):
            slot = self.table[h]
            occupied = (slot != 0) | (h == 0)
            hit = occupied & ((slot >> _KEY_SHIFT) == k)
            found[pending[hit]] = h[hit]
            if insert:
                free = ~occupied
                self.table[h[free]] = (k[free] << _KEY_SHIFT) | _NEW
                stay = ~hit
                h = np.where(free, h, (h + 1) & mask)[stay]  # claimants re-check: won, or move on
            else:
                stay = occupied & ~hit
                h = ((h + 1) & mask)[stay]
            pending, k = pending[stay], k[stay]
        return found

    def _reserve(self, extra: int) -> None:
        """Keep the load at most MAX_LOAD after adding up to ``extra`` keys (a low load keeps most
        keys in their home slot, which the one-gather fast path finds)."""
        needed = (self.size + extra + 1) / MAX_LOAD
        if needed <= (1 << self.bits):
            return
        bits = self.bits + (2 if self.bits < 20 else 1)  # grow fast while small: fewer rehashes
        while needed > (1 << bits):
            bits += 1
        entries = self.table[self.table != 0]
        self._alloc(bits)
        slots = self._probe(entries >> _KEY_SHIFT, insert=True)
        self.table[slots] = entries

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Ids (int32) of ``keys`` (uint64, 0 = empty -> id 0), adding the new ones."""
        keys = keys.ravel()
        if self.size < len(keys) // 8 and len(keys) >= 2 * WARM_UP_KEYS:
            # A young table would miss on nearly every key of a large batch (each repeat of a
            # new key probed and sorted). Adding a prefix first puts the frequent keys in, and
            # the rest mostly hits; the order of first appearance is unchanged.
            cut = max(WARM_UP_KEYS, len(keys) // 16)
            return np.concatenate((self.add(keys[:cut]), self.add(keys[cut:])))
        ids, miss = self._fast(keys)
        if not len(miss):
            return ids
        self._reserve(len(miss))
        where = self._probe(keys[miss], insert=True)
        claimed = (self.table[where] & ID_MASK) == _NEW
        if claimed.any():
            self._number(where[claimed])
        ids[miss] = (self.table[where] & ID_MASK).astype(np.int32)
        return ids

    def _number(self, slots: np.ndarray) -> None:
        """Give the slots claimed in this batch their ids: per field, in order of first appearance."""
        new_slots, first = np.unique(slots, return_index=True)
        # Order by first appearance without sorting: the first positions are distinct.
        by_position = np.full(len(slots), -1, dtype=np.int64)
        by_position[first] = np.arange(len(new_slots))
        new_slots = new_slots[by_position[by_position >= 0]]
        field = ((self.table[new_slots] >> _KEY_SHIFT) >> _FIELD_SHIFT).astype(np.uint8) - np.uint8(1)
        by_field = np.argsort(field, kind="stable")  # a radix sort for uint8
        counts = np.bincount(field, minlength=self.num_fields)
        field_sorted = field[by_field].astype(np.int64)
        rank = np.arange(len(field_sorted)) - (np.cumsum(counts) - counts)[field_sorted]
        ids = self.sizes[field_sorted] + 1 + rank
        if len(ids) and ids.max() >= int(_NEW):
            raise DataError(f"a categorical field has more than {int(_NEW) - 1} distinct values; use hashing")
        target = new_slots[by_field]
        self.table[target] = (self.table[target] & ~ID_MASK) | ids.astype(np.uint64)
        self.sizes += counts

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Ids (int32) of ``keys``; 0 for empty keys and keys never added."""
        keys = keys.ravel()
        ids, miss = self._fast(keys)
        if not len(miss):
            return ids
        where = self._probe(keys[miss], insert=False)
        found = where >= 0
        ids[miss] = 0
        ids[miss[found]] = (self.table[where[found]] & ID_MASK).astype(np.int32)
        return ids

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(field int64, 32-bit value uint32, id int64) of every key."""
        entries = self.table[self.table != 0]
        keys = entries >> _KEY_SHIFT
        field = (keys >> _FIELD_SHIFT).astype(np.int64) - 1
        value = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        return field, value, (entries & ID_MASK).astype(np.int64)


class CategoryIndexer:
    """Categorical keys [n, fields] -> embedding indices [n, fields] (int32), by vocabulary or hashing.

    Vocabulary (``max_ind_range`` = -1): training rows are added while they stream past; when the
    training days end (``finalize``), categories seen fewer than ``min_count`` times are dropped and
    the rest keep their order of first appearance, numbered from 1; index 0 is shared by dropped,
    unseen and empty values. Training rows written before ``finalize`` hold first-appearance ids;
    ``remap_train`` turns them into final indices (only needed when ``min_count`` > 1).

    Hashing (``max_ind_range`` = M > 0): 0 for empty, otherwise 1 + value mod (M - 1), so every
    table has M rows and nothing is kept in memory.
    """

    def __init__(self, num_fields: int, *, max_ind_range: int, min_count: int):
        if max_ind_range > 2**31 - 1:
            raise DataError(f"max_ind_range = {max_ind_range}: expected at most {2**31 - 1} (int32 indices)")
        self.num_fields = num_fields
        self.hashing = max_ind_range > 0
        self.max_ind_range = max_ind_range
        self.min_count = min_count
        self.vocab = None if self.hashing else Vocabulary(num_fields)
        self.finalized = False
        self._counts: np.ndarray | None = None  # occurrences by offsets[field] + id
        self._old_offsets = np.zeros(num_fields + 1, dtype=np.int64)  # the offsets _counts uses
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._remap: np.ndarray | None = None  # offsets[field] + first-appearance id -> final index
        self._offsets: np.ndarray | None = None

    def train_indices(self, keys: np.ndarray) -> np.ndarray:
        if self.hashing:
            return self._hash(keys)
        if self.finalized:
            raise DataError("training rows after the evaluation rows started")
        assert self.vocab is not None
        ids = self.vocab.add(keys).reshape(keys.shape)
        if self.min_count > 1:
            self._pending.append(ids)
            self._pending_len += ids.size
            if self._pending_len >= max(4 << 20, self.vocab.size):
                self._flush_counts()
        return ids

    def eval_indices(self, keys: np.ndarray) -> np.ndarray:
        if self.hashing:
            return self._hash(keys)
        self.finalize()
        assert self.vocab is not None
        ids = self.vocab.lookup(keys).reshape(keys.shape)
        return ids if self._remap is None else self.remap(ids)

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        if self.max_ind_range == 1:
            return np.zeros(keys.shape, dtype=np.int32)
        value = keys & np.uint64(0xFFFFFFFF)
        value %= np.uint64(self.max_ind_range - 1)
        value += np.uint64(1)
        index = value.astype(np.int32)
        index[keys == 0] = 0
        return index

    def _field_offsets(self) -> np.ndarray:
        assert self.vocab is not None
        return np.concatenate(([0], np.cumsum(self.vocab.sizes + 1)))

    def _flush_counts(self) -> None:
        if not self._pending:
            return
        offsets = self._field_offsets()
        combined = np.concatenate([ids + offsets[:-1] for ids in self._pending], axis=None)
        counts = np.bincount(combined, minlength=int(offsets[-1]))
        if self._counts is not None:
            old = self._counts
            old_offsets = self._old_offsets
            for f in range(self.num_fields):
                n = old_offsets[f + 1] - old_offsets[f]
                counts[offsets[f] : offsets[f] + n] += old[old_offsets[f] : old_offsets[f + 1]]
        self._counts, self._old_offsets = counts, offsets
        self._pending, self._pending_len = [], 0

    def finalize(self) -> None:
        """The training rows are over: fix the vocabulary (apply ``min_count``)."""
        if self.finalized:
            return
        self.finalized = True
        if self.hashing or self.min_count <= 1:
            return
        self._flush_counts()
        offsets = self._field_offsets()
        counts = self._counts if self._counts is not None else np.zeros(int(offsets[-1]), dtype=np.int64)
        remap = np.zeros(int(offsets[-1]), dtype=np.int32)
        for f in range(self.num_fields):
            lo, hi = offsets[f], offsets[f + 1]
            keep = counts[lo + 1 : hi] >= self.min_count
            remap[lo + 1 : hi][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        self._remap, self._offsets = remap, offsets

    @property
    def needs_train_remap(self) -> bool:
        return self._remap is not None

    def remap(self, ids: np.ndarray) -> np.ndarray:
        """First-appearance ids [n, fields] -> final indices (after ``finalize`` with min_count > 1)."""
        assert self._remap is not None and self._offsets is not None
        return self._remap[ids + self._offsets[:-1].astype(np.int32)]

    def table_sizes(self) -> list[int]:
        """Rows of each field's embedding table, index 0 included."""
        self.finalize()
        if self.hashing:
            return [self.max_ind_range] * self.num_fields
        assert self.vocab is not None
        if self._remap is None:
            return [int(n) + 1 for n in self.vocab.sizes]
        offsets = self._offsets
        assert offsets is not None
        return [
            int(self._remap[offsets[f] : offsets[f + 1]].max(initial=0)) + 1 for f in range(self.num_fields)
        ]

    def categories(self) -> tuple[np.ndarray, np.ndarray]:
        """(values uint32, offsets int64 [fields + 1]): field f's category at index i >= 1 is
        ``values[offsets[f] + i - 1]``."""
        self.finalize()
        assert self.vocab is not None
        field, value, ids = self.vocab.entries()
        if self._remap is not None and self._offsets is not None:
            final = self._remap[self._offsets[field] + ids]
            keep = final > 0
            field, value, ids = field[keep], value[keep], final[keep].astype(np.int64)
        sizes = np.bincount(field, minlength=self.num_fields)
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        values = np.empty(len(value), dtype=np.uint32)
        values[offsets[field] + ids - 1] = value  # ids are 1..size within each field
        return values, offsets
