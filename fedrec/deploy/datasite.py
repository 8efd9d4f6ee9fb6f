"""The coordinator's session with one PySyft datasite, and calls with a deadline.

A :class:`DatasiteClient` logs in with the data-scientist account the owner created, reads the
published schema (never rows), submits the approved-code requests, reads their approval and calls
the approved functions. PySyft's HTTP client has no deadline: :func:`call_in_thread` runs a call in
a daemon thread so the coordinator can wait on it with one.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from fedrec.deploy.errors import DeployError
from fedrec.deploy.functions import FUNCTIONS, function_digest, source_digest
from fedrec.deploy.local import DatasiteSpec
from fedrec.deploy.training import PROTOCOL
from fedrec.errors import ConfigError
from fedrec.federated.run import one_line


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

        host, port = split_url(self.spec.url)
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


def split_url(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ConfigError(f"datasite url {url!r}: expected http://host:port")
    return f"{parts.scheme}://{parts.hostname}", int(parts.port)


def connect_all(
    datasites: dict[int, DatasiteClient], *, timeout: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Log into every datasite concurrently; returns their one model metadata.

    A datasite that fails stays a dropped client; none reachable, or two schemas, is an error.
    """
    futures = {cid: call_in_thread(ds.connect) for cid, ds in datasites.items()}
    for cid, future in futures.items():
        try:
            future.result(timeout=timeout)
        except Exception as err:
            log(f"deploy: datasite {cid} ({datasites[cid].spec.url}) unreachable: {one_line(err)}")
    connected = [ds for ds in datasites.values() if ds.connected]
    if not connected:
        raise DeployError("no datasite could be reached; see the messages above")
    metas = {json.dumps(ds.meta, sort_keys=True) for ds in connected}
    if len(metas) != 1:
        raise DeployError(
            "datasites publish different data schemas (model metadata); one federation needs one"
        )
    return connected[0].meta


def request_approval(
    datasites: dict[int, DatasiteClient],
    *,
    timeout: float,
    approval_timeout: float,
    log: Callable[[str], None],
) -> dict[int, dict[str, str]]:
    """Submit the functions everywhere and wait (up to ``approval_timeout``) for the owners.

    Returns each datasite's ``function -> status``; an error when no datasite approved everything.
    """
    futures = {cid: call_in_thread(ds.submit) for cid, ds in datasites.items() if ds.connected}
    for cid, future in futures.items():
        try:
            future.result(timeout=timeout)
        except Exception as err:
            log(f"deploy: datasite {cid}: code request failed: {one_line(err)}")
    deadline = time.monotonic() + approval_timeout
    pending = {cid for cid, ds in datasites.items() if ds.connected}
    status: dict[int, dict[str, str]] = {}
    while pending and time.monotonic() < deadline:
        for cid in sorted(pending):
            try:
                status[cid] = datasites[cid].approval()
            except Exception as err:
                status[cid] = {"error": one_line(err)}
            if all(s in ("approved", "denied") for s in status[cid].values()):
                pending.discard(cid)
        if pending:
            time.sleep(0.5)
    for cid, functions in sorted(status.items()):
        if any(s != "approved" for s in functions.values()):
            log(f"deploy: datasite {cid}: code not approved ({functions}); it will be a dropped client")
    if not any(all(s == "approved" for s in f.values()) for f in status.values()):
        raise DeployError(f"no datasite approved the training code within {approval_timeout}s: {status}")
    return status
