"""Data owner side: run a PySyft 0.9 datasite that holds one partition and approves code by policy.

Commands (one owner, on the owner's own machine)::

    python -m fedrec.deploy.owner digests                 # what to pin in the policy file
    python -m fedrec.deploy.owner prepare --config CFG --dir OWNER_DIR [--client K --of N]
    python -m fedrec.deploy.owner serve --dir OWNER_DIR   # launch, publish, approve until stopped

The owner directory holds what the owner prepared (``scripts/deploy_syft.py`` writes it in local
mode; docs/deployment.md shows how to write it by hand):

- ``data.npz``: the owner's training rows (``name -> array``, no pickle); ``meta.json``: the model
  metadata of the data's schema (public, e.g. embedding table sizes);
- ``keys.json``: this owner's key file from the key authority (mode 0600, :mod:`fedrec.deploy.keys`);
- ``public.ctx``: the key authority's public context (the one the coordinator gets); at start the
  owner checks that its secret context and this file form a key pair (a missing file, a swapped
  ``keys.json`` or a secret context in ``public.ctx`` is a one-line error before anything is served);
- ``policy.yml``: the owner policy (:mod:`fedrec.deploy.policy`);
- ``accounts.json``: the data-scientist accounts to create (name, email, password; mode 0600); the
  owner hands each password to its holder out of band.

``serve`` then:

1. starts the datasite on ``--host`` (127.0.0.1 unless the owner asks otherwise) with an admin
   password that is random before the server exists (PySyft's default is never active), written
   only to ``admin.json`` (mode 0600);
2. turns guest sign-up off, refuses anonymous guest sessions (:mod:`fedrec.deploy.guests`, checked
   with a real guest login before the owner reports ready) and creates the listed data-scientist
   accounts;
3. uploads dataset ``fedrec`` with asset ``train`` (the private rows, with a synthetic mock of the
   same schema for data scientists to develop against) and asset ``owner`` (the key material, the
   path of the owner's privacy ledger, the minimum aggregate size; no mock, so nothing ever runs on
   a stand-in for it); the dataset summary publishes only the schema and the row count;
4. opens the owner's privacy ledger (``privacy_ledger.sqlite``, budget from the policy);
5. writes ``ready.json`` (URL, port, pid) and then approves or denies every code request by the
   policy (or asks on the terminal for unlisted code with ``unlisted: ask``), logging each decision
   to ``decisions.jsonl``, until SIGTERM/SIGINT, when it shuts the datasite down.

PySyft's state lives in ``OWNER_DIR/syft`` and is removed at shutdown (it is rebuilt at each start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedrec.deploy.errors import DeployError
from fedrec.deploy.guests import check_guests_refused, install_guest_refusal
from fedrec.errors import FedrecError

DATASET_NAME = "fedrec"
TRAIN_ASSET = "train"
OWNER_ASSET = "owner"
ADMIN_EMAIL = "info@openmined.org"  # PySyft's root account; only its password matters
SYFT_DEFAULT_PASSWORD = "changethis"
POLL_SECONDS = 1.0
MAX_FAILED_POLLS = 60

DATA_FILE = "data.npz"
META_FILE = "meta.json"
KEYS_FILE = "keys.json"
PUBLIC_CONTEXT_FILE = "public.ctx"
POLICY_FILE = "policy.yml"
ACCOUNTS_FILE = "accounts.json"
ADMIN_FILE = "admin.json"
READY_FILE = "ready.json"
DECISIONS_FILE = "decisions.jsonl"
LEDGER_FILE = "privacy_ledger.sqlite"
SYFT_STATE_DIR = "syft"


# --------------------------------------------------------------------------------------------------
# Owner data: rows, schema, mock
# --------------------------------------------------------------------------------------------------


def write_owner_data(directory: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """``data.npz`` (arrays, no pickle) and ``meta.json`` (model metadata), written atomically."""
    from fedrec.data.base import write_json_atomic

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, DATA_FILE)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **{name: np.ascontiguousarray(a) for name, a in arrays.items()})
    os.replace(tmp, path)
    write_json_atomic(os.path.join(directory, META_FILE), meta)


def read_owner_data(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = os.path.join(directory, DATA_FILE)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.ascontiguousarray(npz[name]) for name in npz.files}
        with open(os.path.join(directory, META_FILE), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as err:
        raise DeployError(
            f"{directory}: cannot read the owner's data ({type(err).__name__}: {err})"
        ) from None
    if not arrays or "label" not in arrays or len({len(a) for a in arrays.values()}) != 1:
        raise DeployError(f"{path}: expected equal-length arrays including 'label', got {sorted(arrays)}")
    return arrays, meta


def synthetic_mock(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random rows with the data's schema (names, dtypes, shapes, valid index ranges), not its values.

    Ranges come from the public model metadata (table sizes, user and item counts, rating scale),
    never from the private rows.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, array in arrays.items():
        shape, dtype = array.shape, array.dtype
        values: np.ndarray
        if name == "label":
            if meta.get("task") == "rating" and "rating_min" in meta and "rating_max" in meta:
                values = rng.uniform(float(meta["rating_min"]), float(meta["rating_max"]), size=shape)
            else:
                values = rng.integers(0, 2, size=shape)
        elif name == "sparse" and "table_sizes" in meta and len(shape) == 2:
            sizes = np.asarray(meta["table_sizes"], dtype=np.int64)[: shape[1]]
            values = rng.integers(0, np.maximum(sizes, 1), size=shape)
        elif name == "dense":
            values = np.log1p(rng.exponential(10.0, size=shape))  # the shape of log(1 + count) features
        elif name == "user" and "num_users" in meta:
            values = rng.integers(0, int(meta["num_users"]), size=shape)
        elif name == "item" and "num_items" in meta:
            values = rng.integers(0, int(meta["num_items"]), size=shape)
        else:
            values = np.zeros(shape)
        out[name] = np.asarray(values).astype(dtype)
    return out


def public_summary(client_id: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """The dataset summary every data scientist sees: schema, row count, model metadata."""
    from fedrec.deploy.training import PROTOCOL, model_meta

    return json.dumps(
        {
            "fedrec": PROTOCOL,
            "client_id": int(client_id),
            "rows": len(arrays["label"]),
            "arrays": {name: [str(a.dtype), list(a.shape[1:])] for name, a in arrays.items()},
            "meta": model_meta(meta),
        },
        sort_keys=True,
    )


# --------------------------------------------------------------------------------------------------
# Approval: PySyft request -> policy decision
# --------------------------------------------------------------------------------------------------


def describe_request(code: Any, asset_ids: dict[str, Any]) -> Any:
    """The policy's view of a PySyft ``UserCode``: name, source digest, execution limit, input bindings."""
    from syft.service.policy.policy import Matches, MixedInputPolicy, OutputPolicyExecuteCount, UserOwned

    from fedrec.deploy.functions import source_digest
    from fedrec.deploy.policy import CodeRequest

    names_by_id = {str(uid): name for name, uid in asset_ids.items()}
    inputs: dict[str, str] = {}
    if code.input_policy_type is not MixedInputPolicy:
        inputs["<input policy>"] = (
            f"policy type {getattr(code.input_policy_type, '__name__', code.input_policy_type)}"
        )
    rules_by_server = code.input_policy_init_kwargs or {}
    if len(rules_by_server) != 1:
        inputs["<servers>"] = f"{len(rules_by_server)} servers"
    for rules in rules_by_server.values():
        for argument, rule in rules.items():
            if isinstance(rule, Matches):
                name = names_by_id.get(str(rule.val))
                inputs[argument] = f"asset:{name}" if name else f"object {rule.val}"
            elif isinstance(rule, UserOwned):
                inputs[argument] = f"user:{getattr(rule.type, '__name__', rule.type)}"
            else:
                inputs[argument] = type(rule).__name__
    limit = None
    output_type = code.output_policy_type
    if isinstance(output_type, type) and issubclass(output_type, OutputPolicyExecuteCount):
        raw_limit = (code.output_policy_init_kwargs or {}).get("limit")
        limit = int(raw_limit) if isinstance(raw_limit, int) else None
    return CodeRequest(
        name=str(code.service_func_name),
        sha256=source_digest(str(code.raw_code)),
        max_executions=limit,
        inputs=inputs,
    )


def ask_on_terminal(code: Any, request: Any, reason: str) -> bool:
    """Interactive approval: show the code and ask (only on a terminal; elsewhere the answer is no)."""
    if not sys.stdin or not sys.stdin.isatty():
        return False
    print(f"\n--- code request {request.name} ({reason})", file=sys.stderr)
    print(
        f"inputs: {request.inputs}  executions: {request.max_executions}  sha256: {request.sha256}",
        file=sys.stderr,
    )
    print(str(code.raw_code), file=sys.stderr)
    answer = input("approve this code to run on your private data? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


class Owner:
    """One data owner's datasite (see the module docstring)."""

    def __init__(self, directory: str, *, host: str = "127.0.0.1", port: int = 0, name: str | None = None):
        self.directory = os.path.abspath(directory)
        self.host = host
        self.port = port or free_port(host)
        self.keys = self._load_keys()
        self.name = name or f"fedrec-owner-{self.keys.client_id}"
        self.policy_path = os.path.join(self.directory, POLICY_FILE)
        self.policy = self._load_policy()
        self._policy_mtime = os.path.getmtime(self.policy_path)
        self.handle: Any = None
        self.admin: Any = None
        self.asset_ids: dict[str, Any] = {}
        self.decided: set[str] = set()
        self.denied_by_policy: set[str] = set()  # reconsidered when the policy file changes
        self.reconsider: set[str] = set()
        self.stopping = False
        self.parent_pid: int | None = None  # stop when this process's parent (a launcher) is gone

    def _load_keys(self) -> Any:
        """The owner's key file, checked against the public context before anything starts."""
        from fedrec.deploy.keys import OwnerKeys, check_owner_keys

        keys_path = self.path(KEYS_FILE)
        keys = OwnerKeys.load(keys_path)
        check_owner_keys(keys, keys_path=keys_path, public_path=self.path(PUBLIC_CONTEXT_FILE))
        return keys

    def _load_policy(self) -> Any:
        from fedrec.deploy.policy import OwnerPolicy

        return OwnerPolicy.load(os.path.join(self.directory, POLICY_FILE))

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        log(f"{self.name}: starting")
        arrays, meta = read_owner_data(self.directory)
        ledger = self._open_ledger()
        sy = import_syft_with_random_admin_password()
        # Anonymous guests are refused by the server itself (PySyft 0.9.5 ignores allow_guest_sessions
        # once it has started); the forked server process inherits the refusal. Checked below.
        install_guest_refusal()
        preload_training_modules()
        # The datasite logs failures of approved code (PySyft shows the requester only a generic message).
        logging.basicConfig(
            level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
        state = self.path(SYFT_STATE_DIR)
        shutil.rmtree(state, ignore_errors=True)
        os.makedirs(state, mode=0o700)
        tempfile.tempdir = state  # PySyft keeps its database and blobs under the temp dir
        log(f"{self.name}: modules loaded; launching the datasite on {self.host}:{self.port}")
        self.handle = sy.orchestra.launch(name=self.name, host=self.host, port=self.port, reset=True)
        # The admin password was random before the server started (PySyft's default never existed);
        # it is kept only in admin.json, readable by the owner alone.
        password = os.environ.pop("DEFAULT_ROOT_PASSWORD")
        from fedrec.deploy.keys import write_private_json

        write_private_json(
            self.path(ADMIN_FILE), {"email": ADMIN_EMAIL, "password": password, "url": self.url}
        )
        self.admin = sy.login(
            url=f"http://{self.host}", port=self.port, email=ADMIN_EMAIL, password=password, cache=False
        )
        self.admin.settings.allow_guest_signup(enable=False)
        # No anonymous sessions (issue 14, item 9): recorded in PySyft's settings too, though the running
        # 0.9.5 server never rereads them; fedrec.deploy.guests enforces it.
        result = self.admin.settings.update(allow_guest_sessions=False)
        if type(result).__name__ == "SyftError":
            raise DeployError(f"{self.path(ADMIN_FILE)}: PySyft refused to disable guest sessions: {result}")
        self._create_accounts()
        self._upload(sy, arrays, meta, ledger)
        # Fail closed: a real anonymous guest must be refused every read before the owner is ready.
        check_guests_refused(f"http://{self.host}", self.port, DATASET_NAME)
        log(f"{self.name}: anonymous guest sessions refused (checked with a guest login)")
        from fedrec.data.base import write_json_atomic

        write_json_atomic(
            self.path(READY_FILE),
            {
                "url": self.url,
                "host": self.host,
                "port": self.port,
                "pid": os.getpid(),
                "name": self.name,
                "client_id": self.keys.client_id,
                "dataset": DATASET_NAME,
                "started_at": time.time(),
            },
        )
        log(
            f"{self.name}: datasite ready at {self.url} (client {self.keys.client_id}, {len(arrays['label'])} rows)"
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _open_ledger(self) -> str:
        from privacy.ledger import PrivacyLedger

        path = self.path(LEDGER_FILE)
        privacy = self.policy.privacy
        PrivacyLedger.open(
            path,
            delta=privacy.delta,
            accountant=privacy.accountant,
            client_epsilon_budget=privacy.epsilon_budget,
            run_id=f"owner-{self.keys.client_id}",
            config={"owner": self.name, "policy": os.path.basename(self.policy_path)},
        ).close()
        return path

    def _create_accounts(self) -> None:
        path = self.path(ACCOUNTS_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            accounts = json.load(fh)
        for account in accounts:
            result = self.admin.register(
                name=account["name"],
                email=account["email"],
                password=account["password"],
                password_verify=account["password"],
            )
            if type(result).__name__ == "SyftError":
                raise DeployError(f"{path}: PySyft refused account {account['email']!r}: {result}")

    def _upload(self, sy: Any, arrays: dict[str, np.ndarray], meta: dict[str, Any], ledger: str) -> None:
        mock = synthetic_mock(arrays, meta, seed=1000 + self.keys.client_id)
        train = sy.Asset(
            name=TRAIN_ASSET,
            description="This owner's training rows (private); the mock has the same schema and random values.",
            data=arrays,
            mock=mock,
        )
        secrets_asset = sy.Asset(
            name=OWNER_ASSET,
            description="Key material and privacy ledger of this owner (private, no mock).",
            data={
                "client_id": self.keys.client_id,
                "secret_context": self.keys.secret_context,
                "model_key": self.keys.model_key,
                "ledger": ledger,
                "min_aggregate_clients": self.policy.min_aggregate_clients,
                "signing_key": self.keys.signing_key,
                "registered_keys": {str(c): k for c, k in sorted(self.keys.registered_keys.items())},
                "allowed_modules": list(self.policy.allowed_modules),
                "reproducible_noise": bool(self.policy.reproducible_noise),
            },
        )
        secrets_asset.no_mock()
        dataset = sy.Dataset(
            name=DATASET_NAME,
            description="fedrec federated training data of one owner (docs/deployment.md).",
            summary=public_summary(self.keys.client_id, arrays, meta),
            asset_list=[train, secrets_asset],
        )
        result = self.admin.upload_dataset(dataset)
        if type(result).__name__ == "SyftError":
            raise DeployError(f"{self.name}: dataset upload failed: {result}")
        uploaded = self.admin.datasets[DATASET_NAME]
        self.asset_ids = {name: uploaded.assets[name].action_id for name in (TRAIN_ASSET, OWNER_ASSET)}

    # ------------------------------------------------------------------ approvals
    def reload_policy_if_changed(self) -> None:
        mtime = os.path.getmtime(self.policy_path)
        if mtime != self._policy_mtime:
            self._policy_mtime = mtime
            try:
                self.policy = self._load_policy()
            except FedrecError as err:  # a bad edit: keep deciding by the last good policy
                log(f"{self.name}: policy not reloaded, the previous one stays in force ({err})")
                return
            # Code the old policy denied may be pinned now: the owner approves by editing the file.
            self.reconsider |= self.denied_by_policy
            log(f"{self.name}: policy reloaded from {self.policy_path}")

    def review_requests(self) -> int:
        """Decide every pending request once; returns how many were decided."""
        from syft.service.request.request import RequestStatus

        self.reload_policy_if_changed()
        decided = 0
        for request in self.admin.requests:
            request_id = str(request.id)
            status = request.status
            again = request_id in self.reconsider and status == RequestStatus.REJECTED
            if not again and (request_id in self.decided or status != RequestStatus.PENDING):
                continue
            self.reconsider.discard(request_id)
            code = request.code
            view = describe_request(code, self.asset_ids)
            decision = self.policy.decide(view)
            if again and decision.action != "approve":
                continue  # still not approved: it stays denied
            approve = decision.action == "approve" or (
                decision.action == "ask" and ask_on_terminal(code, view, decision.reason)
            )
            if approve:
                request.approve(disable_warnings=True)
                self.denied_by_policy.discard(request_id)
            else:
                request.deny(reason=decision.reason)
                if decision.action == "deny":
                    self.denied_by_policy.add(request_id)
            self.decided.add(request_id)
            decided += 1
            entry = {
                "time": time.time(),
                "request": request_id,
                "function": view.name,
                "sha256": view.sha256,
                "max_executions": view.max_executions,
                "inputs": view.inputs,
                "decision": "approved" if approve else "denied",
                "reason": decision.reason,
            }
            with open(self.path(DECISIONS_FILE), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
            log(f"{self.name}: {entry['decision']} {view.name} ({decision.reason})")
        return decided

    def serve(self) -> None:
        failures = 0
        while not self.stopping:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log(f"{self.name}: the launcher is gone; shutting down")
                break
            try:
                self.review_requests()
                failures = 0
            except Exception as err:  # the datasite may be busy; a long outage ends the owner
                failures += 1
                log(f"{self.name}: reviewing requests failed ({type(err).__name__}: {err})")
                if failures >= MAX_FAILED_POLLS:
                    raise DeployError(f"{self.name}: the datasite stopped answering") from None
            deadline = time.monotonic() + POLL_SECONDS
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.land()
            self.handle = None
        for name in (READY_FILE,):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(name))
        shutil.rmtree(self.path(SYFT_STATE_DIR), ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------------------


def import_syft_with_random_admin_password() -> Any:
    """Import PySyft so that a datasite started from this process gets a random admin password.

    PySyft 0.9 reads ``DEFAULT_ROOT_PASSWORD`` once, when ``syft.server.server`` is imported, and
    otherwise uses 'changethis'. Setting a random value first means the default is never active.
    """
    if "syft" not in sys.modules:
        os.environ["DEFAULT_ROOT_PASSWORD"] = secrets.token_urlsafe(32)
    import syft as sy
    from syft.server import server as syft_server

    if syft_server.default_root_password in (None, "", SYFT_DEFAULT_PASSWORD) or (
        syft_server.default_root_password != os.environ.get("DEFAULT_ROOT_PASSWORD")
    ):
        raise DeployError(
            "PySyft was imported before the owner set a random admin password; start the owner in a fresh process"
        )
    return sy


def preload_training_modules() -> None:
    """Import what the approved code uses before the datasite forks, so its first call is fast."""
    import opacus  # noqa: F401
    import tenseal
    import tenseal.sealapi  # noqa: F401
    import torch  # noqa: F401

    import fedrec.deploy.training
    import fedrec.federated.algorithms.fed_avg
    import fedrec.federated.client_round
    import fedrec.federated.clients
    import fedrec.models.dlrm
    import fedrec.trainers.dp_trainer  # noqa: F401
    import privacy.encryption.client
    import privacy.ledger  # noqa: F401


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    print(f"[owner {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _print_digests() -> int:
    from fedrec.deploy.functions import approved_digests

    for name, digest in sorted(approved_digests().items()):
        print(f"{name} {digest}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """The owner's rows (its own data file, or part K of N of a shared one) and a policy template."""
    from fedrec.config import load_config
    from fedrec.data.partition import make_partition
    from fedrec.deploy.functions import approved_digests
    from fedrec.deploy.policy import policy_text
    from fedrec.deploy.training import model_meta
    from fedrec.experiment import prepare_data

    config = load_config(args.config, args.overrides)
    data = prepare_data(config, progress=False)
    train = data.split("train")
    rows = train.arrays
    if args.of is not None:
        if args.client is None or not 0 <= args.client < args.of:
            raise DeployError(f"--client {args.client!r}: expected 0 <= K < --of {args.of}")
        fl = config.fl
        partition = make_partition(
            fl.partition if fl else "iid",
            train.arrays,
            args.of,
            seed=config.seed,
            alpha=fl.dirichlet_alpha if fl else 0.5,
        )
        rows = train.subset(partition.client_rows(args.client)).arrays
    else:
        rows = {name: np.asarray(array) for name, array in rows.items()}
    write_owner_data(args.dir, rows, model_meta(data.meta))
    policy = os.path.join(args.dir, POLICY_FILE)
    existing = os.path.exists(policy)
    if not existing:
        with open(policy, "w", encoding="utf-8") as fh:
            fh.write(policy_text(approved_digests(), epsilon_budget=10.0, delta=1e-5))
    state = "kept" if existing else "written (edit its budget)"
    log(f"{args.dir}: {len(rows['label'])} rows and the model metadata written; policy.yml {state}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    owner = Owner(args.dir, host=args.host, port=args.port, name=args.name)
    if args.exit_with_parent:
        owner.parent_pid = os.getppid()

    def request_stop(signum: int, frame: Any) -> None:
        owner.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        owner.start()
        owner.serve()
    finally:
        owner.stop()
    log(f"{owner.name}: stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedrec.deploy.owner", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("digests", help="print the source digests of the functions to approve")
    prepare = commands.add_parser(
        "prepare", help="write data.npz, meta.json (and a policy template) for an owner"
    )
    prepare.add_argument(
        "--config", required=True, help="the federation's config (the data schema must agree)"
    )
    prepare.add_argument("--dir", required=True, help="owner directory to write")
    prepare.add_argument("--client", type=int, default=None, help="with --of: this owner's part")
    prepare.add_argument(
        "--of", type=int, default=None, help="split the config's data into this many parts (demos)"
    )
    prepare.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    serve = commands.add_parser("serve", help="run this owner's datasite until stopped")
    serve.add_argument(
        "--dir", required=True, help="owner directory (data.npz, meta.json, keys.json, policy.yml)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=0, help="TCP port (0: a free one)")
    serve.add_argument("--name", default=None, help="datasite name")
    serve.add_argument(
        "--exit-with-parent", action="store_true", help="shut down when the launching process exits"
    )
    args = parser.parse_args(argv)
    if args.command == "digests":
        return _print_digests()
    if args.command == "prepare":
        return _prepare(args)
    return _serve(args)


if __name__ == "__main__":
    from fedrec.cli import run_main

    run_main(main, sys.argv[1:])
