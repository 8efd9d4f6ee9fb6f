"""fl.row_normalize: a plaintext mean whose embedding rows are divided by the weight of the clients
that touched them (hand-computed), and the configurations that refuse it."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.codec import PlainCodec
from fedrec.federated.worker import ParamLayout


class TableAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(3, 2)
        self.head = nn.Linear(2, 1)


def aggregate(codec: PlainCodec, updates: list[tuple[np.ndarray, float]]) -> np.ndarray:
    running = codec.new_sum(tag=0)
    for delta, weight in updates:
        codec.add(running, (delta, weight))  # what PlainCodec.encode sends
    closed, _ = codec.close(running)
    return codec.decode_mean(closed, tag=0).mean


def test_rows_are_divided_by_the_weight_of_the_clients_that_touched_them():
    layout = ParamLayout.from_model(TableAndHead())
    assert layout.row_tables == ["table.weight"]
    assert layout.names == ["table.weight", "head.weight", "head.bias"]  # table rows are values 0..5
    # client A (weight 1) touched rows 0, 1; client B (weight 3) touched rows 1 and (one value of) 2.
    a = np.array([1.0, 2.0, 4.0, -4.0, 0.0, 0.0, 0.5, 0.5, 1.0], dtype=np.float32)
    b = np.array([0.0, 0.0, 8.0, 0.0, 0.0, 2.0, 0.25, -0.5, 2.0], dtype=np.float32)
    plain = aggregate(PlainCodec(layout, bits=24), [(a, 1.0), (b, 3.0)])
    normalized = aggregate(PlainCodec(layout, bits=24, row_normalize=True), [(a, 1.0), (b, 3.0)])
    want_plain = (1 * a + 3 * b) / 4
    want = want_plain.copy()
    want[0:2] = (1 * a[0:2]) / 1  # row 0: only A
    want[2:4] = (1 * a[2:4] + 3 * b[2:4]) / 4  # row 1: both
    want[4:6] = (3 * b[4:6]) / 3  # row 2: only B (a row with one non-zero value counts as touched)
    np.testing.assert_allclose(plain, want_plain, atol=1e-6)
    np.testing.assert_allclose(normalized, want, atol=1e-6)
    assert not np.allclose(normalized, plain)


def test_a_row_nobody_touched_stays_put():
    layout = ParamLayout.from_model(TableAndHead())
    a = np.zeros(layout.size, dtype=np.float32)
    a[0] = 1.0
    a[7] = 3.0
    mean = aggregate(PlainCodec(layout, bits=24, row_normalize=True), [(a, 2.0), (np.zeros_like(a), 2.0)])
    np.testing.assert_allclose(mean[:6], [1.0, 0, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(mean[7], 1.5, atol=1e-6)  # dense parameters keep the plain mean


def fl_config(**fl):
    return build_experiment(
        {
            "model": {"name": "dlrm", "preproc": {"dataset": "criteo"}},
            "fl": {"num_workers": 10, "client_num_per_round": 5, "row_normalize": True, **fl},
            "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        }
    )


def test_row_normalize_is_refused_with_secure_aggregation_and_user_dp():
    with pytest.raises(ConfigError, match=r"fl\.row_normalize.*fl\.secure"):
        fl_config(secure=True)
    with pytest.raises(ConfigError, match=r"fl\.row_normalize.*user_dp"):
        fl_config(secure=False, user_dp={"clip_norm": 1.0, "noise_multiplier": 1.0})
    assert fl_config(secure=False).fl.row_normalize
