"""Typed config sections. YAML only fills these in; every key is documented in configs/flags.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fedrec.errors import ConfigError


@dataclass
class SyntheticConfig:
    """Built-in synthetic data written in the real raw format, with a planted signal."""

    rows: int = 200_000  # Criteo lines, or MovieLens ratings
    seed: int = 0
    vocab_size: int = 1000  # Criteo: distinct categories per categorical field
    users: int = 943  # MovieLens
    items: int = 1682  # MovieLens
    rank: int = 8  # MovieLens: rank of the planted rating matrix

    def validate(self, path: str) -> None:
        for key in ("rows", "vocab_size", "users", "items", "rank"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a positive integer")


@dataclass
class PreprocConfig:
    """Where the raw data is and how it becomes memory-mappable arrays."""

    dataset: str = "criteo"  # registry kind 'dataset': criteo, movielens
    datafile: str | None = None  # raw file; null = generate synthetic data in the real format
    processed_dir: str | None = None  # default: beside datafile, '<stem>_processed/'
    cache_dir: str = "data"  # where synthetic raw files are generated
    strict: bool = False  # stop at the first malformed line instead of counting and skipping it
    max_ind_range: int = -1  # Criteo: > 0 hashes categories modulo this; -1 builds a vocabulary
    min_count: int = 1  # Criteo: categories seen fewer times share the out-of-vocabulary index 0
    num_days: int = 7  # Criteo: equal-count day splits; the last is halved into val and test
    split: Literal["leave_last_out", "random"] = "leave_last_out"  # MovieLens per-user eval split
    eval_fraction: float = 0.2  # MovieLens 'random' split: fraction of each user's ratings held out
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, path: str) -> None:
        if self.num_days < 2:
            raise ConfigError(f"config key '{path}.num_days' = {self.num_days!r}: expected at least 2")
        if self.min_count < 1:
            raise ConfigError(f"config key '{path}.min_count' = {self.min_count!r}: expected at least 1")
        if self.max_ind_range == 0 or self.max_ind_range < -1:
            raise ConfigError(
                f"config key '{path}.max_ind_range' = {self.max_ind_range!r}: expected -1 or a positive integer"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(
                f"config key '{path}.eval_fraction' = {self.eval_fraction!r}: expected a value in (0, 1)"
            )


@dataclass
class ModelSection:
    """``model:``: the registered model's name, its data, and its own typed parameters."""

    name: str
    preproc: PreprocConfig
    params: Any  # the registered model class's Config dataclass


@dataclass
class TrainConfig:
    """Central training loop settings (also used by each federated client for local steps)."""

    batch_size: int = 128
    eval_batch_size: int = 16384
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (across epochs)
    optimizer: Literal["sgd", "adagrad", "adam"] = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0
    num_eval_batches: int | None = None  # cap evaluation at this many batches; null = whole split
    eval_every: int | None = None  # steps between validations; null = end of each epoch
    log_every: int = 50  # steps between TensorBoard train scalars
    checkpoint_every: int = 500  # steps between atomic checkpoints (and at the end)
    num_threads: int | None = None  # torch intra-op threads; null = torch's default
    progress: bool = True  # progress bars on stderr

    def validate(self, path: str) -> None:
        positive = ("batch_size", "eval_batch_size", "epochs", "log_every", "checkpoint_every")
        for key in positive:
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a positive integer")
        for key in ("max_steps", "num_eval_batches", "eval_every", "num_threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(
                    f"config key '{path}.{key}' = {value!r}: expected a positive integer or null"
                )
        if self.lr <= 0:
            raise ConfigError(f"config key '{path}.lr' = {self.lr!r}: expected a positive number")
        if self.weight_decay < 0:
            raise ConfigError(f"config key '{path}.weight_decay' = {self.weight_decay!r}: expected >= 0")


@dataclass
class ExperimentConfig:
    """The whole run. Sections later features add (privacy, fl, encryption, ...) go here too."""

    model: ModelSection
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
