"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
https://arxiv.org/abs/1812.06127): FedAvg whose clients stay close to the global model.

Each client minimises its loss plus ``mu/2 ||w - w_global||^2``. Here the proximal term is applied
as its exact proximal step after every local optimiser step, ``w <- (w + lr mu w_global) / (1 + lr mu)``
(operator splitting; equal to the gradient form to first order in ``lr mu``). The step uses no
data, so with DP-SGD it is post-processing of the private step and costs no privacy.

This file is also the worked example of adding an algorithm: subclass an existing worker, override
one hook, declare the algorithm's keys in ``Config``, register a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedrec import registry
from fedrec.errors import ConfigError
from fedrec.federated.aggregate import proximal_step
from fedrec.federated.algorithms.fed_avg import FedAvgWorker


@registry.load("fl_algo", "fed_prox")
class FedProxWorker(FedAvgWorker):
    """FedAvg plus a proximal pull towards the global model on each client."""

    @dataclass
    class Config:
        """``fl.algorithm_params`` of fed_prox."""

        mu: float = 0.01  # strength of the proximal term

        def validate(self, path: str) -> None:
            if not self.mu >= 0:
                raise ConfigError(f"config key '{path}.mu' = {self.mu!r}: expected a number >= 0")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._anchor: dict[str, torch.Tensor] | None = None

    def after_local_step(self, trainer: Any) -> None:
        mu = float(self.params.mu)
        if mu == 0 or self.global_model is None or self.layout is None:
            return
        if self._anchor is None or getattr(self, "_anchor_round", None) != self.global_model.round_idx:
            self._anchor = self.layout.unflatten(self.global_model.params)
            self._anchor_round = self.global_model.round_idx
        flush = getattr(trainer, "flush_noise", None)
        if callable(flush):
            flush()  # lazily deferred DP noise must be in the weights before they are rescaled
        lr = float(trainer.optimizer.param_groups[0]["lr"])
        state = self.model.state_dict()
        with torch.no_grad():
            for name, anchor in self._anchor.items():
                param = state[name]
                param.copy_(proximal_step(param, anchor.to(param.device, param.dtype), lr=lr, mu=mu))
