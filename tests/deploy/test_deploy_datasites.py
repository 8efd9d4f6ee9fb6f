"""Rounds over three real PySyft datasites on 127.0.0.1: agreement with the simulation, resume, dropped
datasites, and scripts/deploy_syft.py end to end (summary.json and the privacy report)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from deploy_helpers import build, deploy_data, run_deploy_script

pytestmark = pytest.mark.slow


def _owner_keys(federation, client_id: int):
    from fedrec.deploy.keys import OwnerKeys

    return OwnerKeys.load(os.path.join(federation.owner_dir(client_id), "keys.json"))


def _spends(logdir: str) -> list[tuple]:
    from privacy.ledger import PrivacyLedger

    with PrivacyLedger.read(os.path.join(logdir, "privacy_ledger.sqlite")) as ledger:
        return sorted(
            (s.client, s.round, s.noise_multiplier, s.sample_rate, s.steps) for s in ledger.client_spends()
        )


def test_three_datasites_two_rounds_match_the_simulation(federation, deployed_run, simulation):
    """Same config and seeds: the deployment's final model is the simulation's within the encryption bound."""
    from fedrec.deploy.sealed import open_global_model

    rounds = deployed_run.summary["rounds"]
    assert [r["completed"] for r in rounds] == [3, 3] and [r["dropped"] for r in rounds] == [0, 0]
    assert deployed_run.out["rounds"] == 2 and deployed_run.out["datasites"] == 3
    # What the coordinator holds is sealed; an owner's model key opens it.
    with open(deployed_run.out["final_model"], "rb") as fh:
        sealed = fh.read()
    run_id = deployed_run.checkpoint["server_state"]["run_id"]
    params = open_global_model(
        sealed,
        key=_owner_keys(federation, 2).model_key,
        run_id=run_id,
        round_idx=2,
        size=simulation.params.size,
    )
    bound = sum(r["aggregate_error_bound"] for r in rounds)  # server_lr = 1
    difference = float(np.max(np.abs(params.astype(np.float64) - simulation.params.astype(np.float64))))
    assert difference <= bound, f"max |deployment - simulation| = {difference} > encryption bound {bound}"
    # Quantisation draws from the same generators, so the two runs agree exactly here.
    assert deployed_run.out["final_model_digest"] == simulation.digest
    # The coordinator's ledger copy holds the simulation's spends; epsilon agrees.
    assert _spends(deployed_run.logdir) == _spends(simulation.logdir)
    with open(os.path.join(simulation.logdir, "summary.json"), encoding="utf-8") as fh:
        simulated = json.load(fh)
    assert rounds[-1]["epsilon"] == pytest.approx(simulated["rounds"][-1]["epsilon"], rel=1e-12)
    # Nothing the coordinator wrote holds a secret context, the model key or the plaintext model.
    assert deployed_run.summary["deployment"]["coordinator_holds"].startswith("public context only")
    model_key = _owner_keys(federation, 0).model_key
    for path in Path(deployed_run.logdir).rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"FRHK\x01\x00\x01" not in content, path  # a secret-role key envelope
            assert model_key not in content and params.tobytes() not in content, path


def test_every_owner_recorded_its_own_spends(federation, deployed_run):
    """Each owner's ledger (on its datasite) holds a spend for each round it trained in, before sending."""
    from privacy.ledger import PrivacyLedger

    for owner in federation.local.owners:
        with PrivacyLedger.read(os.path.join(owner.directory, "privacy_ledger.sqlite")) as ledger:
            rounds = [s.round for s in ledger.client_spends() if s.client == str(owner.client_id)]
            assert {0, 1} <= set(rounds)
            assert ledger.info.client_epsilon_budget == 1000.0


def test_resume_continues_to_the_same_model(federation, deployed_run, tmp_path):
    """One round, stop, resume: the same final model as the uninterrupted run."""
    from fedrec.deploy.coordinator import Coordinator

    config = build(deploy_data(federation.cache))
    first = Coordinator(config, str(tmp_path), federation.specs, public_context=federation.public_context)
    assert first.run(max_rounds=1)["rounds_completed"] == 1
    with pytest.raises(Exception, match="already holds a deployment"):
        Coordinator(
            config, str(tmp_path), federation.specs, public_context=federation.public_context
        ).prepare()
    resumed = Coordinator(
        config, str(tmp_path), federation.specs, public_context=federation.public_context, resume=True
    )
    final = resumed.run()
    assert final["rounds_completed"] == 2
    assert final["final_model_digest"] == deployed_run.out["final_model_digest"]


def test_down_and_slow_datasites_are_dropped_not_fatal(federation, tmp_path):
    """A datasite that is down and one slower than fl.client_timeout are dropped; the round completes."""
    from fedrec.deploy.coordinator import Coordinator
    from fedrec.deploy.local import DatasiteSpec
    from fedrec.deploy.owner import free_port

    down = DatasiteSpec(
        client_id=3, url=f"http://127.0.0.1:{free_port('127.0.0.1')}", email="x@fedrec.org", password="x"
    )
    data = deploy_data(
        federation.cache,
        **{
            "fl.num_workers": 4,
            "fl.client_num_per_round": 4,
            "fl.rounds": 1,
            "fl.min_completion_rate": 0.5,
            "fl.client_timeout": 15,
            "fl.faults": {"hang_clients": [2], "hang_seconds": 45.0},
        },
    )
    coordinator = Coordinator(
        build(data), str(tmp_path), [*federation.specs, down], public_context=federation.public_context
    )
    final = coordinator.run()
    assert final["rounds_completed"] == 1
    (record,) = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    assert record["completed"] == 2 and record["aggregate_clients"] == 2
    reasons = {f["client"]: f["reason"] for f in record["failures"]}
    assert reasons == {2: "timeout", 3: "error"}
    assert record["dropped_clients"] == [2, 3]


def test_deploy_script_writes_summary_and_privacy_report(deployed_run):
    """scripts/deploy_syft.py (the run above): summary.json, the privacy report, one JSON line."""
    logdir = Path(deployed_run.logdir)
    summary = deployed_run.summary
    assert len(summary["rounds"]) == 2 and summary["final"]["rounds_completed"] == 2
    assert summary["deployment"]["mode"] == "pysyft" and len(summary["deployment"]["datasites"]) == 3
    report = json.loads((logdir / "privacy_report.json").read_text())
    assert (logdir / "privacy_report.html").stat().st_size > 0 and (logdir / "privacy_report.md").exists()
    assert deployed_run.out["privacy_report"] == str(logdir / "privacy_report.html")
    assert report["example_level"]["epsilon"]["max"] == pytest.approx(deployed_run.out["epsilon"], rel=1e-9)
    assert deployed_run.out["epsilon"] == pytest.approx(summary["rounds"][-1]["epsilon"], rel=1e-12)
    assert "Traceback" not in deployed_run.stderr


def test_deploy_script_bad_input_is_one_line(tmp_path):
    data = deploy_data(tmp_path)
    data["syft"]["datasites"] = [
        {"client_id": 0, "url": "http://127.0.0.1:9", "email": "a@b.org", "password_file": "p"}
    ]
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_deploy_script("--config", str(path), "--logdir", str(tmp_path / "run"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "syft.public_context" in line
