"""A federated run's layout under LOGDIR, the spec every rank receives, and the global model files.

Global models live in client storage (``LOGDIR/fl/clients/global/round_NNNNNN.npy``), immutable per
round and identified by the SHA-256 of their values; the aggregator's checkpoint commits a round by
naming that digest.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

import numpy as np

from fedrec.config import ExperimentConfig
from fedrec.errors import FedrecError
from fedrec.federated.worker import (
    GlobalModel,
)

# --------------------------------------------------------------------------------------------------
# Run layout and the spec every rank receives
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where a federated run keeps its state under LOGDIR."""

    logdir: str

    @property
    def fl(self) -> str:
        return os.path.join(self.logdir, "fl")

    @property
    def clients(self) -> str:  # the trainers' persistent storage (client side)
        return os.path.join(self.fl, "clients")

    @property
    def aggregator(self) -> str:  # the aggregator's persistent storage
        return os.path.join(self.fl, "aggregator")

    @property
    def partition(self) -> str:
        return os.path.join(self.fl, "partition.npz")

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.fl, "checkpoint.json")

    @property
    def private_rows(self) -> str:
        return os.path.join(self.clients, "private")

    @property
    def secret_context(self) -> str:
        return os.path.join(self.clients, "keys", "secret.ctx")

    @property
    def public_context(self) -> str:
        return os.path.join(self.aggregator, "public.ctx")

    @property
    def best_model(self) -> str:  # train.early_stopping: the best validated round's global model
        return os.path.join(self.clients, "global", "best.npy")

    def global_model(self, round_idx: int) -> str:
        return os.path.join(self.clients, "global", f"round_{round_idx:06d}.npy")


@dataclass(frozen=True)
class RunSpec:
    """What every rank needs to rebuild its side of the run (sent with each task; small)."""

    run_id: str
    config: ExperimentConfig
    logdir: str
    device: str  # for ranks without a gpu_map entry
    world_size: int

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.logdir)


# --------------------------------------------------------------------------------------------------
# Global model files (client storage): immutable per round, identified by the digest of their values
# --------------------------------------------------------------------------------------------------


def params_digest(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params, dtype=np.float32).tobytes()).hexdigest()


def write_global_model(path: str, params: np.ndarray) -> str:
    """Write ``params`` (float32) atomically; returns its digest."""
    params = np.ascontiguousarray(params, dtype=np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}.npy"
    np.save(tmp, params, allow_pickle=False)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return params_digest(params)


def read_global_model(path: str, round_idx: int, digest: str) -> GlobalModel:
    try:
        params = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FedrecError(f"{path}: cannot read the global model of round {round_idx} ({err})") from None
    if params_digest(params) != digest:
        raise FedrecError(f"{path}: global model of round {round_idx} does not match the checkpoint's digest")
    params.setflags(write=False)
    return GlobalModel(round_idx, params, digest)


def one_line(err: BaseException) -> str:
    """An exception as one line for logs and failure records (PySyft's ``public_message`` preferred)."""
    text = str(getattr(err, "public_message", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]
