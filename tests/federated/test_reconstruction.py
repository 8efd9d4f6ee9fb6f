"""fl.reconstruction in the simulation: no per-user rows kept between rounds, evaluation by the ridge solve."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml
from fl_helpers import ROOT

from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.simulation import Simulation


@pytest.fixture(scope="module")
def mf_plain(tmp_path_factory) -> dict:
    """configs/mf_movielens_fl.yml, plain mode, on a small synthetic set."""
    data = yaml.safe_load((ROOT / "configs" / "mf_movielens_fl.yml").read_text())
    data["model"]["preproc"]["synthetic"].update({"rows": 4000, "users": 80, "items": 150})
    data["model"]["preproc"]["cache_dir"] = str(tmp_path_factory.mktemp("mf-data"))
    data["train"]["progress"] = False
    data["fl"].update(
        {"secure": False, "client_num_per_round": 20, "rounds": 3, "local_epochs": 2, "eval_every": 1}
    )
    return data


def run(data: dict, logdir) -> dict:
    return Simulation(build_experiment(copy.deepcopy(data)), str(logdir), log=lambda message: None).run()


def test_reconstruction_keeps_no_user_rows_and_learns(mf_plain, tmp_path):
    data = copy.deepcopy(mf_plain)
    data["fl"]["reconstruction"] = {"method": "ridge", "ridge": 1.0}
    final = run(data, tmp_path / "recon")
    assert not (tmp_path / "recon" / "fl" / "clients" / "private").exists()
    stored = run(mf_plain, tmp_path / "stored")
    assert (tmp_path / "stored" / "fl" / "clients" / "private").is_dir()
    assert final["rounds_completed"] == stored["rounds_completed"] == 3
    assert np.isfinite(final["test"]["rmse"]) and final["final_model_digest"] != stored["final_model_digest"]


def test_reconstruction_needs_per_user_parameters(tiny_config, tmp_path):
    data = tiny_config(reconstruction={"method": "steps", "steps": 2})
    with pytest.raises(ConfigError, match="no per-user parameters"):
        run(data, tmp_path)


def test_a_null_reconstruction_section_stays_off(mf_plain):
    data = copy.deepcopy(mf_plain)
    data["fl"]["reconstruction"] = None
    assert build_experiment(data).fl.reconstruction is None
