"""Python API for notebooks: run a central, DP or federated job from a config and get the results.

No argparse: the same code paths as scripts/train.py, train_dp.py and train_fl.py, called with a
config object, a YAML path or a plain mapping (plus ``key=value`` overrides)::

    from fedrec import api

    config = api.load_config("configs/mf_movielens.yml", ["train.lr=0.05"])
    result = api.train(config, logdir="runs/nb1")
    result.test["rmse"]

    fl = api.train_fl("configs/mf_movielens_fl.yml", logdir="runs/nb-fl", overrides=["fl.rounds=3"])
    fl.history.metric("rmse")        # [(round, value), ...] on the validation split
    fl.history.epsilons()            # [(round, epsilon), ...], example level, most exposed client

Each call writes LOGDIR exactly as the script does (summary.json, TensorBoard, checkpoints; a LOGDIR
that holds a run is refused unless ``resume=True``). Errors are ``fedrec.errors.FedrecError`` (and
``privacy.errors.PrivacyError``) with the one-line message the scripts print.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrec.cli import parse_devices, prepare_logdir
from fedrec.config import ExperimentConfig, apply_overrides, build_experiment
from fedrec.config import load_config as _load_yaml_config
from fedrec.errors import ConfigError
from fedrec.experiment import record_run_config, run_central_training, set_seed

ConfigLike = ExperimentConfig | str | os.PathLike | Mapping[str, Any]


def load_config(config: ConfigLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A validated config from an ExperimentConfig, a YAML path or a plain mapping, plus overrides."""
    if isinstance(config, ExperimentConfig):
        if overrides:
            from fedrec.config import config_to_dict

            return build_experiment(apply_overrides(config_to_dict(config), overrides))
        return config
    if isinstance(config, str | os.PathLike):
        return _load_yaml_config(config, overrides)
    if isinstance(config, Mapping):
        return build_experiment(apply_overrides(dict(config), overrides))
    raise ConfigError(f"config {config!r}: expected an ExperimentConfig, a YAML path or a mapping")


@dataclass
class TrainResult:
    """A central or DP run: the trainer's results (``val``, ``test``, ``privacy``, ...) and where they are."""

    results: dict[str, Any]
    summary_path: str
    logdir: str

    @property
    def val(self) -> dict[str, float]:
        return self.results.get("val") or {}

    @property
    def test(self) -> dict[str, float]:
        return self.results.get("test") or {}

    @property
    def privacy(self) -> dict[str, Any] | None:
        return self.results.get("privacy")


@dataclass
class History:
    """Per-round records of a federated run (as in summary.json), with Flower-like accessors."""

    rounds: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rounds)

    def metric(self, name: str, split: str = "val") -> list[tuple[int, float]]:
        """``[(round, value), ...]`` (rounds counted from 1) of ``split``'s metric, where evaluated."""
        return [
            (int(r["round"]) + 1, float(r[split][name]))
            for r in self.rounds
            if isinstance(r.get(split), dict) and name in r[split]
        ]

    def losses(self) -> list[tuple[int, float]]:
        """``[(round, weighted mean local training loss), ...]``."""
        return [
            (int(r["round"]) + 1, float(r["train_loss"]))
            for r in self.rounds
            if r.get("train_loss") is not None
        ]

    def epsilons(self, level: str = "example") -> list[tuple[int, float]]:
        """``[(round, epsilon), ...]``: ``example`` (DP-SGD, most exposed client) or ``user`` (DP-FedAvg)."""
        key = {"example": "epsilon", "user": "user_epsilon"}.get(level)
        if key is None:
            raise ConfigError(f"epsilon level {level!r}: expected 'example' or 'user'")
        return [(int(r["round"]) + 1, float(r[key])) for r in self.rounds if r.get(key) is not None]


@dataclass
class FederatedResult:
    """A federated run: the final figures (``test``, ``epsilon``, ``rounds_completed``, ...) and history."""

    final: dict[str, Any]
    history: History
    summary_path: str
    logdir: str

    @property
    def test(self) -> dict[str, float]:
        return self.final.get("test") or {}


def _central(
    cfg: ExperimentConfig, trainer_cls: Any, *, logdir: str, devices: str, resume: bool, **kwargs: Any
) -> TrainResult:
    """The shared body of :func:`train` and :func:`train_dp` (``run_central_training``, as the scripts)."""
    results, path = run_central_training(
        cfg, trainer_cls, logdir=logdir, devices=devices, resume=resume, **kwargs
    )
    return TrainResult(results, path, logdir)


def train(
    config: ConfigLike,
    *,
    logdir: str,
    overrides: Sequence[str] = (),
    devices: str = "cpu",
    resume: bool = False,
) -> TrainResult:
    """Central (non-private) training, as scripts/train.py (train.* may change on ``resume``)."""
    from fedrec.trainers.base_trainer import BaseTrainer, optimizer_supports_sparse

    cfg = load_config(config, overrides)
    sparse = optimizer_supports_sparse(cfg.train.optimizer) and cfg.train.weight_decay == 0
    return _central(
        cfg,
        BaseTrainer,
        logdir=logdir,
        devices=devices,
        resume=resume,
        sparse=sparse,
        record_ignore=("train",),
    )


def train_dp(
    config: ConfigLike,
    *,
    logdir: str,
    overrides: Sequence[str] = (),
    devices: str = "cpu",
    resume: bool = False,
) -> TrainResult:
    """DP-SGD training (example-level DP), as scripts/train_dp.py; ``result.privacy`` holds epsilon.

    train.* is part of the privacy guarantee (a resume must match it); embedding gradients never go
    through autograd in DP-SGD (dense tables). A run with noise from the config seed prints a WARNING
    line on stdout (``privacy.secure_mode`` draws from the OS CSPRNG instead).
    """
    from fedrec.trainers.dp_trainer import DPTrainer

    cfg = load_config(config, overrides)
    if cfg.privacy is None:
        raise ConfigError("config section 'privacy' is missing: train_dp needs one (see configs/dlrm_dp.yml)")
    return _central(cfg, DPTrainer, logdir=logdir, devices=devices, resume=resume, sparse=False)


def train_fl(
    config: ConfigLike,
    *,
    logdir: str,
    overrides: Sequence[str] = (),
    devices: str = "cpu",
    resume: bool = False,
) -> FederatedResult:
    """A federated simulation in this process (as scripts/train_fl.py without mpirun)."""
    from fedrec.federated.simulation import Simulation

    cfg = load_config(config, overrides)
    if cfg.fl is None:
        raise ConfigError("config section 'fl' is missing: train_fl needs one (see configs/dlrm_fl.yml)")
    device = parse_devices(devices)[0]
    logdir = prepare_logdir(logdir)
    record_run_config(logdir, cfg, resume=resume, ignore=("fl", "train"))
    set_seed(cfg.seed)
    simulation = Simulation(cfg, logdir, resume=resume, device=str(device))
    final = simulation.run()
    rounds = list(simulation.state.history) if simulation.state is not None else []
    return FederatedResult(final, History(rounds), os.path.join(logdir, "summary.json"), logdir)
