"""Fixtures of the deployment tests: a tiny DLRM config, three real PySyft datasites on 127.0.0.1
(one owner process each, shared by every test of the session and shut down at the end), the
same configuration run by the in-process simulation, and one two-round deployment over the datasites
by scripts/deploy_syft.py (as for datasites their owners started: ``syft.datasites``).

Each owner also lists a second data-scientist account ("analyst") that the security tests use, so
their code requests never shadow the coordinator's approved functions.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
        reproducible_noise=True,  # the owners replay the request's seed: runs comparable with train_fl.py
    )
    for owner in local.owners:  # the owner lists a second data-scientist account
        path = os.path.join(owner.directory, "accounts.json")
        with open(path, encoding="utf-8") as fh:
            accounts = json.load(fh)
        accounts.append({"name": "analyst", "email": ANALYST_EMAIL, "password": ANALYST_PASSWORD})
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(accounts, fh)
    _RUNNING.append(local)
    try:
        specs = local.start()
        yield Federation(local=local, specs=specs, public_context=local.public_context, cache=deploy_cache)
    finally:
        local.stop()


_RUNNING: list = []  # launched federations, stopped after the last test of this directory


def stop_datasites() -> None:
    while _RUNNING:
        _RUNNING.pop().stop()


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
    out: dict  # the script's JSON line
    summary: dict
    checkpoint: dict
    stderr: str


def script_config(federation: Federation, directory: Path, **changes: Any) -> Path:
    """A config naming the session's datasites (``syft.datasites``), as for datasites owners started."""
    import yaml

    (directory / "public.ctx").write_bytes(federation.public_context)
    sites = []
    for spec in federation.specs:
        password = directory / f"password{spec.client_id}"
        password.write_text(spec.password)
        sites.append(
            {
                "client_id": spec.client_id,
                "url": spec.url,
                "email": spec.email,
                "password_file": str(password),
            }
        )
    data = deploy_data(federation.cache, **changes)
    data["syft"].update({"datasites": sites, "public_context": str(directory / "public.ctx")})
    path = directory / "syft.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_deploy_script(*args: str) -> subprocess.CompletedProcess:
    """``python scripts/deploy_syft.py ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy_syft.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@pytest.fixture(scope="session")
def deployed_run(federation, tmp_path_factory) -> DeployedRun:
    """scripts/deploy_syft.py: two rounds of the tiny config over the session's three datasites."""
    directory = tmp_path_factory.mktemp("deployed")
    logdir = directory / "run"
    result = run_deploy_script("--config", str(script_config(federation, directory)), "--logdir", str(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((logdir / "summary.json").read_text())
    checkpoint = json.loads((logdir / "deploy" / "checkpoint.json").read_text())
    return DeployedRun(
        logdir=str(logdir), out=out, summary=summary, checkpoint=checkpoint, stderr=result.stderr
    )
