"""Federated simulation: many simulated clients multiplexed over the ranks of an ``mpi4py.futures`` pool.

Launch::

    mpirun -np 4 python -m mpi4py.futures scripts/train_fl.py --config configs/dlrm_fl.yml ...   # 3 worker ranks
    python scripts/train_fl.py --config configs/mf_movielens_fl.yml ...                          # one process

Under ``python -m mpi4py.futures`` rank 0 runs the aggregator and the other ranks form the pool
that runs client tasks. Without it the same code runs the client tasks in one worker thread of the
same process (an in-process pool of size one), with identical results.

Lazy clients: a client is an id. A client task reads that client's rows of the training split
(the partition maps ids to row ranges), builds or reuses one model per rank, trains, returns the
encoded update and forgets everything; only the per-rank caches (data memory maps, one model, the
current global model) persist. The aggregator keeps one running sum (exact, order-independent), so
memory does not grow with the number of clients, and the final model is the same bit for bit with
1, 2 or 4 ranks.

Global models live in client storage (``LOGDIR/fl/clients/global/round_NNNNNN.npy``), written by the
"apply" task, a key-holding client that decodes (in secure mode: decrypts) the round's aggregate,
applies the algorithm's server rule and evaluates; the aggregator then commits the round by
atomically replacing ``LOGDIR/fl/checkpoint.json``. In secure mode the aggregator process never
loads the secret key (with ``mpirun``; in one process everything shares the process).

Faults: a task that raises, or returns nothing within ``fl.client_timeout`` seconds, is dropped from
the round and reported to the algorithm's ``aggregate`` as a failure. At most as many tasks run as
there are workers, so a task's deadline measures its own run time. A worker still stuck in a
timed-out task is not given new work; if every worker is stuck, or the apply task does not return,
the job stops with an error (``MPI_Abort`` under mpirun) instead of hanging. A rank that dies takes
the whole MPI job down (mpiexec's default); ``--resume`` continues from the last completed round.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import hashlib
import math
import os
import platform
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec import registry
from fedrec.config import ExperimentConfig, config_to_dict
from fedrec.data.base import ArraySplit, ProcessedData
from fedrec.data.partition import Partition, make_partition, partition_statistics
from fedrec.errors import ConfigError, FedrecError
from fedrec.experiment import build_model, config_fingerprint, open_writer, prepare_data, write_summary
from fedrec.federated.checkpoint import (
    AggregatorState,
    capture_rng,
    check_resume,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fedrec.federated.codec import PlainCodec, SecureCodec
from fedrec.federated.private_store import PrivateRowStore, attempt_tag
from fedrec.federated.worker import (
    ClientDirectory,
    ClientFailure,
    ClientResult,
    FederatedWorker,
    GlobalModel,
    Neighbour,
    ParamLayout,
    RoundResults,
    algorithm_params,
)
from fedrec.trainers.base_trainer import BaseTrainer, optimizer_supports_sparse

APPLY_TIMEOUT_FLOOR = 600.0  # seconds the apply (decrypt + evaluate) task may take beyond fl.client_timeout
MAX_LOGGED_FAILURES = 20


class SimulationError(FedrecError):
    """The simulation cannot go on (every worker stuck, the pool broken, a round that never completes)."""


# --------------------------------------------------------------------------------------------------
# Run layout and the spec every rank receives
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where a federated run keeps its state under LOGDIR."""

    logdir: str

    @property
    def fl(self) -> str:
        return os.path.join(self.logdir, "fl")

    @property
    def clients(self) -> str:  # the trainers' persistent storage (client side)
        return os.path.join(self.fl, "clients")

    @property
    def aggregator(self) -> str:  # the aggregator's persistent storage
        return os.path.join(self.fl, "aggregator")

    @property
    def partition(self) -> str:
        return os.path.join(self.fl, "partition.npz")

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.fl, "checkpoint.json")

    @property
    def private_rows(self) -> str:
        return os.path.join(self.clients, "private")

    @property
    def secret_context(self) -> str:
        return os.path.join(self.clients, "keys", "secret.ctx")

    @property
    def public_context(self) -> str:
        return os.path.join(self.aggregator, "public.ctx")

    def global_model(self, round_idx: int) -> str:
        return os.path.join(self.clients, "global", f"round_{round_idx:06d}.npy")


@dataclass(frozen=True)
class RunSpec:
    """What every rank needs to rebuild its side of the run (sent with each task; small)."""

    run_id: str
    config: ExperimentConfig
    logdir: str
    device: str  # for ranks without a gpu_map entry
    world_size: int

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.logdir)


# --------------------------------------------------------------------------------------------------
# Global model files (client storage): immutable per round, identified by the digest of their values
# --------------------------------------------------------------------------------------------------


def params_digest(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params, dtype=np.float32).tobytes()).hexdigest()


def write_global_model(path: str, params: np.ndarray) -> str:
    """Write ``params`` (float32) atomically; returns its digest."""
    params = np.ascontiguousarray(params, dtype=np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}.npy"
    np.save(tmp, params, allow_pickle=False)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return params_digest(params)


def read_global_model(path: str, round_idx: int, digest: str) -> GlobalModel:
    try:
        params = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FedrecError(f"{path}: cannot read the global model of round {round_idx} ({err})") from None
    if params_digest(params) != digest:
        raise FedrecError(f"{path}: global model of round {round_idx} does not match the checkpoint's digest")
    params.setflags(write=False)
    return GlobalModel(round_idx, params, digest)


# --------------------------------------------------------------------------------------------------
# Ranks, hosts and GPUs (communications.gpu_map: the seed's / FedML's format)
# --------------------------------------------------------------------------------------------------


def gpu_assignments(gpu_map: dict[str, list[int]]) -> list[tuple[str, int]]:
    """Process i -> (host, GPU index): ``host: [n_0, n_1, ...]`` puts n_j processes on GPU j, in order."""
    out = []
    for host, counts in gpu_map.items():
        for gpu, count in enumerate(counts):
            out.extend([(host, gpu)] * int(count))
    return out


def _is_this_host(host: str) -> bool:
    return host in (platform.node(), "localhost", "127.0.0.1")


def check_gpu_map(gpu_map: dict[str, list[int]], world_size: int, *, cuda_devices: int) -> None:
    """Errors before the first round: rank count differs from the map, or a GPU of this host is missing."""
    assigned = gpu_assignments(gpu_map)
    launch = "one process (no mpirun)" if world_size == 1 else f"{world_size} ranks (mpirun -np {world_size})"
    if len(assigned) > world_size:
        raise ConfigError(
            f"config key 'communications.gpu_map' asks for {len(assigned)} processes but the job has {launch}"
        )
    if len(assigned) < world_size:
        raise ConfigError(
            f"config key 'communications.gpu_map' assigns {len(assigned)} processes but the job has {launch}; "
            "every rank needs an entry"
        )
    host0, _ = assigned[0]
    if not _is_this_host(host0):
        raise ConfigError(
            f"config key 'communications.gpu_map': rank 0 is mapped to host {host0!r} but runs on "
            f"{platform.node()!r} (use the host's name or 'localhost')"
        )
    for host, counts in gpu_map.items():
        if not _is_this_host(host):
            continue  # checked by that host's worker ranks when the pool starts
        for gpu, count in enumerate(counts):
            if count > 0 and gpu >= cuda_devices:
                raise ConfigError(
                    f"config key 'communications.gpu_map.{host}' = {counts!r}: GPU {gpu} does not exist "
                    f"({cuda_devices} CUDA device(s) on {platform.node()})"
                )


def import_modules(modules: list[str]) -> None:
    """Import ``fl.import_modules`` (your own ``@registry.load('fl_algo', ...)``) on this rank."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"config key 'fl.import_modules': cannot import {module!r} ({err})") from None


def world_rank() -> int:
    """This process's rank in MPI.COMM_WORLD (0 without MPI)."""
    if "mpi4py.MPI" not in sys.modules:
        return 0
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def rank_device(spec: RunSpec) -> torch.device:
    gpu_map = spec.config.communications.gpu_map if spec.config.communications else None
    if not gpu_map:
        return torch.device(spec.device)
    host, gpu = gpu_assignments(gpu_map)[world_rank()]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not _is_this_host(host):
        raise ConfigError(
            f"config key 'communications.gpu_map': rank {world_rank()} is mapped to host {host!r} but runs on "
            f"{platform.node()!r}"
        )
    if gpu >= available:
        raise ConfigError(
            f"config key 'communications.gpu_map.{host}': GPU {gpu} does not exist ({available} CUDA device(s) "
            f"on {platform.node()})"
        )
    return torch.device("cuda", gpu)


def _init_worker_rank(spec: RunSpec) -> None:
    """Pool initializer on every worker rank, before round 0: check (and select) this rank's device and
    build the rank's context (data, partition, model), so no client's timeout pays for the setup."""
    try:
        device = rank_device(spec)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        rank_context(spec)
    except Exception as err:
        print(f"train_fl.py (rank {world_rank()}): error: {_one_line(err)}", file=sys.stderr, flush=True)
        raise


# --------------------------------------------------------------------------------------------------
# Pools: mpi4py.futures under mpirun, one worker thread otherwise
# --------------------------------------------------------------------------------------------------


def mpi_world_size() -> int:
    """Ranks of the surrounding ``python -m mpi4py.futures`` job (1 when not under one)."""
    core = sys.modules.get("mpi4py.futures._core")
    if core is None or getattr(core, "SharedPool", None) is None:
        return 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def launcher_ranks() -> int:
    """Ranks announced by an MPI launcher's environment (mpich/hydra, Open MPI), or 1."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


class InProcessPool:
    """The pool of a run without mpirun: one worker thread in this process."""

    mode = "in-process"
    num_workers = 1

    def __init__(self, spec: RunSpec) -> None:
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fl-client")
        self._executor.submit(rank_context, spec).result()  # set up before round 0 (errors surface here)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self._executor.submit(fn, *args)

    def shutdown(self, *, stuck: bool) -> None:
        self._executor.shutdown(wait=not stuck, cancel_futures=True)


class MPIPool:
    """The ``mpi4py.futures`` pool of the worker ranks (rank 0 is the aggregator)."""

    mode = "mpi"

    def __init__(self, spec: RunSpec) -> None:
        from mpi4py.futures import MPIPoolExecutor

        self._executor = MPIPoolExecutor(initializer=_init_worker_rank, initargs=(spec,))
        try:
            self._executor.bootup(wait=True)
            self.num_workers = self._executor.num_workers
        except Exception as err:
            raise ConfigError(f"the MPI worker pool did not start: {err}") from None
        if self.num_workers < 1:
            raise ConfigError(
                "the MPI worker pool did not start: a worker rank failed its setup "
                "(for example its communications.gpu_map entry; see the rank's error above)"
            )

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self._executor.submit(fn, *args)

    def shutdown(self, *, stuck: bool) -> None:
        self._executor.shutdown(wait=not stuck, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Rank side: per-process context and the tasks
# --------------------------------------------------------------------------------------------------


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """The seed of one client's local round: its batches and (non-secure-mode) DP noise."""
    return int(
        np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1, np.uint64)[0] >> np.uint64(2)
    )


def _local_dp_trainer_class() -> type:
    from fedrec.trainers.dp_trainer import DPTrainer

    class LocalDPTrainer(DPTrainer):
        """DPTrainer for one client's local epochs; its spend goes to the ledger from the client task."""

        def flush_noise(self) -> None:
            self.dp.flush()

        def finish(self) -> None:
            self.dp.close()  # flush pending row noise, remove the hooks from the (reused) model

        def update_extra(self) -> dict[str, Any]:
            return {
                "noise_multiplier": float(self.params["noise_multiplier"]),
                "sample_rate": float(self.params["sample_rate"]),
                "dp_steps": int(self.dp.steps),
                "clipped_fraction": float(self.last_stats.clipped_fraction) if self.last_stats else 0.0,
            }

    return LocalDPTrainer


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


class RankContext:
    """One rank's cached view of the run: data (memory-mapped), partition, one model, codec, store."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.config = config = spec.config
        self.fl = config.fl
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
        self.store = (
            PrivateRowStore.open(self.paths.private_rows, list(self.private_names))
            if self.private_names
            else None
        )
        self.ledger: Any = None
        if self.fl.secure:
            from privacy.ledger import PrivacyLedger, ledger_path

            self.client_privacy = client_privacy_config(config, self.partition)
            self.dp_trainer_cls = _local_dp_trainer_class()
            self.ledger = PrivacyLedger.attach(ledger_path(spec.logdir))
        self._codec: Any = None
        self._global: GlobalModel | None = None
        self._evaluator: BaseTrainer | None = None

    @property
    def codec(self) -> Any:
        """Plain fixed point, or encryption with the clients' secret key (read at first use: the key
        authority runs after the ranks are set up)."""
        if self._codec is None:
            if self.fl.secure:
                with open(self.paths.secret_context, "rb") as fh:
                    self._codec = SecureCodec(self.layout, secret_context=fh.read())
            else:
                self._codec = PlainCodec(self.layout, bits=self.fl.fixed_point_bits)
        return self._codec

    def global_model(self, round_idx: int, digest: str) -> GlobalModel:
        if self._global is None or self._global.round_idx != round_idx or self._global.digest != digest:
            self._global = read_global_model(self.paths.global_model(round_idx), round_idx, digest)
        return self._global

    def make_trainer(self, worker: FederatedWorker) -> BaseTrainer:
        """The local trainer of one client's round (DP-SGD in secure mode), seeded per (round, client)."""
        data = ProcessedData({"train": worker.data}, self.meta)
        seed = client_seed(self.config.seed, worker.round_idx, int(worker.worker_id))
        if not self.fl.secure:
            return BaseTrainer(
                worker.model, data, dataclasses.replace(self.config, seed=seed), device=self.device
            )
        local = dataclasses.replace(self.config, seed=seed, privacy=self.client_privacy)
        trainer = self.dp_trainer_cls(worker.model, data, local, device=self.device, ledger=False)
        # DPTrainer resets a data-dependent global rating bias; the global model's value is the one to use.
        self.layout.load_into(worker.model, worker.global_model.params)  # type: ignore[union-attr]
        return trainer

    def trainer_worker(self, client_id: int, round_idx: int, attempt: int, digest: str) -> FederatedWorker:
        """A short-lived trainer for ``client_id``: its rows, a local model, the global model's digest."""
        split = self.train.subset(self.partition.client_rows(client_id))
        if self.private_names:
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
        return worker

    def save_private_rows(self, worker: FederatedWorker, round_idx: int, attempt: int) -> None:
        if not self.private_names:
            return
        users = self.partition.client_users(int(worker.worker_id))
        state = worker.model.state_dict()
        rows = {name: state[name].detach().cpu().numpy() for name in self.private_names}
        self.store.write(users, rows, tag=attempt_tag(round_idx, attempt))  # type: ignore[union-attr]

    def evaluate(self, params: np.ndarray, splits: list[str], *, tag: int) -> dict[str, dict[str, float]]:
        """Metrics of the global model (plus every user's private rows as of ``tag``) on ``splits``."""
        if not splits:
            return {}
        model = self.template
        self.layout.load_into(model, params)
        if self.store is not None:
            rows = self.store.read_all(tag=tag)
            state = model.state_dict()
            with torch.no_grad():
                for name in self.private_names:
                    state[name].copy_(torch.from_numpy(rows[name]))
        if self._evaluator is None:
            self._evaluator = BaseTrainer(model, self.data, self.config, device=self.device)
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
    faults = spec.config.fl.faults
    if faults.rounds is not None and round_idx not in faults.rounds:
        return
    if client_id in faults.kill_clients:
        os.kill(os.getpid(), signal.SIGKILL)
    if client_id in faults.raise_clients:
        raise FedrecError(f"fault injection: client {client_id} raised in round {round_idx}")
    if client_id in faults.hang_clients:
        time.sleep(faults.hang_seconds)


def _peak_rss_mb() -> float:
    from fedrec.experiment import peak_rss_mb

    return peak_rss_mb()


def client_task(spec: RunSpec, round_idx: int, attempt: int, client_id: int, digest: str) -> TaskResult:
    """One client's round: take the global model, train locally, encode (encrypt) the update."""
    started = time.perf_counter()
    inject_faults(spec, round_idx, client_id)
    context = rank_context(spec)
    worker = context.trainer_worker(client_id, round_idx, attempt, digest)
    asyncio.run(worker.run())
    update = worker.update
    assert update is not None
    context.save_private_rows(worker, round_idx, attempt)
    if context.ledger is not None:
        # Durable before the update leaves this client (BudgetExceededError: it never leaves).
        context.ledger.record_client_spend(
            client=client_id,
            round=round_idx,
            noise_multiplier=update.extra["noise_multiplier"],
            sample_rate=update.extra["sample_rate"],
            steps=update.extra["dp_steps"],
        )
    tag = attempt_tag(round_idx, attempt)
    rng = np.random.default_rng([spec.config.seed, round_idx, client_id, 0xE1])
    payload, nbytes = context.codec.encode(update, tag=tag, rng=rng)
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
    )


def apply_task(
    spec: RunSpec, round_idx: int, attempt: int, aggregate: Any, digest: str, splits: list[str]
) -> dict[str, Any]:
    """A key-holding client: decode the round's aggregate, apply the server rule, write and evaluate.

    Writes the global model of round ``round_idx + 1`` to client storage; returns its digest and the
    evaluation metrics (numbers only: the model itself never goes to the aggregator).
    """
    started = time.perf_counter()
    context = rank_context(spec)
    current = context.global_model(round_idx, digest)
    decoded = context.codec.decode_mean(aggregate, tag=attempt_tag(round_idx, attempt))
    worker = context.algorithm_cls(
        "apply",
        ("trainer",),
        config=spec.config,
        persistent_storage=spec.paths.clients,
        params=context.algorithm_params,
    )
    new_params = np.asarray(worker.apply_aggregate(current.params, decoded.mean), dtype=np.float32)
    if not np.all(np.isfinite(new_params)):
        raise FedrecError(
            f"round {round_idx}: the new global model has NaN or infinite values (lower train.lr?)"
        )
    new_digest = write_global_model(spec.paths.global_model(round_idx + 1), new_params)
    context._global = GlobalModel(round_idx + 1, new_params, new_digest)
    metrics = context.evaluate(new_params, splits, tag=attempt_tag(round_idx + 1, 0))
    stale = spec.paths.global_model(round_idx - 1)
    if round_idx >= 1 and os.path.exists(stale):
        os.remove(stale)  # keep the current and the previous round's models
    return {
        "digest": new_digest,
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "num_clients": decoded.num_clients,
        "error_bound": decoded.error_bound,
        "rank": world_rank(),
        "peak_rss_mb": _peak_rss_mb(),
    }


def keygen_task(spec: RunSpec, *, max_clients: int, max_weight: int) -> bytes:
    """Key authority on the client side: keep the secret context in client storage, return the public one."""
    from privacy.encryption.context import generate_keys

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


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------------------------------
# Aggregator side
# --------------------------------------------------------------------------------------------------


class AggregatorTransport:
    """Runs the sampled clients' tasks on the pool and streams their updates into the running sum."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.stuck: set[cf.Future] = set()

    def _reap_stuck(self) -> None:
        self.stuck = {f for f in self.stuck if not f.done()}

    async def _wait_for_stuck(self) -> None:
        """Every worker is busy with a timed-out task: wait a while for one, then give up."""
        grace = self.sim.fl.client_timeout
        done, _ = await asyncio.wait(
            [asyncio.wrap_future(f) for f in self.stuck], timeout=grace, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            raise SimulationError(
                f"all {self.sim.pool.num_workers} pool workers are stuck in client tasks that exceeded "
                f"fl.client_timeout={self.sim.fl.client_timeout}s; stopping (resume with --resume)"
            )
        self._reap_stuck()

    async def request_models(self, worker: FederatedWorker, neighbour_ids: Any) -> RoundResults:
        sim, fl = self.sim, self.sim.fl
        round_idx, attempt = worker.round_idx, worker.attempt
        tag = attempt_tag(round_idx, attempt)
        running = sim.codec.new_sum(tag)
        queue = deque(int(c) for c in neighbour_ids)
        inflight: dict[asyncio.Future, tuple[int, float, cf.Future]] = {}
        results: list[ClientResult] = []
        failures: list[ClientFailure] = []
        while queue or inflight:
            self._reap_stuck()
            free = sim.pool.num_workers - len(inflight) - len(self.stuck)
            while queue and free > 0:
                client = queue.popleft()
                future = sim.pool.submit(
                    client_task, sim.spec, round_idx, attempt, client, sim.state.global_digest
                )
                inflight[asyncio.wrap_future(future)] = (client, time.monotonic(), future)
                free -= 1
            if not inflight:
                await self._wait_for_stuck()
                continue
            deadline = min(started for _, started, _ in inflight.values()) + fl.client_timeout
            done, _ = await asyncio.wait(
                list(inflight),
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in done:
                client, started, _ = inflight.pop(waiter)
                self._collect(waiter, client, time.monotonic() - started, running, results, failures)
            now = time.monotonic()
            for waiter, (client, started, future) in list(inflight.items()):
                if now - started >= fl.client_timeout:
                    del inflight[waiter]
                    failures.append(
                        ClientFailure(
                            client,
                            "timeout",
                            f"no update within fl.client_timeout={fl.client_timeout}s",
                            now - started,
                        )
                    )
                    if not future.cancel():
                        self.stuck.add(future)
        results.sort(key=lambda r: r.client_id)
        failures.sort(key=lambda f: f.client_id)
        return RoundResults(
            round_idx, attempt, tuple(sorted(int(c) for c in neighbour_ids)), results, failures, running
        )

    def _collect(
        self,
        waiter: asyncio.Future,
        client: int,
        elapsed: float,
        running: Any,
        results: list[ClientResult],
        failures: list[ClientFailure],
    ) -> None:
        sim = self.sim
        try:
            result: TaskResult = waiter.result()
        except cf.BrokenExecutor as err:
            raise SimulationError(f"the worker pool broke: {_one_line(err)}") from None
        except Exception as err:  # a client's failure is data, not an exception unwinding the round
            failures.append(ClientFailure(client, "error", _one_line(err), elapsed))
            return
        if result.seconds > sim.fl.client_timeout:
            failures.append(
                ClientFailure(
                    client,
                    "timeout",
                    f"took {result.seconds:.1f}s > fl.client_timeout={sim.fl.client_timeout}s",
                    elapsed,
                )
            )
            return
        try:
            sim.codec.add(running, result.payload)
        except Exception as err:
            failures.append(ClientFailure(client, "rejected", _one_line(err), elapsed))
            return
        sim.note_rank_memory(result.rank, result.peak_rss_mb)
        results.append(
            ClientResult(
                client_id=client,
                num_examples=result.num_examples,
                weight=result.weight,
                train_loss=result.train_loss,
                steps=result.steps,
                seconds=result.seconds,
                bytes_sent=result.bytes_sent,
                bytes_received=sim.download_bytes,
                rank=result.rank,
            )
        )

    async def publish(
        self, aggregate: Any, round_idx: int, attempt: int, splits: list[str]
    ) -> dict[str, Any]:
        """Hand the aggregate to a key-holding client (the apply task); returns its digest and metrics."""
        sim = self.sim
        future = sim.pool.submit(
            apply_task, sim.spec, round_idx, attempt, aggregate, sim.state.global_digest, splits
        )
        timeout = sim.fl.client_timeout + APPLY_TIMEOUT_FLOOR
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=timeout)
        except TimeoutError:
            self.stuck.add(future)
            raise SimulationError(
                f"round {round_idx}: the apply/evaluate task did not return within {timeout:.0f}s"
            ) from None
        except cf.BrokenExecutor as err:
            raise SimulationError(f"the worker pool broke: {_one_line(err)}") from None


class Simulation:
    """The aggregator's side of a federated run: setup and validation, rounds, checkpoints, outputs."""

    def __init__(
        self,
        config: ExperimentConfig,
        logdir: str,
        *,
        resume: bool = False,
        device: str = "cpu",
        log: Callable[[str], None] | None = None,
    ):
        if config.fl is None:
            raise ConfigError("the config has no 'fl' section (see configs/dlrm_fl.yml and configs/flags.md)")
        self.config = config
        self.fl = config.fl
        self.logdir = logdir
        self.paths = RunPaths(logdir)
        self.resume = resume
        self.device = device
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.pool: Any = None
        self.codec: Any = None
        self.spec: RunSpec | None = None
        self.state: AggregatorState | None = None
        self.rank_memory: dict[int, float] = {}
        self.download_bytes = 0
        self.partition_stats: dict[str, Any] = {}
        self.writer: Any = None
        self.ledger: Any = None

    # ------------------------------------------------------------------ setup (every check before round 0)
    def prepare(self) -> None:
        config, fl, paths = self.config, self.fl, self.paths
        import_modules(fl.import_modules)
        try:
            algorithm_cls = registry.lookup("fl_algo", fl.algorithm)
        except FedrecError as err:
            raise ConfigError(f"config key 'fl.algorithm': {err}") from None
        algorithm_params(algorithm_cls, fl.algorithm_params)
        have_checkpoint = os.path.exists(paths.checkpoint)
        if self.resume and not have_checkpoint:
            raise FedrecError(f"{paths.checkpoint}: no federated checkpoint to resume from")
        if not self.resume and have_checkpoint:
            raise ConfigError(
                f"--logdir {self.logdir} already holds a federated run ({paths.checkpoint}); "
                "pass --resume to continue it or choose a new --logdir"
            )
        world = mpi_world_size()
        if world == 1 and launcher_ranks() > 1:
            raise ConfigError(
                f"started by an MPI launcher with {launcher_ranks()} ranks but not under mpi4py.futures: run "
                "mpirun -np N python -m mpi4py.futures scripts/train_fl.py ..."
            )
        gpu_map = config.communications.gpu_map if config.communications else None
        if gpu_map:
            check_gpu_map(
                gpu_map, world, cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0
            )

        data = prepare_data(config, progress=config.train.progress)
        model_cls = registry.lookup("model", config.model.name)
        private = tuple(getattr(model_cls, "PRIVATE_PARAMETERS", ()))
        if private and fl.partition != "natural":
            raise ConfigError(
                f"config key 'fl.partition' = {fl.partition!r}: model {config.model.name!r} keeps "
                f"{', '.join(private)} on each client, so each user must belong to one client (use 'natural')"
            )
        train = data.split("train")
        os.makedirs(paths.fl, exist_ok=True)
        if self.resume:
            partition = Partition.load(paths.partition)
        else:
            partition = make_partition(
                fl.partition, train.arrays, fl.num_workers, seed=config.seed, alpha=fl.dirichlet_alpha
            )
        if len(np.asarray(partition.order)) != len(train):
            raise ConfigError(
                f"{paths.partition}: partition of {len(partition.order)} rows for {len(train)} training rows"
            )
        if fl.client_num_per_round > partition.num_clients:
            raise ConfigError(
                f"config key 'fl.client_num_per_round' = {fl.client_num_per_round}: above the number of clients "
                f"({partition.num_clients})"
            )
        self.partition = partition
        self.partition_stats = partition_statistics(partition, train.arrays["label"])
        sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
        model = build_model(config, data.meta, sparse=sparse)
        self.layout = ParamLayout.from_model(model)
        if fl.secure:
            self.client_privacy = client_privacy_config(config, partition)
            _public_initialisation(model, data.meta)
        fingerprint = config_fingerprint(config)

        if self.resume:
            state = load_checkpoint(paths.checkpoint)
            check_resume(
                state,
                config_fingerprint=fingerprint,
                layout_digest=self.layout.digest(),
                path=paths.checkpoint,
            )
            read_global_model(paths.global_model(state.round_idx), state.round_idx, state.global_digest)
            restore_rng(state.rng)
        else:
            partition.save(paths.partition)
            digest = write_global_model(paths.global_model(0), self.layout.flatten(model))
            if private:
                PrivateRowStore.create(
                    paths.private_rows, {name: model.state_dict()[name] for name in private}
                )
            state = AggregatorState(
                round_idx=0,
                global_digest=digest,
                config_fingerprint=fingerprint,
                layout_digest=self.layout.digest(),
                rng=capture_rng(),
            )
        del model
        self.state = state
        self.spec = RunSpec(
            run_id=f"{fingerprint}-{uuid.uuid4().hex[:8]}",
            config=config,
            logdir=self.logdir,
            device=self.device,
            world_size=world,
        )
        if fl.secure:
            self._open_ledger()
        self.pool = MPIPool(self.spec) if world > 1 else InProcessPool(self.spec)
        if fl.secure:
            self._prepare_secure(partition)
        else:
            self.codec = PlainCodec(self.layout, bits=fl.fixed_point_bits)
        self.download_bytes = self.layout.nbytes
        if not self.resume:
            save_checkpoint(paths.checkpoint, state)

    def _prepare_secure(self, partition: Partition) -> None:
        fl, paths = self.fl, self.paths
        if self.resume:
            with open(paths.public_context, "rb") as fh:
                public = fh.read()
            digest = hashlib.sha256(public).hexdigest()
            if digest != self.state.public_context_digest:  # type: ignore[union-attr]
                raise FedrecError(f"{paths.public_context}: public context does not match the checkpoint")
        else:
            max_weight = fl.encryption.max_weight or int(partition.sizes().max())
            future = self.pool.submit(_keygen_call, self.spec, fl.client_num_per_round, max_weight)
            public = future.result(timeout=APPLY_TIMEOUT_FLOOR)
            os.makedirs(paths.aggregator, exist_ok=True)
            with open(paths.public_context, "wb") as fh:
                fh.write(public)
            self.state.public_context_digest = hashlib.sha256(public).hexdigest()  # type: ignore[union-attr]
        self.codec = SecureCodec(self.layout, public_context=public)

    def _open_ledger(self) -> None:
        """The run's privacy ledger (the aggregator owns it; clients attach and record their spends)."""
        from privacy.ledger import PrivacyLedger, ledger_path

        privacy = self.client_privacy
        self.ledger = PrivacyLedger.open(
            ledger_path(self.logdir),
            delta=privacy.delta,
            accountant=privacy.accountant if privacy.accountant in ("rdp", "prv") else "rdp",
            client_epsilon_budget=self.config.privacy.epsilon_budget,  # type: ignore[union-attr]
            config=config_to_dict(self.config),
        )
        self.max_epsilon = 0.0
        if self.resume:
            epsilons = self.ledger.epsilons()
            self.max_epsilon = max(epsilons.values(), default=0.0)

    def note_rank_memory(self, rank: int, peak_mb: float) -> None:
        self.rank_memory[rank] = max(self.rank_memory.get(rank, 0.0), float(peak_mb))

    # ------------------------------------------------------------------ rounds
    def run(self) -> dict[str, Any]:
        """Prepare (every input check), run the remaining rounds, write outputs; returns the final summary."""
        self.prepare()
        self.writer = open_writer(self.logdir)
        try:
            asyncio.run(self._rounds())
        except FedrecError as err:
            self._write_summary(final=None, error=_one_line(err))
            raise
        finally:
            # A worker still inside a timed-out task will not finish: do not wait for it.
            self.stuck_workers = bool(getattr(self, "transport", None) and self.transport.stuck)
            if self.writer is not None:
                self.writer.close()
            if self.pool is not None:
                self.pool.shutdown(stuck=self.stuck_workers)
        return self.final

    async def _rounds(self) -> None:
        fl, state = self.fl, self.state
        assert state is not None
        self.transport = AggregatorTransport(self)
        aggregator = registry.lookup("fl_algo", fl.algorithm)(
            "aggregator",
            ("aggregator",),
            config=self.config,
            in_neighbours=ClientDirectory(self.partition.sizes()),
            persistent_storage=self.paths.aggregator,
            comm=self.transport,
            round_idx=state.round_idx,
            params=algorithm_params(registry.lookup("fl_algo", fl.algorithm), fl.algorithm_params),
        )
        bar = _progress(total=fl.rounds, initial=state.round_idx, enabled=self.config.train.progress)
        try:
            while aggregator.round_idx < fl.rounds:
                record = await self._one_round(aggregator)
                bar.update(1)
                val = record.get("val") or {}
                shown = {k: f"{v:.4f}" for k, v in val.items() if k in ("auc", "rmse", "logloss")}
                bar.set_postfix(done=f"{record['completed']}/{record['sampled']}", **shown)
        finally:
            bar.close()
        self.final = self._final_summary()

    async def _one_round(self, aggregator: FederatedWorker) -> dict[str, Any]:
        fl, state = self.fl, self.state
        assert state is not None
        round_idx = aggregator.round_idx
        started = time.perf_counter()
        attempts: list[RoundResults] = []
        while aggregator.round_idx == round_idx:
            if aggregator.attempt > fl.max_round_retries:
                last = attempts[-1]
                raise SimulationError(
                    f"round {round_idx}: too few clients returned in {len(attempts)} attempts (last: {len(last)} "
                    f"of {len(last.sampled)}; fl.min_completion_rate={fl.min_completion_rate}, "
                    f"fl.max_round_retries={fl.max_round_retries}); first failure: "
                    f"{last.failures[0].message if last.failures else 'none'}"
                )
            await aggregator.run()
            assert aggregator.last_results is not None
            attempts.append(aggregator.last_results)
        results = attempts[-1]
        aggregate_payload, aggregate_bytes = self.codec.close(results.aggregate)
        last_round = round_idx + 1 == fl.rounds
        splits = ["val"] if (round_idx + 1) % fl.eval_every == 0 or last_round else []
        if last_round:
            splits.append("test")
        applied = await self.transport.publish(aggregate_payload, round_idx, results.attempt, splits)
        self.note_rank_memory(applied["rank"], applied["peak_rss_mb"])
        epsilon = self._epsilon(attempts)
        record = self._round_record(
            round_idx, attempts, applied, aggregate_bytes, time.perf_counter() - started, epsilon
        )
        self.download_bytes = aggregate_bytes if self.codec.secure else self.layout.nbytes
        state.round_idx = round_idx + 1
        state.global_digest = applied["digest"]
        state.history.append(record)
        state.rng = capture_rng()
        state.ledger_position = self._ledger_position()
        save_checkpoint(self.paths.checkpoint, state)  # the round is committed here
        self._log_round(record)
        self._write_summary(final=None)
        return record

    def _round_record(
        self,
        round_idx: int,
        attempts: list[RoundResults],
        applied: dict[str, Any],
        aggregate_bytes: int,
        seconds: float,
        epsilon: float | None,
    ) -> dict[str, Any]:
        results = attempts[-1]
        weights = np.array([r.num_examples for r in results.results], dtype=np.float64)
        losses = np.array([r.train_loss for r in results.results], dtype=np.float64)
        finite = np.isfinite(losses)
        train_loss = (
            float(np.sum(weights[finite] * losses[finite]) / np.sum(weights[finite]))
            if finite.any()
            else None
        )
        failures = [f for attempt in attempts for f in attempt.failures]
        return {
            "round": round_idx,
            "attempts": len(attempts),
            "sampled": len(results.sampled),
            "completed": len(results.results),
            "dropped": len(results.failures),
            "dropped_clients": [f.client_id for f in results.failures],
            "failures": [
                {
                    "client": f.client_id,
                    "reason": f.reason,
                    "message": f.message,
                    "seconds": round(f.seconds, 3),
                }
                for f in failures[:MAX_LOGGED_FAILURES]
            ],
            "failed_attempts": [
                {"completed": len(a.results), "sampled": len(a.sampled)} for a in attempts[:-1]
            ],
            "round_seconds": seconds,
            "client_seconds": float(sum(r.seconds for r in results.results)),
            "apply_seconds": float(applied["seconds"]),
            "client_updates_per_second": len(results.results) / seconds if seconds > 0 else 0.0,
            "bytes_sent": int(sum(r.bytes_sent for r in results.results)),
            "bytes_received": int(sum(r.bytes_received for r in results.results)),
            "aggregate_bytes": int(aggregate_bytes),
            "train_loss": train_loss,
            "local_steps": int(sum(r.steps for r in results.results)),
            "val": applied["metrics"].get("val"),
            "test": applied["metrics"].get("test"),
            "epsilon": epsilon,
            "aggregate_error_bound": applied["error_bound"],
        }

    def _log_round(self, record: dict[str, Any]) -> None:
        writer, step = self.writer, record["round"] + 1
        if writer is None:
            return
        scalars = {
            "fl/sampled": record["sampled"],
            "fl/completed": record["completed"],
            "fl/dropped": record["dropped"],
            "fl/attempts": record["attempts"],
            "fl/round_seconds": record["round_seconds"],
            "fl/bytes_sent": record["bytes_sent"],
            "fl/bytes_received": record["bytes_received"],
            "fl/client_updates_per_second": record["client_updates_per_second"],
        }
        if record["train_loss"] is not None:
            scalars["train/loss"] = record["train_loss"]
        if record["epsilon"] is not None:
            scalars["privacy/epsilon"] = record["epsilon"]
        for split in ("val", "test"):
            for name, value in (record.get(split) or {}).items():
                scalars[f"{split}/{name}"] = value
        for name, value in scalars.items():
            if isinstance(value, int | float) and math.isfinite(value):
                writer.add_scalar(name, value, step)
        writer.flush()

    def _epsilon(self, attempts: list[RoundResults]) -> float | None:
        """Example-level epsilon of the most exposed client so far (every spend the ledger holds)."""
        if self.ledger is None:
            return None
        clients = sorted({c for attempt in attempts for c in attempt.sampled})
        for client in clients:
            self.max_epsilon = max(self.max_epsilon, self.ledger.client_epsilon(client))
        return self.max_epsilon

    def _privacy_summary(self) -> dict[str, Any] | None:
        if not self.fl.secure:
            return None
        privacy = self.client_privacy
        return {
            "level": "example (DP-SGD on each client)",
            "epsilon_max_over_clients": getattr(self, "max_epsilon", None),
            "delta": privacy.delta,
            "noise_multiplier": privacy.noise_multiplier,
            "max_grad_norm": privacy.max_grad_norm,
            "accountant": privacy.accountant,
            "ledger": os.path.join(self.logdir, "privacy_ledger.sqlite"),
            "aggregator_context": "public (no secret key)",
            "encryption": {
                "scheme": self.fl.encryption.scheme,
                "clip": self.fl.encryption.clip,
                "precision_bits": self.fl.encryption.precision_bits,
            },
        }

    def _ledger_position(self) -> dict[str, int] | None:
        if self.ledger is None:
            return None
        return {"client_spends": len(self.ledger.client_spends())}

    def _final_summary(self) -> dict[str, Any]:
        state = self.state
        assert state is not None
        last = state.history[-1] if state.history else {}
        final = {
            "rounds_completed": state.round_idx,
            "test": last.get("test"),
            "val": last.get("val"),
            "epsilon": last.get("epsilon"),
            "final_model": self.paths.global_model(state.round_idx),
            "final_model_digest": state.global_digest,
        }
        self._write_summary(final=final)
        return final

    def _write_summary(self, final: dict[str, Any] | None, error: str | None = None) -> str:
        state = self.state
        assert state is not None and self.spec is not None
        results: dict[str, Any] = {"rounds": state.history, "final": final}
        if error is not None:
            results["error"] = error
        return write_summary(
            self.logdir,
            self.config,
            results,
            federated={
                "mode": "secure" if self.fl.secure else "plain",
                "executor": self.pool.mode if self.pool else None,
                "world_size": self.spec.world_size,
                "pool_workers": self.pool.num_workers if self.pool else None,
                "num_clients": self.partition.num_clients,
                "model_parameters_shared": self.layout.size,
                "partition": self.partition_stats,
                "rank_peak_rss_mb": {str(k): v for k, v in sorted(self.rank_memory.items())},
                "privacy": self._privacy_summary(),
            },
        )


def _public_initialisation(model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Secure mode: a global rating bias initialised from the data's mean is not private; use the midpoint."""
    bias = getattr(model, "global_bias", None)
    if isinstance(bias, torch.Tensor) and "rating_min" in meta and "rating_max" in meta:
        with torch.no_grad():
            bias.fill_((float(meta["rating_min"]) + float(meta["rating_max"])) / 2.0)


def _keygen_call(spec: RunSpec, max_clients: int, max_weight: int) -> bytes:
    return keygen_task(spec, max_clients=max_clients, max_weight=max_weight)


def _progress(*, total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar over rounds on stderr, or a no-op."""
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc="rounds", unit="round", dynamic_ncols=True)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
