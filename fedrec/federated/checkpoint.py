"""Aggregator checkpoints: one JSON file, replaced atomically after every completed round.

What a resumed run needs to reach the same final model as an uninterrupted one:

- the next round to run and the digest of the global model the clients start it from (the model
  file itself is written, immutable and named by round, before the checkpoint that commits it);
- the random states (Python, NumPy, torch). Sampling, batch order, DP noise and quantisation draw
  from generators keyed by (seed, round, attempt, client), so these states hold nothing the rounds
  depend on; they are kept so any code that does use the global generators resumes identically;
- the privacy ledger position (spend rows committed when the round closed; rows written after it
  by an interrupted round stay in the ledger: it over-counts, never under-counts);
- the config fingerprint, the public-context digest (secure mode) and the per-round history.

JSON, not pickle or ``torch.load``: nothing in a checkpoint is executable.
"""

from __future__ import annotations

import base64
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fedrec.data.base import write_json_atomic
from fedrec.errors import ConfigError, FedrecError

CHECKPOINT_VERSION = 1


@dataclass
class AggregatorState:
    """Everything the aggregator keeps between rounds."""

    round_idx: int  # the next round to run
    global_digest: str  # sha256 of the clients' global model for round_idx
    config_fingerprint: str
    layout_digest: str
    history: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    ledger_position: dict[str, int] | None = None
    public_context_digest: str | None = None
    server_state: dict[str, Any] = field(default_factory=dict)
    version: int = CHECKPOINT_VERSION


def capture_rng() -> dict[str, Any]:
    """The global generators' states as JSON-able data."""
    np_state: Any = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def restore_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))


def check_checkpoint_presence(path: str, *, resume: bool, logdir: str, what: str) -> None:
    """``--resume`` needs the checkpoint at ``path``; a fresh run must not find one (``what``: the kind
    of run, e.g. 'federated' or 'deployment')."""
    have = os.path.exists(path)
    if resume and not have:
        raise FedrecError(f"{path}: no {what} checkpoint to resume from")
    if not resume and have:
        raise ConfigError(
            f"--logdir {logdir} already holds a {what} run ({path}); "
            "pass --resume to continue it or choose a new --logdir"
        )


def save_checkpoint(path: str, state: AggregatorState) -> None:
    """Write the checkpoint to a temporary name, fsync, rename over the old one."""
    write_json_atomic(path, asdict(state))


def load_checkpoint(path: str) -> AggregatorState:
    """Read a checkpoint; a missing, truncated or foreign file is a one-line error."""
    if not os.path.isfile(path):
        raise FedrecError(f"{path}: no federated checkpoint to resume from")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("version") != CHECKPOINT_VERSION:
            raise FedrecError(
                f"{path}: checkpoint version {data.get('version')!r}, expected {CHECKPOINT_VERSION}"
            )
        return AggregatorState(**data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as err:
        raise FedrecError(f"{path}: not a federated checkpoint ({err})") from None


def check_resume(state: AggregatorState, *, config_fingerprint: str, layout_digest: str, path: str) -> None:
    """Refuse to resume a checkpoint written under another config or for another model."""
    if state.config_fingerprint != config_fingerprint:
        raise ConfigError(
            f"{path}: --resume from a checkpoint of another config (fingerprint {state.config_fingerprint}, "
            f"this config {config_fingerprint}); use the run's own config or a new --logdir"
        )
    if state.layout_digest != layout_digest:
        raise ConfigError(f"{path}: --resume from a checkpoint of another model (parameter layout differs)")


def resume_checkpoint(path: str, *, config_fingerprint: str, layout_digest: str) -> AggregatorState:
    """The checkpoint to resume from, checked against this config and model; restores the generators."""
    state = load_checkpoint(path)
    check_resume(state, config_fingerprint=config_fingerprint, layout_digest=layout_digest, path=path)
    restore_rng(state.rng)
    return state


def initial_state(
    *, global_digest: str, config_fingerprint: str, layout_digest: str, **extra: Any
) -> AggregatorState:
    """Round 0's aggregator state (``extra``: public_context_digest, server_state)."""
    return AggregatorState(
        round_idx=0,
        global_digest=global_digest,
        config_fingerprint=config_fingerprint,
        layout_digest=layout_digest,
        rng=capture_rng(),
        **extra,
    )
