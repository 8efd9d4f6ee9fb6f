"""Helpers of the federated tests: a tiny DLRM config on synthetic Criteo-format data, script runners.

The data is generated and preprocessed once per session in a temporary cache; every run (in this
process, in a subprocess or under mpirun) reuses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).parent / "mpirun"

TINY_DLRM = {
    "seed": 0,
    "model": {
        "name": "dlrm",
        "arch_sparse_feature_size": 4,
        "arch_mlp_bot": [13, 8, 4],
        "arch_mlp_top": [4 + 27 * 26 // 2, 8, 1],
        "preproc": {"dataset": "criteo", "synthetic": {"rows": 3000, "seed": 0, "vocab_size": 20}},
    },
    "train": {"batch_size": 16, "lr": 0.1, "optimizer": "sgd", "progress": False, "num_eval_batches": 1},
    "fl": {
        "secure": False,
        "num_workers": 40,
        "client_num_per_round": 8,
        "rounds": 3,
        "partition": "dirichlet",
        "dirichlet_alpha": 0.5,
        "client_timeout": 60,
        "min_completion_rate": 0.75,
    },
    "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
}


def round_noise(**fields: object):
    """A user-level ``RoundNoise`` of one small seeded round (q 0.1, 9 sampled, k 4, q N 50, sigma 1,
    S 3); ``fields`` override any of them."""
    from fedrec.federated.user_dp import RoundNoise

    defaults: dict[str, object] = {
        "round_idx": 0,
        "attempt": 0,
        "noise_multiplier": 1.0,
        "clip_norm": 3.0,
        "client_sampling_rate": 0.1,
        "num_sampled": 9,
        "min_survivors": 4,
        "expected_clients": 50.0,
        "secure_mode": False,
    }
    return RoundNoise(**{**defaults, **fields})


def write_config(directory: Path, data: dict, name: str = "fl.yml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Prepare the tiny dataset once (so concurrent ranks only ever read it)."""
    from fedrec.config.loader import build_experiment
    from fedrec.experiment import prepare_data

    cache = tmp_path_factory.mktemp("fl-data")
    data = _with_cache(TINY_DLRM, cache)
    prepare_data(build_experiment(data), log=lambda message: None, progress=False)
    return cache


def _with_cache(data: dict, cache: Path) -> dict:
    import copy

    data = copy.deepcopy(data)
    data["model"]["preproc"]["cache_dir"] = str(cache)
    return data


@pytest.fixture
def tiny_config(data_cache):
    """``tiny_config(**fl_overrides)`` -> the config as a plain mapping (data cache filled in)."""

    def make(**fl: object) -> dict:
        data = _with_cache(TINY_DLRM, data_cache)
        data["fl"].update(fl)
        return data

    return make


def script_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def train_fl(*args: str, ranks: int = 0, timeout: int = 300, **popen: object) -> subprocess.CompletedProcess:
    """scripts/train_fl.py as a user runs it: in one process, or under ``mpirun -np ranks``."""
    command = [sys.executable, str(ROOT / "scripts" / "train_fl.py"), *args]
    if ranks:
        command = [str(MPIRUN), "-np", str(ranks), sys.executable, "-m", "mpi4py.futures", *command[1:]]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=script_env(), **popen
    )
