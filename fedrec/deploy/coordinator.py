"""Coordinator side of a deployment: federated rounds over PySyft datasites, holding only public keys.

The coordinator logs into each datasite with the data-scientist account its owner created, reads
the published schema (never rows), submits the two functions of :mod:`fedrec.deploy.functions` and
waits for the owners to approve them (by policy or by hand). Each round it runs the simulation's
round logic: the registered algorithm's aggregator samples clients (deterministic in seed, round and
attempt), the transport here calls ``fedrec_train_round`` on every sampled datasite concurrently
with the sealed global model, checks each output before it touches the aggregate (one list of
wire-format payloads of this round, attempt and client, plus a spend record that matches the
config's DP-SGD), records the spend in the run's ledger copy and adds the payloads to a
:class:`~privacy.encryption.StreamingAggregator` that holds the public context only. Failures are
data (Flower's ``aggregate_fit(results, failures)``): a datasite that is down, raises, answers after
``fl.client_timeout`` or returns anything malformed is a dropped client and the round goes on; too
few survivors (``fl.min_completion_rate``) retry the round with a fresh sample. The encrypted
aggregate then goes to one datasite's ``fedrec_apply_round``, which returns the next global model
sealed under the owners' model key; it is checkpointed and sent with the next round's requests.

The coordinator never receives raw data or plaintext weights: what comes back is ciphertext, sealed
models, digests and spend records. The only plaintext model it builds is round 0's seeded
initialisation (from the config, no data), to learn the parameter layout.

Files under LOGDIR: ``deploy/checkpoint.json`` (atomic, after every round; ``resume=True``
continues), ``deploy/global/round_NNNNNN.sealed`` (the encrypted global models),
``privacy_ledger.sqlite`` (the coordinator's copy of every spend), ``summary.json``, TensorBoard.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedrec.config import ExperimentConfig, config_to_dict
from fedrec.deploy.errors import DeployError, RejectedOutput
from fedrec.deploy.functions import APPLY_FUNCTION, FUNCTIONS, TRAIN_FUNCTION, function_digest, source_digest
from fedrec.deploy.local import DatasiteSpec
from fedrec.deploy.training import PROTOCOL, RoundRequest, initial_global_model, params_digest
from fedrec.errors import ConfigError, FedrecError
from fedrec.federated.server_opt import check_server_optimizer

SPEND_KEYS = {"client", "round", "attempt", "noise_multiplier", "sample_rate", "steps"}
APPLY_KEYS = {"protocol", "round", "global_model", "digest", "num_clients", "error_bound"}


# --------------------------------------------------------------------------------------------------
# Calls with a deadline (PySyft's HTTP client has none)
# --------------------------------------------------------------------------------------------------


def call_in_thread(fn: Callable[[], Any]) -> cf.Future:
    """Run ``fn`` in a daemon thread; the future resolves with its result or exception.

    A datasite that never answers leaves its thread blocked in PySyft's HTTP call; as a daemon it
    neither holds up the round (the caller waits on the future with a deadline) nor the exit.
    """
    future: cf.Future = cf.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:  # handed to the waiting coordinator as data
            future.set_exception(err)

    threading.Thread(target=run, daemon=True, name="fedrec-datasite-call").start()
    return future


def one_line(err: BaseException) -> str:
    text = str(getattr(err, "public_message", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


# --------------------------------------------------------------------------------------------------
# One datasite, seen through a data-scientist account
# --------------------------------------------------------------------------------------------------

# Logged-in PySyft clients of this process by (url, email, password digest): a login costs seconds
# (the datasite hashes the password, then builds the account's whole API), so a process that runs
# several coordinators (a resume, the tests) logs in once per account.
_SESSIONS: dict[tuple[str, str, str], Any] = {}


class DatasiteClient:
    """The coordinator's session with one datasite: login, schema, code requests, calls."""

    def __init__(
        self,
        spec: DatasiteSpec,
        *,
        max_executions: int,
        functions: dict[str, Callable[..., Any]] | None = None,
    ):
        self.spec = spec
        self.client_id = spec.client_id
        self.max_executions = max_executions
        self.functions = dict(functions or FUNCTIONS)
        self.client: Any = None
        self.summary: dict[str, Any] | None = None
        self.train_asset: Any = None
        self.owner_asset: Any = None
        self.code_ids: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DatasiteClient({self.spec!r})"

    @property
    def connected(self) -> bool:
        return self.client is not None

    def connect(self) -> None:
        """Log in and read the published dataset (schema, row count, the assets' handles)."""
        import syft as sy

        from fedrec.deploy.owner import DATASET_NAME, OWNER_ASSET, TRAIN_ASSET

        host, port = _split_url(self.spec.url)
        key = (self.spec.url, self.spec.email, hashlib.sha256(self.spec.password.encode()).hexdigest())
        client = _SESSIONS.get(key)
        try:
            if client is None:
                client = sy.login(
                    url=host, port=port, email=self.spec.email, password=self.spec.password, cache=False
                )
            dataset = client.datasets[DATASET_NAME]
        except Exception:
            if _SESSIONS.pop(key, None) is None:
                raise
            # the session of a datasite that restarted: log in again
            client = sy.login(
                url=host, port=port, email=self.spec.email, password=self.spec.password, cache=False
            )
            dataset = client.datasets[DATASET_NAME]
        _SESSIONS[key] = client
        summary = json.loads(dataset.summary or "{}")
        train_asset = dataset.assets[TRAIN_ASSET]
        owner_asset = dataset.assets[OWNER_ASSET]
        if summary.get("fedrec") != PROTOCOL or summary.get("client_id") != self.client_id:
            raise DeployError(
                f"datasite {self.spec.url}: dataset '{DATASET_NAME}' is for client {summary.get('client_id')!r} "
                f"(protocol {summary.get('fedrec')!r}); expected client {self.client_id}, protocol {PROTOCOL}"
            )
        if not isinstance(summary.get("rows"), int) or summary["rows"] < 1:
            raise DeployError(f"datasite {self.spec.url}: dataset summary has no row count")
        self.client, self.summary = client, summary
        self.train_asset, self.owner_asset = train_asset, owner_asset

    @property
    def rows(self) -> int:
        assert self.summary is not None
        return int(self.summary["rows"])

    @property
    def meta(self) -> dict[str, Any]:
        assert self.summary is not None
        return dict(self.summary.get("meta") or {})

    def _requests_by_function(self) -> dict[str, list[tuple[Any, str]]]:
        """Our own code requests on this datasite: name -> [(UserCode, status), ...] with our digests."""
        from syft.service.request.request import RequestStatus

        digests = {name: function_digest(fn) for name, fn in self.functions.items()}
        found: dict[str, list[tuple[Any, str]]] = {name: [] for name in self.functions}
        for request in self.client.requests:
            code = request.code
            name = str(code.service_func_name)
            if name in digests and source_digest(str(code.raw_code)) == digests[name]:
                status = request.status
                label = {RequestStatus.APPROVED: "approved", RequestStatus.REJECTED: "denied"}.get(
                    status, "pending"
                )
                found[name].append((code, label))
        return found

    def submit(self) -> None:
        """Request execution of every function not already requested here (whatever the answer was)."""
        from fedrec.deploy.functions import syft_functions

        existing = self._requests_by_function()
        # PySyft refuses a second request for identical code: a denied one stays the request, and the
        # owner approves it by pinning its digest (the owner's daemon reconsiders it then).
        missing = [name for name, entries in existing.items() if not entries]
        if not missing:
            return
        wrapped = syft_functions(
            self.client,
            self.train_asset,
            self.owner_asset,
            max_executions=self.max_executions,
            functions={name: self.functions[name] for name in missing},
        )
        for name in missing:
            result = self.client.code.request_code_execution(wrapped[name])
            if type(result).__name__ == "SyftError":
                raise DeployError(f"datasite {self.spec.url}: request for {name} refused: {result}")

    def approval(self) -> dict[str, str]:
        """``name -> 'approved' | 'pending' | 'denied'``; remembers the approved code ids."""
        found = self._requests_by_function()
        status = {}
        for name, entries in found.items():
            approved = [code for code, label in entries if label == "approved"]
            if approved:
                self.code_ids[name] = approved[-1].id
                status[name] = "approved"
            elif any(label == "pending" for _, label in entries):
                status[name] = "pending"
            else:
                status[name] = "denied" if entries else "missing"
        return status

    def call(self, name: str, request: dict[str, Any]) -> Any:
        """Run approved function ``name`` on this datasite; returns its output (plain data)."""
        with self._lock:
            if name not in self.code_ids:
                raise DeployError(f"{name} is not approved on this datasite")
            endpoint = getattr(self.client.code, name, None)
            if endpoint is None or endpoint.user_code_id != self.code_ids[name]:
                raise DeployError(
                    f"the datasite's endpoint {name} is not the approved code (a newer submission shadows it)"
                )
            kwargs: dict[str, Any] = {"owner": self.owner_asset, "request": request}
            if (
                "data"
                in self.functions[name].__code__.co_varnames[: self.functions[name].__code__.co_argcount]
            ):
                kwargs["data"] = self.train_asset
            result = endpoint(**kwargs)
            if type(result).__name__ == "SyftError":
                raise DeployError(str(result))
            value = result.get() if hasattr(result, "get") and callable(result.get) else result
        if type(value).__name__ in ("SyftError", "Err"):
            raise DeployError(str(value))
        return value


def refuse_user_dp(config: ExperimentConfig) -> None:
    """fl.user_dp is not honoured on datasites (owners do not clip and noise whole updates): refuse it."""
    if config.fl is not None and config.fl.user_dp is not None:
        raise ConfigError(
            "config key 'fl.user_dp': user-level DP-FedAvg is not supported in deployment yet (datasites "
            "do not clip and noise whole updates); set fl.user_dp=null or use scripts/train_fl.py"
        )


def _split_url(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ConfigError(f"datasite url {url!r}: expected http://host:port")
    return f"{parts.scheme}://{parts.hostname}", int(parts.port)


# --------------------------------------------------------------------------------------------------
# Checking what datasites return (before anything touches the aggregate)
# --------------------------------------------------------------------------------------------------


def expected_spend(config: ExperimentConfig, rows: int) -> dict[str, Any]:
    """The DP-SGD spend a client with ``rows`` examples makes in one round under ``config``."""
    privacy = config.privacy
    assert privacy is not None and privacy.noise_multiplier is not None and config.fl is not None
    rate = (
        privacy.sample_rate
        if privacy.sample_rate is not None
        else min(1.0, config.train.batch_size / max(1, rows))
    )
    steps = config.fl.local_epochs * max(1, math.ceil(1.0 / rate))
    if config.fl.local_steps is not None:
        steps = min(steps, config.fl.local_steps)
    return {
        "noise_multiplier": float(privacy.noise_multiplier),
        "sample_rate": float(rate),
        "steps": int(steps),
    }


def validate_train_output(
    output: Any,
    *,
    client_id: int,
    round_idx: int,
    attempt: int,
    aggregator: Any,
    spend: dict[str, Any],
) -> tuple[list[bytes], dict[str, Any]]:
    """The payloads and spend of a well-formed output of this round, or RejectedOutput (nothing added).

    Checks the structure, every chunk's header (kind, parameters, schema, round, client, chunk index
    and count, ciphertext count), every ciphertext's SEAL framing, and that the spend record is the
    one the config implies for this client.
    """
    from privacy.encryption import wire
    from privacy.encryption.client import _check_binding, max_ciphertext_bytes
    from privacy.errors import EncryptionError

    if not isinstance(output, dict) or set(output) != {"protocol", "update", "spend"}:
        keys = sorted(output) if isinstance(output, dict) else type(output).__name__
        raise RejectedOutput(f"output {keys}: expected a dict with exactly protocol, update, spend")
    if output["protocol"] != PROTOCOL:
        raise RejectedOutput(f"output protocol {output['protocol']!r}: expected {PROTOCOL}")
    payloads = output["update"]
    layout = aggregator.spec.chunk_layout(aggregator.schema.size)
    if (
        not isinstance(payloads, list)
        or len(payloads) != len(layout)
        or not all(isinstance(p, bytes) for p in payloads)
    ):
        raise RejectedOutput(f"update: expected a list of {len(layout)} byte strings (one per chunk)")
    max_ct = max_ciphertext_bytes(aggregator.spec)
    tag = aggregator.round_idx
    try:
        for index, payload in enumerate(payloads):
            n_ct = layout[index][2]
            header, body = wire.decode(payload, max_body=n_ct * (max_ct + 4))
            if header.kind != wire.KIND_UPDATE:
                raise RejectedOutput(f"chunk {index}: payload kind {header.kind}, expected an update")
            _check_binding(header, aggregator.spec, aggregator.schema, tag)
            if header.client_id != client_id:
                raise RejectedOutput(
                    f"chunk {index}: payload of client {header.client_id}, sent by client {client_id}"
                )
            if (header.chunk_index, header.chunk_count, header.num_ciphertexts) != (index, len(layout), n_ct):
                raise RejectedOutput(
                    f"chunk {index}: header says chunk {header.chunk_index} of {header.chunk_count} with "
                    f"{header.num_ciphertexts} ciphertexts; expected chunk {index} of {len(layout)} with {n_ct}"
                )
            wire.split_ciphertexts(body, n_ct, max_ciphertext=max_ct)
    except EncryptionError as err:
        raise RejectedOutput(f"update: {err}") from None
    record = output["spend"]
    if not isinstance(record, dict) or set(record) != SPEND_KEYS:
        raise RejectedOutput(f"spend record: expected keys {sorted(SPEND_KEYS)}")
    wanted = {"client": client_id, "round": round_idx, "attempt": attempt, **spend}
    for key, value in wanted.items():
        got = record[key]
        same = (
            isinstance(got, float | int)
            and not isinstance(got, bool)
            and math.isclose(float(got), value, rel_tol=1e-12)
            if isinstance(value, float)
            else type(got) is int and got == value
        )
        if not same:
            raise RejectedOutput(f"spend record {key}={got!r}: expected {value!r}")
    return payloads, record


def validate_apply_output(output: Any, *, round_idx: int, size: int, num_clients: int) -> dict[str, Any]:
    """The sealed next global model and its digest, or RejectedOutput."""
    from fedrec.deploy.sealed import OVERHEAD, sealed_round

    if not isinstance(output, dict) or set(output) != APPLY_KEYS or output["protocol"] != PROTOCOL:
        raise RejectedOutput(f"apply output: expected a dict with exactly {sorted(APPLY_KEYS)}")
    sealed = output["global_model"]
    if (
        not isinstance(sealed, bytes)
        or len(sealed) != OVERHEAD + 4 * size
        or sealed_round(sealed) != round_idx + 1
    ):
        raise RejectedOutput(
            f"apply output: not a sealed global model of round {round_idx + 1} with {size} values"
        )
    digest = output["digest"]
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise RejectedOutput("apply output: digest is not a sha256 hex string")
    if output["round"] != round_idx + 1 or output["num_clients"] != num_clients:
        raise RejectedOutput(
            f"apply output: round {output['round']!r} of {output['num_clients']!r} clients; expected round "
            f"{round_idx + 1} of {num_clients}"
        )
    bound = output["error_bound"]
    if not isinstance(bound, float) or not math.isfinite(bound) or bound < 0:
        raise RejectedOutput(f"apply output: error bound {bound!r} is not a finite number >= 0")
    return output


# --------------------------------------------------------------------------------------------------
# The transport the algorithm's aggregator uses
# --------------------------------------------------------------------------------------------------


class DatasiteTransport:
    """``request_models`` for the aggregator: train on the sampled datasites, stream into the sum."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    async def request_models(self, worker: Any, neighbour_ids: Sequence[Any]) -> Any:
        from fedrec.federated.private_store import attempt_tag
        from fedrec.federated.worker import ClientFailure, ClientResult, RoundResults
        from privacy.encryption.aggregator import StreamingAggregator

        co = self.coordinator
        round_idx, attempt = worker.round_idx, worker.attempt
        tag = attempt_tag(round_idx, attempt)
        running = StreamingAggregator(co.public_context, co.schema, round_idx=tag)
        timeout = co.fl.client_timeout
        sampled = sorted(int(c) for c in neighbour_ids)
        started = time.monotonic()
        waiting: dict[asyncio.Future, int] = {}
        for client in sampled:
            request = co.round_request(client, round_idx, attempt)
            future = call_in_thread(functools.partial(co.train_on, client, request))
            waiting[asyncio.wrap_future(future)] = client
        results: list[Any] = []
        failures: list[Any] = []
        while waiting:
            remaining = started + timeout - time.monotonic()
            done, _ = await asyncio.wait(
                list(waiting), timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for waiter in done:
                client = waiting.pop(waiter)
                elapsed = time.monotonic() - started
                try:
                    output = waiter.result()
                except Exception as err:
                    failures.append(ClientFailure(client, "error", one_line(err), elapsed))
                    continue
                try:
                    added = co.accept(client, output, round_idx, attempt, running)
                except RejectedOutput as err:
                    failures.append(ClientFailure(client, "rejected", one_line(err), elapsed))
                    continue
                except FedrecError as err:  # e.g. the coordinator's ledger refuses the spend
                    failures.append(ClientFailure(client, "refused", one_line(err), elapsed))
                    continue
                rows = co.datasites[client].rows
                results.append(
                    ClientResult(
                        client_id=client,
                        num_examples=rows,
                        weight=float(rows),
                        train_loss=float("nan"),  # computed on private rows: not released by the datasite
                        steps=int(added["steps"]),
                        seconds=elapsed,
                        bytes_sent=int(added["bytes"]),
                        bytes_received=co.download_bytes,
                        rank=0,
                    )
                )
        for client in waiting.values():
            failures.append(
                ClientFailure(
                    client,
                    "timeout",
                    f"no answer within fl.client_timeout={timeout}s",
                    time.monotonic() - started,
                )
            )
        results.sort(key=lambda r: r.client_id)
        failures.sort(key=lambda f: f.client_id)
        return RoundResults(round_idx, attempt, tuple(sampled), results, failures, running)


# --------------------------------------------------------------------------------------------------
# The coordinator
# --------------------------------------------------------------------------------------------------


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
        from fedrec.federated.worker import algorithm_params
        from privacy.encryption.context import load_context

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
        from fedrec import registry

        self.algorithm_cls = registry.lookup("fl_algo", fl.algorithm)
        self.algorithm_params = algorithm_params(self.algorithm_cls, fl.algorithm_params)
        self.state: Any = None
        self.ledger: Any = None
        self.writer: Any = None
        self.download_bytes = 0
        self.sealed_global: bytes | None = None
        self.final: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def connect(self) -> None:
        """Log into every datasite concurrently; a datasite that fails stays a dropped client."""
        futures = {cid: call_in_thread(ds.connect) for cid, ds in self.datasites.items()}
        for cid, future in futures.items():
            try:
                future.result(timeout=self.fl.client_timeout)
            except Exception as err:
                self.log(
                    f"deploy: datasite {cid} ({self.datasites[cid].spec.url}) unreachable: {one_line(err)}"
                )
        connected = [ds for ds in self.datasites.values() if ds.connected]
        if not connected:
            raise DeployError("no datasite could be reached; see the messages above")
        metas = {json.dumps(ds.meta, sort_keys=True) for ds in connected}
        if len(metas) != 1:
            raise DeployError(
                "datasites publish different data schemas (model metadata); one federation needs one"
            )
        self.meta = connected[0].meta

    def request_approval(self) -> None:
        """Submit the functions everywhere and wait (up to syft.approval_timeout) for the owners."""
        futures = {cid: call_in_thread(ds.submit) for cid, ds in self.datasites.items() if ds.connected}
        for cid, future in futures.items():
            try:
                future.result(timeout=self.fl.client_timeout)
            except Exception as err:
                self.log(f"deploy: datasite {cid}: code request failed: {one_line(err)}")
        deadline = time.monotonic() + self.approval_timeout
        pending = {cid for cid, ds in self.datasites.items() if ds.connected}
        status: dict[int, dict[str, str]] = {}
        while pending and time.monotonic() < deadline:
            for cid in sorted(pending):
                try:
                    status[cid] = self.datasites[cid].approval()
                except Exception as err:
                    status[cid] = {"error": one_line(err)}
                if all(s in ("approved", "denied") for s in status[cid].values()):
                    pending.discard(cid)
            if pending:
                time.sleep(0.5)
        self.approvals = status
        for cid, functions in sorted(status.items()):
            if any(s != "approved" for s in functions.values()):
                self.log(
                    f"deploy: datasite {cid}: code not approved ({functions}); it will be a dropped client"
                )
        if not any(all(s == "approved" for s in f.values()) for f in status.values()):
            raise DeployError(
                f"no datasite approved the training code within {self.approval_timeout}s: {status}"
            )

    def prepare(self) -> None:
        """Every check before round 0: config, datasites, schema, layout, ledger, checkpoint."""
        from fedrec.data.partition import Partition
        from fedrec.deploy.training import ModelPlan
        from fedrec.experiment import config_fingerprint
        from fedrec.federated.checkpoint import (
            AggregatorState,
            capture_rng,
            check_checkpoint_presence,
            check_resume,
            load_checkpoint,
            restore_rng,
        )
        from fedrec.federated.clients import client_privacy_config
        from privacy.encryption.context import load_context
        from privacy.encryption.schema import UpdateSchema

        check_checkpoint_presence(
            self.paths.checkpoint, resume=self.resume, logdir=self.logdir, what="deployment"
        )
        started = time.monotonic()
        self.connect()
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
        self.schema = UpdateSchema(self.layout.entries)
        spec = load_context(self.public_context, role="public").spec
        if spec.quant.max_clients < self.fl.client_num_per_round:
            raise ConfigError(
                f"the public context allows aggregates of {spec.quant.max_clients} clients; "
                f"fl.client_num_per_round = {self.fl.client_num_per_round}"
            )
        fingerprint = config_fingerprint(self.config, ignore=("syft",))
        context_digest = hashlib.sha256(self.public_context).hexdigest()
        if self.resume:
            state = load_checkpoint(self.paths.checkpoint)
            check_resume(
                state,
                config_fingerprint=fingerprint,
                layout_digest=self.layout.digest(),
                path=self.paths.checkpoint,
            )
            if state.public_context_digest != context_digest:
                raise FedrecError(f"{self.paths.checkpoint}: the public context differs from the run's")
            if state.round_idx > 0:
                self.sealed_global = self._read_sealed(state.round_idx, state.server_state["sealed_sha256"])
                self.download_bytes = len(self.sealed_global)
            restore_rng(state.rng)
        else:
            initial = initial_global_model(self.client_config, self.meta)
            state = AggregatorState(
                round_idx=0,
                global_digest=params_digest(initial),
                config_fingerprint=fingerprint,
                layout_digest=self.layout.digest(),
                rng=capture_rng(),
                public_context_digest=context_digest,
                server_state={"run_id": f"{fingerprint}-{uuid.uuid4().hex[:8]}"},
            )
            del initial
        self.state = state
        self._open_ledger()
        started = time.monotonic()
        self.request_approval()
        self.log(f"deploy: code requests answered in {time.monotonic() - started:.1f}s")
        if not self.resume:
            os.makedirs(self.paths.root, exist_ok=True)
            self._save_checkpoint()

    def _open_ledger(self) -> None:
        from privacy.ledger import PrivacyLedger, ledger_path

        privacy = self.client_privacy
        self.ledger = PrivacyLedger.open(
            ledger_path(self.logdir),
            delta=privacy.delta,
            accountant=privacy.accountant if privacy.accountant in ("rdp", "prv") else "rdp",
            client_epsilon_budget=self.config.privacy.epsilon_budget,  # type: ignore[union-attr]
            config=config_to_dict(self.config),
        )
        if self.resume and self.state.ledger_position:
            spends = len(self.ledger.client_spends())
            if spends < self.state.ledger_position.get("client_spends", 0):
                raise FedrecError(
                    f"{self.ledger.path}: fewer spends than the checkpoint recorded (ledger replaced?)"
                )
        self.max_epsilon = max(self.ledger.epsilons().values(), default=0.0)

    @property
    def run_id(self) -> str:
        return str(self.state.server_state["run_id"])

    # ------------------------------------------------------------------ per-client work
    def round_request(
        self, client: int, round_idx: int, attempt: int, *, aggregate: bytes | None = None
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

    def accept(self, client: int, output: Any, round_idx: int, attempt: int, running: Any) -> dict[str, Any]:
        """Validate, record the spend, then add to the running sum (in that order)."""
        from privacy.ledger import ClientSpend

        spend = expected_spend(self.client_config, self.datasites[client].rows)
        payloads, record = validate_train_output(
            output, client_id=client, round_idx=round_idx, attempt=attempt, aggregator=running, spend=spend
        )
        self.ledger.record_client_spends(
            [
                ClientSpend(
                    str(client), round_idx, record["noise_multiplier"], record["sample_rate"], record["steps"]
                )
            ]
        )
        try:
            for payload in payloads:
                running.add(payload)
        except Exception as err:  # SEAL refused a ciphertext: the earlier chunks are in (allow_partial)
            raise RejectedOutput(f"update: {one_line(err)}") from None
        return {"steps": record["steps"], "bytes": sum(len(p) for p in payloads)}

    def apply_on_datasites(
        self, closed: Any, round_idx: int, attempt: int, survivors: Sequence[int]
    ) -> dict[str, Any]:
        """The apply step on the first datasite that does it (survivors first, then the others)."""
        order = list(survivors) + [c for c in sorted(self.datasites) if c not in survivors]
        errors = []
        for client in order:
            datasite = self.datasites[client]
            request = self.round_request(client, round_idx, attempt, aggregate=closed.aggregate)

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
            return {**checked, "client": client, "seconds": time.monotonic() - started}
        raise DeployError(f"round {round_idx}: no datasite applied the aggregate ({'; '.join(errors[:3])})")

    # ------------------------------------------------------------------ rounds
    def run(self, *, max_rounds: int | None = None) -> dict[str, Any]:
        """Prepare, run the remaining rounds (at most ``max_rounds`` now), write the summary."""
        from fedrec.experiment import open_writer

        try:
            self.prepare()
            self.writer = open_writer(self.logdir)
            asyncio.run(self._rounds(max_rounds))
        except FedrecError as err:
            if self.state is not None and hasattr(self, "layout"):
                self._write_summary(final=None, error=one_line(err))
            raise
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None
        return self.final or {}

    async def _rounds(self, max_rounds: int | None) -> None:
        from fedrec.federated.worker import ClientDirectory

        sizes = np.array(
            [self.datasites[c].rows if self.datasites[c].connected else 1 for c in sorted(self.datasites)]
        )
        aggregator = self.algorithm_cls(
            "aggregator",
            ("aggregator",),
            config=self.config,
            in_neighbours=ClientDirectory(sizes),
            persistent_storage=self.paths.root,
            comm=DatasiteTransport(self),
            round_idx=self.state.round_idx,
            params=self.algorithm_params,
        )
        done = 0
        while aggregator.round_idx < self.fl.rounds and (max_rounds is None or done < max_rounds):
            record = await self._one_round(aggregator)
            done += 1
            self.log(
                f"deploy: round {record['round']}: {record['completed']}/{record['sampled']} datasites, "
                f"{record['round_seconds']:.1f}s, epsilon {record['epsilon']:.4g}"
            )
        self.final = self._final_summary()

    async def _one_round(self, aggregator: Any) -> dict[str, Any]:
        from fedrec.federated.checkpoint import capture_rng

        fl, state = self.fl, self.state
        round_idx = aggregator.round_idx
        started = time.perf_counter()
        attempts: list[Any] = []
        while aggregator.round_idx == round_idx:
            if aggregator.attempt > fl.max_round_retries:
                last = attempts[-1]
                first = last.failures[0].message if last.failures else "none"
                raise DeployError(
                    f"round {round_idx}: too few datasites returned in {len(attempts)} attempts (last: {len(last)} of "
                    f"{len(last.sampled)}; fl.min_completion_rate={fl.min_completion_rate}); first failure: {first}"
                )
            await aggregator.run()
            attempts.append(aggregator.last_results)
        results = attempts[-1]
        closed = results.aggregate.close()
        survivors = [r.client_id for r in results.results]
        applied = await asyncio.to_thread(
            self.apply_on_datasites, closed, round_idx, results.attempt, survivors
        )
        sealed = applied["global_model"]
        path = self.paths.global_model(round_idx + 1)
        from fedrec.deploy.keys import write_private_bytes

        write_private_bytes(path, sealed, mode=0o644)
        self.sealed_global = sealed
        self.download_bytes = len(sealed)
        epsilon = self._epsilon(attempts)
        from fedrec.federated.worker import round_outcome

        record = {
            **round_outcome(round_idx, attempts),
            "round_seconds": time.perf_counter() - started,
            "apply_seconds": float(applied["seconds"]),
            "apply_datasite": applied["client"],
            "aggregate_bytes": len(closed.aggregate),
            "aggregate_clients": int(closed.num_clients),
            "epsilon": epsilon,
            "aggregate_error_bound": float(applied["error_bound"]),
            "global_digest": applied["digest"],
        }
        state.round_idx = round_idx + 1
        state.global_digest = applied["digest"]
        state.server_state["sealed_sha256"] = hashlib.sha256(sealed).hexdigest()
        state.history.append(record)
        state.rng = capture_rng()
        state.ledger_position = {"client_spends": len(self.ledger.client_spends())}
        self._save_checkpoint()  # the round is committed here
        stale = self.paths.global_model(round_idx - 1)
        if round_idx >= 1 and os.path.exists(stale):
            os.remove(stale)
        self._log_round(record)
        self._write_summary(final=None)
        return record

    def _epsilon(self, attempts: list[Any]) -> float:
        for client in sorted({c for attempt in attempts for c in attempt.sampled}):
            self.max_epsilon = max(self.max_epsilon, self.ledger.client_epsilon(client))
        return float(self.max_epsilon)

    def _save_checkpoint(self) -> None:
        from fedrec.federated.checkpoint import save_checkpoint

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

    def _log_round(self, record: dict[str, Any]) -> None:
        step = record["round"] + 1
        for name, key in (
            ("fl/sampled", "sampled"),
            ("fl/completed", "completed"),
            ("fl/dropped", "dropped"),
            ("fl/attempts", "attempts"),
            ("fl/round_seconds", "round_seconds"),
            ("fl/bytes_sent", "bytes_sent"),
            ("privacy/epsilon", "epsilon"),
        ):
            value = record[key]
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def _final_summary(self) -> dict[str, Any]:
        state = self.state
        final = {
            "rounds_completed": state.round_idx,
            "epsilon": state.history[-1]["epsilon"] if state.history else None,
            "final_model": self.paths.global_model(state.round_idx) if state.round_idx > 0 else None,
            "final_model_digest": state.global_digest,
            "final_model_encrypted": True,
        }
        self._write_summary(final=final)
        return final

    def _write_summary(self, final: dict[str, Any] | None, error: str | None = None) -> str:
        from fedrec.experiment import write_summary

        state = self.state
        results: dict[str, Any] = {"rounds": state.history, "final": final}
        if error is not None:
            results["error"] = error
        privacy = self.client_privacy
        return write_summary(
            self.logdir,
            self.config,
            results,
            deployment={
                "mode": "pysyft",
                "run_id": self.run_id,
                "datasites": [
                    {
                        "client_id": cid,
                        "url": ds.spec.url,
                        "rows": ds.rows if ds.connected else None,
                        "approval": getattr(self, "approvals", {}).get(cid),
                    }
                    for cid, ds in sorted(self.datasites.items())
                ],
                "functions": {name: function_digest(fn) for name, fn in FUNCTIONS.items()},
                "max_executions": self.max_executions,
                "model_parameters_shared": self.layout.size,
                "coordinator_holds": "public context only; updates encrypted (BFV), global model sealed (AES-GCM)",
                "public_context_sha256": state.public_context_digest,
                "privacy": {
                    "level": "example (DP-SGD on each datasite)",
                    "epsilon_max_over_clients": getattr(self, "max_epsilon", None),
                    "delta": privacy.delta,
                    "noise_multiplier": privacy.noise_multiplier,
                    "max_grad_norm": privacy.max_grad_norm,
                    "accountant": privacy.accountant,
                    "ledger": os.path.join(self.logdir, "privacy_ledger.sqlite"),
                    "owner_ledgers": "each owner's privacy_ledger.sqlite (authoritative for its budget)",
                },
            },
        )
