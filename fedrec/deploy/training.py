"""What an approved syft function runs on a datasite: one client's local round, and the apply step.

These are plain functions (no PySyft): the syft functions in :mod:`fedrec.deploy.functions` are
two-line wrappers that call them on the datasite, and the tests call the same functions in-process.
They are built from the federated simulation's own parts (the registered FedAvg worker, the local
DP-SGD trainer, the per-(round, client) seeds, the secure codec and its quantisation generator), so
a deployment and ``scripts/train_fl.py`` with the same config and seeds compute the same rounds.

``train_round(data, owner, request)``: open the sealed global model with the owner's model key (round
0: build the initial model from the config, as the simulation does), run local DP-SGD on the owner's
rows, record the spend in the owner's own privacy ledger (durable before anything is returned; over
the owner's budget nothing is returned), quantise and BFV-encrypt the update with the owner's secret
context. Returns only the encrypted update (wire format of :mod:`privacy.encryption.wire`) and the
spend record.

``apply_round(owner, request)``: decrypt the round's encrypted aggregate (refused below the owner's
minimum number of contributors), apply the algorithm's server rule to the global model and seal the
new global model for the next round. Returns the sealed model and its digest; never plaintext.

Inputs: ``data`` is the owner's private asset (``name -> array``, the rows of one partition);
``owner`` is the owner's secret asset (client id, secret context, model key, ledger path, minimum
aggregate size), which has no mock, so PySyft runs these functions on private inputs only;
``request`` is a plain dict from the coordinator (protocol version, run id, config, model metadata,
round, attempt, client id, sealed global model and its digest; ``aggregate`` for the apply step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec import registry
from fedrec.config import config_to_dict
from fedrec.config.loader import build_experiment
from fedrec.data.base import ArraySplit, ProcessedData
from fedrec.deploy.errors import DeployError
from fedrec.deploy.sealed import open_global_model, seal_global_model
from fedrec.errors import FedrecError
from fedrec.experiment import build_model
from fedrec.federated.client_round import (
    apply_mean_update,
    attempt_tag,
    client_seed,
    local_dp_trainer_class,
    local_users,
    public_initialisation,
    quantisation_rng,
    reconstruct,
)
from fedrec.federated.codec import SecureCodec
from fedrec.federated.ranks import import_modules
from fedrec.federated.run import params_digest
from fedrec.federated.worker import GlobalModel, Neighbour, ParamLayout, algorithm_params
from fedrec.trainers.base_trainer import optimizer_supports_sparse
from privacy.encryption.client import EncryptionClient
from privacy.encryption.schema import UpdateSchema
from privacy.encryption.signing import recompute_aggregate, sign_contribution
from privacy.errors import EncryptionError
from privacy.ledger import PrivacyLedger

# The coordinator <-> datasite format (round request, train and apply outputs, the dataset summary's
# "fedrec" field), checked by both sides. 2: signed contributions and the apply step's contribution
# list, the outputs' noise_source and dropped ids, the request's import_modules, public FedAvg
# weights in the update header (wire v2), the owner's noise source (issue 14). A coordinator and a
# datasite of different protocols refuse each other at connect instead of failing mid-round.
PROTOCOL = 2
# Dataset facts a model is sized from: public schema, not statistics of anyone's rows.
MODEL_META_KEYS = (
    "dataset",
    "task",
    "num_dense",
    "num_sparse",
    "table_sizes",
    "num_users",
    "num_items",
    "rating_min",
    "rating_max",
)


def model_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a dataset's metadata that sizes a model (JSON-able)."""
    out: dict[str, Any] = {}
    for key in MODEL_META_KEYS:
        if key in meta:
            value = meta[key]
            out[key] = [int(v) for v in value] if isinstance(value, list | tuple) else value
    return out


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """The value itself: PySyft may hand approved code an ActionObject that wraps it."""
    wrapped = getattr(value, "syft_action_data", None)
    return value if wrapped is None else wrapped


def is_mock_run(owner: Any) -> bool:
    """True on PySyft's second run of approved code, over the assets' mocks.

    PySyft runs approved code on the private inputs and again on their mocks (the result's mock
    side). The owner asset has no mock (an empty value), so that run has no keys and computes
    nothing: it returns :data:`MOCK_RUN_OUTPUT`, which no coordinator accepts as an update.
    """
    return type(plain(owner)).__name__ == "ActionDataEmpty"


MOCK_RUN_OUTPUT = {"protocol": PROTOCOL, "mock_run": True}


@dataclass(frozen=True)
class OwnerSecrets:
    """The owner's secret asset as the datasite code sees it."""

    client_id: int
    secret_context: bytes
    model_key: bytes
    ledger: str
    min_aggregate_clients: int
    signing_key: bytes  # this owner's Ed25519 key: signs its encrypted updates
    registered_keys: dict[int, bytes]  # every owner's public key, registered at join
    allowed_modules: tuple[str, ...] = ()  # the owner policy's allowed_modules (absent: none)
    reproducible_noise: bool = False  # the owner policy's reproducible_noise (absent: own CSPRNG)

    @classmethod
    def from_asset(cls, owner: Any) -> OwnerSecrets:
        if not isinstance(owner, Mapping):
            raise DeployError(f"owner asset of type {type(owner).__name__}: expected a mapping")
        try:
            secrets = cls(
                client_id=int(owner["client_id"]),
                secret_context=bytes(owner["secret_context"]),
                model_key=bytes(owner["model_key"]),
                ledger=str(owner["ledger"]),
                min_aggregate_clients=int(owner["min_aggregate_clients"]),
                signing_key=bytes(owner["signing_key"]),
                registered_keys={int(c): bytes(k) for c, k in dict(owner["registered_keys"]).items()},
                allowed_modules=tuple(str(m) for m in owner.get("allowed_modules") or ()),
                reproducible_noise=owner.get("reproducible_noise", False) is True,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DeployError(
                f"owner asset: missing or malformed field ({type(err).__name__}: {err})"
            ) from None
        if not secrets.ledger:
            raise DeployError(
                "owner asset has no privacy ledger path: no update may leave without a ledger record"
            )
        return secrets

    def __repr__(self) -> str:  # never print key bytes
        return f"OwnerSecrets(client_id={self.client_id}, ledger={self.ledger!r})"


@dataclass(frozen=True)
class RoundRequest:
    """The coordinator's request for one round (the non-private argument of the syft functions)."""

    run_id: str
    config: Any  # ExperimentConfig (its privacy section already resolved for clients)
    meta: dict[str, Any]
    round_idx: int
    attempt: int
    client_id: int
    global_model: bytes | None  # sealed model of round_idx; None in round 0 (built from the config)
    global_digest: str | None
    aggregate: bytes | None = None  # the apply step: the round's encrypted aggregate (informational)
    # The apply step: every contribution in the aggregate as the coordinator received it, signed by its
    # owner: ``client id -> (payloads, signature)``. The decrypting owner recomputes the sum from these.
    contributions: dict[int, tuple[list[bytes], bytes]] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The request as plain data; the owner-owned ``privacy.secure_mode`` is left out."""
        config = config_to_dict(self.config)
        if isinstance(config.get("privacy"), dict):
            config["privacy"].pop("secure_mode", None)
        return {
            "protocol": PROTOCOL,
            "run_id": self.run_id,
            "config": config,
            "meta": dict(self.meta),
            "round": self.round_idx,
            "attempt": self.attempt,
            "client_id": self.client_id,
            "global_model": self.global_model,
            "global_digest": self.global_digest,
            "aggregate": self.aggregate,
            "contributions": None
            if self.contributions is None
            else [
                {"client": int(c), "update": list(p), "signature": sig}
                for c, (p, sig) in sorted(self.contributions.items())
            ],
        }

    @classmethod
    def from_wire(cls, data: Any) -> RoundRequest:

        if not isinstance(data, Mapping):
            raise DeployError(f"round request of type {type(data).__name__}: expected a mapping")
        if data.get("protocol") != PROTOCOL:
            raise DeployError(f"round request protocol {data.get('protocol')!r}: expected {PROTOCOL}")
        for key, kind in (("round", int), ("attempt", int), ("client_id", int), ("run_id", str)):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise DeployError(f"round request key {key!r} = {value!r}: expected {kind.__name__}")
        if data["round"] < 0 or data["attempt"] < 0 or data["client_id"] < 0:
            raise DeployError("round request: round, attempt and client_id must be >= 0")
        for key in ("global_model", "aggregate"):
            if data.get(key) is not None and not isinstance(data[key], bytes):
                raise DeployError(f"round request key {key!r}: expected bytes or None")
        if not isinstance(data.get("config"), Mapping) or not isinstance(data.get("meta"), Mapping):
            raise DeployError("round request: 'config' and 'meta' must be mappings")
        privacy = data["config"].get("privacy")
        if isinstance(privacy, Mapping) and "secure_mode" in privacy:
            raise DeployError(
                "round request config key 'privacy.secure_mode': the datasite owns its noise source (its "
                "own CSPRNG, or the owner's reproducible_noise policy); a request may not set it"
            )
        config = build_experiment(dict(data["config"]), "round request config")
        if config.fl is None or config.privacy is None or not config.fl.secure:
            raise DeployError("round request config: needs fl.secure = true and a privacy section")
        return cls(
            run_id=data["run_id"],
            config=config,
            meta=dict(data["meta"]),
            round_idx=data["round"],
            attempt=data["attempt"],
            client_id=data["client_id"],
            global_model=data.get("global_model"),
            global_digest=data.get("global_digest"),
            aggregate=data.get("aggregate"),
            contributions=_contributions(data.get("contributions")),
        )


def _contributions(value: Any) -> dict[int, tuple[list[bytes], bytes]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DeployError("round request key 'contributions': expected a list")
    out: dict[int, tuple[list[bytes], bytes]] = {}
    for item in value:
        if not isinstance(item, Mapping) or set(item) != {"client", "update", "signature"}:
            raise DeployError("round request contribution: expected client, update and signature")
        client, update, signature = item["client"], item["update"], item["signature"]
        if isinstance(client, bool) or not isinstance(client, int) or client in out:
            raise DeployError(f"round request contribution client {client!r}: expected a unique integer")
        if not isinstance(update, list) or not all(isinstance(p, bytes) for p in update):
            raise DeployError(f"round request contribution of client {client}: update must be a bytes list")
        if not isinstance(signature, bytes):
            raise DeployError(f"round request contribution of client {client}: signature must be bytes")
        out[client] = (list(update), signature)
    return out


def import_requested_modules(request: Any, secrets: OwnerSecrets) -> None:
    """Import the request config's ``fl.import_modules``, each only if the owner's policy allows it.

    Runs before the request's config is built (a custom model or algorithm registers itself on
    import). A module the owner did not list in ``allowed_modules`` is refused and nothing is imported.
    """
    config = request.get("config") if isinstance(request, Mapping) else None
    fl = config.get("fl") if isinstance(config, Mapping) else None
    modules = (fl.get("import_modules") if isinstance(fl, Mapping) else None) or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise DeployError("round request config key 'fl.import_modules': expected a list of module names")
    refused = [m for m in modules if m not in secrets.allowed_modules]
    if refused:
        raise DeployError(
            f"round request config key 'fl.import_modules': {refused} not in this owner's policy "
            f"allowed_modules {list(secrets.allowed_modules)}; nothing was imported"
        )
    import_modules(modules)


NOISE_SOURCES = {
    "owner_csprng": "the owner's CSPRNG (privacy.secure_mode on the datasite)",
    "request_seed": "the request's seed (owner policy reproducible_noise: true): replayable by whoever holds the config",
}


def noise_source(secrets: OwnerSecrets) -> str:
    """Where this datasite's DP-SGD noise and Poisson batches come from (a key of NOISE_SOURCES)."""
    return "request_seed" if secrets.reproducible_noise else "owner_csprng"


def owner_noise_config(config: Any, secrets: OwnerSecrets) -> Any:
    """The request's config with the owner's noise source: ``privacy.secure_mode`` is the owner's choice."""
    privacy = dataclasses.replace(config.privacy, secure_mode=not secrets.reproducible_noise)
    return dataclasses.replace(config, privacy=privacy)


def _arrays(data: Any) -> dict[str, np.ndarray]:
    if not isinstance(data, Mapping) or not data:
        raise DeployError(
            f"data asset of type {type(data).__name__}: expected a non-empty name -> array mapping"
        )
    arrays = {str(name): np.ascontiguousarray(np.asarray(values)) for name, values in data.items()}
    if "label" not in arrays:
        raise DeployError(f"data asset has arrays {sorted(arrays)}: expected a 'label' array")
    if len({len(a) for a in arrays.values()}) != 1:
        raise DeployError(f"data asset arrays of unequal length: { {k: len(v) for k, v in arrays.items()} }")
    return arrays


# --------------------------------------------------------------------------------------------------
# The model and the global model
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    """The model a config builds on given data metadata, its shared-parameter layout and algorithm."""

    model: torch.nn.Module
    layout: Any  # fedrec.federated.worker.ParamLayout
    algorithm_cls: type
    algorithm_params: Any

    @classmethod
    def build(cls, config: Any, meta: Mapping[str, Any]) -> ModelPlan:

        model_cls = registry.lookup("model", config.model.name)
        if getattr(model_cls, "PRIVATE_PARAMETERS", ()) and config.fl.reconstruction is None:
            raise DeployError(
                f"model {config.model.name!r} has per-user parameters, which datasites do not keep between "
                "rounds: set fl.reconstruction (Federated Reconstruction rebuilds them every round)"
            )
        sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
        model = build_model(config, dict(meta), sparse=sparse)
        algorithm_cls = registry.lookup("fl_algo", config.fl.algorithm)
        return cls(
            model=model,
            layout=ParamLayout.from_model(model),
            algorithm_cls=algorithm_cls,
            algorithm_params=algorithm_params(algorithm_cls, config.fl.algorithm_params),
        )


def initial_global_model(config: Any, meta: Mapping[str, Any]) -> np.ndarray:
    """Round 0's global model: the config's seeded initialisation (as ``Simulation.prepare`` writes it)."""
    plan = ModelPlan.build(config, meta)
    public_initialisation(plan.model, dict(meta))
    return plan.layout.flatten(plan.model)


def current_global_model(request: RoundRequest, secrets: OwnerSecrets, size: int) -> np.ndarray:
    """The global model the request's round starts from (checked against the digest it names)."""

    if request.global_model is None:
        if request.round_idx != 0:
            raise DeployError(f"round {request.round_idx}: the request carries no global model")
        params = initial_global_model(request.config, request.meta)
    else:
        params = open_global_model(
            request.global_model,
            key=secrets.model_key,
            run_id=request.run_id,
            round_idx=request.round_idx,
            size=size,
        )
    if params.size != size:
        raise DeployError(f"global model of {params.size} values: the config's model has {size}")
    if request.global_digest is not None and params_digest(params) != request.global_digest:
        raise DeployError(f"round {request.round_idx}: the global model does not match the digest requested")
    params.setflags(write=False)
    return params


# --------------------------------------------------------------------------------------------------
# Local training (the simulation's client task, on one owner's rows)
# --------------------------------------------------------------------------------------------------


class _GlobalModelChannel:
    """A trainer's transport that hands out one already-opened global model."""

    def __init__(self, global_model: Any):
        self.global_model = global_model

    async def request_models(self, worker: Any, neighbour_ids: Any) -> list[Any]:
        return [self.global_model for _ in neighbour_ids]


def check_faults(config: Any, round_idx: int, client_id: int) -> None:
    """``fl.faults`` as the simulation applies them (raise, hang); used to test dropped datasites."""

    faults = config.fl.faults
    if faults.rounds is not None and round_idx not in faults.rounds:
        return
    if client_id in faults.raise_clients:
        raise FedrecError(f"fault injection: client {client_id} raised in round {round_idx}")
    if client_id in faults.hang_clients:
        time.sleep(faults.hang_seconds)


def local_update(
    config: Any,
    meta: Mapping[str, Any],
    arrays: dict[str, np.ndarray],
    global_params: np.ndarray,
    *,
    client_id: int,
    round_idx: int,
    attempt: int,
    device: str = "cpu",
    plan: ModelPlan | None = None,
) -> Any:
    """One client's local DP-SGD from ``global_params`` on ``arrays``; returns its ClientUpdate.

    The same steps as the simulation's client task: the registered algorithm's trainer role, the
    local DP trainer seeded by ``client_seed(seed, round, client)``, ``config.privacy`` as resolved
    for clients (the coordinator resolves delta exactly as ``client_privacy_config`` does).
    """

    torch.set_num_threads(config.train.num_threads or 1)  # as every simulation rank: same results
    plan = plan if plan is not None else ModelPlan.build(config, meta)
    layout = plan.layout
    model = plan.model.to(device)
    reconstruction = config.fl.reconstruction
    if reconstruction is not None and getattr(model, "PRIVATE_PARAMETERS", None):
        # Per-user rows live only in this call: this datasite's users, renumbered, rebuilt below.
        users, arrays = local_users(arrays)
        sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
        model = build_model(config, {**meta, "num_users": len(users)}, sparse=sparse).to(device)
    global_model = GlobalModel(round_idx, global_params, params_digest(global_params))
    worker = plan.algorithm_cls(
        client_id,
        ("trainer",),
        config=config,
        out_neighbours={"aggregator": Neighbour("aggregator", 0)},
        persistent_storage=None,
        comm=_GlobalModelChannel(global_model),
        round_idx=round_idx,
        params=plan.algorithm_params,
    )
    dp_trainer_cls = local_dp_trainer_class()

    def make_trainer(trainer_worker: Any, *, phase: int = 0) -> Any:
        data = ProcessedData({"train": trainer_worker.data}, dict(meta))
        seed = client_seed(config.seed, trainer_worker.round_idx, int(trainer_worker.worker_id), phase)
        local = dataclasses.replace(config, seed=seed)
        trainer = dp_trainer_cls(trainer_worker.model, data, local, device=device, ledger=False)
        # DPTrainer resets a data-dependent initialisation; the global model's values are the ones to use.
        layout.load_into(trainer_worker.model, trainer_worker.global_model.params)
        return trainer

    worker.attempt = attempt
    worker.model = model
    worker.data = ArraySplit(arrays)
    worker.layout = layout
    worker.make_trainer = make_trainer
    if reconstruction is not None and getattr(model, "PRIVATE_PARAMETERS", None):
        worker.reconstruct = functools.partial(reconstruct, config=reconstruction)
    asyncio.run(worker.run())
    if worker.update is None:
        raise DeployError(f"client {client_id}: local training produced no update")
    return worker.update


def encrypt_update(config: Any, layout: Any, update: Any, secret_context: bytes, *, tag: int) -> list[bytes]:
    """The simulation's SecureCodec.encode with its quantisation generator: wire-format payloads."""

    rng = quantisation_rng(config.seed, update.round_idx, update.client_id)
    payloads, _ = SecureCodec(layout, secret_context=secret_context).encode(update, tag=tag, rng=rng)
    return [bytes(p) for p in payloads]


# --------------------------------------------------------------------------------------------------
# Datasite entry points
# --------------------------------------------------------------------------------------------------


def _logged(function: Any) -> Any:
    """Write a failure's traceback to the datasite's own log (PySyft tells the requester only that it failed)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception:
            # PySyft swaps sys.stderr while approved code runs; the process's real stderr is the owner's log.
            print(
                f"[datasite] {function.__name__} failed:\n{traceback.format_exc()}",
                file=sys.__stderr__,
                flush=True,
            )
            raise

    return wrapper


@_logged
def train_round(data: Any, owner: Any, request: Any) -> dict[str, Any]:
    """Local DP-SGD + ledger record + encryption on the owner's datasite; see the module docstring."""
    if is_mock_run(owner):
        return dict(MOCK_RUN_OUTPUT)

    secrets = OwnerSecrets.from_asset(plain(owner))
    import_requested_modules(plain(request), secrets)
    req = RoundRequest.from_wire(plain(request))
    if req.client_id != secrets.client_id:
        raise DeployError(
            f"request for client {req.client_id} sent to the datasite of client {secrets.client_id}"
        )
    check_faults(req.config, req.round_idx, secrets.client_id)
    arrays = _arrays(plain(data))
    plan = ModelPlan.build(req.config, req.meta)
    global_params = current_global_model(req, secrets, plan.layout.size)
    config = owner_noise_config(req.config, secrets)
    update = local_update(
        config,
        req.meta,
        arrays,
        global_params,
        client_id=secrets.client_id,
        round_idx=req.round_idx,
        attempt=req.attempt,
        plan=plan,
    )
    extra = update.extra
    spend: dict[str, Any] = {
        "client": secrets.client_id,
        "round": req.round_idx,
        "attempt": req.attempt,
        "noise_multiplier": float(extra["noise_multiplier"]),
        "sample_rate": float(extra["sample_rate"]),
        "steps": int(extra["dp_steps"]),
    }
    # Durable before the update leaves; past the owner's budget this raises and nothing is returned.
    with PrivacyLedger.attach(secrets.ledger) as ledger:
        ledger.record_client_spend(
            client=secrets.client_id,
            round=req.round_idx,
            noise_multiplier=spend["noise_multiplier"],
            sample_rate=spend["sample_rate"],
            steps=spend["steps"],
        )
    payloads = encrypt_update(
        req.config, plan.layout, update, secrets.secret_context, tag=attempt_tag(req.round_idx, req.attempt)
    )
    return {
        "protocol": PROTOCOL,
        "update": payloads,
        "spend": spend,
        "noise_source": noise_source(secrets),
        "signature": sign_contribution(secrets.signing_key, payloads),
    }


#: Distinct aggregates one owner decrypts for one (run, round): the round's attempts retried after a
#: failure. Each is a release (``decryption`` event in the owner's ledger, recorded before decrypting).
MAX_DECRYPTIONS_PER_ROUND = 3


def record_decryption(ledger_path: str, req: RoundRequest, signers: tuple[int, ...], digest: str) -> None:
    """Record this decryption in the owner's ledger before it happens; refuse past the per-round budget.

    Decrypting the same contributions again (a retried call) releases nothing new and is not counted
    again. Refused: another contributor set for an attempt already decrypted (two subsets of one
    attempt's updates differ by one owner's update), and a new aggregate for a (run, round) that
    already had ``MAX_DECRYPTIONS_PER_ROUND``; so a coordinator cannot use the apply step as a
    decryption oracle queried once per call.
    """
    with PrivacyLedger.attach(ledger_path) as ledger:
        earlier = [
            event.detail
            for event in ledger.events()
            if event.kind == "decryption"
            and event.detail.get("run_id") == req.run_id
            and event.detail.get("round") == req.round_idx
        ]
        if any(d.get("aggregate_sha256") == digest for d in earlier):
            return
        for d in earlier:
            if d.get("attempt") == req.attempt and d.get("signers") != list(signers):
                raise DeployError(
                    f"round {req.round_idx} attempt {req.attempt}: this owner already decrypted the "
                    f"aggregate of clients {d.get('signers')}; refusing another subset {list(signers)}"
                )
        if len(earlier) >= MAX_DECRYPTIONS_PER_ROUND:
            raise DeployError(
                f"round {req.round_idx} of run {req.run_id!r}: this owner already decrypted {len(earlier)} "
                f"aggregates (MAX_DECRYPTIONS_PER_ROUND={MAX_DECRYPTIONS_PER_ROUND}); refusing another"
            )
        ledger.record_event(
            "decryption",
            run_id=req.run_id,
            round=req.round_idx,
            attempt=req.attempt,
            signers=list(signers),
            aggregate_sha256=digest,
        )


@_logged
def apply_round(owner: Any, request: Any) -> dict[str, Any]:
    """Verify the signed contributions, recompute and decrypt their sum, apply, seal (on a datasite)."""
    if is_mock_run(owner):
        return dict(MOCK_RUN_OUTPUT)

    secrets = OwnerSecrets.from_asset(plain(owner))
    import_requested_modules(plain(request), secrets)
    req = RoundRequest.from_wire(plain(request))
    if not req.contributions:
        raise DeployError(f"round {req.round_idx}: the apply request carries no signed contributions")
    plan = ModelPlan.build(req.config, req.meta)
    current = current_global_model(req, secrets, plan.layout.size)
    tag = attempt_tag(req.round_idx, req.attempt)
    schema = UpdateSchema(plan.layout.entries)
    try:
        # Signatures first (a forged contributor refuses the whole request), then each update's format.
        closed, signers = recompute_aggregate(
            secrets.secret_context,
            schema,
            round_idx=tag,
            contributions=req.contributions,
            registered=secrets.registered_keys,
        )
        checker = EncryptionClient(secrets.secret_context, schema)
        dropped = sorted(
            c
            for c, (payloads, _) in req.contributions.items()
            if checker.check_contribution(payloads, round_idx=tag)
        )
        if dropped:  # isolated: the round goes on without them (only their ids leave)
            closed, signers = recompute_aggregate(
                secrets.secret_context,
                schema,
                round_idx=tag,
                contributions={c: v for c, v in req.contributions.items() if c not in dropped},
                registered=secrets.registered_keys,
            )
    except EncryptionError as err:
        raise DeployError(f"round {req.round_idx}: contributions refused: {err}") from None
    # Distinct registered owners whose every chunk is in the sum (this owner's own included).
    if len(signers) < secrets.min_aggregate_clients:
        raise DeployError(
            f"round {req.round_idx}: aggregate of {len(signers)} signed registered client(s), below this "
            f"owner's min_aggregate_clients={secrets.min_aggregate_clients}; not decrypted"
        )
    digest = hashlib.sha256(closed.aggregate).hexdigest()
    record_decryption(secrets.ledger, req, signers, digest)
    codec = SecureCodec(plan.layout, secret_context=secrets.secret_context)
    decoded = codec.decode_mean(closed.aggregate, tag=tag)
    worker = plan.algorithm_cls(
        "apply", ("trainer",), config=req.config, persistent_storage=None, params=plan.algorithm_params
    )
    new_params, _ = apply_mean_update(worker, current, decoded.mean, round_idx=req.round_idx)
    sealed = seal_global_model(
        new_params, key=secrets.model_key, run_id=req.run_id, round_idx=req.round_idx + 1
    )
    return {
        "protocol": PROTOCOL,
        "round": req.round_idx + 1,
        "global_model": sealed,
        "digest": params_digest(new_params),
        "num_clients": int(decoded.num_clients),
        "dropped": dropped,  # malformed contributions left out (their client ids only)
        # A constant of the configuration (quantum + float64 slack): nothing plaintext-derived goes back.
        "error_bound": float(decoded.error_bound),
    }
