"""Aggregator checkpoints: JSON round trip, random states restored, foreign checkpoints refused."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedrec.errors import ConfigError, FedrecError
from fedrec.federated.checkpoint import (
    AggregatorState,
    capture_rng,
    check_resume,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def test_round_trip_and_rng_restore(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = AggregatorState(
        round_idx=4,
        global_digest="ab",
        config_fingerprint="cf",
        layout_digest="ld",
        rng=capture_rng(),
        history=[{"round": 3, "val": {"auc": 0.7}}],
        ledger_position={"client_spends": 9},
    )
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    path = str(tmp_path / "checkpoint.json")
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded == state
    restore_rng(loaded.rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_foreign_or_corrupt_checkpoints_are_one_line_errors(tmp_path):
    state = AggregatorState(round_idx=1, global_digest="x", config_fingerprint="cf", layout_digest="ld")
    with pytest.raises(ConfigError, match="another config"):
        check_resume(state, config_fingerprint="other", layout_digest="ld", path="ck.json")
    with pytest.raises(ConfigError, match="another model"):
        check_resume(state, config_fingerprint="cf", layout_digest="zz", path="ck.json")
    path = tmp_path / "checkpoint.json"
    path.write_text('{"round_idx": 1')
    with pytest.raises(FedrecError, match="not a federated checkpoint") as err:
        load_checkpoint(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(FedrecError, match="no federated checkpoint"):
        load_checkpoint(str(tmp_path / "missing.json"))
