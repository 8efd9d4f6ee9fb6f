"""One federated round loop over any transport: the MPI simulation and the PySyft datasites are backends.

The shape is Flower's ``Server.fit_round`` over ``ClientProxy``: the :class:`RoundEngine` owns what
every federated run does the same way, and a :class:`Backend` only carries client tasks and the
aggregate to where they run.

The engine (aggregator side):

- is the algorithm's transport (``comm``): the registered algorithm's aggregator samples the clients
  (deterministic per seed, round and attempt) and calls :meth:`RoundEngine.request_models`;
- runs the sampled clients' tasks through the backend, at most ``backend.slots`` at a time, each with
  its own deadline (``fl.client_timeout``); a task that raises, answers late, or whose output the
  backend refuses is a failure handed to the algorithm's ``aggregate`` as data, never an exception
  unwinding the round. A task still running past its deadline keeps its slot ("stuck"); when every
  slot is stuck the engine waits one more timeout, then stops the run with the backend's error;
- retries a round the algorithm declines (too few survivors) up to ``fl.max_round_retries``;
- closes the running sum through the codec, publishes it (the backend hands it to a key holder that
  applies it and returns the next global model's digest), writes the round record, commits the round
  in the checkpoint, logs TensorBoard scalars and rewrites ``summary.json``;
- with ``train.early_stopping`` validates every ``fl.eval_every`` rounds, stops after ``patience``
  validations without improvement and ends with the best round's model (``fedrec.federated.early_stop``;
  a backend offers it through ``keep_best`` and ``evaluate_model``);
- opens the run's privacy ledger and reports each round's example-level epsilon of the most exposed
  client; with ``fl.user_dp`` the round's user-level logic (:class:`~fedrec.federated.user_dp.UserDPRounds`)
  opens, checks and records every attempt, whatever the backend.

Backends: ``fedrec.federated.simulation`` (client tasks on an ``mpi4py.futures`` pool or in-process)
and ``fedrec.deploy.coordinator`` (calls to approved code on PySyft datasites).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedrec.config import ExperimentConfig, config_to_dict
from fedrec.errors import ConfigError, FedrecError
from fedrec.experiment import open_writer, write_summary
from fedrec.federated.checkpoint import AggregatorState, capture_rng, save_checkpoint
from fedrec.federated.client_round import attempt_tag
from fedrec.federated.early_stop import Tracking, track
from fedrec.federated.run import one_line
from fedrec.federated.user_dp import RoundNoise, UserBudgetExhausted, UserDPRounds, check_release
from fedrec.federated.worker import (
    ClientFailure,
    ClientResult,
    FederatedWorker,
    RoundResults,
    round_outcome,
)
from fedrec.noise_source import warn_seeded
from fedrec.progress import RoundProgress
from privacy.report.tensorboard import log_ledger_epsilon

FAILURE_REASONS = ("error", "timeout", "rejected", "refused")
BUDGET_SUBSTITUTE_SALT = 0xB5  # keys fl.on_budget_exhausted=continue's replacement draws


class ClientFailed(Exception):
    """A backend refuses one client's output: ``reason`` is 'timeout', 'rejected' or 'refused'."""

    def __init__(self, reason: str, message: str):
        if reason not in FAILURE_REASONS:
            raise ValueError(f"failure reason {reason!r}: expected one of {FAILURE_REASONS}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class ClientOutOfBudget(FedrecError):
    """A sampled client's ledger refused its spend (privacy.epsilon_budget): it trained, sent nothing."""


class BudgetStop(Exception):
    """The run ends cleanly here: sampled clients cannot pay for another round (fl.on_budget_exhausted)."""


@dataclass(frozen=True)
class ClosedRound:
    """A round attempt's closed aggregate, as the backend publishes it."""

    round_idx: int
    attempt: int
    payload: Any  # the codec's aggregate (plain fixed point, or encrypted bytes)
    nbytes: int
    num_clients: int  # contributors in the sum
    survivors: tuple[int, ...]
    splits: tuple[str, ...]  # evaluation splits the key holder reports on ("val", "test")
    noise: RoundNoise | None  # fl.user_dp: the attempt's noise parameters


@dataclass
class Published:
    """What the key holder returned: the next global model's digest and what the record shows."""

    digest: str
    seconds: float
    error_bound: float | None
    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # backend-specific round-record fields


class Backend(Protocol):
    """How client tasks and the aggregate reach the parties that run them.

    Attributes:
        error: the exception class the run stops with (``SimulationError``, ``DeployError``).
        slots: tasks that may run at once (pool workers); None: every sampled client at once.
        publish_timeout: seconds the publish future may take (None: the backend bounds it itself).
        summary_key: the summary's section for :meth:`summary_fields` (``federated``, ``deployment``).
        log_rounds: print one line per round (besides the progress bar).

    A backend that supports ``train.early_stopping`` also has ``keep_best(model_round, digest)`` (a key
    holder keeps a copy of that global model), ``evaluate_model(model_round, digest, splits, *, best)``
    (a key holder's metrics of that model, or of the kept copy) and ``best_model_path()``; the engine
    refuses the setting before round 0 on a backend without them.
    """

    @property
    def error(self) -> type[FedrecError]: ...

    @property
    def slots(self) -> int | None: ...

    @property
    def publish_timeout(self) -> float | None: ...

    @property
    def summary_key(self) -> str: ...

    @property
    def log_rounds(self) -> bool: ...

    def submit(self, client: int, round_idx: int, attempt: int, noise: RoundNoise | None) -> cf.Future:
        """Start one client's task; the future resolves to the backend's raw output."""

    def accept(
        self, client: int, output: Any, running: Any, *, round_idx: int, attempt: int, elapsed: float
    ) -> ClientResult:
        """Check ``output`` and add it to ``running`` (through the codec); ClientFailed refuses it."""

    def publish(self, closed: ClosedRound) -> cf.Future:
        """Hand the aggregate to a key holder; the future resolves to a :class:`Published`."""

    def summary_fields(self) -> dict[str, Any]:
        """The backend's summary section (the engine adds ``privacy``)."""

    def privacy_fields(self) -> dict[str, Any]:
        """Backend-specific additions to the example-level privacy summary."""

    def final_fields(self) -> dict[str, Any]:
        """Backend-specific fields of the final summary (e.g. where the final model is)."""


def open_ledger(
    logdir: str,
    config: ExperimentConfig,
    *,
    delta: float,
    accountant: str,
    client_budget: float | None,
    user_budget: float | None = None,
    position: dict[str, int] | None = None,
) -> Any:
    """The run's privacy ledger (the aggregator owns it; clients attach or report their spends).

    On resume ``position`` is the checkpoint's ledger position: a ledger holding fewer rows (replaced
    or truncated) is an error, and so is a missing one (a fresh ledger would forget every spend before
    the checkpoint).
    """
    from privacy.errors import LedgerError
    from privacy.ledger import PrivacyLedger, ledger_path

    path = ledger_path(logdir)
    if position and not os.path.exists(path):
        raise LedgerError(
            f"--resume: the checkpoint was written with privacy ledger {position.get('ledger_id')} but {path} "
            "does not exist; a resume without the run's ledger would forget the spends already made (restore it)"
        )
    ledger = PrivacyLedger.open(
        path,
        delta=delta,
        accountant=accountant if accountant in ("rdp", "prv") else "rdp",
        client_epsilon_budget=client_budget,
        user_epsilon_budget=user_budget,
        config=config_to_dict(config),
    )
    if position:
        ledger.check_position(position)
    return ledger


def chained(future: cf.Future, then: Callable[[Any], Any]) -> cf.Future:
    """A future of ``then(result)`` once ``future`` resolves (its exception or cancellation passes through)."""
    out: cf.Future = cf.Future()

    def done(source: cf.Future) -> None:
        if source.cancelled():
            out.cancel()
            return
        error = source.exception()
        if error is not None:
            out.set_exception(error)
            return
        try:
            out.set_result(then(source.result()))
        except BaseException as err:  # handed to whoever waits on ``out``
            out.set_exception(err)

    future.add_done_callback(done)
    return out


def example_privacy_summary(privacy: Any, *, epsilon: float | None, ledger: str) -> dict[str, Any]:
    """The summary's example-level (DP-SGD on each client) privacy section."""
    return {
        "ledger": ledger,
        "level": "example (DP-SGD on each client)",
        "epsilon_max_over_clients": epsilon,
        "delta": privacy.delta,
        "noise_multiplier": privacy.noise_multiplier,
        "max_grad_norm": privacy.max_grad_norm,
        "accountant": privacy.accountant,
    }


class RoundEngine:
    """Runs a federated run's remaining rounds over one backend (see the module docstring).

    Args:
        config: the experiment (``config.fl`` set).
        logdir: where the summary and TensorBoard go.
        backend: carries client tasks and the aggregate.
        codec: the running sum (``new_sum``/``add``/``close``/``contributors``).
        state: the aggregator state (from the checkpoint, or round 0's).
        checkpoint: the checkpoint path the round is committed to.
        algorithm: the registered algorithm's class and its params (``fl.algorithm_params``).
        ledger: the run's privacy ledger, or None (plain runs).
        client_privacy: ``privacy`` as clients apply it (example-level DP), or None.
        user_dp: fl.user_dp's round logic, or None.
        storage: the aggregator's persistent storage directory.
        sizes: every client's number of examples (the algorithm's in-neighbours).
        log: progress lines (default: stderr).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        logdir: str,
        *,
        backend: Backend,
        codec: Any,
        state: AggregatorState,
        checkpoint: str,
        algorithm: tuple[type[FederatedWorker], Any],
        ledger: Any = None,
        client_privacy: Any = None,
        user_dp: UserDPRounds | None = None,
        storage: str | None = None,
        sizes: np.ndarray,
        log: Callable[[str], None] | None = None,
    ):
        assert config.fl is not None
        self.config = config
        self.fl = config.fl
        self.logdir = logdir
        self.backend = backend
        self.codec = codec
        self.state = state
        self.checkpoint = checkpoint
        self.algorithm_cls, self.algorithm_params = algorithm
        self.ledger = ledger
        self.client_privacy = client_privacy
        self.user_dp = user_dp
        self.storage = storage
        self.sizes = np.asarray(sizes)
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.stuck: set[cf.Future] = set()  # tasks past their deadline that still hold a slot
        self.writer: Any = None
        self.final: dict[str, Any] | None = None
        epsilons = ledger.epsilons() if ledger is not None else {}
        self.max_epsilon = max(epsilons.values(), default=0.0)
        # client -> round its ledger first refused a spend (privacy.epsilon_budget); resumed from the ledger
        self.exhausted: dict[int, int] = {}
        if ledger is not None:
            for item in ledger.exclusions():
                if item.reason.startswith("budget") and str(item.client).isdigit():
                    self.exhausted.setdefault(int(item.client), int(item.round))
        self.budget_stop: str | None = None  # why the run ended at the budget (fl.on_budget_exhausted)
        self.early_stopping = config.train.early_stopping  # train.early_stopping: over rounds
        self.early_stopped: str | None = None  # why the run ended early (train.early_stopping)
        self.early_result: dict[str, Any] | None = None  # the summary's early_stopping section
        if self.early_stopping is not None and not (
            callable(getattr(backend, "keep_best", None))
            and callable(getattr(backend, "evaluate_model", None))
        ):
            raise ConfigError(
                f"config key 'train.early_stopping' is not supported by this backend ({type(backend).__name__}); "
                "set it to null"
            )

    @property
    def error(self) -> type[FedrecError]:
        return self.backend.error

    # ------------------------------------------------------------------ the run
    def noise_sources(self) -> dict[str, str]:
        """Where each party's privacy-protecting randomness comes from: party -> source.

        The backend names its parties (``noise_sources()``), or reports per datasite in its privacy
        fields (``noise_source``, filled in as outputs arrive).
        """
        own = getattr(self.backend, "noise_sources", None)
        if callable(own):
            return dict(own())
        reported = self.backend.privacy_fields().get("noise_source") or {}
        return {f"datasite {party} (DP-SGD noise, Poisson batches)": text for party, text in reported.items()}

    def warn_seeded(self) -> None:
        """A seeded run says so loudly: one line on stdout (and the log) per seeded party."""
        warn_seeded(self.noise_sources(), self.log)

    def run(self, *, max_rounds: int | None = None) -> dict[str, Any]:
        """Run the remaining rounds (at most ``max_rounds`` now); returns the final summary."""
        self.warn_seeded()
        self.writer = open_writer(self.logdir)
        try:
            asyncio.run(self._rounds(max_rounds))
        except FedrecError as err:
            self.write_summary(final=None, error=one_line(err))
            raise
        finally:
            self.writer.close()
        assert self.final is not None
        return self.final

    async def _rounds(self, max_rounds: int | None) -> None:
        from fedrec.federated.worker import ClientDirectory

        aggregator = self.algorithm_cls(
            "aggregator",
            ("aggregator",),
            config=self.config,
            in_neighbours=ClientDirectory(self.sizes),
            persistent_storage=self.storage,
            comm=self,
            round_idx=self.state.round_idx,
            params=self.algorithm_params,
        )
        aggregator.user_dp_sample_key = self.user_dp.sample_key if self.user_dp else None
        bar = RoundProgress(
            total=self.fl.rounds, initial=self.state.round_idx, enabled=self.config.train.progress
        )
        done = 0
        if self.early_stopping is not None and self.state.history:
            # a resumed run: the last committed round may be the best one and its copy not yet kept
            await self._track_best(self.state.history[-1])
        try:
            while aggregator.round_idx < self.fl.rounds and (max_rounds is None or done < max_rounds):
                if self._early_stop_now():  # resumed after the run had already stopped early
                    break
                try:
                    record = await self._one_round(aggregator)
                except UserBudgetExhausted as stop:
                    assert self.user_dp is not None
                    self.user_dp.stopped_at_budget = True
                    self.log(
                        f"round {stop.args[0]}: one more round would exceed fl.user_dp.epsilon_budget = "
                        f"{self.user_dp.plan.epsilon_budget:g}; stopping after {self.state.round_idx} rounds"
                    )
                    break
                except BudgetStop as stop:
                    self.budget_stop = str(stop)
                    self.log(f"{stop}; the model of round {self.state.round_idx} is kept")
                    break
                done += 1
                bar.update(record)  # a bar on a terminal, one line per round otherwise (mpirun)
                if self.backend.log_rounds:
                    epsilon = record["epsilon"]
                    self.log(
                        f"round {record['round']}: {record['completed']}/{record['sampled']} clients, "
                        f"{record['round_seconds']:.1f}s"
                        + (f", epsilon {epsilon:.4g}" if epsilon is not None else "")
                    )
                if self.budget_stop:  # the round completed, but clients ran out: stop here
                    self.log(f"{self.budget_stop}; the model of round {self.state.round_idx} is kept")
                    break
                if self.early_stopping is not None:
                    await self._track_best(record)
                    if self._early_stop_now():
                        break
        finally:
            bar.close()
        if self.early_stopping is not None:
            await self._finish_early_stopping()
        self.final = self._final_summary()

    # ------------------------------------------------------------------ early stopping (train.early_stopping)
    def _tracking(self) -> Tracking:
        assert self.early_stopping is not None
        return track(self.early_stopping, self.state.history)

    def _early_stop_now(self) -> bool:
        if self.early_stopping is None:
            return False
        tracking = self._tracking()
        if not tracking.should_stop(self.early_stopping):
            return False
        if self.early_stopped is None:
            self.early_stopped = (
                f"round {self.state.round_idx - 1}: {tracking.since_best} validations without an improvement of "
                f"{self.early_stopping.metric} (best {tracking.best_value:.6g} after round {tracking.best_round}; "
                f"train.early_stopping.patience = {self.early_stopping.patience}); stopping after "
                f"{self.state.round_idx} rounds"
            )
            self.log(self.early_stopped)
        return True

    async def _track_best(self, record: Mapping[str, Any]) -> None:
        """A round whose model validated best so far: a key holder keeps a copy of that model."""
        assert self.early_stopping is not None
        backend: Any = self.backend  # keep_best is optional in the protocol (checked in __init__)
        tracking = self._tracking()
        if self.early_stopping.restore_best and tracking.best_round == record["round"]:
            await asyncio.wrap_future(backend.keep_best(record["round"] + 1, record["global_digest"]))

    async def _finish_early_stopping(self) -> None:
        """Test the model the run ends with: the best validated round's (restore_best) or the last one."""
        cfg = self.early_stopping
        assert cfg is not None
        backend: Any = self.backend  # evaluate_model / best_model_path are optional (checked in __init__)
        tracking = self._tracking()
        last = self.state.history[-1] if self.state.history else {}
        result: dict[str, Any] = {
            "metric": cfg.metric,
            "patience": cfg.patience,
            "min_delta": cfg.min_delta,
            "validations": tracking.validations,
            "best_round": tracking.best_round,
            "best_value": tracking.best_value,
            "best_digest": tracking.best_digest,
            "stopped_early": self.early_stopped is not None,
            "stopped": self.early_stopped,
            "restored_best": False,
            "last_round": last.get("round"),
            "last_round_val": last.get("val"),
            "last_round_test": last.get("test"),
            "val": last.get("val"),
            "test": last.get("test"),
        }
        if cfg.restore_best and tracking.best_round is not None and tracking.best_digest is not None:
            model_round = tracking.best_round + 1
            if tracking.best_digest == self.state.global_digest and last.get("test") is not None:
                metrics = {"val": last.get("val"), "test": last.get("test")}  # the last model is the best
            else:
                metrics = await asyncio.wrap_future(
                    backend.evaluate_model(model_round, tracking.best_digest, ["val", "test"], best=True)
                )
            result.update(restored_best=True, val=metrics.get("val"), test=metrics.get("test"))
            result["final_model"] = backend.best_model_path()
            result["final_model_digest"] = tracking.best_digest
        elif last and last.get("test") is None:  # stopped before fl.rounds: test the last model
            metrics = await asyncio.wrap_future(
                backend.evaluate_model(self.state.round_idx, self.state.global_digest, ["test"], best=False)
            )
            result["test"] = metrics.get("test")
        self.early_result = result
        self.log(
            f"early stopping: best {cfg.metric} {tracking.best_value} after round {tracking.best_round}"
            + (" (restored)" if result["restored_best"] else "")
            + f"; test {result['test']}"
        )

    async def _one_round(self, aggregator: FederatedWorker) -> dict[str, Any]:
        fl, state = self.fl, self.state
        round_idx = aggregator.round_idx
        started = time.perf_counter()
        attempts: list[RoundResults] = []
        while aggregator.round_idx == round_idx:
            if aggregator.attempt > fl.max_round_retries:
                last = attempts[-1]
                raise self.error(
                    f"round {round_idx}: too few clients returned in {len(attempts)} attempts (last: {len(last)} "
                    f"of {len(last.sampled)}; fl.min_completion_rate={fl.min_completion_rate}, "
                    f"fl.max_round_retries={fl.max_round_retries}); first failure: "
                    f"{last.failures[0].message if last.failures else 'none'}"
                )
            known = len(self.exhausted)
            await aggregator.run()
            assert aggregator.last_results is not None
            attempts.append(aggregator.last_results)
            newly = len(self.exhausted) - known
            if aggregator.round_idx == round_idx and newly and self.fl.on_budget_exhausted == "stop":
                self._stop_at_budget(
                    round_idx,
                    f"round {round_idx}: {newly} sampled client(s) cannot afford the round within "
                    f"privacy.epsilon_budget (fl.on_budget_exhausted=stop); stopping after "
                    f"{self.state.round_idx} rounds",
                )
        results = attempts[-1]
        noise = self.user_dp.noise if self.user_dp else None
        if noise is not None:
            from privacy.errors import PrivacyError

            try:
                check_release(noise, survivors=len(results))
            except PrivacyError as err:  # an algorithm accepted what fl.user_dp must not release
                raise self.error(f"round {round_idx}: not released: {err}") from None
        num_clients = int(self.codec.contributors(results.aggregate))
        payload, nbytes = self.codec.close(results.aggregate)
        last_round = round_idx + 1 == fl.rounds or (
            self.user_dp and not self.user_dp.can_afford_another_round()
        )
        splits = ["val"] if (round_idx + 1) % fl.eval_every == 0 or last_round else []
        if last_round:
            splits.append("test")
        closed = ClosedRound(
            round_idx=round_idx,
            attempt=results.attempt,
            payload=payload,
            nbytes=int(nbytes),
            num_clients=num_clients,
            survivors=tuple(r.client_id for r in results.results),
            splits=tuple(splits),
            noise=noise,
        )
        published = await self._publish(closed)
        record = self._round_record(
            round_idx, attempts, closed, published, time.perf_counter() - started, self._epsilon(attempts)
        )
        if noise is not None:
            assert self.user_dp is not None
            record.update(self.user_dp.round_record(noise, survivors=len(results)))
        state.round_idx = round_idx + 1
        state.global_digest = published.digest
        state.history.append(record)
        state.rng = capture_rng()
        state.ledger_position = self.ledger.position() if self.ledger is not None else None
        os.makedirs(os.path.dirname(self.checkpoint), exist_ok=True)
        save_checkpoint(self.checkpoint, state)  # the round is committed here
        self._log_round(record)
        self.write_summary(final=None)
        if self.exhausted and self.fl.on_budget_exhausted == "stop" and state.round_idx < fl.rounds:
            self.budget_stop = (
                f"round {round_idx}: {len(self.exhausted)} client(s) out of privacy.epsilon_budget "
                f"(fl.on_budget_exhausted=stop); stopping after {state.round_idx} rounds"
            )
        return record

    def _stop_at_budget(self, round_idx: int, message: str) -> None:
        """End the run cleanly at the budget, unless no round was ever affordable (a config error)."""
        if self.state.round_idx == 0:
            raise self.error(
                f"round {round_idx}: no round is affordable: sampled clients' spends exceed "
                f"privacy.epsilon_budget from the first round (BudgetExceededError); nothing was sent"
            )
        raise BudgetStop(message)

    def _affordable_sample(self, sampled: list[int], round_idx: int, attempt: int) -> list[int]:
        """Leave out (continue: replace) sampled clients whose next spend the ledger would refuse.

        A client's next spend is its last one (same data, same config); the ledger excludes a client
        it would take past privacy.epsilon_budget, recording the round and the epsilon it would
        reach, before any client trains. ``stop`` ends the run here (BudgetStop); ``continue`` draws
        replacements among the clients that can still pay (not under fl.user_dp, whose Poisson
        sample is what its accountant assumes: there the exhausted clients are only left out).
        """
        if (
            self.ledger is None
            or self.client_privacy is None
            or self.ledger.info.client_epsilon_budget is None
        ):
            return sampled
        newly = self._exclude_unaffordable(sampled, round_idx)
        if newly and self.fl.on_budget_exhausted == "stop":
            self._stop_at_budget(
                round_idx,
                f"round {round_idx}: {newly} sampled client(s) cannot afford the round within "
                f"privacy.epsilon_budget (fl.on_budget_exhausted=stop); stopping after "
                f"{self.state.round_idx} rounds",
            )
        if self.user_dp is not None:
            return [c for c in sampled if c not in self.exhausted]
        while any(c in self.exhausted for c in sampled):
            sampled = self._substitute_exhausted(sampled, round_idx, attempt)
            self._exclude_unaffordable(sampled, round_idx)
        return sampled

    def _exclude_unaffordable(self, clients: Sequence[int], round_idx: int) -> int:
        """Ask the ledger to admit each client's next spend (its last one); returns how many it excluded."""
        newly = 0
        for client in clients:
            if client in self.exhausted:
                continue
            history = self.ledger.client_history(client)
            if not history:
                continue  # a first spend: refused by the client's own ledger record if it is too large
            sigma, rate, steps = history[-1]
            admitted = self.ledger.admit_clients(
                [client], round=round_idx, noise_multiplier=sigma, sample_rate=rate, steps=steps
            )
            if not admitted:
                self.exhausted[client] = round_idx
                newly += 1
        return newly

    def _substitute_exhausted(self, sampled: list[int], round_idx: int, attempt: int) -> list[int]:
        """fl.on_budget_exhausted=continue: replace clients known to be out of budget by clients that can pay.

        Replacements are drawn uniformly (keyed on seed, round and attempt) among the clients neither
        sampled nor exhausted; fewer such clients than the sample needs ends the run (BudgetStop).
        """
        out = [c for c in sampled if c not in self.exhausted]
        need = len(sampled) - len(out)
        if not need:
            return sampled
        population = len(self.sizes)
        if population - len(self.exhausted) < len(sampled):
            self._stop_at_budget(
                round_idx,
                f"round {round_idx}: only {population - len(self.exhausted)} of {population} clients can still "
                f"pay, fewer than fl.client_num_per_round = {len(sampled)}; stopping after "
                f"{self.state.round_idx} rounds",
            )
        rng = np.random.default_rng([self.config.seed, round_idx, attempt, BUDGET_SUBSTITUTE_SALT])
        taken = set(out) | set(sampled)
        candidates = [c for c in range(population) if c not in taken and c not in self.exhausted]
        if len(candidates) < need:
            self._stop_at_budget(
                round_idx,
                f"round {round_idx}: only {len(out) + len(candidates)} of {population} clients can still pay, "
                f"fewer than fl.client_num_per_round = {len(sampled)}; stopping after {self.state.round_idx} rounds",
            )
        out.extend(int(c) for c in rng.choice(candidates, size=need, replace=False))
        return sorted(out)

    async def _publish(self, closed: ClosedRound) -> Published:
        future = self.backend.publish(closed)
        timeout = self.backend.publish_timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=timeout)
        except TimeoutError:
            self.stuck.add(future)
            raise self.error(
                f"round {closed.round_idx}: the apply/evaluate task did not return within {timeout:.0f}s"
            ) from None
        except cf.BrokenExecutor as err:
            raise self.error(f"the worker pool broke: {one_line(err)}") from None

    # ------------------------------------------------------------------ collection (the algorithm's comm)
    async def request_models(self, worker: FederatedWorker, neighbour_ids: Sequence[Any]) -> RoundResults:
        """Run the sampled clients' tasks and stream their outputs into one running sum."""
        round_idx, attempt = worker.round_idx, worker.attempt
        timeout = self.fl.client_timeout
        neighbour_ids = self._affordable_sample([int(c) for c in neighbour_ids], round_idx, attempt)
        noise = self.user_dp.open_round(round_idx, attempt, neighbour_ids) if self.user_dp else None
        running = self.codec.new_sum(attempt_tag(round_idx, attempt))
        queue = deque(int(c) for c in neighbour_ids)
        slots = self.backend.slots if self.backend.slots is not None else max(1, len(queue))
        inflight: dict[asyncio.Future, tuple[int, float, cf.Future]] = {}
        results: list[ClientResult] = []
        failures: list[ClientFailure] = []
        while queue or inflight:
            self._reap_stuck()
            free = slots - len(inflight) - len(self.stuck)
            while queue and free > 0:
                client = queue.popleft()
                future = self.backend.submit(client, round_idx, attempt, noise)
                inflight[asyncio.wrap_future(future)] = (client, time.monotonic(), future)
                free -= 1
            if not inflight:
                await self._wait_for_stuck(slots)
                continue
            deadline = min(started for _, started, _ in inflight.values()) + timeout
            done, _ = await asyncio.wait(
                list(inflight),
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in done:
                client, started, _ = inflight.pop(waiter)
                outcome = self._collect(
                    waiter, client, time.monotonic() - started, running, round_idx, attempt
                )
                (results if isinstance(outcome, ClientResult) else failures).append(outcome)  # type: ignore[arg-type]
            now = time.monotonic()
            for waiter, (client, started, future) in list(inflight.items()):
                if now - started >= timeout:
                    del inflight[waiter]
                    failures.append(
                        ClientFailure(
                            client, "timeout", f"no answer within fl.client_timeout={timeout}s", now - started
                        )
                    )
                    if not future.cancel():
                        self.stuck.add(future)
        results.sort(key=lambda r: r.client_id)
        failures.sort(key=lambda f: f.client_id)
        sampled = tuple(sorted(int(c) for c in neighbour_ids))
        return RoundResults(round_idx, attempt, sampled, results, failures, running)

    def _collect(
        self, waiter: asyncio.Future, client: int, elapsed: float, running: Any, round_idx: int, attempt: int
    ) -> ClientResult | ClientFailure:
        try:
            output = waiter.result()
        except cf.BrokenExecutor as err:
            raise self.error(f"the worker pool broke: {one_line(err)}") from None
        except ClientOutOfBudget as err:  # its ledger refused the spend: nothing was sent
            self.exhausted.setdefault(client, round_idx)
            return ClientFailure(client, "refused", one_line(err), elapsed)
        except Exception as err:  # a client's failure is data, not an exception unwinding the round
            return ClientFailure(client, "error", one_line(err), elapsed)
        try:
            result = self.backend.accept(
                client, output, running, round_idx=round_idx, attempt=attempt, elapsed=elapsed
            )
        except ClientFailed as failed:
            if failed.reason == "rejected":
                self.log(f"round {round_idx}: client {client}: update rejected: {failed.message}")
            return ClientFailure(client, failed.reason, failed.message, elapsed)
        if self.user_dp is not None:
            self.user_dp.note_clipped(result.clipped, result.count_share)
        return result

    def _reap_stuck(self) -> None:
        self.stuck = {f for f in self.stuck if not f.done()}

    async def _wait_for_stuck(self, slots: int) -> None:
        """Every slot is held by a timed-out task: wait one more timeout for one, then give up."""
        grace = self.fl.client_timeout
        done, _ = await asyncio.wait(
            [asyncio.wrap_future(f) for f in self.stuck], timeout=grace, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            raise self.error(
                f"all {slots} pool workers are stuck in client tasks that exceeded "
                f"fl.client_timeout={self.fl.client_timeout}s; stopping (resume with --resume)"
            )
        self._reap_stuck()

    # ------------------------------------------------------------------ records and outputs
    def _round_record(
        self,
        round_idx: int,
        attempts: list[RoundResults],
        closed: ClosedRound,
        published: Published,
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
            # updates the server refused to add (bad payload, norm above the plaintext bound)
            "rejected": sum(1 for a in attempts for f in a.failures if f.reason == "rejected"),
            "round_seconds": seconds,
            "apply_seconds": float(published.seconds),
            "client_updates_per_second": len(results.results) / seconds if seconds > 0 else 0.0,
            "aggregate_bytes": closed.nbytes,
            "aggregate_clients": closed.num_clients,
            "train_loss": train_loss,
            "val": published.metrics.get("val"),
            "test": published.metrics.get("test"),
            "epsilon": epsilon,
            "aggregate_error_bound": published.error_bound,
            "global_digest": published.digest,
            **published.record,
        }

    def _epsilon(self, attempts: list[RoundResults]) -> float | None:
        """Example-level epsilon of the most exposed client so far (every spend the ledger holds)."""
        if self.ledger is None or self.client_privacy is None:
            return None
        for client in sorted({c for attempt in attempts for c in attempt.sampled}):
            self.max_epsilon = max(self.max_epsilon, self.ledger.client_epsilon(client))
        return float(self.max_epsilon)

    def _log_round(self, record: Mapping[str, Any]) -> None:
        step = record["round"] + 1
        scalars = {
            f"fl/{key}": record[key]
            for key in (
                "sampled",
                "completed",
                "dropped",
                "attempts",
                "round_seconds",
                "bytes_sent",
                "bytes_received",
                "client_updates_per_second",
            )
        }
        scalars["train/loss"] = record["train_loss"]
        scalars["privacy/epsilon"] = record["epsilon"]
        if record.get("user_epsilon") is not None:
            scalars["privacy/user_level_epsilon"] = record["user_epsilon"]
            scalars["privacy/user_dp_clipped_fraction"] = record["user_dp"]["clipped_fraction"]
        for split in ("val", "test"):
            for name, value in (record.get(split) or {}).items():
                scalars[f"{split}/{name}"] = value
        for name, value in scalars.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        if self.ledger is not None and self.fl.secure:
            # per-client min/median/max example-level epsilon (the user-level one is written above)
            log_ledger_epsilon(self.writer, self.ledger, step=step, user_level=False)
        self.writer.flush()

    def privacy_summary(self) -> dict[str, Any] | None:
        """The summary's privacy section: example level (DP-SGD) and/or user level (fl.user_dp)."""
        if self.client_privacy is None and self.user_dp is None:
            return None
        from privacy.ledger import ledger_path

        summary: dict[str, Any] = {
            "ledger": ledger_path(self.logdir),
            # the report checks the ledger against it (rewound, replaced or copied in)
            "ledger_position": self.ledger.position() if self.ledger is not None else None,
        }
        if self.client_privacy is not None:
            summary.update(
                example_privacy_summary(
                    self.client_privacy, epsilon=self.max_epsilon, ledger=summary["ledger"]
                )
            )
            summary.update(self.backend.privacy_fields())
        if self.user_dp is not None:
            summary["user_level"] = self.user_dp.summary()
        return summary

    def _final_summary(self) -> dict[str, Any]:
        state = self.state
        last = state.history[-1] if state.history else {}
        final = {
            "rounds_completed": state.round_idx,
            "test": last.get("test"),
            "val": last.get("val"),
            "epsilon": last.get("epsilon"),
            "user_epsilon": self.ledger.user_level_epsilon() if self.user_dp and self.ledger else None,
            "stopped_at_budget": bool(self.user_dp and self.user_dp.stopped_at_budget)
            or bool(self.budget_stop),
            "budget_exhausted": {
                "policy": self.fl.on_budget_exhausted,
                "stopped": self.budget_stop,
                "clients": len(self.exhausted),
                "first_refused_round": {str(c): r for c, r in sorted(self.exhausted.items())},
            },
            "final_model_digest": state.global_digest,
            **self.backend.final_fields(),
        }
        if self.early_result is not None:  # train.early_stopping: the model the run ends with
            final["early_stopping"] = self.early_result
            final["val"], final["test"] = self.early_result["val"], self.early_result["test"]
            if self.early_result["restored_best"]:
                final["final_model"] = self.early_result["final_model"]
                final["final_model_digest"] = self.early_result["final_model_digest"]
        self.write_summary(final=final)
        return final

    def write_summary(self, final: dict[str, Any] | None, error: str | None = None) -> str:
        results: dict[str, Any] = {"rounds": self.state.history, "final": final}
        if error is not None:
            results["error"] = error
        section = {
            **self.backend.summary_fields(),
            "privacy": self.privacy_summary(),
            "noise_source": self.noise_sources(),  # party -> where its privacy noise comes from
        }
        return write_summary(self.logdir, self.config, results, **{self.backend.summary_key: section})
