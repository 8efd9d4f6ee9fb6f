"""Processed datasets: named splits of memory-mappable arrays, batched into torch tensors.

A dataset class is registered with ``@registry.load('dataset', name)`` and provides
``prepare(preproc, log=...) -> ProcessedData``: it parses the raw file (or generates synthetic data
in the same raw format), writes arrays once, and reuses them while the inputs are unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fedrec.errors import DataError


class ArraySplit:
    """Rows of equal-length named arrays (for example dense, sparse, label), possibly memory-mapped."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"arrays of unequal length in one split: {lengths}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def subset(self, indices: np.ndarray) -> ArraySplit:
        """Rows at ``indices`` (copied into memory; used for client partitions)."""
        indices = np.asarray(indices)
        return ArraySplit({name: np.ascontiguousarray(a[indices]) for name, a in self.arrays.items()})

    def rows(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """One batch as tensors: integer arrays become int64, the rest float32."""
        batch = {}
        for name, array in self.arrays.items():
            values = np.asarray(array[indices])
            if not values.flags.writeable:  # a slice of a read-only memory map: torch wants its own copy
                values = values.copy()
            if np.issubdtype(values.dtype, np.integer) and name != "label":
                batch[name] = torch.from_numpy(values.astype(np.int64, copy=False))
            else:
                batch[name] = torch.from_numpy(values.astype(np.float32, copy=False))
        return batch

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: np.random.Generator | None = None,
        drop_last: bool = False,
        max_batches: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches; with ``shuffle`` the order is a permutation drawn from ``generator``."""
        n = len(self)
        if shuffle:
            rng = generator if generator is not None else np.random.default_rng()
            order = rng.permutation(n)
        else:
            order = None
        count = 0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                break
            if max_batches is not None and count >= max_batches:
                break
            if order is None:
                yield self.rows(slice(start, stop))  # type: ignore[arg-type]
            else:
                # Sorted indices read memory-mapped files sequentially; the batch's row order
                # does not matter to the loss.
                yield self.rows(np.sort(order[start:stop]))
            count += 1

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)


@dataclass
class ProcessedData:
    """The splits of a prepared dataset plus what preparation counted."""

    splits: dict[str, ArraySplit]
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> ArraySplit:
        if name not in self.splits:
            raise DataError(f"no split {name!r}; have {', '.join(self.splits)}")
        return self.splits[name]


class Dataset:
    """Base for registered datasets. Subclasses set the class constants and implement ``prepare``."""

    TASK: ClassVar[str]  # 'ctr' (binary labels) or 'rating'
    NUM_DENSE: ClassVar[int] = 0
    NUM_SPARSE: ClassVar[int] = 0

    @classmethod
    def prepare(cls, preproc: Any, *, log: Any = print, progress: bool = True) -> ProcessedData:
        raise NotImplementedError


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary name, fsync, rename: readers never see a partial file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
