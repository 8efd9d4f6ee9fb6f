"""Client-side storage of private parameter rows (MF's user embeddings), versioned by round attempt.

Parameters a model lists in ``PRIVATE_PARAMETERS`` never leave their client. In the simulation the
clients' devices are one directory: one memory-mapped file per private parameter with two slots per
user, and one int64 state word per user. A client task reads its users' rows, trains, and writes the
new rows into the *other* slot, then flips the state word (a single aligned 8-byte store, so a
``kill -9`` leaves either the old or the new state, never a mix).

The state word is ``tag * 2 + slot`` where ``tag`` numbers the round attempt that wrote the row.
Reading in attempt ``t`` takes the newest slot unless it was written *by attempt t itself*: that can
only be a write from a run that crashed during ``t``, and a resumed run redoes ``t`` from the rows
as they were before, so it reaches the same rows an uninterrupted run would. Memory is the rows of
the users being trained, whatever the number of users; the files grow with the users, as a real
deployment's devices would.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch

from fedrec.data.file_rows import read_items
from fedrec.errors import FedrecError
from fedrec.federated.client_round import attempt_tag

__all__ = ["PrivateRowStore", "attempt_tag"]

STATE_FILE = "state.npy"
NEVER_WRITTEN = -1


class PrivateRowStore:
    """Two-slot, attempt-tagged rows of each private parameter, indexed by user id."""

    def __init__(self, directory: str, arrays: dict[str, np.memmap], state: np.memmap):
        self.directory = directory
        self.arrays = arrays  # name -> memmap [2, num_users, *row_shape]
        self.state = state  # memmap [num_users] int64

    @staticmethod
    def _file(directory: str, name: str) -> str:
        return os.path.join(directory, name.replace("/", "_") + ".npy")

    @classmethod
    def create(cls, directory: str, initial: Mapping[str, torch.Tensor | np.ndarray]) -> PrivateRowStore:
        """Write a fresh store whose slot 0 holds ``initial`` (``name -> [num_users, ...]``)."""
        os.makedirs(directory, exist_ok=True)
        arrays = {}
        num_users = None
        for name, value in initial.items():
            rows = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            rows = rows.astype(np.float32, copy=False)
            if num_users is None:
                num_users = rows.shape[0]
            elif rows.shape[0] != num_users:
                raise FedrecError(f"private parameter {name} has {rows.shape[0]} rows, expected {num_users}")
            path = cls._file(directory, name)
            memmap = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(2, *rows.shape))
            memmap[0] = rows
            memmap.flush()
            arrays[name] = memmap
        if num_users is None:
            raise FedrecError("no private parameters to store")
        state = np.lib.format.open_memmap(
            os.path.join(directory, STATE_FILE), mode="w+", dtype=np.int64, shape=(num_users,)
        )
        state[:] = NEVER_WRITTEN
        state.flush()
        return cls(directory, arrays, state)

    @classmethod
    def open(cls, directory: str, names: list[str]) -> PrivateRowStore:
        """Open an existing store (every rank memory-maps the same files)."""
        try:
            arrays = {name: np.load(cls._file(directory, name), mmap_mode="r+") for name in names}
            state = np.load(os.path.join(directory, STATE_FILE), mmap_mode="r+")
        except (OSError, ValueError) as err:
            raise FedrecError(f"{directory}: cannot open the private row store ({err})") from None
        return cls(directory, arrays, state)

    @property
    def num_users(self) -> int:
        return int(self.state.shape[0])

    def _read_slots(self, users: np.ndarray, tag: int) -> np.ndarray:
        words = np.asarray(self.state[users])
        slot = np.where(words < 0, 0, words & 1)
        written_now = (words >= 0) & ((words >> 1) == tag)
        return np.where(written_now, 1 - slot, slot)

    def read(self, users: np.ndarray, *, tag: int) -> dict[str, np.ndarray]:
        """The rows of ``users`` as attempt ``tag`` must see them (copies)."""
        users = np.asarray(users, dtype=np.int64)
        slots = self._read_slots(users, tag)
        # Read from the files, not through the maps: scattered reads through a map would leave most of
        # the store's pages in this process's RSS (a million users: 264 bytes each).
        flat = slots * self.num_users + users
        return {
            name: read_items(array.reshape(-1, *array.shape[2:]), flat) for name, array in self.arrays.items()
        }

    def read_all(self, *, tag: int, chunk: int = 65536) -> dict[str, np.ndarray]:
        """Every user's rows (for evaluation), read in chunks."""
        out = {name: np.empty(array.shape[1:], dtype=np.float32) for name, array in self.arrays.items()}
        for start in range(0, self.num_users, chunk):
            users = np.arange(start, min(start + chunk, self.num_users))
            for name, rows in self.read(users, tag=tag).items():
                out[name][users] = rows
        return out

    def write(self, users: np.ndarray, rows: Mapping[str, np.ndarray], *, tag: int) -> None:
        """Store new rows of ``users`` written by attempt ``tag``; the old rows stay in the other slot."""
        users = np.asarray(users, dtype=np.int64)
        words = np.asarray(self.state[users])
        current = np.where(words < 0, 0, words & 1)
        rewrite = (words >= 0) & ((words >> 1) == tag)  # redo of this attempt: keep the base slot
        target = np.where(rewrite, current, 1 - current)
        for name, array in self.arrays.items():
            array[target, users] = np.asarray(rows[name], dtype=np.float32)
            array.flush()
        self.state[users] = tag * 2 + target
        self.state.flush()
