"""Update schema: the ordered (name, shape) list of a model update, its hash, flatten and unflatten.

Every client and the aggregator bind to the same schema; its SHA-256 travels in each payload header,
so an update for another model (or another parameter order) is rejected before it is added.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from privacy.errors import EncryptionError


class UpdateSchema:
    """Ordered parameter names and shapes of a model update.

    Args:
        entries: ``(name, shape)`` pairs in the order the flat vector uses.
    """

    def __init__(self, entries: Iterable[tuple[str, Iterable[int]]]) -> None:
        items: list[tuple[str, tuple[int, ...]]] = []
        for entry in entries:
            if not (isinstance(entry, tuple | list) and len(entry) == 2):
                raise EncryptionError(f"schema entry {entry!r}: expected a (name, shape) pair")
            name, shape = entry
            if not isinstance(name, str) or not name:
                raise EncryptionError(f"schema entry name {name!r}: expected a non-empty string")
            dims = tuple(shape)
            if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 0 for d in dims):
                raise EncryptionError(
                    f"schema entry {name!r} shape {shape!r}: expected non-negative integers"
                )
            items.append((name, tuple(int(d) for d in dims)))
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise EncryptionError(f"schema names {names}: expected unique names")
        self.entries: tuple[tuple[str, tuple[int, ...]], ...] = tuple(items)
        self.sizes = tuple(math.prod(shape) for _, shape in self.entries)
        self.size = sum(self.sizes)
        if self.size == 0:
            raise EncryptionError("schema: expected at least one parameter value, got none")
        canonical = json.dumps(
            {"format": 1, "entries": [[n, list(s)] for n, s in self.entries]}, separators=(",", ":")
        )
        self.hash = hashlib.sha256(canonical.encode()).digest()

    @classmethod
    def from_update(cls, update: Mapping[str, Any]) -> UpdateSchema:
        """Schema of a ``name -> tensor`` mapping (torch tensors or numpy arrays), in its key order."""
        return cls((name, tuple(np.shape(_as_numpy(value)))) for name, value in update.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UpdateSchema) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"UpdateSchema({len(self.entries)} entries, {self.size} values, hash={self.hash.hex()[:12]})"

    def flatten(self, update: Mapping[str, Any] | np.ndarray) -> np.ndarray:
        """One float64 vector in schema order from a mapping (exact keys and shapes) or a flat array."""
        if isinstance(update, Mapping):
            keys = list(update)
            expected = [name for name, _ in self.entries]
            if sorted(keys) != sorted(expected):
                missing = sorted(set(expected) - set(keys))
                unknown = sorted(set(keys) - set(expected))
                raise EncryptionError(f"update keys: missing {missing}, unknown {unknown} for {self!r}")
            parts = []
            for name, shape in self.entries:
                array = _as_numpy(update[name])
                if tuple(array.shape) != shape:
                    raise EncryptionError(f"update {name!r} has shape {tuple(array.shape)}: expected {shape}")
                parts.append(np.asarray(array, dtype=np.float64).reshape(-1))
            return np.concatenate(parts)
        array = _as_numpy(update)
        if array.ndim != 1 or array.size != self.size:
            raise EncryptionError(f"flat update of shape {array.shape}: expected ({self.size},) for {self!r}")
        return np.asarray(array, dtype=np.float64)

    def unflatten(self, flat: np.ndarray, *, dtype: Any = np.float64) -> dict[str, np.ndarray]:
        """Split a flat vector back into ``name -> array`` of the schema's shapes (numpy; use
        ``torch.from_numpy`` for tensors)."""
        vector = np.asarray(flat)
        if vector.ndim != 1 or vector.size != self.size:
            raise EncryptionError(
                f"flat vector of shape {vector.shape}: expected ({self.size},) for {self!r}"
            )
        out, start = {}, 0
        for (name, shape), size in zip(self.entries, self.sizes):
            out[name] = vector[start : start + size].astype(dtype).reshape(shape)
            start += size
        return out


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor without importing torch
        return value.detach().cpu().double().numpy()
    return np.asarray(value)
