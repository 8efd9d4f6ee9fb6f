"""MF in deployment by Federated Reconstruction: datasites keep no per-user rows, yet reach the simulation's model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from deploy_helpers import ROOT, build, run_deploy_script

from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.client_round import local_users, ridge_user_rows
from fedrec.models.mf import MatrixFactorization, MFConfig


def mf_deploy_data(cache) -> dict:
    """configs/syft_mf.yml on a smaller synthetic set, with its data cache."""
    data = yaml.safe_load((ROOT / "configs" / "syft_mf.yml").read_text())
    data["model"]["preproc"]["synthetic"].update({"rows": 6000, "users": 120, "items": 200})
    data["model"]["preproc"]["cache_dir"] = str(cache)
    data["fl"]["local_steps"] = 10
    data["fl"]["reconstruction"]["steps"] = 5
    data["syft"]["owner_reproducible_noise"] = True  # comparable with the simulation, bit for bit
    return data


@pytest.mark.slow
def test_mf_on_three_datasites_by_reconstruction_matches_the_simulation(tmp_path):
    """deploy_syft.py runs the MF config for 2 rounds on 3 datasites; its model is the simulation's, bit for bit."""
    from fedrec.federated.simulation import Simulation

    data = mf_deploy_data(tmp_path / "data")
    config_path = tmp_path / "syft_mf.yml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_deploy_script("--config", str(config_path), "--logdir", str(tmp_path / "deployed"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rounds"] == 2 and out["datasites"] == 3
    summary = json.loads((tmp_path / "deployed" / "summary.json").read_text())
    assert [r["completed"] for r in summary["rounds"]] == [3, 3]
    # Only the shared parameters travel: item embedding, item bias, global bias.
    assert summary["deployment"]["model_parameters_shared"] == 200 * 16 + 200 + 1
    final = Simulation(build(data), str(tmp_path / "simulated"), log=lambda message: None).run()
    assert out["final_model_digest"] == final["final_model_digest"]
    assert out["epsilon"] == pytest.approx(final["epsilon"], rel=1e-12)  # reconstruction steps are spent too
    assert final["epsilon"] > summary["rounds"][0]["epsilon"] > 0


def test_ridge_reconstruction_is_the_per_user_least_squares_solve():
    """ridge_user_rows solves each user's regularised normal equations (bias column included)."""
    rng = np.random.default_rng(0)
    model = MatrixFactorization(MFConfig(embedding_dim=3), num_users=4, num_items=6, global_mean=3.0, seed=0)
    with torch.no_grad():
        model.item_bias.weight.copy_(torch.from_numpy(rng.normal(size=(6, 1))))
    users = np.array([0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3])
    items = rng.integers(0, 6, size=len(users))
    labels = rng.uniform(1, 5, size=len(users))
    ridge_user_rows(model, {"user": users, "item": items, "label": labels}, ridge=0.5)
    q = model.item_embedding.weight.detach().double().numpy()
    b = model.item_bias.weight.detach().double().numpy()[:, 0]
    for user in (0, 1, 3):
        rows = users == user
        x = np.hstack([q[items[rows]], np.ones((rows.sum(), 1))])
        y = labels[rows] - 3.0 - b[items[rows]]
        expected = np.linalg.solve(x.T @ x + 0.5 * np.eye(4), x.T @ y)
        got = np.concatenate(
            [
                model.user_embedding.weight[user].detach().numpy(),
                model.user_bias.weight[user].detach().numpy(),
            ]
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not model.user_embedding.weight[2].any() and not model.user_bias.weight[2].any()  # no ratings


def test_local_users_renumbers_a_datasites_users_in_id_order():
    users, local = local_users({"user": np.array([7, 3, 7, 9]), "item": np.arange(4)})
    assert users.tolist() == [3, 7, 9] and local["user"].tolist() == [1, 0, 1, 2]


def test_the_closed_form_is_refused_where_updates_must_be_differentially_private(tmp_path):
    data = mf_deploy_data(tmp_path)
    data["fl"]["reconstruction"]["method"] = "ridge"
    with pytest.raises(
        ConfigError, match=r"fl\.reconstruction\.method' = 'ridge'.*not differentially private"
    ):
        build_experiment(data)
