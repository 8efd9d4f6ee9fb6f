"""Wiring of the ledger and key checks into federated runs (issue 14 items 3, 6 and 8).

- summary.json records the ledger position, and the privacy report checks the ledger against it;
- a resume whose checkpoint names a ledger refuses to start without it;
- the clients' secret and the run's public context are read with one-line errors and proven to be
  one key pair at start-up, before any spend (a deleted public.ctx, a swapped secret.ctx).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from fl_helpers import TINY_DLRM, _with_cache, train_fl, write_config

from fedrec import registry
from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.algorithms.fed_avg import FedAvgWorker
from fedrec.federated.run import RunPaths
from fedrec.federated.simulation import Simulation, SimulationError
from privacy.errors import EncryptionError, LedgerError
from privacy.ledger import PrivacyLedger, ledger_path


def secure(tiny_config, **fl):
    config = tiny_config(secure=True, rounds=1, local_epochs=1, **fl)
    config["privacy"] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7}
    return config


def run(config, logdir, **kwargs):
    return Simulation(build_experiment(config), str(logdir), log=lambda message: None, **kwargs).run()


def spends(logdir) -> int:
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        return len(ledger.client_spends())


@pytest.fixture(scope="module")
def one_secure_round(tmp_path_factory, data_cache):
    """One secure round, run once; tests copy its logdir before changing it."""
    config = _with_cache(TINY_DLRM, data_cache)
    config["fl"].update(secure=True, rounds=1, local_epochs=1)
    config["privacy"] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7}
    logdir = tmp_path_factory.mktemp("secure-one")
    run(config, logdir)
    return config, logdir


def copy_run(source, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def test_summary_records_the_ledger_position_and_the_report_checks_it(one_secure_round):
    _, logdir = one_secure_round
    summary = json.loads((logdir / "summary.json").read_text())
    position = summary["federated"]["privacy"]["ledger_position"]
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        assert position == ledger.position()
        assert position["client_spends"] == len(ledger.client_spends()) == 8


def test_report_refuses_a_ledger_rewound_behind_the_summary(one_secure_round, tmp_path):
    """train_fl.py in subprocesses (each exits, so the ledger file alone holds every row)."""
    from privacy.report.build import build_run_report

    config, _ = one_secure_round
    path = write_config(tmp_path, config)
    logdir = tmp_path / "run"
    first = train_fl("--config", str(path), "--logdir", str(logdir))
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.copy(ledger_path(str(logdir)), tmp_path / "after-round-0.sqlite")
    second = train_fl("--config", str(path), "--logdir", str(logdir), "--resume", "fl.rounds=2")
    assert second.returncode == 0, second.stderr[-2000:]
    build_run_report(str(logdir))  # the intact run reports
    shutil.copy(tmp_path / "after-round-0.sqlite", ledger_path(str(logdir)))  # rewound: round 1 forgotten
    os.remove(logdir / "fl" / "checkpoint.json")  # only summary.json still records where the ledger stood
    with pytest.raises(LedgerError, match="lost records"):
        build_run_report(str(logdir))


def test_resume_refuses_a_missing_ledger_the_checkpoint_names(one_secure_round, tmp_path):
    config, logdir = one_secure_round
    target = copy_run(logdir, tmp_path)
    os.remove(ledger_path(str(target)))
    config = {**config, "fl": {**config["fl"], "rounds": 2}}
    with pytest.raises(LedgerError, match="does not exist"):
        run(config, target, resume=True)
    assert not os.path.exists(ledger_path(str(target)))  # no fresh, empty ledger was created


@pytest.mark.parametrize("damage", ["delete_public", "swap_secret"])
def test_bad_context_files_stop_the_run_before_any_spend(one_secure_round, tmp_path, damage):
    config, logdir = one_secure_round
    target = copy_run(logdir, tmp_path)
    paths = RunPaths(str(target))
    before = spends(target)
    if damage == "delete_public":
        os.remove(paths.public_context)
        match = "public context file not found"
    else:
        other = tmp_path / "other"
        run(config, other)  # another key generation
        shutil.copy(RunPaths(str(other)).secret_context, paths.secret_context)
        match = "."
    config = {**config, "fl": {**config["fl"], "rounds": 2}}
    with pytest.raises(EncryptionError, match=match) as raised:
        run(config, target, resume=True)
    assert "\n" not in str(raised.value)
    assert spends(target) == before  # nothing recorded for round 1


# ---------------------------------------------------------------- no spend for work never sent


@registry.load("fl_algo", "_test_heavy_weight")
class HeavyWeight(FedAvgWorker):
    """Weights no key pair can encode: only each client's own check (before its spend) can see it."""

    def client_weight(self, num_examples: int) -> float:
        return float(num_examples * 1000)


def test_max_weight_below_the_largest_client_is_a_config_error_before_anything_is_written(
    tiny_config, tmp_path
):
    config = secure(tiny_config)
    config["fl"]["encryption"] = {"max_weight": 10}
    with pytest.raises(
        ConfigError, match=r"'fl.encryption.max_weight' = 10: below the largest client"
    ) as raised:
        run(config, tmp_path)
    assert "\n" not in str(raised.value)
    assert not os.path.exists(ledger_path(str(tmp_path)))
    assert not os.path.exists(RunPaths(str(tmp_path)).checkpoint)


def test_an_unencodable_weight_is_refused_by_the_client_before_its_spend(tiny_config, tmp_path):
    config = secure(tiny_config, algorithm="_test_heavy_weight", max_round_retries=1)
    with pytest.raises(SimulationError, match=r"outside \[1, fl\.encryption\.max_weight") as raised:
        run(config, tmp_path)
    assert "nothing is recorded or sent" in str(raised.value)
    assert spends(tmp_path) == 0  # two attempts of 8 clients, nothing recorded
