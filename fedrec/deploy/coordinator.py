"""Coordinator side of a deployment: federated rounds over PySyft datasites, holding only public keys.

The coordinator logs into each datasite with the data-scientist account its owner created
(:mod:`fedrec.deploy.datasite`), reads the published schema (never rows), submits the two functions
of :mod:`fedrec.deploy.functions` and waits for the owners to approve them (by policy or by hand).
The rounds are :class:`~fedrec.federated.engine.RoundEngine`'s, the same loop as the simulation's:
the registered algorithm's aggregator samples clients (deterministic in seed, round and attempt),
and :class:`DatasiteBackend` calls ``fedrec_train_round`` on every sampled datasite concurrently with
the sealed global model, checks each output before it touches the aggregate (one list of wire-format
payloads of this round, attempt and client, plus a spend record that matches the config's DP-SGD),
records the spend in the run's ledger copy and adds the payloads through the secure codec (a
:class:`~privacy.encryption.StreamingAggregator` that holds the public context only). Failures are
data: a datasite that is down, raises, answers after ``fl.client_timeout`` or returns anything
malformed is a dropped client and the round goes on; too few survivors (``fl.min_completion_rate``)
retry the round with a fresh sample. The encrypted aggregate then goes to one datasite's
``fedrec_apply_round``, which returns the next global model sealed under the owners' model key; it is
checkpointed and sent with the next round's requests.

The coordinator never receives raw data or plaintext weights: what comes back is ciphertext, sealed
models, digests and spend records. The only plaintext model it builds is round 0's seeded
initialisation (from the config, no data), to learn the parameter layout.

Files under LOGDIR: ``deploy/checkpoint.json`` (atomic, after every round; ``resume=True``
continues), ``deploy/global/round_NNNNNN.sealed`` (the encrypted global models),
``privacy_ledger.sqlite`` (the coordinator's copy of every spend), ``summary.json``, TensorBoard.
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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedrec import registry
from fedrec.config import ExperimentConfig
from fedrec.data.partition import Partition
from fedrec.deploy.datasite import DatasiteClient, call_in_thread, connect_all, request_approval
from fedrec.deploy.errors import DeployError, RejectedOutput
from fedrec.deploy.functions import APPLY_FUNCTION, FUNCTIONS, TRAIN_FUNCTION, function_digest
from fedrec.deploy.keys import write_private_bytes
from fedrec.deploy.local import DatasiteSpec
from fedrec.deploy.outputs import expected_spend, validate_apply_output, validate_train_output
from fedrec.deploy.training import NOISE_SOURCES, ModelPlan, RoundRequest, initial_global_model
from fedrec.errors import ConfigError, FedrecError
from fedrec.experiment import config_fingerprint
from fedrec.federated.checkpoint import (
    check_checkpoint_presence,
    initial_state,
    resume_checkpoint,
    save_checkpoint,
)
from fedrec.federated.clients import client_privacy_config
from fedrec.federated.codec import SecureCodec
from fedrec.federated.engine import ClientFailed, ClosedRound, Published, RoundEngine, open_ledger
from fedrec.federated.ranks import import_modules
from fedrec.federated.run import one_line, params_digest
from fedrec.federated.server_opt import check_server_optimizer
from fedrec.federated.worker import ClientResult, algorithm_params
from privacy.encryption.context import load_context
from privacy.ledger import ClientSpend


def refuse_user_dp(config: ExperimentConfig) -> None:
    """fl.user_dp is not honoured on datasites (owners do not clip and noise whole updates): refuse it."""
    if config.fl is not None and config.fl.user_dp is not None:
        raise ConfigError(
            "config key 'fl.user_dp': user-level DP-FedAvg is not supported in deployment yet (datasites "
            "do not clip and noise whole updates); set fl.user_dp=null or use scripts/train_fl.py"
        )


# --------------------------------------------------------------------------------------------------
# The round engine's backend, and the coordinator
# --------------------------------------------------------------------------------------------------


class DatasiteBackend:
    """The round engine's backend for a deployment: approved code on the sampled datasites."""

    error = DeployError
    slots = None  # every sampled datasite at once; each call has its own deadline
    publish_timeout = None  # apply_on_datasites bounds each datasite's call by fl.client_timeout
    summary_key = "deployment"
    log_rounds = True

    def __init__(self, coordinator: Coordinator):
        self.co = coordinator

    def submit(self, client: int, round_idx: int, attempt: int, noise: Any) -> cf.Future:
        request = self.co.round_request(client, round_idx, attempt)
        return call_in_thread(functools.partial(self.co.train_on, client, request))

    def accept(
        self, client: int, output: Any, running: Any, *, round_idx: int, attempt: int, elapsed: float
    ) -> ClientResult:
        """Validate, record the spend in the coordinator's ledger copy, then add (in that order)."""
        co = self.co
        rows = co.datasites[client].rows
        try:
            payloads, record = validate_train_output(
                output,
                client_id=client,
                round_idx=round_idx,
                attempt=attempt,
                aggregator=running,
                spend=expected_spend(co.client_config, rows),
            )
        except RejectedOutput as err:
            raise ClientFailed("rejected", one_line(err)) from None
        source = output["noise_source"]
        if source != "owner_csprng" and co.noise_sources.get(client) != source:
            co.log(
                f"deploy: WARNING: datasite {client} draws its DP noise from {NOISE_SOURCES[source]}; "
                "its epsilon does not hold against anyone who holds this config"
            )
        co.noise_sources[client] = source
        spend = ClientSpend(
            str(client), round_idx, record["noise_multiplier"], record["sample_rate"], record["steps"]
        )
        try:
            co.ledger.record_client_spends([spend])
        except FedrecError as err:  # e.g. the coordinator's ledger refuses the spend (budget)
            raise ClientFailed("refused", one_line(err)) from None
        try:
            co.codec.add(running, payloads)  # type: ignore[union-attr]
        except Exception as err:  # SEAL refused a ciphertext: the earlier chunks are in (allow_partial)
            raise ClientFailed("rejected", f"RejectedOutput: update: {one_line(err)}") from None
        # The signed contribution, shown to the decrypting owner, who recomputes the sum from these.
        co.contributions.setdefault((round_idx, attempt), {})[client] = (payloads, output["signature"])
        return ClientResult(
            client_id=client,
            num_examples=rows,
            weight=float(rows),
            train_loss=float("nan"),  # computed on private rows: not released by the datasite
            steps=int(record["steps"]),
            seconds=elapsed,
            bytes_sent=sum(len(p) for p in payloads),
            bytes_received=co.download_bytes,
            rank=0,
        )

    def publish(self, closed: ClosedRound) -> cf.Future:
        """One datasite decrypts and applies; the sealed next global model is stored before the commit."""
        co = self.co

        def published(applied: dict[str, Any]) -> Published:
            sealed = applied["global_model"]
            write_private_bytes(co.paths.global_model(closed.round_idx + 1), sealed, mode=0o644)
            stale = co.paths.global_model(closed.round_idx - 1)
            if closed.round_idx >= 1 and os.path.exists(stale):
                os.remove(stale)  # keep the current and the previous round's models
            co.sealed_global, co.download_bytes = sealed, len(sealed)
            for key in [k for k in co.contributions if k[0] <= closed.round_idx]:
                del co.contributions[key]
            co.state.server_state["sealed_sha256"] = hashlib.sha256(sealed).hexdigest()
            return Published(
                digest=applied["digest"],
                seconds=applied["seconds"],
                error_bound=float(applied["error_bound"]),
                record={"apply_datasite": applied["client"]},
            )

        return call_in_thread(lambda: published(co.apply_on_datasites(closed)))

    def summary_fields(self) -> dict[str, Any]:
        co = self.co
        return {
            "mode": "pysyft",
            "run_id": co.run_id,
            "datasites": [
                {
                    "client_id": cid,
                    "url": ds.spec.url,
                    "rows": ds.rows if ds.connected else None,
                    "approval": co.approvals.get(cid),
                }
                for cid, ds in sorted(co.datasites.items())
            ],
            "functions": {name: function_digest(fn) for name, fn in FUNCTIONS.items()},
            "max_executions": co.max_executions,
            "model_parameters_shared": co.layout.size,
            "coordinator_holds": "public context only; updates encrypted (BFV), global model sealed (AES-GCM)",
            "public_context_sha256": co.state.public_context_digest,
        }

    def privacy_fields(self) -> dict[str, Any]:
        return {
            "owner_ledgers": "each owner's privacy_ledger.sqlite (authoritative for its budget)",
            "noise_source": {str(c): NOISE_SOURCES[s] for c, s in sorted(self.co.noise_sources.items())},
        }

    def final_fields(self) -> dict[str, Any]:
        round_idx = self.co.state.round_idx
        return {
            "final_model": self.co.paths.global_model(round_idx) if round_idx > 0 else None,
            "final_model_encrypted": True,
        }


@dataclasses.dataclass(frozen=True)
class DeployPaths:
    logdir: str

    @property
    def root(self) -> str:
        return os.path.join(self.logdir, "deploy")

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.root, "checkpoint.json")

    def global_model(self, round_idx: int) -> str:
        return os.path.join(self.root, "global", f"round_{round_idx:06d}.sealed")


class Coordinator:
    """Runs the federated rounds of ``config`` over ``datasites`` (see the module docstring).

    Args:
        config: the experiment (``fl`` with ``secure: true``, ``privacy`` with a noise multiplier).
        logdir: where checkpoints, the ledger copy, the summary and TensorBoard go.
        datasites: one spec per datasite (client ids must be 0..N-1).
        public_context: the key authority's public context (a secret context is refused).
        resume: continue from ``LOGDIR/deploy/checkpoint.json``.
        log: progress lines (default: stderr).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        logdir: str,
        datasites: Sequence[DatasiteSpec],
        *,
        public_context: bytes,
        resume: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        fl = config.fl
        if fl is None or not fl.secure:
            raise ConfigError(
                "config key 'fl.secure' must be true for a deployment (encrypted updates, DP-SGD, ledger)"
            )
        refuse_user_dp(config)
        check_server_optimizer(fl, custom_rule=False, deployment=True)
        if config.privacy is None or config.privacy.noise_multiplier is None:
            raise ConfigError(
                "config key 'privacy.noise_multiplier' is required for a deployment (each owner's DP-SGD)"
            )
        if fl.faults.kill_clients:
            raise ConfigError(
                "config key 'fl.faults.kill_clients': not supported on datasites (use hang_clients)"
            )
        ids = sorted(spec.client_id for spec in datasites)
        if ids != list(range(len(ids))) or not ids:
            raise ConfigError(
                f"datasite client ids {ids}: expected 0..{len(ids) - 1}, one datasite per client"
            )
        if fl.client_num_per_round > len(ids):
            raise ConfigError(
                f"config key 'fl.client_num_per_round' = {fl.client_num_per_round}: above the {len(ids)} datasites"
            )
        load_context(public_context, role="public")  # refuses a secret context
        self.config = config
        self.fl = fl
        self.logdir = logdir
        self.paths = DeployPaths(logdir)
        self.resume = resume
        self.public_context = public_context
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        syft = config.syft
        self.max_executions = (syft.max_executions if syft and syft.max_executions else None) or (
            (fl.rounds + 1) * (fl.max_round_retries + 1)
        )
        self.approval_timeout = syft.approval_timeout if syft else 300.0
        self.datasites = {
            spec.client_id: DatasiteClient(spec, max_executions=self.max_executions) for spec in datasites
        }
        import_modules(fl.import_modules)  # the coordinator's own copy of a custom algorithm
        self.algorithm_cls = registry.lookup("fl_algo", fl.algorithm)
        self.algorithm_params = algorithm_params(self.algorithm_cls, fl.algorithm_params)
        self.state: Any = None
        self.ledger: Any = None
        self.codec: SecureCodec | None = None
        self.download_bytes = 0
        self.sealed_global: bytes | None = None
        self.noise_sources: dict[int, str] = {}  # datasite -> where its DP noise came from (its output)
        # (round, attempt) -> client -> (payloads, signature): what the decrypting owner is shown.
        self.contributions: dict[tuple[int, int], dict[int, tuple[list[bytes], bytes]]] = {}
        self.final: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Every check before round 0: config, datasites, schema, layout, ledger, checkpoint."""
        check_checkpoint_presence(
            self.paths.checkpoint, resume=self.resume, logdir=self.logdir, what="deployment"
        )
        started = time.monotonic()
        self.meta = connect_all(self.datasites, timeout=self.fl.client_timeout, log=self.log)
        self.log(
            f"deploy: {sum(ds.connected for ds in self.datasites.values())} datasite(s) connected in "
            f"{time.monotonic() - started:.1f}s"
        )
        rows = [ds.rows if ds.connected else 0 for _, ds in sorted(self.datasites.items())]
        sizes = np.array([max(1, r) for r in rows], dtype=np.int64)
        # delta as the simulation resolves it for its clients (below 1/N of the largest client)
        partition = Partition(
            kind="deploy", order=np.arange(int(sizes.sum())), offsets=np.concatenate([[0], np.cumsum(sizes)])
        )
        self.client_privacy = client_privacy_config(self.config, partition)
        self.client_config = dataclasses.replace(
            self.config, privacy=self.client_privacy, syft=None, communications=None
        )
        plan = ModelPlan.build(self.client_config, self.meta)
        self.layout = plan.layout
        self.codec = SecureCodec(self.layout, public_context=self.public_context)
        spec = load_context(self.public_context, role="public").spec
        if spec.quant.max_clients < self.fl.client_num_per_round:
            raise ConfigError(
                f"the public context allows aggregates of {spec.quant.max_clients} clients; "
                f"fl.client_num_per_round = {self.fl.client_num_per_round}"
            )
        fingerprint = config_fingerprint(self.config, ignore=("syft",))
        context_digest = hashlib.sha256(self.public_context).hexdigest()
        if self.resume:
            state = resume_checkpoint(
                self.paths.checkpoint, config_fingerprint=fingerprint, layout_digest=self.layout.digest()
            )
            if state.public_context_digest != context_digest:
                raise FedrecError(f"{self.paths.checkpoint}: the public context differs from the run's")
            if state.round_idx > 0:
                self.sealed_global = self._read_sealed(state.round_idx, state.server_state["sealed_sha256"])
                self.download_bytes = len(self.sealed_global)
        else:
            initial = initial_global_model(self.client_config, self.meta)
            state = initial_state(
                global_digest=params_digest(initial),
                config_fingerprint=fingerprint,
                layout_digest=self.layout.digest(),
                public_context_digest=context_digest,
                server_state={"run_id": f"{fingerprint}-{uuid.uuid4().hex[:8]}"},
            )
            del initial
        self.state = state
        self.ledger = open_ledger(
            self.logdir,
            self.config,
            delta=self.client_privacy.delta,
            accountant=self.client_privacy.accountant,
            client_budget=self.config.privacy.epsilon_budget,  # type: ignore[union-attr]
            position=state.ledger_position if self.resume else None,
        )
        started = time.monotonic()
        self.approvals = request_approval(
            self.datasites,
            timeout=self.fl.client_timeout,
            approval_timeout=self.approval_timeout,
            log=self.log,
        )
        self.log(f"deploy: code requests answered in {time.monotonic() - started:.1f}s")
        if not self.resume:
            os.makedirs(self.paths.root, exist_ok=True)
            self._save_checkpoint()

    @property
    def run_id(self) -> str:
        return str(self.state.server_state["run_id"])

    # ------------------------------------------------------------------ per-client work
    def round_request(
        self,
        client: int,
        round_idx: int,
        attempt: int,
        *,
        aggregate: bytes | None = None,
        contributions: dict[int, tuple[list[bytes], bytes]] | None = None,
    ) -> dict:
        return RoundRequest(
            run_id=self.run_id,
            config=self.client_config,
            meta=self.meta,
            round_idx=round_idx,
            attempt=attempt,
            client_id=client,
            global_model=self.sealed_global,
            global_digest=self.state.global_digest,
            aggregate=aggregate,
            contributions=contributions,
        ).to_wire()

    def train_on(self, client: int, request: dict) -> Any:
        """Connect if needed, check approval, run the training function (in a worker thread)."""
        datasite = self.datasites[client]
        if not datasite.connected:
            datasite.connect()
        if TRAIN_FUNCTION not in datasite.code_ids:
            status = datasite.approval()
            if status.get(TRAIN_FUNCTION) != "approved":
                raise DeployError(
                    f"training code not approved on this datasite ({status.get(TRAIN_FUNCTION)})"
                )
        return datasite.call(TRAIN_FUNCTION, request)

    def apply_on_datasites(self, closed: ClosedRound) -> dict[str, Any]:
        """The apply step on the first datasite that does it (survivors first, then the others)."""
        round_idx, survivors = closed.round_idx, closed.survivors
        order = list(survivors) + [c for c in sorted(self.datasites) if c not in survivors]
        errors = []
        for client in order:
            datasite = self.datasites[client]
            shown = self.contributions.get((round_idx, closed.attempt), {})  # signed, for the decrypter
            request = self.round_request(
                client, round_idx, closed.attempt, aggregate=closed.payload, contributions=shown
            )

            def apply(ds: DatasiteClient = datasite, req: dict = request) -> Any:
                if not ds.connected:
                    ds.connect()
                if APPLY_FUNCTION not in ds.code_ids and ds.approval().get(APPLY_FUNCTION) != "approved":
                    raise DeployError("apply code not approved on this datasite")
                return ds.call(APPLY_FUNCTION, req)

            started = time.monotonic()
            try:
                output = call_in_thread(apply).result(timeout=self.fl.client_timeout)
                checked = validate_apply_output(
                    output, round_idx=round_idx, size=self.layout.size, num_clients=closed.num_clients
                )
            except (cf.TimeoutError, Exception) as err:
                errors.append(f"client {client}: {one_line(err)}")
                self.log(f"deploy: round {round_idx}: apply on datasite {client} failed: {one_line(err)}")
                continue
            if checked["dropped"]:
                self.log(
                    f"deploy: round {round_idx}: datasite {client} left out malformed contributions of "
                    f"clients {checked['dropped']} and applied the other {checked['num_clients']}"
                )
            return {**checked, "client": client, "seconds": time.monotonic() - started}
        raise DeployError(f"round {round_idx}: no datasite applied the aggregate ({'; '.join(errors[:3])})")

    # ------------------------------------------------------------------ rounds
    def engine(self) -> RoundEngine:
        """The round engine over this coordinator's datasites (after :meth:`prepare`)."""
        sizes = [self.datasites[c].rows if self.datasites[c].connected else 1 for c in sorted(self.datasites)]
        return RoundEngine(
            self.config,
            self.logdir,
            backend=DatasiteBackend(self),
            codec=self.codec,
            state=self.state,
            checkpoint=self.paths.checkpoint,
            algorithm=(self.algorithm_cls, self.algorithm_params),
            ledger=self.ledger,
            client_privacy=self.client_privacy,
            storage=self.paths.root,
            sizes=np.array(sizes),
            log=lambda message: self.log(f"deploy: {message}"),
        )

    def run(self, *, max_rounds: int | None = None) -> dict[str, Any]:
        """Prepare, run the remaining rounds (at most ``max_rounds`` now), write the summary."""
        try:
            try:
                self.prepare()
            except FedrecError as err:
                if self.state is not None and self.codec is not None:
                    self.engine().write_summary(final=None, error=one_line(err))
                raise
            self.final = self.engine().run(max_rounds=max_rounds)
        finally:
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None
        return self.final

    def _save_checkpoint(self) -> None:
        os.makedirs(self.paths.root, exist_ok=True)
        save_checkpoint(self.paths.checkpoint, self.state)

    def _read_sealed(self, round_idx: int, sha256: str) -> bytes:
        path = self.paths.global_model(round_idx)
        try:
            with open(path, "rb") as fh:
                sealed = fh.read()
        except OSError as err:
            raise FedrecError(f"{path}: cannot read the encrypted global model ({err})") from None
        if hashlib.sha256(sealed).hexdigest() != sha256:
            raise FedrecError(f"{path}: the encrypted global model does not match the checkpoint")
        return sealed
