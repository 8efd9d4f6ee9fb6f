"""Local federation: N data owners, each a separate ``python -m fedrec.deploy.owner serve`` process.

What ``scripts/deploy_syft.py`` starts when the config lists no datasite URLs, and what the tests
use: the script plays the key authority and prepares one directory per owner (that owner's rows of
the same partition the simulation would use, the model metadata, the owner's key file, an owner
policy pinning this installation's function digests, a data-scientist account for the coordinator),
then starts each owner in its own process and session. Every owner binds its datasite to
``syft.host`` (127.0.0.1 by default) on a free port and writes ``ready.json`` when it accepts code
requests. ``stop()`` (also on error, via the context manager) sends SIGTERM, so each owner shuts its
datasite down, and kills the owner's process group if it does not exit in time.

The coordinator side of the script receives only the public context and the account credentials:
it never opens an owner's key file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrec.deploy.errors import DeployError

COORDINATOR_NAME = "fedrec coordinator"
COORDINATOR_EMAIL = "coordinator@fedrec.org"
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 20.0
PUBLIC_CONTEXT_FILE = "public.ctx"


@dataclass(frozen=True)
class DatasiteSpec:
    """What the coordinator knows of one datasite: its client id, URL and its data-scientist account."""

    client_id: int
    url: str
    email: str
    password: str
    name: str = ""

    def __repr__(self) -> str:  # never print the password
        return f"DatasiteSpec(client_id={self.client_id}, url={self.url!r}, email={self.email!r})"


@dataclass
class OwnerProcess:
    client_id: int
    directory: str
    process: subprocess.Popen | None = None
    ready: dict[str, Any] | None = None


def owner_directory(root: str, client_id: int) -> str:
    return os.path.join(root, f"owner_{client_id:03d}")


class LocalFederation:
    """Owner directories under ``root`` and the owner processes serving them."""

    def __init__(self, root: str, num_owners: int, *, host: str = "127.0.0.1"):
        self.root = os.path.abspath(root)
        self.host = host
        self.owners = [OwnerProcess(k, owner_directory(self.root, k)) for k in range(num_owners)]

    # ------------------------------------------------------------------ preparation (key authority)
    @classmethod
    def prepare(
        cls,
        config: Any,
        root: str,
        *,
        host: str = "127.0.0.1",
        owner_epsilon_budget: float,
        owner_delta: float | None = None,
        owner_max_executions: int = 1000,
        min_aggregate_clients: int = 2,
        max_clients: int | None = None,
        reproducible_noise: bool = False,
        log: Any = None,
    ) -> LocalFederation:
        """Write every owner's directory (rows, metadata, keys, policy, account) and the public context.

        ``max_clients`` (default: the larger of fl.client_num_per_round and the number of owners) is the
        most updates one encrypted aggregate may hold. Reuses existing directories (a resumed run
        keeps its keys, ledgers and data).
        """
        from fedrec.data.partition import make_partition
        from fedrec.deploy.functions import approved_digests
        from fedrec.deploy.keys import generate_federation_keys, write_private_bytes, write_private_json
        from fedrec.deploy.owner import KEYS_FILE, POLICY_FILE, write_owner_data
        from fedrec.deploy.policy import policy_text
        from fedrec.deploy.training import model_meta
        from fedrec.experiment import prepare_data

        fl = config.fl
        num_owners = int(fl.num_workers)
        federation = cls(root, num_owners, host=host)
        public_path = os.path.join(federation.root, PUBLIC_CONTEXT_FILE)
        complete = os.path.exists(public_path) and all(
            os.path.exists(os.path.join(o.directory, name))
            for o in federation.owners
            for name in (KEYS_FILE, PUBLIC_CONTEXT_FILE)
        )
        if complete:
            return federation
        data = prepare_data(config, log=log, progress=False)
        train = data.split("train")
        # The partition the simulation makes for the same config (Simulation.prepare).
        partition = make_partition(
            fl.partition, train.arrays, num_owners, seed=config.seed, alpha=fl.dirichlet_alpha
        )
        sizes = partition.sizes()
        if int(np.min(sizes)) < 1:
            raise DeployError(
                f"fl.partition={fl.partition!r} left an owner without rows; use more data or 'iid'"
            )
        max_weight = fl.encryption.max_weight or int(sizes.max())
        keys = generate_federation_keys(
            client_ids=[owner.client_id for owner in federation.owners],
            max_clients=max_clients or max(fl.client_num_per_round, num_owners),
            max_weight=max_weight,
            scheme=fl.encryption.scheme,
            clip=fl.encryption.clip,
            precision_bits=fl.encryption.precision_bits,
        )
        meta = model_meta(data.meta)
        delta = owner_delta if owner_delta is not None else min(1e-5, 0.1 / int(sizes.max()))
        policy = policy_text(
            approved_digests(),
            epsilon_budget=owner_epsilon_budget,
            delta=delta,
            max_executions=owner_max_executions,
            min_aggregate_clients=min_aggregate_clients,
            # The owners of this local federation run the config's own modules (one person plays them all).
            allowed_modules=list(fl.import_modules),
            reproducible_noise=reproducible_noise,
        )
        for owner in federation.owners:
            rows = train.subset(partition.client_rows(owner.client_id)).arrays
            write_owner_data(owner.directory, rows, meta)
            keys.owners[owner.client_id].save(os.path.join(owner.directory, KEYS_FILE))
            # The owner checks at start that its secret context and the public one form a pair.
            write_private_bytes(
                os.path.join(owner.directory, PUBLIC_CONTEXT_FILE), keys.public_context, mode=0o644
            )
            with open(os.path.join(owner.directory, POLICY_FILE), "w", encoding="utf-8") as fh:
                fh.write(policy)
            write_private_json(
                os.path.join(owner.directory, "accounts.json"),
                [
                    {
                        "name": COORDINATOR_NAME,
                        "email": COORDINATOR_EMAIL,
                        "password": secrets.token_urlsafe(24),
                    }
                ],
            )
        write_private_bytes(public_path, keys.public_context, mode=0o644)
        return federation

    @property
    def public_context(self) -> bytes:
        with open(os.path.join(self.root, PUBLIC_CONTEXT_FILE), "rb") as fh:
            return fh.read()

    # ------------------------------------------------------------------ processes
    def start(self, *, timeout: float = READY_TIMEOUT) -> list[DatasiteSpec]:
        """Start every owner process; returns the coordinator's view once all are ready."""
        try:
            for owner in self.owners:
                self._spawn(owner)
            deadline = time.monotonic() + timeout
            for owner in self.owners:
                self._wait_ready(owner, deadline)
        except BaseException:
            self.stop()
            raise
        return self.specs()

    def specs(self) -> list[DatasiteSpec]:
        out = []
        for owner in self.owners:
            if owner.ready is None:
                continue
            with open(os.path.join(owner.directory, "accounts.json"), encoding="utf-8") as fh:
                account = json.load(fh)[0]
            out.append(
                DatasiteSpec(
                    client_id=owner.client_id,
                    url=owner.ready["url"],
                    email=account["email"],
                    password=account["password"],
                    name=owner.ready["name"],
                )
            )
        return out

    def _spawn(self, owner: OwnerProcess) -> None:
        ready = os.path.join(owner.directory, "ready.json")
        if os.path.exists(ready):
            os.remove(ready)
        log_file = open(os.path.join(owner.directory, "owner.log"), "ab")  # noqa: SIM115  (the child keeps it)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("DEFAULT_ROOT_PASSWORD", None)
        try:
            owner.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedrec.deploy.owner",
                    "serve",
                    "--dir",
                    owner.directory,
                    "--host",
                    self.host,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: the datasite it forks goes with it
            )
        finally:
            log_file.close()

    def _wait_ready(self, owner: OwnerProcess, deadline: float) -> None:
        path = os.path.join(owner.directory, "ready.json")
        assert owner.process is not None
        while time.monotonic() < deadline:
            if owner.process.poll() is not None:
                raise DeployError(
                    f"owner {owner.client_id} exited with status {owner.process.returncode} before its datasite "
                    f"was ready: {self.log_tail(owner)}"
                )
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    owner.ready = json.load(fh)
                return
            time.sleep(0.2)
        raise DeployError(
            f"owner {owner.client_id}: datasite not ready after the timeout: {self.log_tail(owner)}"
        )

    def log_tail(self, owner: OwnerProcess, lines: int = 5) -> str:
        try:
            with open(os.path.join(owner.directory, "owner.log"), encoding="utf-8", errors="replace") as fh:
                text = [line.strip() for line in fh.readlines() if line.strip()]
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM every owner (each lands its datasite); kill the process group of any that lingers."""
        for owner in self.owners:
            if owner.process is not None and owner.process.poll() is None:
                owner.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for owner in self.owners:
            process = owner.process
            if process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the owner's own group: its datasite, if still there
            if process.poll() is None:
                process.wait(timeout=5)
            owner.process = None
            owner.ready = None

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
