"""FederatedWorker: a node of a federation, with roles, neighbours, storage and an ``async run()``.

The seed's API (RecoEdge README): a worker has ``roles`` (``aggregator``, ``trainer``), ``in_neighbours``
(who sends it models: an aggregator's clients) and ``out_neighbours`` (whom it sends to: a trainer's
aggregator), a ``persistent_storage`` directory and a ``round_idx``. ``run()`` is one round;
``request_models_suspendable`` suspends the coroutine until the neighbours' models arrive;
``sample_neighbours(round_idx, client_num_per_round)`` is deterministic per round; ``aggregate``
combines what arrived.

An algorithm is a subclass registered with ``@registry.load('fl_algo', name)`` (see
``algorithms/fed_avg.py`` and docs/federated.md). It decides *what* happens; the transport handed to
the worker as ``comm`` (the MPI simulation, or a deployment) decides *how* bytes move. The
transport streams every arriving update into one running sum, so ``aggregate(round_idx, results,
failures)`` sees the clients' metadata and the sum, never a list of models: memory is one aggregate
whatever the number of clients. Failures (errors, timeouts, rejected payloads) reach ``aggregate``
as data, as in Flower's ``aggregate_fit(server_round, results, failures)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from fedrec.config.schema import ExperimentConfig, FLConfig
from fedrec.errors import FedrecError
from fedrec.trainers.base_trainer import move_batch

ROLES = ("aggregator", "trainer")


class InvalidStateError(FedrecError):
    """A worker asked to do something its roles or its state do not allow."""


# --------------------------------------------------------------------------------------------------
# What workers know of each other and exchange
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbour:
    """What a worker knows of another: its id and how many training samples it holds (never its data)."""

    worker_id: Any
    sample_num: int


class ClientDirectory(Mapping[int, Neighbour]):
    """The simulated clients ``0..n-1`` as a read-only mapping id -> Neighbour, built on demand.

    Backed by one array of client sizes, so a million clients cost a million integers, not a million
    objects.
    """

    def __init__(self, sizes: np.ndarray):
        self._sizes = np.asarray(sizes)

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self._sizes)))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int | np.integer) and 0 <= int(key) < len(self._sizes)

    def __getitem__(self, key: int) -> Neighbour:
        if key not in self:
            raise KeyError(key)
        return Neighbour(int(key), int(self._sizes[int(key)]))


class ParamLayout:
    """Names and shapes of the parameters a federation shares, in a fixed order; flat float32 vectors.

    Parameters listed in the model's ``PRIVATE_PARAMETERS`` (for MF: the user embedding and bias)
    are left out: they never leave the client.
    """

    def __init__(self, entries: Sequence[tuple[str, tuple[int, ...]]], *, row_tables: Sequence[str] = ()):
        self.entries = [(name, tuple(int(d) for d in shape)) for name, shape in entries]
        self.sizes = [math.prod(shape) for _, shape in self.entries]
        self.size = int(sum(self.sizes))
        names = {name: shape for name, shape in self.entries}
        for name in row_tables:
            if name not in names or len(names[name]) != 2:
                raise ValueError(f"row table {name!r}: expected a shared 2-D parameter of the layout")
        self.row_tables = list(row_tables)  # embedding weights (rows x dim) among the entries

    @classmethod
    def from_model(cls, model: nn.Module) -> ParamLayout:
        private = set(getattr(model, "PRIVATE_PARAMETERS", ()))
        entries = [
            (name, tuple(tensor.shape)) for name, tensor in model.state_dict().items() if name not in private
        ]
        tables = [
            f"{module_name}.weight" if module_name else "weight"
            for module_name, module in model.named_modules()
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        ]
        return cls(entries, row_tables=[name for name in tables if name not in private])

    def row_spans(self) -> list[tuple[int, int, int]]:
        """(flat offset, rows, dim) of each row table, in layout order."""
        spans, start = [], 0
        for (name, shape), size in zip(self.entries, self.sizes):
            if name in self.row_tables:
                spans.append((start, shape[0], shape[1]))
            start += size
        return spans

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.entries]

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    def flatten(self, model: nn.Module) -> np.ndarray:
        """The model's shared parameters as one float32 vector (a copy)."""
        state = model.state_dict()
        out = np.empty(self.size, dtype=np.float32)
        start = 0
        for (name, shape), size in zip(self.entries, self.sizes):
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise InvalidStateError(f"parameter {name} has shape {tuple(tensor.shape)}, expected {shape}")
            out[start : start + size] = tensor.detach().to("cpu", torch.float32).reshape(-1).numpy()
            start += size
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """``name -> tensor`` views of a flat vector (float32)."""
        flat = np.asarray(flat, dtype=np.float32)
        if not flat.flags.writeable:
            flat = flat.copy()  # torch tensors over read-only memory are undefined behaviour
        if flat.shape != (self.size,):
            raise InvalidStateError(f"flat parameters of shape {flat.shape}, expected ({self.size},)")
        out, start = {}, 0
        for (name, shape), size in zip(self.entries, self.sizes):
            out[name] = torch.from_numpy(flat[start : start + size].reshape(shape))
            start += size
        return out

    def load_into(self, model: nn.Module, flat: np.ndarray) -> None:
        """Copy a flat vector into the model's shared parameters (private ones are untouched)."""
        tensors = self.unflatten(flat)
        state = model.state_dict()
        with torch.no_grad():
            for name, tensor in tensors.items():
                state[name].copy_(tensor)

    def digest(self) -> str:
        text = ";".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GlobalModel:
    """The shared parameters every trainer starts a round from."""

    round_idx: int
    params: np.ndarray  # flat float32, read-only
    digest: str


@dataclass
class ClientUpdate:
    """What one client's local training produced, before it is encoded (and maybe encrypted)."""

    client_id: int
    round_idx: int
    delta: np.ndarray  # local minus global shared parameters, flat float32
    num_examples: int
    weight: float
    train_loss: float
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    """One returned client as the aggregator records it (its update is already in the running sum)."""

    client_id: int
    num_examples: int
    weight: float
    train_loss: float
    steps: int
    seconds: float
    bytes_sent: int
    bytes_received: int
    rank: int
    clipped: bool | None = None  # fl.user_dp: whether the whole update was clipped to S (a diagnostic)
    count_share: float | None = None  # fl.user_dp.adaptive_clip: centred unclipped bit + count noise share


@dataclass(frozen=True)
class ClientFailure:
    """A sampled client that did not contribute: ``reason`` is 'error', 'timeout', 'rejected' or 'refused'."""

    client_id: int
    reason: str
    message: str
    seconds: float


@dataclass
class RoundResults(Sequence[ClientResult]):
    """The clients that returned in one round attempt (sorted by id), its failures, and the running sum."""

    round_idx: int
    attempt: int
    sampled: tuple[int, ...]
    results: list[ClientResult]
    failures: list[ClientFailure]
    aggregate: Any  # the transport's running sum (plain fixed point or encrypted); opaque to algorithms

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index):  # type: ignore[override]
        return self.results[index]

    @property
    def total_weight(self) -> float:
        return float(sum(r.weight for r in self.results))


class Transport(Protocol):
    """How a worker's requests are carried out (the aggregator's: fedrec.federated.engine.RoundEngine)."""

    async def request_models(self, worker: FederatedWorker, neighbour_ids: Sequence[Any]) -> Any: ...


# --------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------


class FederatedWorker:
    """One node of the federation. Subclass it (and register it) to write an algorithm.

    Args:
        worker_id: this worker's id (clients: their integer id; the aggregator: ``'aggregator'``).
        roles: a subset of ``('aggregator', 'trainer')``.
        config: the experiment config (``config.fl`` holds the federation's settings).
        in_neighbours: workers that send models to this one (an aggregator's clients).
        out_neighbours: workers this one sends to (a trainer's aggregator).
        persistent_storage: a directory that survives between rounds (and restarts) for this worker.
        comm: the transport that carries out requests.
        round_idx: the round this worker is in.
        params: the algorithm's own settings (an instance of its ``Config`` dataclass).

    Trainer-side state set by the transport before ``run()``: ``model`` (the local model), ``data``
    (the client's training rows), ``layout`` (shared-parameter layout), ``make_trainer`` (builds the
    BaseTrainer-like object whose ``training_step`` does one local optimiser step).
    """

    @dataclass
    class Config:
        """The algorithm's own keys (``fl.algorithm_params``); FedAvg has none."""

    roles_allowed: ClassVar[tuple[str, ...]] = ROLES

    def __init__(
        self,
        worker_id: Any,
        roles: Sequence[str],
        *,
        config: ExperimentConfig,
        in_neighbours: Mapping[Any, Neighbour] | None = None,
        out_neighbours: Mapping[Any, Neighbour] | None = None,
        persistent_storage: str | None = None,
        comm: Transport | None = None,
        round_idx: int = 0,
        params: Any = None,
    ):
        unknown = [role for role in roles if role not in self.roles_allowed]
        if unknown or not roles:
            raise InvalidStateError(f"roles {list(roles)!r}: expected a non-empty subset of {list(ROLES)}")
        if config.fl is None:
            raise InvalidStateError("config has no 'fl' section")
        self.worker_id = worker_id
        self.roles = tuple(roles)
        self.config = config
        self.fl: FLConfig = config.fl
        self.in_neighbours: Mapping[Any, Neighbour] = in_neighbours if in_neighbours is not None else {}
        self.out_neighbours: Mapping[Any, Neighbour] = out_neighbours if out_neighbours is not None else {}
        self.persistent_storage = persistent_storage
        self.comm = comm
        self.round_idx = int(round_idx)
        self.attempt = 0
        # fl.user_dp.secure_mode: the aggregator's secret client-sampling key (set by the simulation).
        self.user_dp_sample_key: bytes | None = None
        self.params: Any = params if params is not None else self.Config()
        # Aggregator state
        self.last_results: RoundResults | None = None
        # Trainer state (set by the transport)
        self.model: Any = None
        self.data: Any = None
        self.layout: ParamLayout | None = None
        self.make_trainer: Any = None
        self.reconstruct: Any = None  # fl.reconstruction: rebuilds the per-user rows; returns DP steps
        self.global_model: GlobalModel | None = None
        self.update: ClientUpdate | None = None

    # ------------------------------------------------------------------ the round
    async def run(self) -> None:
        """One round of this worker's roles. Subclasses implement it (see FedAvgWorker)."""
        raise NotImplementedError

    async def request_models_suspendable(self, neighbour_ids: Sequence[Any]) -> Any:
        """Ask ``neighbour_ids`` for their models and suspend until they arrive (or fail).

        An aggregator gets a :class:`RoundResults` (the updates summed as they arrive); a trainer
        gets a list of :class:`GlobalModel`, one per aggregator asked.
        """
        if self.comm is None:
            raise InvalidStateError(f"worker {self.worker_id!r} has no transport (comm)")
        return await self.comm.request_models(self, neighbour_ids)

    # ------------------------------------------------------------------ aggregator hooks
    def sample_neighbours(self, round_idx: int, client_num_per_round: int) -> list[int]:
        """The clients of this round: ``client_num_per_round`` distinct in-neighbours, sorted.

        Deterministic in (seed, round, attempt): a retried round draws a fresh sample. With
        ``fl.user_dp`` every client is kept independently with probability ``client_num_per_round / N``
        (Poisson sampling, which the user-level accountant assumes): the count then varies by round.
        """
        num_neighbours = len(self.in_neighbours)
        if client_num_per_round > num_neighbours:
            raise InvalidStateError(
                f"fl.client_num_per_round = {client_num_per_round}: above the {num_neighbours} clients"
            )
        if self.fl.user_dp is not None:
            from fedrec.federated.user_dp import client_sampling_rate, poisson_sample

            rate = client_sampling_rate(client_num_per_round, num_neighbours)
            return poisson_sample(
                self.config.seed,
                round_idx,
                self.attempt,
                num_clients=num_neighbours,
                rate=rate,
                key=self.user_dp_sample_key,
            )
        if num_neighbours == client_num_per_round:
            return list(self.in_neighbours)
        rng = self.round_rng(round_idx, salt=0x5A)
        chosen = rng.choice(num_neighbours, size=client_num_per_round, replace=False)
        return sorted(int(c) for c in chosen)

    def round_rng(self, round_idx: int, *, salt: int) -> np.random.Generator:
        """A generator keyed by (seed, round, attempt, salt): no hidden state to checkpoint."""
        return np.random.default_rng([self.config.seed, round_idx, self.attempt, salt])

    def aggregate(self, round_idx: int, results: RoundResults, failures: Sequence[ClientFailure]) -> Any:
        """Return the round's aggregate, or None to retry the round without touching the global model."""
        raise NotImplementedError

    def update_model(self, model: Any) -> None:
        """Aggregator: hold the new aggregate for the clients. Trainer: load the global model."""
        if "trainer" in self.roles and isinstance(model, GlobalModel):
            if self.model is None or self.layout is None:
                raise InvalidStateError(f"trainer {self.worker_id!r} has no local model to update")
            self.layout.load_into(self.model, model.params)
            self.global_model = model
        elif "aggregator" in self.roles:
            self.model = model
        else:
            raise InvalidStateError(
                f"worker {self.worker_id!r} with roles {self.roles} cannot take {model!r}"
            )

    # ------------------------------------------------------------------ trainer hooks
    def client_weight(self, num_examples: int) -> float:
        """This client's weight in the average (FedAvg: its number of training examples)."""
        return float(num_examples)

    def after_local_step(self, trainer: Any) -> None:
        """Called after every local optimiser step (FedProx applies its proximal step here)."""

    def apply_aggregate(self, global_params: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        """The server update rule, run where the aggregate is decrypted: ``w + server_lr * mean``."""
        from fedrec.federated.aggregate import apply_mean_update

        return apply_mean_update(global_params, mean_update, server_lr=self.fl.server_lr)

    async def train(self, model_dir: str | None = None) -> ClientUpdate:
        """Local training from the global model on this client's data; returns (and keeps) the update."""
        if self.model is None or self.data is None or self.global_model is None or self.layout is None:
            raise InvalidStateError(
                f"trainer {self.worker_id!r}: no model, data or global model to train from"
            )
        reconstruction_steps = self.reconstruct(self) if self.reconstruct is not None else 0
        trainer = self.make_trainer(self)
        steps, loss_sum, seen = 0, 0.0, 0
        limit = self.fl.local_steps
        try:
            for epoch in range(self.fl.local_epochs):
                for batch in trainer.train_batches(epoch):
                    if limit is not None and steps >= limit:
                        break
                    batch = move_batch(batch, trainer.device)
                    size = len(batch["label"])
                    loss = trainer.training_step(batch)
                    self.after_local_step(trainer)
                    steps += 1
                    if size == 0:  # an empty Poisson batch is still a step of the DP mechanism
                        continue
                    if not math.isfinite(loss):
                        raise FedrecError(
                            f"client {self.worker_id} diverged in round {self.round_idx}: loss {loss} (lower train.lr?)"
                        )
                    loss_sum += loss * size
                    seen += size
            extra = dict(getattr(trainer, "update_extra", dict)())
            if "dp_steps" in extra:  # the reconstruction's DP-SGD steps are spent on the same data
                extra["dp_steps"] += reconstruction_steps
        finally:
            finish = getattr(trainer, "finish", None)
            if callable(finish):
                finish()  # e.g. flush deferred DP noise and detach hooks from a reused model
        delta = self.layout.flatten(self.model) - self.global_model.params
        num_examples = len(self.data)
        self.update = ClientUpdate(
            client_id=int(self.worker_id),
            round_idx=self.round_idx,
            delta=delta,
            num_examples=num_examples,
            weight=self.client_weight(num_examples),
            train_loss=loss_sum / seen if seen else float("nan"),
            steps=steps,
            extra=extra,
        )
        return self.update


def algorithm_params(algorithm_cls: type[FederatedWorker], data: Mapping[str, Any]) -> Any:
    """Build the algorithm's ``Config`` from ``fl.algorithm_params`` (unknown keys are errors)."""
    from fedrec.config.typed import build

    if not dataclasses.is_dataclass(algorithm_cls.Config):
        raise InvalidStateError(f"{algorithm_cls.__name__}.Config must be a dataclass")
    return build(algorithm_cls.Config, dict(data), "fl.algorithm_params")


MAX_LOGGED_FAILURES = 20  # failures listed per round record (all are counted)


def round_outcome(round_idx: int, attempts: list[RoundResults]) -> dict[str, Any]:
    """What every round record holds about its clients: sampled, completed, dropped, failures, traffic.

    ``attempts`` are the round's tries in order; the last one is the one that completed.
    """
    results = attempts[-1]
    failures = [f for attempt in attempts for f in attempt.failures]
    return {
        "round": round_idx,
        "attempts": len(attempts),
        "sampled": len(results.sampled),
        "completed": len(results.results),
        "dropped": len(results.failures),
        "dropped_clients": [f.client_id for f in results.failures],
        "failures": [
            {"client": f.client_id, "reason": f.reason, "message": f.message, "seconds": round(f.seconds, 3)}
            for f in failures[:MAX_LOGGED_FAILURES]
        ],
        "client_seconds": float(sum(r.seconds for r in results.results)),
        "bytes_sent": int(sum(r.bytes_sent for r in results.results)),
        "bytes_received": int(sum(r.bytes_received for r in results.results)),
        "local_steps": int(sum(r.steps for r in results.results)),
    }
