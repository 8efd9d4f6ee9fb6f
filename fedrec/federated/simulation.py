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
ranks, hosts, GPUs and pools), ``clients`` (each rank's context and the client/apply tasks), and this
one (the aggregator: validation, rounds, checkpoints, outputs).

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
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedrec import registry
from fedrec.config import ExperimentConfig, config_to_dict
from fedrec.data.partition import Partition, make_partition, partition_statistics
from fedrec.errors import ConfigError, FedrecError
from fedrec.experiment import build_model, config_fingerprint, open_writer, prepare_data, write_summary
from fedrec.federated.checkpoint import (
    AggregatorState,
    capture_rng,
    check_checkpoint_presence,
    check_resume,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fedrec.federated.clients import (  # _local_dp_trainer_class, client_seed: also used by fedrec.deploy
    TaskResult,
    _local_dp_trainer_class,
    apply_task,
    client_privacy_config,
    client_seed,
    client_task,
    keygen_task,
)
from fedrec.federated.codec import PlainCodec, SecureCodec
from fedrec.federated.private_store import PrivateRowStore, attempt_tag
from fedrec.federated.ranks import (
    InProcessPool,
    MPIPool,
    check_gpu_map,
    import_modules,
    launcher_ranks,
    mpi_world_size,
)
from fedrec.federated.run import (  # params_digest: also used by fedrec.deploy
    RunPaths,
    RunSpec,
    one_line,
    params_digest,
    read_global_model,
    write_global_model,
)
from fedrec.federated.server_opt import check_server_optimizer
from fedrec.federated.user_dp import (
    RoundNoise,
    UserDPPlan,
    check_plan_within_budget,
    check_release,
    max_poisson_sample,
    poisson_sample,
    required_encryption_clip,
    resolve_plan,
)
from fedrec.federated.worker import (
    ClientDirectory,
    ClientFailure,
    ClientResult,
    FederatedWorker,
    ParamLayout,
    RoundResults,
    algorithm_params,
    round_outcome,
)
from fedrec.progress import progress_bar
from fedrec.trainers.base_trainer import optimizer_supports_sparse

APPLY_TIMEOUT_FLOOR = 600.0  # seconds the apply (decrypt + evaluate) task may take beyond fl.client_timeout


class SimulationError(FedrecError):
    """The simulation cannot go on (every worker stuck, the pool broken, a round that never completes)."""


class UserBudgetExhausted(Exception):
    """fl.user_dp: one more round would take the user-level epsilon past its budget; the run stops."""


# --------------------------------------------------------------------------------------------------
# Aggregator side
# --------------------------------------------------------------------------------------------------


class AggregatorTransport:
    """Runs the sampled clients' tasks on the pool and streams their updates into the running sum."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.stuck: set[cf.Future] = set()
        self.noise: RoundNoise | None = None  # fl.user_dp: the latest attempt's round parameters
        self.clipped: list[bool] = []  # fl.user_dp: per returned client of that attempt

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
        noise = sim.open_user_dp_round(round_idx, attempt, neighbour_ids) if sim.user_dp else None
        self.noise, self.clipped = noise, []
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
                future = sim.pool.submit(client_task, sim.spec, round_idx, attempt, client, sim.digest, noise)
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
            raise SimulationError(f"the worker pool broke: {one_line(err)}") from None
        except Exception as err:  # a client's failure is data, not an exception unwinding the round
            failures.append(ClientFailure(client, "error", one_line(err), elapsed))
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
            failures.append(ClientFailure(client, "rejected", one_line(err), elapsed))
            return
        sim.note_rank_memory(result.rank, result.peak_rss_mb)
        if result.clipped is not None:
            self.clipped.append(result.clipped)
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
        self, aggregate: Any, round_idx: int, attempt: int, splits: list[str], noise: RoundNoise | None = None
    ) -> dict[str, Any]:
        """Hand the aggregate to a key-holding client (the apply task); returns its digest and metrics."""
        sim = self.sim
        opt_digest = sim.state.server_state.get("server_opt_digest")  # type: ignore[union-attr]
        future = sim.pool.submit(
            apply_task, sim.spec, round_idx, attempt, aggregate, sim.digest, splits, noise, opt_digest
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
            raise SimulationError(f"the worker pool broke: {one_line(err)}") from None


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
        self.user_dp: UserDPPlan | None = None
        self.user_dp_sample_key: bytes | None = None  # fl.user_dp.secure_mode: the secret sampling key
        self.run_key = 0
        self.stopped_at_budget = False

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
        if fl.user_dp is not None:
            self.user_dp = self._user_dp_plan(algorithm_cls, partition.num_clients)
            # Secure mode: the client sample comes from a secret key (fresh each start: a redone
            # attempt after a crash is then an independent sample, as the ledger accounts it).
            self.user_dp_sample_key = os.urandom(32) if self.user_dp.secure_mode else None
        if fl.secure:
            self.client_privacy = client_privacy_config(config, partition)
            _public_initialisation(model, data.meta)
        fingerprint = run_fingerprint(config)
        self.run_key = int(fingerprint[:16], 16)  # keys seeded user-level noise shares to this config

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
            self._check_resumed_user_dp(state)
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
        self.codec = SecureCodec(self.layout, public_context=public)

    def _open_ledger(self) -> None:
        """The run's privacy ledger (the aggregator owns it; clients attach and record their spends).

        With fl.user_dp it holds the user-level delta, accountant and budget, and its round records;
        in secure mode (checked by ``client_privacy_config``) the example level shares them.
        """
        from privacy.ledger import PrivacyLedger, ledger_path

        if self.user_dp is not None:
            delta, accountant = self.user_dp.delta, self.user_dp.accountant
        else:
            privacy = self.client_privacy
            delta = privacy.delta
            accountant = privacy.accountant if privacy.accountant in ("rdp", "prv") else "rdp"
        client_budget = self.config.privacy.epsilon_budget if self.fl.secure else None  # type: ignore[union-attr]
        self.ledger = PrivacyLedger.open(
            ledger_path(self.logdir),
            delta=delta,
            accountant=accountant,
            client_epsilon_budget=client_budget,
            user_epsilon_budget=self.user_dp.epsilon_budget if self.user_dp else None,
            config=config_to_dict(self.config),
        )
        self.max_epsilon = 0.0
        if self.resume:
            assert self.state is not None
            if self.state.ledger_position:
                self.ledger.check_position(self.state.ledger_position)
            epsilons = self.ledger.epsilons()
            self.max_epsilon = max(epsilons.values(), default=0.0)

    def _user_dp_plan(self, algorithm_cls: type[FederatedWorker], num_clients: int) -> UserDPPlan:
        """fl.user_dp resolved and checked against the algorithm, the budget and the encryption grid."""
        from privacy.dp.dp_fedavg import min_survivors_for

        fl = self.fl
        if algorithm_cls.sample_neighbours is not FederatedWorker.sample_neighbours:
            raise ConfigError(
                f"config key 'fl.user_dp': algorithm {fl.algorithm!r} chooses its own clients "
                "(sample_neighbours); user-level accounting needs the built-in Poisson sampling"
            )
        assert fl.user_dp is not None
        if self.resume and fl.user_dp.target_epsilon is not None and os.path.exists(self.paths.checkpoint):
            saved = load_checkpoint(self.paths.checkpoint).server_state.get("user_dp") or {}
            if saved.get("planned_rounds") != fl.rounds:
                raise ConfigError(
                    f"config key 'fl.rounds' = {fl.rounds}: this run's noise was computed from "
                    f"fl.user_dp.target_epsilon for {saved.get('planned_rounds')} rounds; it cannot be extended"
                )
        plan = resolve_plan(fl, num_clients)
        if not self.resume:
            check_plan_within_budget(plan)
        if fl.secure:
            # Size for a small Poisson sample (4 standard deviations below the mean), not the expected
            # one: fewer survivors mean larger shares, and a client whose noised update does not fit
            # refuses to send (a dropout that depends on its data).
            mean = plan.client_sampling_rate * num_clients
            low = max(1, math.floor(mean - 4.0 * math.sqrt(mean * (1.0 - plan.client_sampling_rate))))
            low_k = min_survivors_for(num_sampled=low, min_completion_rate=fl.min_completion_rate)
            needed = required_encryption_clip(plan, min_survivors=low_k)
            if fl.encryption.clip < needed:
                raise ConfigError(
                    f"config key 'fl.encryption.clip' = {fl.encryption.clip!r}: below {needed:.3g}, the clip norm "
                    f"{plan.clip_norm:g} plus 6 std of a noise share (noise_multiplier {plan.noise_multiplier:.3g}, "
                    f"{low_k} survivors of a small sample of {low}); noised updates would not fit the encryption grid"
                )
        return plan

    def _check_resumed_user_dp(self, state: AggregatorState) -> None:
        """A resumed run keeps the noise it started with (target_epsilon was resolved for its rounds)."""
        if self.user_dp is None:
            return
        saved = state.server_state.get("user_dp")
        if not saved or float(saved["noise_multiplier"]) != self.user_dp.noise_multiplier:
            raise ConfigError(
                f"{self.paths.checkpoint}: --resume with another fl.user_dp noise multiplier "
                f"({self.user_dp.noise_multiplier:.6g}, the checkpoint has {saved.get('noise_multiplier') if saved else None})"
            )

    def open_user_dp_round(self, round_idx: int, attempt: int, sampled: Any) -> RoundNoise:
        """fl.user_dp, before any client of this attempt trains: check the sample is the Poisson sample,
        fix the noise shares' ``k`` and record the round in the ledger (the budget may stop the run here)."""
        from privacy.ledger import BudgetExceededError

        plan, fl = self.user_dp, self.fl
        assert plan is not None and self.ledger is not None
        expected = poisson_sample(
            self.config.seed,
            round_idx,
            attempt,
            num_clients=plan.num_clients,
            rate=plan.client_sampling_rate,
            key=self.user_dp_sample_key,
        )
        if sorted(int(c) for c in sampled) != expected:
            raise SimulationError(
                f"round {round_idx}: the algorithm's client sample is not the Poisson sample fl.user_dp accounts for"
            )
        sigma, q = plan.noise_multiplier, plan.client_sampling_rate
        if not self.ledger.can_afford_round(noise_multiplier=sigma, client_sampling_rate=q):
            raise UserBudgetExhausted(round_idx)
        noise = plan.round_noise(
            round_idx,
            attempt,
            num_sampled=len(expected),
            min_completion_rate=fl.min_completion_rate,
            run_key=self.run_key,
        )
        try:
            self.ledger.record_round(
                round=round_idx,
                noise_multiplier=sigma,
                clip_norm=plan.clip_norm,
                client_sampling_rate=q,
                num_sampled=noise.num_sampled,
                min_survivors=noise.min_survivors,
                sampling="poisson",
            )
        except BudgetExceededError:
            raise UserBudgetExhausted(round_idx) from None
        return noise

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
        self.prepare()
        self.writer = open_writer(self.logdir)
        try:
            asyncio.run(self._rounds())
        except FedrecError as err:
            self._write_summary(final=None, error=one_line(err))
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
        aggregator.user_dp_sample_key = self.user_dp_sample_key
        bar = progress_bar(
            total=fl.rounds,
            initial=state.round_idx,
            desc="rounds",
            unit="round",
            enabled=self.config.train.progress,
            leave=True,
        )
        try:
            while aggregator.round_idx < fl.rounds:
                try:
                    record = await self._one_round(aggregator)
                except UserBudgetExhausted as stop:
                    self.stopped_at_budget = True
                    self.log(
                        f"round {stop.args[0]}: one more round would exceed fl.user_dp.epsilon_budget = "
                        f"{self.fl.user_dp.epsilon_budget:g}; stopping after {state.round_idx} rounds"  # type: ignore[union-attr]
                    )
                    break
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
        noise = self.transport.noise if self.user_dp else None
        if noise is not None:
            from privacy.errors import PrivacyError

            try:
                check_release(noise, survivors=len(results))
            except PrivacyError as err:  # an algorithm accepted what fl.user_dp must not release
                raise SimulationError(f"round {round_idx}: not released: {err}") from None
        aggregate_payload, aggregate_bytes = self.codec.close(results.aggregate)
        last_round = round_idx + 1 == fl.rounds or not self._can_afford_another_round()
        splits = ["val"] if (round_idx + 1) % fl.eval_every == 0 or last_round else []
        if last_round:
            splits.append("test")
        applied = await self.transport.publish(aggregate_payload, round_idx, results.attempt, splits, noise)
        self.note_rank_memory(applied["rank"], applied["peak_rss_mb"])
        epsilon = self._epsilon(attempts)
        record = self._round_record(
            round_idx, attempts, applied, aggregate_bytes, time.perf_counter() - started, epsilon
        )
        if noise is not None:
            record.update(self._user_dp_record(noise, survivors=len(results)))
        self.download_bytes = aggregate_bytes if self.codec.secure else self.layout.nbytes
        state.round_idx = round_idx + 1
        state.global_digest = applied["digest"]
        state.server_state["server_opt_digest"] = applied.get("server_opt_digest")  # fl.server_optimizer
        state.history.append(record)
        state.rng = capture_rng()
        state.ledger_position = self._ledger_position()
        save_checkpoint(self.paths.checkpoint, state)  # the round is committed here
        self._log_round(record)
        self._write_summary(final=None)
        return record

    def _can_afford_another_round(self) -> bool:
        """fl.user_dp with a budget: whether the ledger affords one more round after this one."""
        if self.user_dp is None or self.user_dp.epsilon_budget is None:
            return True
        return bool(
            self.ledger.can_afford_round(
                noise_multiplier=self.user_dp.noise_multiplier,
                client_sampling_rate=self.user_dp.client_sampling_rate,
            )
        )

    def _user_dp_record(self, noise: RoundNoise, *, survivors: int) -> dict[str, Any]:
        """The round record's user-level part: epsilon over every recorded round attempt, and its noise."""
        clipped = self.transport.clipped
        return {
            "user_epsilon": self.ledger.user_level_epsilon(),
            "user_dp": {
                "noise_multiplier": noise.noise_multiplier,
                "min_survivors": noise.min_survivors,
                "survivors": survivors,
                "noise_std_on_mean": check_release(noise, survivors=survivors) / noise.expected_clients,
                "clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
                "rounds_recorded": len(self.ledger.rounds()),
            },
        }

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
        return {
            **round_outcome(round_idx, attempts),
            "failed_attempts": [
                {"completed": len(a.results), "sampled": len(a.sampled)} for a in attempts[:-1]
            ],
            "round_seconds": seconds,
            "apply_seconds": float(applied["seconds"]),
            "client_updates_per_second": len(results.results) / seconds if seconds > 0 else 0.0,
            "aggregate_bytes": int(aggregate_bytes),
            "train_loss": train_loss,
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
        if record.get("user_epsilon") is not None:
            scalars["privacy/user_level_epsilon"] = record["user_epsilon"]
            scalars["privacy/user_dp_clipped_fraction"] = record["user_dp"]["clipped_fraction"]
        for split in ("val", "test"):
            for name, value in (record.get(split) or {}).items():
                scalars[f"{split}/{name}"] = value
        for name, value in scalars.items():
            if isinstance(value, int | float) and math.isfinite(value):
                writer.add_scalar(name, value, step)
        writer.flush()

    def _epsilon(self, attempts: list[RoundResults]) -> float | None:
        """Example-level epsilon of the most exposed client so far (every spend the ledger holds)."""
        if self.ledger is None or not self.fl.secure:
            return None
        clients = sorted({c for attempt in attempts for c in attempt.sampled})
        for client in clients:
            self.max_epsilon = max(self.max_epsilon, self.ledger.client_epsilon(client))
        return self.max_epsilon

    def _privacy_summary(self) -> dict[str, Any] | None:
        if not self.fl.secure and self.user_dp is None:
            return None
        summary: dict[str, Any] = {"ledger": os.path.join(self.logdir, "privacy_ledger.sqlite")}
        if self.fl.secure:
            privacy = self.client_privacy
            summary.update(
                {
                    "level": "example (DP-SGD on each client)",
                    "epsilon_max_over_clients": getattr(self, "max_epsilon", None),
                    "delta": privacy.delta,
                    "noise_multiplier": privacy.noise_multiplier,
                    "max_grad_norm": privacy.max_grad_norm,
                    "accountant": privacy.accountant,
                    "aggregator_context": "public (no secret key)",
                    "encryption": {
                        "scheme": self.fl.encryption.scheme,
                        "clip": self.fl.encryption.clip,
                        "precision_bits": self.fl.encryption.precision_bits,
                    },
                }
            )
        if self.user_dp is not None:
            summary["user_level"] = {
                "level": "user (DP-FedAvg: a client's whole contribution to every round)",
                "epsilon": self.ledger.user_level_epsilon() if self.ledger is not None else None,
                "rounds_recorded": len(self.ledger.rounds()) if self.ledger is not None else 0,
                "stopped_at_budget": self.stopped_at_budget,
                **self.user_dp.summary(),
            }
        return summary

    def _ledger_position(self) -> dict[str, int] | None:
        if self.ledger is None:
            return None
        return self.ledger.position()

    def _final_summary(self) -> dict[str, Any]:
        state = self.state
        assert state is not None
        last = state.history[-1] if state.history else {}
        final = {
            "rounds_completed": state.round_idx,
            "test": last.get("test"),
            "val": last.get("val"),
            "epsilon": last.get("epsilon"),
            "user_epsilon": self.ledger.user_level_epsilon() if self.user_dp and self.ledger else None,
            "stopped_at_budget": self.stopped_at_budget,
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


def _public_initialisation(model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Secure mode: a global rating bias initialised from the data's mean is not private; use the midpoint."""
    bias = getattr(model, "global_bias", None)
    if isinstance(bias, torch.Tensor) and "rating_min" in meta and "rating_max" in meta:
        with torch.no_grad():
            bias.fill_((float(meta["rating_min"]) + float(meta["rating_max"])) / 2.0)


def _keygen_call(spec: RunSpec, max_clients: int, max_weight: int) -> bytes:
    return keygen_task(spec, max_clients=max_clients, max_weight=max_weight)


# Names other packages (fedrec.deploy) import from here; they live in .clients and .run.
__all__ = [
    "Simulation",
    "SimulationError",
    "_local_dp_trainer_class",
    "_public_initialisation",
    "client_privacy_config",
    "client_seed",
    "params_digest",
]
