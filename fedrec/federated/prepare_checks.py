"""Checks the simulation makes while it sets a run up, before the first round: does the model fit the
federated settings, and can the partition serve the population and the round size. Each failure is a
:class:`~fedrec.errors.ConfigError` naming the key or file."""

from __future__ import annotations

from typing import Any

from fedrec.config import ExperimentConfig
from fedrec.config.schema import FLConfig
from fedrec.data.partition import Partition
from fedrec.errors import ConfigError
from fedrec.federated.early_stop import check_federated_early_stopping


def check_model_fits_run(
    config: ExperimentConfig, model_cls: Any, private: tuple[str, ...], data: Any
) -> None:
    """Per-user parameters (``PRIVATE_PARAMETERS``) against ``fl.reconstruction``/``fl.partition``, and
    ``train.early_stopping`` against the model's task and the validation split."""
    fl = config.fl
    assert fl is not None
    if fl.reconstruction is not None and not private:
        raise ConfigError(
            f"config key 'fl.reconstruction': model {config.model.name!r} has no per-user parameters "
            "(PRIVATE_PARAMETERS) to rebuild; set it to null"
        )
    if private and fl.partition != "natural" and fl.reconstruction is None:
        raise ConfigError(
            f"config key 'fl.partition' = {fl.partition!r}: model {config.model.name!r} keeps "
            f"{', '.join(private)} on each client, so each user must belong to one client (use 'natural')"
        )
    check_federated_early_stopping(
        config.train.early_stopping,
        task=getattr(model_cls, "TASK", "ctr"),
        val_rows=len(data.split("val")) if "val" in data.splits else 0,
        stored_private_rows=bool(private) and fl.reconstruction is None,
    )


def check_population(
    fl: FLConfig, partition: Partition, train_rows: int, num_users: int, partition_path: str
) -> None:
    """The partition covers the training split, a round fits the clients, ``fl.eval_users`` the users."""
    if partition.num_rows != train_rows:
        raise ConfigError(
            f"{partition_path}: partition of {partition.num_rows} rows for {train_rows} training rows"
        )
    if fl.client_num_per_round > partition.num_clients:
        raise ConfigError(
            f"config key 'fl.client_num_per_round' = {fl.client_num_per_round}: above the number of clients "
            f"({partition.num_clients})"
        )
    if fl.eval_users is not None and fl.eval_users > num_users:
        raise ConfigError(
            f"config key 'fl.eval_users' = {fl.eval_users}: above the population ({num_users} users); "
            "use at most that many, or null for every user"
        )
