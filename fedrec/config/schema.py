"""Typed config sections. YAML only fills these in; every key is documented in configs/flags.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from fedrec.data.synthetic_movielens import PRESETS as MOVIELENS_PRESETS
from fedrec.data.synthetic_movielens import resolve_preset
from fedrec.errors import ConfigError
from fedrec.federated.server_opt import LRScheduleConfig, ServerOptimizerConfig

SEED_MAX = 2**32 - 1  # numpy's legacy seeding and many tools take 32-bit seeds


def check_seed(seed: int, key: str) -> None:
    """A seed numpy, torch and Python all accept: an integer in [0, 2**32 - 1]."""
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"config key '{key}' = {seed!r}: expected an integer in [0, {SEED_MAX}]")


CRITEO_SYNTHETIC_ROWS = 200_000  # synthetic.rows when null for Criteo


@dataclass
class SyntheticConfig:
    """Built-in synthetic data written in the real raw format, with a planted signal."""

    rows: int | None = None  # Criteo lines (null: 200,000), or MovieLens ratings (null: the preset's)
    seed: int = 0  # seed of the generated data
    vocab_size: int = 1000  # Criteo: distinct categories per categorical field
    # MovieLens: 'ml-100k', 'ml-1m' or 'population-1m' (fedrec.data.synthetic_movielens: the real
    # sets' statistics, noise floor and drift); null = the old planted low-rank generator.
    preset: str | None = None
    users: int | None = None  # MovieLens users (null: the preset's, or 943)
    items: int | None = None  # MovieLens items (null: the preset's, or 1682)
    rank: int | None = None  # MovieLens: rank of the planted rating matrix (null: the preset's, or 8)

    def validate(self, path: str) -> None:
        for key in ("rows", "vocab_size", "users", "items", "rank"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a positive integer")
        check_seed(self.seed, f"{path}.seed")
        if self.preset is not None and self.preset not in MOVIELENS_PRESETS:
            raise ConfigError(
                f"config key '{path}.preset' = {self.preset!r}: expected one of {', '.join(MOVIELENS_PRESETS)} or null"
            )

    def resolve(self, dataset: str) -> None:
        """Fill the sizes left null with the dataset's (and preset's) defaults."""
        if dataset != "movielens":
            self.rows = CRITEO_SYNTHETIC_ROWS if self.rows is None else self.rows
            return
        if self.preset is None:
            legacy = {"rows": 100_000, "users": 943, "items": 1682, "rank": 8}
            for key, value in legacy.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
            return
        preset = resolve_preset(
            self.preset, users=self.users, items=self.items, rows=self.rows, rank=self.rank
        )
        self.rows, self.users, self.items, self.rank = preset.rows, preset.users, preset.items, preset.rank


@dataclass
class PreprocConfig:
    """Where the raw data is and how it becomes memory-mappable arrays."""

    dataset: str = "criteo"  # registry kind 'dataset': criteo, movielens
    datafile: str | None = None  # raw file; null = generate synthetic data in the real format
    processed_dir: str | None = None  # default: beside datafile, '<stem>_processed/'
    cache_dir: str = "data"  # where synthetic raw files are generated
    strict: bool = False  # stop at the first malformed line instead of counting and skipping it
    max_ind_range: int = -1  # Criteo: M >= 2 hashes a category to 1 + value mod (M-1); -1 builds a vocabulary
    min_count: int = 1  # Criteo: categories seen fewer times share the out-of-vocabulary index 0
    num_days: int = 7  # Criteo: equal-count day splits; the last is halved into val and test
    split: Literal["leave_last_out", "random"] = "leave_last_out"  # MovieLens per-user eval split
    eval_fraction: float = 0.2  # MovieLens 'random' split: fraction of each user's ratings held out
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # generated data in the raw format

    def validate(self, path: str) -> None:
        self.synthetic.resolve(self.dataset)
        if self.num_days < 2:
            raise ConfigError(f"config key '{path}.num_days' = {self.num_days!r}: expected at least 2")
        if self.min_count < 1:
            raise ConfigError(f"config key '{path}.min_count' = {self.min_count!r}: expected at least 1")
        if self.max_ind_range in (0, 1) or self.max_ind_range < -1:
            raise ConfigError(
                f"config key '{path}.max_ind_range' = {self.max_ind_range!r}: expected -1 or an integer >= 2"
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


EARLY_STOPPING_METRICS = {  # metric -> True when larger is better
    "rmse": False, "mae": False, "hr@10": True, "ndcg@10": True,  # ratings
    "auc": True, "logloss": False, "accuracy": True,  # clicks
}  # fmt: skip


@dataclass
class EarlyStoppingConfig:
    """``train.early_stopping``: stop when the validation metric stops improving; keep the best model."""

    # Required (no default), so that 'early_stopping: null' can never be read as a section of defaults.
    metric: str  # rmse, mae, hr@10, ndcg@10 (ratings); auc, logloss, accuracy (clicks)
    patience: int = 3  # validations without improvement before training stops
    min_delta: float = 0.0  # an improvement smaller than this does not count
    restore_best: bool = True  # end with the best validated model, not the last one

    def validate(self, path: str) -> None:
        if self.metric not in EARLY_STOPPING_METRICS:
            raise ConfigError(
                f"config key '{path}.metric' = {self.metric!r}: expected one of {', '.join(EARLY_STOPPING_METRICS)}"
            )
        if self.patience < 1:
            raise ConfigError(
                f"config key '{path}.patience' = {self.patience!r}: expected a positive integer"
            )
        if not self.min_delta >= 0:
            raise ConfigError(f"config key '{path}.min_delta' = {self.min_delta!r}: expected a number >= 0")


@dataclass
class TrainConfig:
    """Central training loop settings (also used by each federated client for local steps)."""

    batch_size: int = 128  # training batch size
    eval_batch_size: int = 16384  # evaluation batch size
    epochs: int = 1  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps (across epochs)
    optimizer: Literal["sgd", "adagrad", "adam"] = "sgd"  # sgd, adagrad: sparse embedding gradients
    lr: float = 0.1  # learning rate
    # Learning rate of the embedding tables (nn.Embedding / nn.EmbeddingBag weights); null = lr. A rare
    # category's row gets a gradient from few examples of a batch: a larger step lets it learn in one epoch.
    embedding_lr: float | None = None
    weight_decay: float = 0.0  # L2 penalty
    num_eval_batches: int | None = None  # cap evaluation at this many batches; null = whole split
    eval_every: int | None = None  # steps between validations; null = end of each epoch
    log_every: int = 50  # steps between TensorBoard train scalars
    checkpoint_every: int = 500  # steps between atomic checkpoints (and at the end)
    num_threads: int | None = None  # torch intra-op threads; null = torch's default
    progress: bool = True  # progress bars on stderr
    early_stopping: EarlyStoppingConfig | None = None  # null = train all epochs; needs a validation split

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
        if self.embedding_lr is not None and not self.embedding_lr > 0:
            raise ConfigError(
                f"config key '{path}.embedding_lr' = {self.embedding_lr!r}: expected a positive number or null"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"config key '{path}.weight_decay' = {self.weight_decay!r}: expected >= 0")


@dataclass
class FaultInjectionConfig:
    """Deliberate client faults for testing the federated fault handling (all off by default)."""

    raise_clients: list[int] = field(default_factory=list)  # these clients raise whenever sampled
    hang_clients: list[int] = field(default_factory=list)  # these clients sleep hang_seconds first
    hang_seconds: float = 0.0  # see hang_clients
    kill_clients: list[int] = field(default_factory=list)  # these clients SIGKILL their own rank
    scale_clients: list[int] = field(
        default_factory=list
    )  # these clients send their update times scale_factor (after any clipping): a malicious client
    scale_factor: float = 100.0  # see scale_clients
    rounds: list[int] | None = None  # restrict the faults to these rounds; null = every round

    def validate(self, path: str) -> None:
        if self.hang_seconds < 0:
            raise ConfigError(f"config key '{path}.hang_seconds' = {self.hang_seconds!r}: expected >= 0")


@dataclass
class FLEncryptionConfig:
    """``fl.encryption``: encrypted aggregation in secure mode (privacy.encryption, TenSEAL)."""

    scheme: Literal["bfv", "ckks"] = "bfv"  # secure mode: homomorphic scheme of the updates
    clip: float = (
        1.0  # per-coordinate bound of a client's update; larger values are clipped before encryption
    )
    precision_bits: int = 16  # quantisation grid clip * 2^-precision_bits
    max_weight: int | None = None  # largest integer client weight; null = the largest client's sample count

    def validate(self, path: str) -> None:
        if not self.clip > 0:
            raise ConfigError(f"config key '{path}.clip' = {self.clip!r}: expected a number > 0")
        if not 4 <= self.precision_bits <= 30:
            raise ConfigError(
                f"config key '{path}.precision_bits' = {self.precision_bits!r}: expected 4 to 30"
            )
        if self.max_weight is not None and self.max_weight < 1:
            raise ConfigError(
                f"config key '{path}.max_weight' = {self.max_weight!r}: expected a positive integer or null"
            )


@dataclass
class ReconstructionConfig:
    """``fl.reconstruction``: Federated Reconstruction (Singhal et al. 2021) of per-user parameters.

    Clients keep no per-user rows between rounds: each round a client rebuilds its users' rows (a
    model's ``PRIVATE_PARAMETERS``, MF's user embedding and bias) from the current global model and
    its own ratings, trains, and sends only the shared parameters' update. ``ridge``: the closed-form
    L2-regularised least-squares solve per user (MF only; not DP, so plain mode only); ``steps``:
    ``steps`` local optimiser steps (DP-SGD in secure mode, counted in the ledger) from a fresh
    initialisation, the shared parameters then reset to the global model before training.
    Evaluation rebuilds every user's rows by the ridge solve.
    """

    method: Literal["ridge", "steps"]  # required (a null section stays null, never a default method)
    ridge: float = 1.0  # lambda of the per-user solve (|p_u|^2 + b_u^2)
    steps: int = 20  # local steps of the 'steps' method

    def validate(self, path: str) -> None:
        if not 0 < self.ridge < float("inf"):
            raise ConfigError(f"config key '{path}.ridge' = {self.ridge!r}: expected a finite number > 0")
        if self.steps < 1:
            raise ConfigError(f"config key '{path}.steps' = {self.steps!r}: expected a positive integer")


@dataclass
class AdaptiveClipConfig:
    """``fl.user_dp.adaptive_clip``: the clip follows a quantile of the update norms (Andrew et al. 2021).

    Each round the clip moves by ``C <- C exp(-clip_lr (b_bar - target_quantile))``, ``b_bar`` the
    noised fraction of sampled clients whose update norm was at most ``C`` (privacy.dp.adaptive_clip).
    """

    target_quantile: float = 0.5  # gamma: the fraction of clients whose update should go unclipped
    clip_lr: float = 0.2  # eta_C: the geometric step of the clip per round
    count_noise_multiplier: float | None = None  # sigma_b on the count; null = expected clients / 20
    initial_clip: float | None = None  # the first round's clip; null = fl.user_dp.clip_norm

    def validate(self, path: str) -> None:
        if not 0.0 < self.target_quantile < 1.0:
            raise ConfigError(
                f"config key '{path}.target_quantile' = {self.target_quantile!r}: expected a number in (0, 1)"
            )
        for key in ("clip_lr", "count_noise_multiplier", "initial_clip"):
            value = getattr(self, key)
            if value is not None and not (0 < value < float("inf")):
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a finite number > 0")


@dataclass
class UserDPConfig:
    """``fl.user_dp``: user-level DP-FedAvg (McMahan et al. 2018) on top of the federated round.

    Clients are sampled by Poisson sampling at rate ``q = fl.client_num_per_round / clients``; each
    sampled client clips its whole update to L2 norm ``clip_norm`` and adds its share of Gaussian
    noise; the aggregate is divided by the expected number of clients ``q N``. The ledger records
    every round before its clients train (docs/federated.md, docs/ledger.md).
    """

    clip_norm: float  # S: L2 bound on one client's whole update (required: it depends on the model)
    noise_multiplier: float | None = None  # sigma; exactly one of noise_multiplier / target_epsilon
    target_epsilon: float | None = None  # sigma is then computed for fl.rounds rounds at rate q
    delta: float | None = None  # user level: must be < 1/number of clients; null = 0.1 / number of clients
    accountant: Literal["rdp", "prv"] = "rdp"  # the ledger's accountant (gdp may under-estimate)
    epsilon_budget: float | None = None  # refuse a plan above it; stop at the last round within it
    secure_mode: bool = False  # noise shares from the OS CSPRNG (runs are then not reproducible)
    adaptive_clip: AdaptiveClipConfig | None = None  # null = fixed clip_norm
    # McMahan et al.'s w-hat: a user with n training examples adds min(n / weight_cap, 1) x its clipped
    # update (weights capped at 1 keep the sensitivity S); null = every user weighs 1
    weight_cap: float | None = None

    def validate(self, path: str) -> None:
        if self.adaptive_clip is not None:
            self.adaptive_clip.validate(f"{path}.adaptive_clip")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                f"config keys '{path}.noise_multiplier' = {self.noise_multiplier!r} and '{path}.target_epsilon' "
                f"= {self.target_epsilon!r}: expected exactly one of them to be set (the other null)"
            )
        for key in ("clip_norm", "noise_multiplier", "target_epsilon", "epsilon_budget", "weight_cap"):
            value = getattr(self, key)
            if value is not None and not (0 < value < float("inf")):
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a finite number > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"config key '{path}.delta' = {self.delta!r}: expected a number in (0, 1)")


@dataclass
class FLConfig:
    """``fl:``: the federated simulation run by scripts/train_fl.py (keys in configs/flags.md)."""

    algorithm: str = "fed_avg"  # registry kind 'fl_algo'
    algorithm_params: dict[str, Any] = field(default_factory=dict)  # the algorithm's own Config keys
    import_modules: list[str] = field(default_factory=list)  # modules registering your own algorithms
    secure: bool = False  # DP-SGD on each client + encrypted updates + ledger record before send
    num_workers: int | None = 100  # simulated clients; null = one per user (natural partition only)
    client_num_per_round: int = 10  # clients sampled per round (at most the number of clients)
    rounds: int = 10  # federated rounds (--rounds)
    local_epochs: int = 1  # local epochs per round on each sampled client
    local_steps: int | None = None  # cap on each client's local optimiser steps per round
    partition: Literal["iid", "dirichlet", "natural"] = "iid"  # rows to clients; mf needs natural
    dirichlet_alpha: float = 0.5  # Dirichlet concentration of each client's label mix (small = skewed)
    server_lr: float = 1.0  # the global model moves by server_lr x the weighted mean update
    client_timeout: float = 600.0  # seconds; a slower client is dropped from its round
    min_completion_rate: float = 0.8  # fraction of sampled clients that must return, else retry
    max_round_retries: int = 3  # retries of a round before the run stops with an error
    on_budget_exhausted: Literal["stop", "continue"] = (
        "stop"  # secure mode, a sampled client out of privacy.epsilon_budget: stop = end cleanly after the last round that completed; continue = sample among clients that can still pay
    )
    max_update_norm: float | None = (
        None  # plain mode: the server rejects an update whose L2 norm exceeds it (a 'rejected' failure); null = no bound (with fl.user_dp the bound is clip_norm with room for the noise)
    )
    eval_every: int = 1  # rounds between validations (the last round always evaluates)
    eval_users: int | None = None  # metrics on a seeded sample of this many users; null = every user
    fixed_point_bits: int = 24  # plain mode: updates are summed as exact integers in units of 2^-bits
    # Plain mode: each embedding row's summed update is divided by the weight of the clients whose
    # update touched that row (non-zero), not by every client's; a rare row then moves as far as a
    # frequent one. Refused with fl.secure (the count would be released in clear) and fl.user_dp.
    row_normalize: bool = False
    encryption: FLEncryptionConfig = field(default_factory=FLEncryptionConfig)  # secure mode only
    faults: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)  # testing only
    user_dp: UserDPConfig | None = None  # user-level DP-FedAvg; null = off
    reconstruction: ReconstructionConfig | None = None  # per-user rows rebuilt each round; null = stored
    # Server optimiser (fedrec.federated.server_opt): sgd (FedAvg), fedadam, fedyogi, fedadagrad; applied
    # where the mean is decoded (secure mode: by a key-holding client), with a schedule of fl.server_lr.
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    client_lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)  # of train.lr, per round

    def validate(self, path: str) -> None:
        positive = ("client_num_per_round", "rounds", "local_epochs", "eval_every")
        for key in positive:
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a positive integer")
        for key in ("num_workers", "local_steps", "eval_users"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(
                    f"config key '{path}.{key}' = {value!r}: expected a positive integer or null"
                )
        if self.max_round_retries < 0:
            raise ConfigError(
                f"config key '{path}.max_round_retries' = {self.max_round_retries!r}: expected >= 0"
            )
        if self.max_update_norm is not None and not (
            isinstance(self.max_update_norm, int | float) and 0 < self.max_update_norm < math.inf
        ):
            raise ConfigError(
                f"config key '{path}.max_update_norm' = {self.max_update_norm!r}: expected a finite number > 0 "
                "or null"
            )
        if self.row_normalize and self.secure:
            raise ConfigError(
                f"config key '{path}.row_normalize' = true with {path}.secure = true: the per-row count of "
                "clients that touched a row would be released in clear beside the encrypted sum; row "
                "normalisation is implemented for plaintext runs only (set fl.row_normalize=false)"
            )
        if self.row_normalize and self.user_dp is not None:
            raise ConfigError(
                f"config key '{path}.row_normalize' = true with {path}.user_dp set: user-level DP's noise is "
                "calibrated to a public denominator, a data-dependent row count would break it"
            )
        if self.max_update_norm is not None and self.secure:
            raise ConfigError(
                f"config key '{path}.max_update_norm' = {self.max_update_norm!r}: the server cannot see encrypted "
                "updates (fl.secure = true); the per-coordinate fl.encryption.clip is the bound there "
                "(docs/threat-model.md); set it to null"
            )
        if self.dirichlet_alpha <= 0:
            raise ConfigError(
                f"config key '{path}.dirichlet_alpha' = {self.dirichlet_alpha!r}: expected a number > 0"
            )
        if self.server_lr <= 0:
            raise ConfigError(f"config key '{path}.server_lr' = {self.server_lr!r}: expected a number > 0")
        if self.client_timeout <= 0:
            raise ConfigError(
                f"config key '{path}.client_timeout' = {self.client_timeout!r}: expected seconds > 0"
            )
        if not 0.0 < self.min_completion_rate <= 1.0:
            raise ConfigError(
                f"config key '{path}.min_completion_rate' = {self.min_completion_rate!r}: expected a value in (0, 1]"
            )
        if not 8 <= self.fixed_point_bits <= 40:
            raise ConfigError(
                f"config key '{path}.fixed_point_bits' = {self.fixed_point_bits!r}: expected 8 to 40"
            )
        if self.num_workers is not None and self.client_num_per_round > self.num_workers:
            raise ConfigError(
                f"config key '{path}.client_num_per_round' = {self.client_num_per_round!r}: above the "
                f"number of clients ({path}.num_workers = {self.num_workers})"
            )
        if self.user_dp is not None:
            self._validate_user_dp(f"{path}.user_dp")
        if self.reconstruction is not None and self.secure and self.reconstruction.method == "ridge":
            raise ConfigError(
                f"config key '{path}.reconstruction.method' = 'ridge': the closed-form solve is not "
                f"differentially private; with {path}.secure = true (DP-SGD on each client) use 'steps'"
            )

    def _validate_user_dp(self, path: str) -> None:
        user_dp = self.user_dp
        assert user_dp is not None
        # The number of clients is known here unless it is one per user (checked again at start).
        if (
            user_dp.delta is not None
            and self.num_workers is not None
            and user_dp.delta >= 1.0 / self.num_workers
        ):
            raise ConfigError(
                f"config key '{path}.delta' = {user_dp.delta!r}: expected below 1/number of clients = "
                f"{1.0 / self.num_workers:.3g} (fl.num_workers = {self.num_workers})"
            )
        if self.secure and self.encryption.clip < user_dp.clip_norm:
            raise ConfigError(
                f"config key '{path}.clip_norm' = {user_dp.clip_norm!r}: above fl.encryption.clip = "
                f"{self.encryption.clip!r}; a clipped update and its noise share must fit the encryption grid"
            )
        if self.secure and user_dp.adaptive_clip is not None:
            raise ConfigError(
                f"config key '{path}.adaptive_clip': not supported with {path[: -len('.user_dp')]}.secure = true yet "
                "(the clipped count would need its own slot in the encrypted update); set it to null or use "
                "fl.secure = false"
            )


@dataclass
class CommunicationsConfig:
    """``communications:``: how the simulation's MPI ranks map onto hosts and GPUs."""

    # The seed's format (FedML's gpu_mapping): host -> [n_0, n_1, ...], n_j processes on GPU j of the
    # host; MPI ranks are assigned in order (rank 0, the aggregator, first). null = --devices for all.
    gpu_map: dict[str, list[int]] | None = None

    def validate(self, path: str) -> None:
        if self.gpu_map is None:
            return
        if not self.gpu_map:
            raise ConfigError(f"config key '{path}.gpu_map' = {{}}: expected host: [processes per GPU]")
        for host, counts in self.gpu_map.items():
            if not counts or any(c < 0 for c in counts):
                raise ConfigError(
                    f"config key '{path}.gpu_map.{host}' = {counts!r}: expected a list of process counts >= 0"
                )
        if sum(sum(c) for c in self.gpu_map.values()) < 1:
            raise ConfigError(f"config key '{path}.gpu_map' = {self.gpu_map!r}: assigns no process")


@dataclass
class PrivacyConfig:
    """``privacy:``: example-level DP-SGD (scripts/train_dp.py; docs/privacy.md explains every key)."""

    noise_multiplier: float | None = None  # sigma; exactly one of noise_multiplier / target_epsilon
    target_epsilon: float | None = None  # the noise multiplier is then computed for the planned steps
    delta: float | None = None  # must be < 1/N (N = training examples); null = 1/(10 N)
    max_grad_norm: float = 1.0  # per-sample clipping bound C
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"  # privacy accountant of the ledger
    sampling: str = "poisson"  # only Poisson sampling matches the accountants; anything else is refused
    sample_rate: float | None = None  # Poisson probability q; null = train.batch_size / N
    secure_mode: bool = False  # OS CSPRNG noise and sampling (slower; see docs/privacy.md)
    epsilon_budget: float | None = None  # refuse a plan above it; stop at the last step within it
    lazy_noise: bool = True  # defer embedding-row noise until read (needs train.optimizer sgd, no decay)

    def validate(self, path: str) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                f"config keys '{path}.noise_multiplier' = {self.noise_multiplier!r} and '{path}.target_epsilon' "
                f"= {self.target_epsilon!r}: expected exactly one of them to be set (the other null)"
            )
        positive = ("noise_multiplier", "target_epsilon", "max_grad_norm", "epsilon_budget")
        for key in positive:
            value = getattr(self, key)
            if value is not None and not (0 < value < float("inf")):
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a finite number > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"config key '{path}.delta' = {self.delta!r}: expected a number in (0, 1)")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ConfigError(
                f"config key '{path}.sample_rate' = {self.sample_rate!r}: expected a number in (0, 1]"
            )
        if self.sampling != "poisson":
            raise ConfigError(
                f"config key '{path}.sampling' = {self.sampling!r}: expected 'poisson' (the accountants "
                "assume Poisson sampling; shuffled fixed-size batches would report an epsilon that does not hold)"
            )


@dataclass
class SyftDatasiteConfig:
    """``syft.datasites[i]``: a datasite its owner started (``python -m fedrec.deploy.owner serve``)."""

    client_id: int  # the owner's client id in its key file
    url: str  # http://host:port
    email: str  # the data-scientist account the owner created for the coordinator
    password_file: str  # file holding that account's password (never the password itself in a config)

    def validate(self, path: str) -> None:
        if self.client_id < 0:
            raise ConfigError(f"config key '{path}.client_id' = {self.client_id!r}: expected an integer >= 0")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"config key '{path}.url' = {self.url!r}: expected http://host:port")


@dataclass
class SyftConfig:
    """``syft:``: deployment to PySyft 0.9 datasites (scripts/deploy_syft.py, docs/deployment.md)."""

    host: str = "127.0.0.1"  # local mode: address every local datasite binds (0.0.0.0 only if you mean it)
    datasites: list[SyftDatasiteConfig] = field(default_factory=list)  # [] = start fl.num_workers locally
    public_context: str | None = None  # datasites listed: the key authority's public context file
    approval_timeout: float = 300.0  # seconds to wait for owners to approve the submitted code
    max_executions: int | None = None  # executions asked per function; null = (rounds + 1) * (retries + 1)
    owner_epsilon_budget: float = 10.0  # local mode: each owner's policy budget (its own ledger)
    owner_delta: float | None = None  # local mode: each owner's ledger delta; null = min(1e-5, 0.1 / N)
    owner_max_executions: int = 1000  # local mode: largest execution count an owner approves
    min_aggregate_clients: int = 2  # local mode: owners refuse to decrypt smaller aggregates
    # local mode: owners draw DP noise and batches from the request's seed (replayable; tests only)
    owner_reproducible_noise: bool = False

    def validate(self, path: str) -> None:
        if not self.host:
            raise ConfigError(
                f"config key '{path}.host' = {self.host!r}: expected an address such as 127.0.0.1"
            )
        for key in ("approval_timeout", "owner_epsilon_budget"):
            value = getattr(self, key)
            if not 0 < value < float("inf"):
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a finite number > 0")
        for key in ("max_executions", "owner_max_executions", "min_aggregate_clients"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a positive integer")
        if self.owner_delta is not None and not 0 < self.owner_delta < 1:
            raise ConfigError(
                f"config key '{path}.owner_delta' = {self.owner_delta!r}: expected a number in (0, 1)"
            )
        if self.datasites:
            ids = [d.client_id for d in self.datasites]
            if len(set(ids)) != len(ids):
                raise ConfigError(f"config key '{path}.datasites': client ids {ids}: expected distinct ids")
            if self.public_context is None:
                raise ConfigError(
                    f"config key '{path}.public_context' is required with '{path}.datasites' (the key authority's "
                    "public context; the coordinator never holds the secret one)"
                )


@dataclass
class ExperimentConfig:
    """The whole run. Sections later features add (privacy, fl, encryption, ...) go here too."""

    model: ModelSection
    train: TrainConfig = field(default_factory=TrainConfig)  # also each federated client's local steps
    seed: int = 0  # seeds model initialisation, batch order and evaluation sampling
    import_modules: list[str] = field(default_factory=list)  # imported first: they register your models
    fl: FLConfig | None = None  # federated simulation (scripts/train_fl.py)
    communications: CommunicationsConfig | None = None  # MPI ranks to hosts and GPUs
    privacy: PrivacyConfig | None = None  # example-level DP-SGD (scripts/train_dp.py)
    syft: SyftConfig | None = None  # deployment to PySyft datasites (scripts/deploy_syft.py)

    def validate(self, path: str) -> None:
        check_seed(self.seed, f"{path}.seed" if path else "seed")
