"""The ledger agrees with Opacus: clients train with a real PrivacyEngine, record each round's spend
before "sending", and the ledger's (and the report's) epsilon equals each engine's own epsilon."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from privacy.ledger import PrivacyLedger, ledger_path
from privacy.report.build import build_run_report


def test_ledger_matches_opacus_privacy_engines(tmp_path):
    torch.manual_seed(0)
    delta, rounds, local_steps = 1e-5, 3, 8
    engines = {}
    with PrivacyLedger.open(ledger_path(tmp_path), delta=delta, accountant="rdp") as ledger:
        clients = {}
        for client, size in (("alice", 64), ("bob", 128), ("carol", 96)):
            features = torch.randn(size, 5)
            labels = (features[:, 0] > 0).float()
            model = torch.nn.Linear(5, 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            loader = DataLoader(TensorDataset(features, labels), batch_size=16)
            engine = PrivacyEngine(accountant="rdp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, optimizer, loader = engine.make_private(
                    module=model,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=1.2,
                    max_grad_norm=1.0,
                )
            clients[client] = (model, optimizer, loader)
            engines[client] = engine
        for round_index in range(rounds):
            for client, (model, optimizer, loader) in clients.items():
                steps = 0
                while steps < local_steps:
                    for x, y in loader:
                        optimizer.zero_grad()
                        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
                        loss.backward()
                        optimizer.step()
                        steps += 1
                        if steps == local_steps:
                            break
                # Recorded (committed) before the client's update would be sent.
                ledger.record_client_spend(
                    client=client,
                    round=round_index,
                    noise_multiplier=optimizer.noise_multiplier,
                    sample_rate=1 / len(loader),
                    steps=local_steps,
                )
        ledger_eps = ledger.epsilons()
    for client, engine in engines.items():
        assert len(engine.accountant.history) >= 1
        assert ledger_eps[client] == pytest.approx(engine.get_epsilon(delta), rel=1e-9)
    report = build_run_report(str(tmp_path))
    assert {c["client"]: c["epsilon"] for c in report["clients"]} == pytest.approx(ledger_eps)
    assert report["example_level"]["epsilon"]["max"] == pytest.approx(max(ledger_eps.values()))
