"""A custom federated algorithm a request names in fl.import_modules (registered on import)."""

from __future__ import annotations

from fedrec import registry
from fedrec.federated.algorithms.fed_avg import FedAvgWorker

LOCAL_STEPS: list[int] = []  # one entry per local step this algorithm ran


@registry.load("fl_algo", "_deploy_test_avg")
class DeployTestAvg(FedAvgWorker):
    """FedAvg that counts its local steps (so a test sees the datasite ran this algorithm)."""

    def after_local_step(self, trainer: object) -> None:
        LOCAL_STEPS.append(self.round_idx)
