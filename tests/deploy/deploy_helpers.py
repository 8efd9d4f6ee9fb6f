"""Fixtures of the deployment tests: a tiny DLRM config, three real PySyft datasites on 127.0.0.1
(one owner process each, shared by every test of the session and shut down at the end), the
same configuration run by the in-process simulation, and one two-round deployment over the datasites.

Each owner also lists a second data-scientist account ("analyst") that the security tests use, so
their code requests never shadow the coordinator's approved functions.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TINY_DEPLOY: dict[str, Any] = {
    "seed": 0,
    "model": {
        "name": "dlrm",
        "arch_sparse_feature_size": 4,
        "arch_mlp_bot": [13, 8, 4],
        "arch_mlp_top": [4 + 27 * 26 // 2, 8, 1],
        "preproc": {"dataset": "criteo", "synthetic": {"rows": 3000, "seed": 0, "vocab_size": 20}},
    },
    "train": {
        "batch_size": 16,
        "lr": 0.1,
        "optimizer": "sgd",
        "progress": False,
        "num_eval_batches": 1,
        "num_threads": 1,
    },
    "fl": {
        "secure": True,
        "num_workers": 3,
        "client_num_per_round": 3,
        "rounds": 2,
        "partition": "iid",
        "local_steps": 5,
        "client_timeout": 120,
        "min_completion_rate": 0.6,
        "max_round_retries": 1,
    },
    "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
    "syft": {"approval_timeout": 120, "max_executions": 100},
}
ANALYST_EMAIL = "analyst@fedrec.org"
ANALYST_PASSWORD = secrets.token_urlsafe(24)  # the owner hands it to the analyst out of band
MAX_CLIENTS = 4  # the keys allow aggregates of 4 updates (the dropped-datasite test samples 4)


def deploy_data(cache: Path, **changes: Any) -> dict[str, Any]:
    """The tiny deployment config (plain data) with its data cache and dotted ``changes`` applied."""
    data = copy.deepcopy(TINY_DEPLOY)
    data["model"]["preproc"]["cache_dir"] = str(cache)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return data


def build(data: dict[str, Any]) -> Any:
    from fedrec.config.loader import build_experiment

    return build_experiment(copy.deepcopy(data))


@dataclass
class Federation:
    """The session's datasites: the launcher, the coordinator's view, the public context."""

    local: Any  # fedrec.deploy.local.LocalFederation
    specs: list  # DatasiteSpec per datasite (coordinator account)
    public_context: bytes
    cache: Path

    def owner_dir(self, client_id: int) -> str:
        return self.local.owners[client_id].directory

    def admin(self, client_id: int) -> dict[str, str]:
        with open(os.path.join(self.owner_dir(client_id), "admin.json"), encoding="utf-8") as fh:
            return json.load(fh)

    def analyst_specs(self) -> list:
        from fedrec.deploy.local import DatasiteSpec

        return [
            DatasiteSpec(client_id=s.client_id, url=s.url, email=ANALYST_EMAIL, password=ANALYST_PASSWORD)
            for s in self.specs
        ]


@pytest.fixture(scope="session")
def deploy_cache(tmp_path_factory) -> Path:
    """The tiny dataset, prepared once per session."""
    from fedrec.experiment import prepare_data

    cache = tmp_path_factory.mktemp("deploy-data")
    prepare_data(build(deploy_data(cache)), log=lambda message: None, progress=False)
    return cache


@pytest.fixture(scope="session")
def federation(deploy_cache, tmp_path_factory):
    """Three owner processes, each serving a real datasite on 127.0.0.1; always shut down."""
    from fedrec.deploy.local import LocalFederation

    root = tmp_path_factory.mktemp("owners")
    local = LocalFederation.prepare(
        build(deploy_data(deploy_cache)),
        str(root),
        owner_epsilon_budget=1000.0,
        min_aggregate_clients=2,
        max_clients=MAX_CLIENTS,
    )
    for owner in local.owners:  # the owner lists a second data-scientist account
        path = os.path.join(owner.directory, "accounts.json")
        with open(path, encoding="utf-8") as fh:
            accounts = json.load(fh)
        accounts.append({"name": "analyst", "email": ANALYST_EMAIL, "password": ANALYST_PASSWORD})
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(accounts, fh)
    try:
        specs = local.start()
        yield Federation(local=local, specs=specs, public_context=local.public_context, cache=deploy_cache)
    finally:
        local.stop()


@dataclass
class SimulationRun:
    logdir: str
    digest: str
    params: Any  # final global model (float32)


@pytest.fixture(scope="session")
def simulation(deploy_cache, tmp_path_factory) -> SimulationRun:
    """The same configuration run by the in-process federated simulation (scripts/train_fl.py's engine)."""
    import numpy as np

    from fedrec.federated.simulation import Simulation

    logdir = str(tmp_path_factory.mktemp("simulation"))
    final = Simulation(build(deploy_data(deploy_cache)), logdir, log=lambda message: None).run()
    params = np.load(final["final_model"], allow_pickle=False)
    return SimulationRun(logdir=logdir, digest=final["final_model_digest"], params=params)


@dataclass
class DeployedRun:
    logdir: str
    final: dict
    summary: dict
    checkpoint: dict


@pytest.fixture(scope="session")
def deployed_run(federation, tmp_path_factory) -> DeployedRun:
    """Two rounds of the tiny config over the three datasites."""
    from fedrec.deploy.coordinator import Coordinator

    logdir = str(tmp_path_factory.mktemp("deployed"))
    coordinator = Coordinator(
        build(deploy_data(federation.cache)),
        logdir,
        federation.specs,
        public_context=federation.public_context,
    )
    final = coordinator.run()
    with open(os.path.join(logdir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    with open(os.path.join(logdir, "deploy", "checkpoint.json"), encoding="utf-8") as fh:
        checkpoint = json.load(fh)
    return DeployedRun(logdir=logdir, final=final, summary=summary, checkpoint=checkpoint)
