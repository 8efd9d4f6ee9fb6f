"""The client side of the simulation: each rank's cached context and the tasks the pool runs.

A client task is lazy: it reads one client's rows of the memory-mapped training split, loads the
global model into the rank's one model (or a small per-client model when the model has private
parameters), trains, records its privacy spend (secure mode) and returns its encoded (encrypted)
update. The apply task is a key-holding client that decodes the round's aggregate, applies the
algorithm's server rule, writes the next global model and evaluates it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec import registry
from fedrec.config import ExperimentConfig
from fedrec.config.schema import FLConfig
from fedrec.data.base import ArraySplit, ProcessedData
from fedrec.data.file_rows import read_rows, rows_where_in
from fedrec.data.partition import Partition
from fedrec.errors import ConfigError, FedrecError
from fedrec.experiment import build_model, prepare_data
from fedrec.federated.client_round import (
    apply_mean_update,
    attempt_tag,
    client_seed,
    local_dp_trainer_class,
    local_users,
    quantisation_rng,
    reconstruct,
    ridge_user_rows,
)
from fedrec.federated.codec import PlainCodec, SecureCodec
from fedrec.federated.engine import ClientOutOfBudget
from fedrec.federated.private_store import PrivateRowStore
from fedrec.federated.ranks import import_modules, rank_device, world_rank
from fedrec.federated.run import RunPaths, RunSpec, one_line, read_global_model, write_global_model
from fedrec.federated.server_opt import ServerOptState, lr_at, state_path
from fedrec.federated.user_dp import (
    RoundNoise,
    check_release,
    count_share,
    privatize,
    released_mean,
    user_delta,
)
from fedrec.federated.worker import (
    FederatedWorker,
    GlobalModel,
    Neighbour,
    ParamLayout,
    algorithm_params,
)
from fedrec.trainers.base_trainer import BaseTrainer, optimizer_supports_sparse
from fedrec.trainers.metrics import sample_eval_users
from privacy.dp.dp_fedavg import capped_weight
from privacy.ledger import BudgetExceededError

# --------------------------------------------------------------------------------------------------
# Rank side: per-process context and the tasks
# --------------------------------------------------------------------------------------------------


class ClientChannel:
    """A trainer's transport: the global model comes from client storage (checked against its digest)."""

    def __init__(self, context: RankContext, digest: str):
        self.context = context
        self.digest = digest

    async def request_models(self, worker: FederatedWorker, neighbour_ids: Any) -> list[GlobalModel]:
        return [self.context.global_model(worker.round_idx, self.digest) for _ in neighbour_ids]


@dataclass
class TaskResult:
    """What a client task sends back to the aggregator."""

    client_id: int
    payload: Any
    bytes_sent: int
    num_examples: int
    weight: float
    train_loss: float
    steps: int
    seconds: float
    rank: int
    peak_rss_mb: float
    clipped: bool | None = None  # fl.user_dp: whether the whole update was clipped to S (a diagnostic)
    count_share: float | None = None  # fl.user_dp.adaptive_clip: centred unclipped bit + count noise share


class RankContext:
    """One rank's cached view of the run: data (memory-mapped), partition, one model, codec, store."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.config = config = spec.config
        assert config.fl is not None
        self.fl: FLConfig = config.fl
        self.paths = spec.paths
        import_modules(self.fl.import_modules)
        torch.set_num_threads(
            config.train.num_threads or 1
        )  # same threads everywhere: rank-independent results
        self.device = rank_device(spec)
        if self.device.type == "cuda":
            # Same model with any number of ranks: CUDA's atomics-based kernels would reorder float sums.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.data = prepare_data(config, log=lambda message: None, progress=False)
        self.meta = self.data.meta
        self.train = self.data.split("train")
        self.partition = Partition.load(self.paths.partition)
        self.model_cls = registry.lookup("model", config.model.name)
        self.private_names = tuple(getattr(self.model_cls, "PRIVATE_PARAMETERS", ()))
        self.sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
        self.template = build_model(config, self.meta, sparse=self.sparse).to(self.device)
        self.layout = ParamLayout.from_model(self.template)
        self.algorithm_cls = registry.lookup("fl_algo", self.fl.algorithm)
        self.algorithm_params = algorithm_params(self.algorithm_cls, self.fl.algorithm_params)
        self.reconstruction = self.fl.reconstruction
        self.store = (
            PrivateRowStore.open(self.paths.private_rows, list(self.private_names))
            if self.private_names and self.reconstruction is None
            else None
        )
        self.ledger: Any = None
        if self.fl.secure:
            self.client_privacy = client_privacy_config(config, self.partition)
            self.dp_trainer_cls = local_dp_trainer_class()
        if self.fl.secure or self.fl.user_dp is not None:
            from privacy.ledger import PrivacyLedger, ledger_path

            self.ledger = PrivacyLedger.attach(ledger_path(spec.logdir))
        self._codec: Any = None
        self._global: GlobalModel | None = None
        self._evaluator: BaseTrainer | None = None
        self._eval_train: dict[str, np.ndarray] | None = None  # fl.eval_users' training ratings (ridge)
        # fl.eval_users: the seeded sample of users every evaluation covers (None: all of them).
        self.eval_users = sample_eval_users(
            int(self.meta.get("num_users", 0)), self.fl.eval_users, seed=config.seed
        )

    @property
    def codec(self) -> Any:
        """Plain fixed point, or encryption with the clients' secret key (read at first use: the key
        authority runs after the ranks are set up)."""
        if self._codec is None:
            if self.fl.secure:
                self._codec = SecureCodec(self.layout, secret_context=checked_secret_context(self.paths))
            else:
                self._codec = PlainCodec(
                    self.layout, bits=self.fl.fixed_point_bits, row_normalize=self.fl.row_normalize
                )
        return self._codec

    def global_model(self, round_idx: int, digest: str) -> GlobalModel:
        if self._global is None or self._global.round_idx != round_idx or self._global.digest != digest:
            self._global = read_global_model(self.paths.global_model(round_idx), round_idx, digest)
        return self._global

    def make_trainer(self, worker: FederatedWorker, *, phase: int = 0) -> BaseTrainer:
        """The local trainer of one client's round (DP-SGD in secure mode), seeded per (round, client, phase)."""
        data = ProcessedData({"train": worker.data}, self.meta)
        seed = client_seed(self.config.seed, worker.round_idx, int(worker.worker_id), phase)
        # fl.client_lr_schedule: the round's local learning rate (public: a function of the round only).
        lr = lr_at(
            self.config.train.lr,
            self.fl.client_lr_schedule,
            round_idx=worker.round_idx,
            rounds=self.fl.rounds,
        )
        # train.early_stopping applies to the rounds (fedrec.federated.early_stop), not to local epochs
        train = dataclasses.replace(self.config.train, lr=lr, early_stopping=None)
        if not self.fl.secure:
            return BaseTrainer(
                worker.model,
                data,
                dataclasses.replace(self.config, seed=seed, train=train),
                device=self.device,
            )
        local = dataclasses.replace(self.config, seed=seed, train=train, privacy=self.client_privacy)
        trainer = self.dp_trainer_cls(worker.model, data, local, device=self.device, ledger=False)
        # DPTrainer resets a data-dependent global rating bias; the global model's value is the one to use.
        self.layout.load_into(worker.model, worker.global_model.params)  # type: ignore[union-attr]
        return trainer

    def trainer_worker(self, client_id: int, round_idx: int, attempt: int, digest: str) -> FederatedWorker:
        """A short-lived trainer for ``client_id``: its rows, a local model, the global model's digest."""
        span = self.partition.client_span(client_id)
        if span is None:
            split = self.train.subset(self.partition.client_rows(client_id))
        else:  # one contiguous range, read from the files (not mapped: RSS stays the client's rows)
            split = ArraySplit({name: read_rows(array, *span) for name, array in self.train.arrays.items()})
        if self.private_names and self.reconstruction is not None:
            users, arrays = local_users(split.arrays)
            split = ArraySplit(arrays)
            meta = {**self.meta, "num_users": len(users)}
            model = build_model(self.config, meta, sparse=self.sparse).to(self.device)
        elif self.private_names:
            users = self.partition.client_users(client_id)
            arrays = dict(split.arrays)
            arrays["user"] = np.searchsorted(users, arrays["user"]).astype(arrays["user"].dtype)
            split = ArraySplit(arrays)
            model = build_model(self.config, {**self.meta, "num_users": len(users)}, sparse=self.sparse)
            rows = self.store.read(users, tag=attempt_tag(round_idx, attempt))  # type: ignore[union-attr]
            state = model.state_dict()
            with torch.no_grad():
                for name in self.private_names:
                    state[name].copy_(torch.from_numpy(rows[name]))
            model = model.to(self.device)
        else:
            model = self.template
        worker = self.algorithm_cls(
            client_id,
            ("trainer",),
            config=self.config,
            out_neighbours={"aggregator": Neighbour("aggregator", 0)},
            persistent_storage=self.paths.clients,
            comm=ClientChannel(self, digest),
            round_idx=round_idx,
            params=self.algorithm_params,
        )
        worker.attempt = attempt
        worker.model = model
        worker.data = split
        worker.layout = self.layout
        worker.make_trainer = self.make_trainer
        if self.private_names and self.reconstruction is not None:
            worker.reconstruct = functools.partial(reconstruct, config=self.reconstruction)
        return worker

    def check_round_recorded(self, noise: RoundNoise) -> None:
        """fl.user_dp: send nothing unless the ledger holds this round with the noise this client adds."""
        for record in self.ledger.rounds():
            if (
                record.round == noise.round_idx
                and record.min_survivors == noise.min_survivors
                and record.noise_multiplier == noise.noise_multiplier
                and record.clip_norm == noise.clip_norm
                and record.client_sampling_rate == noise.client_sampling_rate
            ):
                return
        raise FedrecError(
            f"round {noise.round_idx}: the privacy ledger has no record of this round with noise_multiplier "
            f"{noise.noise_multiplier}, clip_norm {noise.clip_norm}, min_survivors {noise.min_survivors}; "
            "the update is not sent"
        )

    def save_private_rows(self, worker: FederatedWorker, round_idx: int, attempt: int) -> None:
        if self.store is None:  # no private parameters, or rebuilt each round (fl.reconstruction)
            return
        users = self.partition.client_users(int(worker.worker_id))
        state = worker.model.state_dict()
        rows = {name: state[name].detach().cpu().numpy() for name in self.private_names}
        self.store.write(users, rows, tag=attempt_tag(round_idx, attempt))  # type: ignore[union-attr]

    def eval_train_arrays(self) -> dict[str, np.ndarray]:
        """The training ratings of the users under evaluation (all of them without fl.eval_users)."""
        if self.eval_users is None:
            return self.train.arrays
        if self._eval_train is None:
            self._eval_train = rows_where_in(self.train.arrays, "user", self.eval_users)
        return self._eval_train

    def evaluate(self, params: np.ndarray, splits: list[str], *, tag: int) -> dict[str, dict[str, float]]:
        """Metrics of the global model (plus every user's private rows as of ``tag``) on ``splits``."""
        if not splits:
            return {}
        model = self.template
        self.layout.load_into(model, params)
        if self.store is not None and self.eval_users is not None:
            rows = self.store.read(self.eval_users, tag=tag)  # only the sampled users' rows
            state = model.state_dict()
            with torch.no_grad():
                for name in self.private_names:
                    state[name][torch.from_numpy(self.eval_users)] = torch.from_numpy(rows[name])
        elif self.store is not None:
            rows = self.store.read_all(tag=tag)
            state = model.state_dict()
            with torch.no_grad():
                for name in self.private_names:
                    state[name].copy_(torch.from_numpy(rows[name]))
        elif self.reconstruction is not None:
            # Federated Reconstruction's evaluation: every evaluated user's rows solved from its training
            # ratings (fl.eval_users: only the sampled users', the only rows the metrics read).
            ridge_user_rows(model, self.eval_train_arrays(), ridge=self.reconstruction.ridge)
        if self._evaluator is None:
            config = dataclasses.replace(
                self.config, train=dataclasses.replace(self.config.train, early_stopping=None)
            )
            self._evaluator = BaseTrainer(model, self.data, config, device=self.device)
            self._evaluator.eval_users = self.eval_users
        return {
            split: self._evaluator.evaluate(split, self.config.train.num_eval_batches) for split in splits
        }


def client_privacy_config(config: ExperimentConfig, partition: Partition) -> Any:
    """``privacy:`` as every client applies it: one delta for all (below 1/N of the largest client).

    Budgets are enforced through the ledger, per client, not by each round's local trainer.
    """
    privacy = config.privacy
    if privacy is None:
        raise ConfigError(
            "fl.secure = true needs a 'privacy' section (DP-SGD on each client: privacy.noise_multiplier)"
        )
    if privacy.noise_multiplier is None:
        raise ConfigError(
            "config key 'privacy.noise_multiplier' is required in federated runs (privacy.target_epsilon is "
            "per central run; each client's epsilon is reported from the ledger)"
        )
    largest = int(partition.sizes().max())
    delta = privacy.delta if privacy.delta is not None else 0.1 / largest
    fl = config.fl
    if fl is not None and fl.user_dp is not None:
        # One ledger accounts both levels, at one delta and with one accountant.
        shared, _ = user_delta(fl, partition.num_clients)
        if privacy.delta is not None and privacy.delta != shared:
            raise ConfigError(
                f"config key 'privacy.delta' = {privacy.delta!r}: with fl.user_dp the run's ledger accounts "
                f"example and user level at one delta; set it to fl.user_dp.delta ({shared!r}) or null"
            )
        if privacy.accountant != fl.user_dp.accountant:
            raise ConfigError(
                f"config key 'privacy.accountant' = {privacy.accountant!r}: with fl.user_dp the run's ledger "
                f"accounts both levels with fl.user_dp.accountant = {fl.user_dp.accountant!r}; set them equal"
            )
        delta = shared
    if not 0 < delta < 1.0 / largest:
        raise ConfigError(
            f"config key 'privacy.delta' = {delta!r}: expected below 1/N = {1.0 / largest:.3g} for the largest "
            f"client ({largest} examples)"
        )
    return dataclasses.replace(privacy, delta=delta, epsilon_budget=None)


_CONTEXTS: dict[str, RankContext] = {}
_CONTEXT_LOCK = threading.Lock()


def rank_context(spec: RunSpec) -> RankContext:
    with _CONTEXT_LOCK:
        context = _CONTEXTS.get(spec.run_id)
        if context is None:
            _CONTEXTS.clear()  # one run per process at a time
            context = _CONTEXTS[spec.run_id] = RankContext(spec)
        return context


def inject_faults(spec: RunSpec, round_idx: int, client_id: int) -> None:
    """``fl.faults``: deliberate failures for testing the fault handling."""
    assert spec.config.fl is not None
    faults = spec.config.fl.faults
    if faults.rounds is not None and round_idx not in faults.rounds:
        return
    if client_id in faults.kill_clients:
        os.kill(os.getpid(), signal.SIGKILL)
    if client_id in faults.raise_clients:
        raise FedrecError(f"fault injection: client {client_id} raised in round {round_idx}")
    if client_id in faults.hang_clients:
        time.sleep(faults.hang_seconds)


def scaled_by_fault(spec: RunSpec, round_idx: int, client_id: int, update: Any) -> Any:
    """``fl.faults.scale_clients``: a malicious client multiplies what it sends (after any clipping)."""
    assert spec.config.fl is not None
    faults = spec.config.fl.faults
    if client_id not in faults.scale_clients or (
        faults.rounds is not None and round_idx not in faults.rounds
    ):
        return update
    delta = (np.asarray(update.delta, dtype=np.float64) * faults.scale_factor).astype(np.float32)
    return dataclasses.replace(update, delta=delta)


def _peak_rss_mb() -> float:
    from fedrec.experiment import peak_rss_mb

    return peak_rss_mb()


def client_task(
    spec: RunSpec,
    round_idx: int,
    attempt: int,
    client_id: int,
    digest: str,
    noise: RoundNoise | None = None,
) -> TaskResult:
    """One client's round: take the global model, train locally, encode (encrypt) the update.

    With ``noise`` (fl.user_dp) the client checks the ledger holds the round, clips its whole update
    to S and adds its noise share before anything is recorded, encoded or encrypted; it weighs 1.
    """
    started = time.perf_counter()
    inject_faults(spec, round_idx, client_id)
    context = rank_context(spec)
    if context.fl.user_dp is not None and noise is None:
        # The client's own config asks for user-level DP: never train and send without it.
        raise FedrecError(
            f"client {client_id}: fl.user_dp is set but round {round_idx} came without its noise parameters; "
            "nothing is sent"
        )
    if noise is not None:
        context.check_round_recorded(noise)
    codec = context.codec  # secure: the key pair is read and proven here, before any training or spend
    worker = context.trainer_worker(client_id, round_idx, attempt, digest)
    asyncio.run(worker.run())
    update = worker.update
    assert update is not None
    context.save_private_rows(worker, round_idx, attempt)
    clipped = None
    share = None
    if noise is not None:
        user_dp = context.fl.user_dp
        weight = capped_weight(update.num_examples, weight_cap=user_dp.weight_cap if user_dp else None)
        noised, clipped = privatize(
            update.delta, noise, seed=spec.config.seed, client_id=client_id, weight=weight
        )
        if noise.count_noise_multiplier is not None:  # fl.user_dp.adaptive_clip (plaintext mode)
            share = count_share(noise, clipped=clipped, seed=spec.config.seed, client_id=client_id)
        if context.fl.secure:
            bound = codec.clip()
            largest = float(np.max(np.abs(noised))) if noised.size else 0.0
            if largest > bound:
                # Clamping a coordinate would change the Gaussian mechanism the ledger accounts.
                # The message leaves the client in plaintext: it must not carry the value itself.
                raise FedrecError(
                    f"client {client_id}: a noised update value exceeds fl.encryption.clip = "
                    f"{bound:g}; the update is not sent (raise fl.encryption.clip)"
                )
        update = dataclasses.replace(update, delta=noised.astype(np.float32), weight=1.0)
    update = scaled_by_fault(spec, round_idx, client_id, update)
    if context.fl.secure:
        # What encode would refuse is refused now, before the spend: no spend for work never sent.
        codec.check_encodable(update)
        # Durable before the update leaves this client (BudgetExceededError: it never leaves).
        try:
            context.ledger.record_client_spend(
                client=client_id,
                round=round_idx,
                noise_multiplier=update.extra["noise_multiplier"],
                sample_rate=update.extra["sample_rate"],
                steps=update.extra["dp_steps"],
            )
        except BudgetExceededError as err:
            record_out_of_budget(context.ledger, client_id, round_idx, update.extra)
            raise ClientOutOfBudget(f"client {client_id}: round {round_idx}: {one_line(err)}") from None
    tag = attempt_tag(round_idx, attempt)
    rng = quantisation_rng(spec.config.seed, round_idx, client_id)
    try:
        payload, nbytes = codec.encode(update, tag=tag, rng=rng)
    except Exception as err:
        if not context.fl.secure:
            raise
        # The spend stays recorded (the ledger is an upper bound); say so, in one line.
        raise FedrecError(
            f"client {client_id}: round {round_idx}: encoding failed after the spend was recorded "
            f"(counted, nothing sent): {one_line(err)}"
        ) from None
    return TaskResult(
        client_id=client_id,
        payload=payload,
        bytes_sent=nbytes,
        num_examples=update.num_examples,
        weight=update.weight,
        train_loss=update.train_loss,
        steps=update.steps,
        seconds=time.perf_counter() - started,
        rank=world_rank(),
        peak_rss_mb=_peak_rss_mb(),
        clipped=clipped,
        count_share=share,
    )


def apply_task(
    spec: RunSpec,
    round_idx: int,
    attempt: int,
    aggregate: Any,
    digest: str,
    splits: list[str],
    noise: RoundNoise | None = None,
    server_opt_digest: str | None = None,
) -> dict[str, Any]:
    """A key-holding client: decode the round's aggregate, apply the server rule, write and evaluate.

    A stateful server optimiser (fl.server_optimizer) reads its state after the previous round from
    client storage (checked against ``server_opt_digest``, which the aggregator's checkpoint keeps)
    and writes the new one beside the new global model: the aggregator never sees either.

    Writes the global model of round ``round_idx + 1`` to client storage; returns its digest and the
    evaluation metrics (numbers only: the model itself never goes to the aggregator). With ``noise``
    (fl.user_dp) an aggregate of fewer than ``k`` survivors is refused and the noised sum is divided
    by the expected number of clients ``q N``.
    """
    from privacy.errors import PrivacyError

    started = time.perf_counter()
    context = rank_context(spec)
    current = context.global_model(round_idx, digest)
    if context.fl.user_dp is not None:
        if noise is None:
            raise FedrecError(
                f"round {round_idx}: fl.user_dp is set but the aggregate came without its noise parameters; "
                "it is not released"
            )
        context.check_round_recorded(noise)  # the ledger holds this round with this k
    decoded = context.codec.decode_mean(aggregate, tag=attempt_tag(round_idx, attempt))
    mean = decoded.mean
    if noise is not None:
        if not decoded.uniform:
            raise FedrecError(
                f"round {round_idx}: a client delivered only part of its update; under fl.user_dp the "
                "aggregate is not released"
            )
        try:
            check_release(noise, survivors=decoded.num_clients)
        except PrivacyError as err:
            raise FedrecError(f"round {round_idx}: {err}") from None
        mean = released_mean(decoded.mean, decoded.total_weight, noise)
    worker = context.algorithm_cls(
        "apply",
        ("trainer",),
        config=spec.config,
        persistent_storage=spec.paths.clients,
        params=context.algorithm_params,
    )
    opt_state = None
    if server_opt_digest is not None:
        opt_state = ServerOptState.load(
            state_path(spec.paths.global_model(round_idx)), digest=server_opt_digest
        )
    new_params, opt_state = apply_mean_update(
        worker, current.params, mean, round_idx=round_idx, fl=context.fl, state=opt_state
    )
    new_digest = write_global_model(spec.paths.global_model(round_idx + 1), new_params)
    new_opt_digest = (
        opt_state.save(state_path(spec.paths.global_model(round_idx + 1))) if opt_state is not None else None
    )
    context._global = GlobalModel(round_idx + 1, new_params, new_digest)
    metrics = context.evaluate(new_params, splits, tag=attempt_tag(round_idx + 1, 0))
    stale = spec.paths.global_model(round_idx - 1)
    if round_idx >= 1 and os.path.exists(stale):
        os.remove(stale)  # keep the current and the previous round's models
    if round_idx >= 1 and os.path.exists(state_path(stale)):
        os.remove(state_path(stale))
    return {
        "digest": new_digest,
        "server_opt_digest": new_opt_digest,
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "num_clients": decoded.num_clients,
        "error_bound": decoded.error_bound,
        "rank": world_rank(),
        "peak_rss_mb": _peak_rss_mb(),
    }


def keep_best_task(spec: RunSpec, model_round: int, digest: str) -> str:
    """train.early_stopping: a key holder keeps a copy of the global model ``model_round`` (the best so
    far) beside the rounds' models, which are deleted as the run goes on; returns its digest."""
    current = read_global_model(spec.paths.global_model(model_round), model_round, digest)
    return write_global_model(spec.paths.best_model, current.params)


def evaluate_model_task(
    spec: RunSpec, model_round: int, digest: str, splits: list[str], *, best: bool
) -> dict[str, Any]:
    """A key holder's metrics (numbers only) of the global model ``model_round`` (``best``: of the copy
    :func:`keep_best_task` kept), checked against ``digest``."""
    context = rank_context(spec)
    path = spec.paths.best_model if best else spec.paths.global_model(model_round)
    model = read_global_model(path, model_round, digest)
    return context.evaluate(np.array(model.params), splits, tag=attempt_tag(model_round, 0))


def record_out_of_budget(ledger: Any, client_id: int, round_idx: int, extra: dict[str, Any]) -> None:
    """Record (once) that the ledger refused ``client_id``'s spend: the report lists it, and when."""
    if str(client_id) in ledger.excluded_clients():
        return
    ledger.record_exclusion(
        client=client_id,
        round=round_idx,
        reason=(
            f"budget: the round's spend (noise {extra['noise_multiplier']:g}, rate {extra['sample_rate']:.4g}, "
            f"{extra['dp_steps']} steps) would exceed privacy.epsilon_budget"
        ),
    )


def checked_secret_context(paths: RunPaths) -> bytes:
    """The clients' secret context bytes, once it is shown to pair with the run's public context.

    Both files are read with one-line errors naming them (missing, unreadable, wrong role, other
    parameters), and the pair is proven (a vector encrypted under the public key decrypts under the
    secret one): a deleted public.ctx or a swapped secret.ctx stops the run before any spend.

    Raises:
        EncryptionError: a file is missing or refused, or the two contexts are not one key pair.
    """
    from privacy.encryption.context import check_key_pair, read_context_file

    secret = read_context_file(paths.secret_context, role="secret")
    public = read_context_file(paths.public_context, role="public")
    check_key_pair(secret, public)
    with open(paths.secret_context, "rb") as fh:
        return fh.read()


def key_check_task(spec: RunSpec) -> bool:
    """Start-up check on the client side: the secret and public contexts are one key pair."""
    checked_secret_context(spec.paths)
    return True


def keygen_task(spec: RunSpec, *, max_clients: int, max_weight: int) -> bytes:
    """Key authority on the client side: keep the secret context in client storage, return the public one."""
    from privacy.encryption.context import generate_keys

    assert spec.config.fl is not None
    enc = spec.config.fl.encryption
    keys = generate_keys(
        max_clients=max_clients,
        scheme=enc.scheme,
        max_weight=max_weight,
        clip=enc.clip,
        precision_bits=enc.precision_bits,
    )
    path = spec.paths.secret_context
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(keys.secret_context)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return keys.public_context
