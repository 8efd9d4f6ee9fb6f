"""Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", https://arxiv.org/abs/1602.05629), in the seed's FederatedWorker shape.

Each round the aggregator samples ``fl.client_num_per_round`` clients, every sampled client trains
``fl.local_epochs`` from the global model on its own data, and the global model moves by
``fl.server_lr`` times the example-weighted mean of the clients' updates. A round in which fewer than
``fl.min_completion_rate`` of the sampled clients returned is retried with a fresh sample and the
global model untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fedrec import registry
from fedrec.federated.aggregate import completion_ok
from fedrec.federated.worker import ClientFailure, FederatedWorker, InvalidStateError, RoundResults

log = logging.getLogger(__name__)


@registry.load("fl_algo", "fed_avg")
class FedAvgWorker(FederatedWorker):
    """FedAvg: sample, train locally, average the updates weighted by example counts."""

    async def run(self) -> None:
        """One round. The aggregator asks the sampled trainers for their updates and aggregates them;
        a trainer takes the aggregator's global model and trains on its own data.
        """
        if not self.roles:
            raise InvalidStateError(f"worker {self.worker_id!r} has no role")
        if "aggregator" in self.roles:
            neighbours = self.sample_neighbours(self.round_idx, self.fl.client_num_per_round)
            results = await self.request_models_suspendable(neighbours)
            self.last_results = results
            aggregate = self.aggregate(self.round_idx, results, results.failures)
            if aggregate is None:
                self.attempt += 1  # retried: the global model is not touched
                return
            self.update_model(aggregate)
        if "trainer" in self.roles:
            # Standard FL: a trainer always starts from its aggregator's (the central server's) model.
            aggregators = list(self.out_neighbours)
            global_models = await self.request_models_suspendable(aggregators)
            self.update_model(global_models[0])
            await self.train(model_dir=self.persistent_storage)
        self.round_idx += 1
        self.attempt = 0

    def aggregate(self, round_idx: int, results: RoundResults, failures: Sequence[ClientFailure]) -> object:
        """The running weighted sum when enough clients returned; None (retry) otherwise."""
        sampled = len(results) + len(failures)
        if not completion_ok(sampled, len(results), min_completion_rate=self.fl.min_completion_rate):
            log.info(
                "round %d: %d of %d sampled clients returned, below fl.min_completion_rate=%s; retrying",
                round_idx,
                len(results),
                sampled,
                self.fl.min_completion_rate,
            )
            return None
        return results.aggregate
