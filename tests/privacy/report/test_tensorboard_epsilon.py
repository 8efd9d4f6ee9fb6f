"""Epsilon reaches TensorBoard: scalars written by the helper read back from the event file."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from privacy.ledger import PrivacyLedger, ledger_path
from privacy.report.tensorboard import log_ledger_epsilon


def test_ledger_epsilon_scalars_round_trip(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    with PrivacyLedger.open(ledger_path(tmp_path), delta=1e-5) as ledger:
        for r in range(3):
            ledger.record_round(
                round=r,
                noise_multiplier=1.0,
                clip_norm=1.0,
                client_sampling_rate=0.1,
                num_sampled=5,
                min_survivors=4,
            )
            for client in range(r + 1):
                ledger.record_client_spend(
                    client=client, round=r, noise_multiplier=1.0, sample_rate=0.1, steps=10
                )
            written = log_ledger_epsilon(writer, ledger, step=r)
        final = ledger.epsilons()
        user = ledger.user_level_epsilon()
    writer.close()
    assert written["privacy/example_epsilon_max"] == pytest.approx(max(final.values()))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert set(tags) == {
        "privacy/example_epsilon_max",
        "privacy/example_epsilon_median",
        "privacy/example_epsilon_min",
        "privacy/user_level_epsilon",
    }
    user_values = events.Scalars("privacy/user_level_epsilon")
    assert [e.step for e in user_values] == [0, 1, 2]
    assert user_values[-1].value == pytest.approx(user, rel=1e-6)
    assert events.Scalars("privacy/example_epsilon_max")[-1].value == pytest.approx(
        max(final.values()), rel=1e-6
    )
