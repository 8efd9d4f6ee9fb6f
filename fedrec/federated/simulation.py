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

Modules: ``run`` (layout under LOGDIR, the spec sent to ranks, global model files), ``ranks`` (MPI
ranks, hosts, GPUs and pools), ``clients`` (each rank's context and the client/apply tasks),
``engine`` (the round loop every backend shares: sampling, retries, deadlines, records, checkpoints,
summary) and this one (setup and validation, and :class:`PoolBackend`, the engine's backend here).

Faults: a task that raises, or returns nothing within ``fl.client_timeout`` seconds, is dropped from
the round and reported to the algorithm's ``aggregate`` as a failure. At most as many tasks run as
there are workers, so a task's deadline measures its own run time. A worker still stuck in a
timed-out task is not given new work; if every worker is stuck, or the apply task does not return,
the job stops with an error (``MPI_Abort`` under mpirun) instead of hanging. A rank that dies takes
the whole MPI job down (mpiexec's default); ``--resume`` continues from the last completed round.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from fedrec import registry
from fedrec.config import ExperimentConfig
from fedrec.data.partition import Partition, make_partition, partition_statistics
from fedrec.errors import ConfigError, FedrecError
from fedrec.experiment import build_model, config_fingerprint, prepare_data
from fedrec.federated import server_checks
from fedrec.federated.checkpoint import (
    AggregatorState,
    check_checkpoint_presence,
    initial_state,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from fedrec.federated.client_round import public_initialisation
from fedrec.federated.clients import (
    TaskResult,
    apply_task,
    client_privacy_config,
    client_task,
    evaluate_model_task,
    keep_best_task,
    key_check_task,
    keygen_task,
)
from fedrec.federated.codec import PlainCodec, SecureCodec
from fedrec.federated.engine import (
    ClientFailed,
    ClosedRound,
    Published,
    RoundEngine,
    chained,
    open_ledger,
)
from fedrec.federated.prepare_checks import check_model_fits_run, check_population
from fedrec.federated.private_store import PrivateRowStore
from fedrec.federated.ranks import (
    InProcessPool,
    MPIPool,
    check_gpu_map,
    import_modules,
    launcher_ranks,
    mpi_world_size,
)
from fedrec.federated.run import RunPaths, RunSpec, one_line, read_global_model, write_global_model
from fedrec.federated.server_opt import check_server_optimizer
from fedrec.federated.user_dp import (
    RoundNoise,
    UserDPPlan,
    UserDPRounds,
    check_resumed_plan,
    max_poisson_sample,
    plan_for_run,
)
from fedrec.federated.worker import ClientResult, FederatedWorker, ParamLayout, algorithm_params
from fedrec.trainers.base_trainer import optimizer_supports_sparse
from privacy.encryption.context import read_context_file

APPLY_TIMEOUT_FLOOR = 600.0  # seconds the apply (decrypt + evaluate) task may take beyond fl.client_timeout


class SimulationError(FedrecError):
    """The simulation cannot go on (every worker stuck, the pool broken, a round that never completes)."""


class PoolBackend:
    """The engine's backend for the simulation: client and apply tasks on the worker pool."""

    error = SimulationError
    summary_key = "federated"
    log_rounds = False

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.slots = sim.pool.num_workers
        self.publish_timeout = sim.fl.client_timeout + APPLY_TIMEOUT_FLOOR

    def submit(self, client: int, round_idx: int, attempt: int, noise: RoundNoise | None) -> cf.Future:
        sim = self.sim
        return sim.pool.submit(client_task, sim.spec, round_idx, attempt, client, sim.digest, noise)

    def accept(
        self, client: int, output: TaskResult, running: Any, *, round_idx: int, attempt: int, elapsed: float
    ) -> ClientResult:
        sim, timeout = self.sim, self.sim.fl.client_timeout
        if output.seconds > timeout:
            raise ClientFailed("timeout", f"took {output.seconds:.1f}s > fl.client_timeout={timeout}s")
        if not sim.codec.secure:
            # where the server can see: the norm bound, and weight 1 under fl.user_dp ('rejected' failures)
            server_checks.check_plain_update(
                output.payload, fl=sim.fl, user_dp_rounds=sim.user_dp_rounds, size=sim.layout.size
            )
        try:
            sim.codec.add(running, output.payload)
        except Exception as err:
            raise ClientFailed("rejected", one_line(err)) from None
        sim.note_rank_memory(output.rank, output.peak_rss_mb)
        return ClientResult(
            client_id=client,
            num_examples=output.num_examples,
            weight=output.weight,
            train_loss=output.train_loss,
            steps=output.steps,
            seconds=output.seconds,
            bytes_sent=output.bytes_sent,
            bytes_received=sim.download_bytes,
            rank=output.rank,
            clipped=output.clipped,
            count_share=output.count_share,
        )

    def noise_sources(self) -> dict[str, str]:
        """The simulation's parties and where their privacy noise comes from (none without DP)."""
        return server_checks.noise_sources(self.sim.fl, self.sim.config.privacy)

    def publish(self, closed: ClosedRound) -> cf.Future:
        """A key-holding client (the apply task) decodes, applies, writes and evaluates the next model."""
        sim = self.sim
        server_state = sim.state.server_state  # type: ignore[union-attr]
        future = sim.pool.submit(
            apply_task, sim.spec, closed.round_idx, closed.attempt, closed.payload, sim.digest,
            list(closed.splits), closed.noise, server_state.get("server_opt_digest"),
        )  # fmt: skip

        def published(applied: dict[str, Any]) -> Published:
            sim.note_rank_memory(applied["rank"], applied["peak_rss_mb"])
            # fl.server_optimizer: the digest of the optimiser state the key holder wrote (checkpointed
            # with the round; the state itself stays in client storage)
            server_state["server_opt_digest"] = applied.get("server_opt_digest")
            sim.download_bytes = closed.nbytes if sim.codec.secure else sim.layout.nbytes
            return Published(
                digest=applied["digest"],
                seconds=applied["seconds"],
                error_bound=applied["error_bound"],
                metrics=applied["metrics"],
            )

        return chained(future, published)

    def keep_best(self, model_round: int, digest: str) -> cf.Future:
        """train.early_stopping: a key-holding client keeps a copy of the best round's global model."""
        return self.sim.pool.submit(keep_best_task, self.sim.spec, model_round, digest)

    def evaluate_model(self, model_round: int, digest: str, splits: list[str], *, best: bool) -> cf.Future:
        """train.early_stopping: a key-holding client's metrics of a round's (or the kept best) model."""
        return self.sim.pool.submit(
            functools.partial(evaluate_model_task, best=best), self.sim.spec, model_round, digest, splits
        )

    def best_model_path(self) -> str:
        return self.sim.paths.best_model

    def summary_fields(self) -> dict[str, Any]:
        sim = self.sim
        return {
            "mode": "secure" if sim.fl.secure else "plain",
            "executor": sim.pool.mode if sim.pool else None,
            "world_size": sim.spec.world_size if sim.spec else None,
            "pool_workers": sim.pool.num_workers if sim.pool else None,
            "num_clients": sim.partition.num_clients,
            "model_parameters_shared": sim.layout.size,
            "partition": sim.partition_stats,
            "rank_peak_rss_mb": {str(k): v for k, v in sorted(sim.rank_memory.items())},
            "setup_seconds": dict(sim.setup_seconds),
        }

    def privacy_fields(self) -> dict[str, Any]:
        enc = self.sim.fl.encryption
        return {
            "aggregator_context": "public (no secret key)",
            "encryption": {"scheme": enc.scheme, "clip": enc.clip, "precision_bits": enc.precision_bits},
        }

    def final_fields(self) -> dict[str, Any]:
        return {"final_model": self.sim.paths.global_model(self.sim.state.round_idx)}  # type: ignore[union-attr]


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
        self.ledger: Any = None
        self.client_privacy: Any = None
        self.user_dp: UserDPPlan | None = None
        self.user_dp_rounds: UserDPRounds | None = None
        self.user_dp_sample_key: bytes | None = None  # fl.user_dp.secure_mode: the secret sampling key
        self.run_key = 0
        self.engine: RoundEngine | None = None
        self.final: dict[str, Any] = {}
        self.setup_seconds: dict[str, float] = {}  # prepare(): "data" (load or generate) and "total"

    # ------------------------------------------------------------------ setup (every check before round 0)
    def prepare(self) -> None:
        config, fl, paths = self.config, self.fl, self.paths
        import_modules(fl.import_modules)
        try:
            algorithm_cls = registry.lookup("fl_algo", fl.algorithm)
        except FedrecError as err:
            raise ConfigError(f"config key 'fl.algorithm': {err}") from None
        algorithm_params(algorithm_cls, fl.algorithm_params)
        check_server_optimizer(
            fl,
            custom_rule=algorithm_cls.apply_aggregate is not FederatedWorker.apply_aggregate,
            deployment=False,
        )
        check_checkpoint_presence(paths.checkpoint, resume=self.resume, logdir=self.logdir, what="federated")
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

        started = time.perf_counter()
        data = prepare_data(config, progress=config.train.progress)
        self.setup_seconds["data"] = time.perf_counter() - started
        model_cls = registry.lookup("model", config.model.name)
        private = tuple(getattr(model_cls, "PRIVATE_PARAMETERS", ()))
        check_model_fits_run(config, model_cls, private, data)
        train = data.split("train")
        os.makedirs(paths.fl, exist_ok=True)
        if self.resume:
            partition = Partition.load(paths.partition)
        else:
            partition = make_partition(
                fl.partition, train.arrays, fl.num_workers, seed=config.seed, alpha=fl.dirichlet_alpha
            )
        check_population(fl, partition, len(train), int(data.meta.get("num_users", 0)), paths.partition)
        self.partition = partition
        self.algorithm_cls = algorithm_cls
        self.partition_stats = partition_statistics(partition, train.arrays["label"])
        sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
        model = build_model(config, data.meta, sparse=sparse)
        self.layout = ParamLayout.from_model(model)
        if fl.user_dp is not None:
            saved = None
            if self.resume and os.path.exists(paths.checkpoint):
                saved = load_checkpoint(paths.checkpoint).server_state.get("user_dp") or {}
            self.user_dp = plan_for_run(
                fl, algorithm_cls, partition.num_clients, resume=self.resume, saved=saved
            )
            # Secure mode: the client sample comes from a secret key (fresh each start: a redone
            # attempt after a crash is then an independent sample, as the ledger accounts it).
            self.user_dp_sample_key = os.urandom(32) if self.user_dp.secure_mode else None
        if fl.secure:
            server_checks.check_weights_encodable(
                fl, algorithm_cls, partition.sizes(), user_dp=self.user_dp is not None
            )
            self.client_privacy = client_privacy_config(config, partition)
            public_initialisation(model, data.meta)
        fingerprint = run_fingerprint(config)
        self.run_key = int(fingerprint[:16], 16)  # keys seeded user-level noise shares to this config

        if self.resume:
            state = resume_checkpoint(
                paths.checkpoint, config_fingerprint=fingerprint, layout_digest=self.layout.digest()
            )
            read_global_model(paths.global_model(state.round_idx), state.round_idx, state.global_digest)
            if self.user_dp is not None:
                check_resumed_plan(self.user_dp, state.server_state.get("user_dp"), paths.checkpoint)
        else:
            partition.save(paths.partition)
            digest = write_global_model(paths.global_model(0), self.layout.flatten(model))
            if private and fl.reconstruction is None:
                PrivateRowStore.create(
                    paths.private_rows, {name: model.state_dict()[name] for name in private}
                )
            state = initial_state(
                global_digest=digest, config_fingerprint=fingerprint, layout_digest=self.layout.digest()
            )
            if self.user_dp is not None:
                state.server_state["user_dp"] = {
                    "noise_multiplier": self.user_dp.noise_multiplier,
                    "planned_rounds": self.user_dp.planned_rounds,
                }
        del model
        self.state = state
        self.spec = RunSpec(
            run_id=f"{fingerprint}-{uuid.uuid4().hex[:8]}",
            config=config,
            logdir=self.logdir,
            device=self.device,
            world_size=world,
        )
        if fl.secure or self.user_dp is not None:
            self._open_ledger()
        self.pool = MPIPool(self.spec) if world > 1 else InProcessPool(self.spec)
        if fl.secure:
            self._prepare_secure(partition)
        else:
            self.codec = PlainCodec(self.layout, bits=fl.fixed_point_bits, row_normalize=fl.row_normalize)
        self.download_bytes = self.layout.nbytes
        if not self.resume:
            save_checkpoint(paths.checkpoint, state)

    def _prepare_secure(self, partition: Partition) -> None:
        fl, paths = self.fl, self.paths
        if self.resume:
            read_context_file(paths.public_context, role="public")  # one-line error: missing, wrong role
            with open(paths.public_context, "rb") as fh:
                public = fh.read()
            digest = hashlib.sha256(public).hexdigest()
            if digest != self.state.public_context_digest:  # type: ignore[union-attr]
                raise FedrecError(f"{paths.public_context}: public context does not match the checkpoint")
        else:
            max_clients = fl.client_num_per_round
            max_weight = fl.encryption.max_weight or int(partition.sizes().max())
            if self.user_dp is not None:
                # Poisson samples vary in size; every client weighs 1.
                max_clients = max_poisson_sample(self.user_dp.client_sampling_rate, partition.num_clients)
                max_weight = fl.encryption.max_weight or 1
            future = self.pool.submit(_keygen_call, self.spec, max_clients, max_weight)
            public = future.result(timeout=APPLY_TIMEOUT_FLOOR)
            os.makedirs(paths.aggregator, exist_ok=True)
            with open(paths.public_context, "wb") as fh:
                fh.write(public)
            self.state.public_context_digest = hashlib.sha256(public).hexdigest()  # type: ignore[union-attr]
        # The clients' secret and the run's public context must be one key pair: checked once here,
        # before round 0 (a swapped secret.ctx or a deleted public.ctx is one line, not 20 spends).
        self.pool.submit(_key_check_call, self.spec).result(timeout=APPLY_TIMEOUT_FLOOR)
        self.codec = SecureCodec(self.layout, public_context=public)

    def _open_ledger(self) -> None:
        """The run's privacy ledger (the aggregator owns it; clients attach and record their spends).

        With fl.user_dp it holds the user-level delta, accountant and budget, and its round records;
        in secure mode (checked by ``client_privacy_config``) the example level shares them.
        """
        plan, privacy = self.user_dp, self.client_privacy
        self.ledger = open_ledger(
            self.logdir,
            self.config,
            delta=plan.delta if plan is not None else privacy.delta,
            accountant=plan.accountant if plan is not None else privacy.accountant,
            client_budget=self.config.privacy.epsilon_budget if self.fl.secure else None,  # type: ignore[union-attr]
            user_budget=plan.epsilon_budget if plan is not None else None,
            position=self.state.ledger_position if self.resume and self.state is not None else None,
        )
        if plan is not None:
            self.user_dp_rounds = UserDPRounds(
                plan,
                self.ledger,
                seed=self.config.seed,
                min_completion_rate=self.fl.min_completion_rate,
                sample_key=self.user_dp_sample_key,
                run_key=self.run_key,
                server_state=self.state.server_state.setdefault("user_dp", {}),  # type: ignore[union-attr]
            )

    @property
    def digest(self) -> str:
        """Digest of the global model the current round starts from."""
        assert self.state is not None
        return self.state.global_digest

    def note_rank_memory(self, rank: int, peak_mb: float) -> None:
        self.rank_memory[rank] = max(self.rank_memory.get(rank, 0.0), float(peak_mb))

    # ------------------------------------------------------------------ rounds
    def run(self) -> dict[str, Any]:
        """Prepare (every input check), run the remaining rounds, write outputs; returns the final summary."""
        started = time.perf_counter()
        self.prepare()
        self.setup_seconds["total"] = time.perf_counter() - started
        assert self.state is not None
        self.engine = RoundEngine(
            self.config,
            self.logdir,
            backend=PoolBackend(self),
            codec=self.codec,
            state=self.state,
            checkpoint=self.paths.checkpoint,
            algorithm=(self.algorithm_cls, algorithm_params(self.algorithm_cls, self.fl.algorithm_params)),
            ledger=self.ledger,
            client_privacy=self.client_privacy if self.fl.secure else None,
            user_dp=self.user_dp_rounds,
            storage=self.paths.aggregator,
            sizes=self.partition.sizes(),
            log=self.log,
        )
        try:
            self.final = self.engine.run()
        finally:
            # A worker still inside a timed-out task will not finish: do not wait for it.
            self.stuck_workers = bool(self.engine.stuck)
            if self.pool is not None:
                self.pool.shutdown(stuck=self.stuck_workers)
            if self.ledger is not None:  # checkpoints the WAL: the file alone is the whole ledger
                self.ledger.close()
        return self.final


def run_fingerprint(config: ExperimentConfig) -> str:
    """The config's fingerprint, leaving out what a resume may change without changing any round's
    result: ``fl.rounds`` (to extend a run), ``fl.eval_every``, ``train.progress``."""
    assert config.fl is not None
    normalised = dataclasses.replace(
        config,
        fl=dataclasses.replace(config.fl, rounds=1, eval_every=1),
        train=dataclasses.replace(config.train, progress=True),
    )
    return config_fingerprint(normalised)


def _key_check_call(spec: RunSpec) -> bool:
    return key_check_task(spec)


def _keygen_call(spec: RunSpec, max_clients: int, max_weight: int) -> bytes:
    return keygen_task(spec, max_clients=max_clients, max_weight=max_weight)
