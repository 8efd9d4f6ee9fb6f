"""Refuse anonymous guest sessions on a fedrec datasite (issue 14, item 9).

PySyft 0.9.5 has a ``allow_guest_sessions`` setting, but the running server never sees it change:
``Server.get_settings`` caches the settings object it read at start-up (``allow_guest_sessions``
True) and ``settings.update`` writes only the stash, so an anonymous guest (``sy.login_as_guest``,
a random key that no account holds) can still list the datasets, read the published summary (row
count, schema) and download the mock. This module closes that on the server side:

- :func:`install_guest_refusal` wraps the two PySyft entry points that answer a key-bearing request,
  ``Server.handle_api_call_with_unsigned_result`` (every ``/api_call``: datasets, assets, mocks, code,
  requests, the ``queue`` and ``metadata`` paths, forwarding) and ``Server.get_api`` (``/api``: the
  service listing a client needs before it can call anything). A request whose key belongs to no
  account with at least the data-scientist role is answered with :data:`GUEST_REFUSAL` and never
  reaches a service. The owner installs it in its own process before ``sy.orchestra.launch``, whose
  uvicorn server is a forked child that inherits the wrapped class.
- :func:`check_guests_refused` then connects to the running datasite as a real anonymous guest and
  requires every read to be refused; the owner shuts the datasite down if one is answered (fails
  closed: a PySyft upgrade that renames the wrapped methods, or a ``spawn`` start method that loses
  the wrapper, stops the owner instead of serving guests).

What stays open to anyone who can reach the port: ``/metadata`` (server name, id, PySyft version,
whether sign-up is on; a client needs it to log in), ``/login`` (email and password; wrong ones are
refused), ``/register`` (refused: sign-up is off) and the health check ``/``.
"""

from __future__ import annotations

import functools
import multiprocessing
import sys
from typing import Any

from fedrec.deploy.errors import DeployError

GUEST_REFUSAL = (
    "fedrec datasite: anonymous guest sessions are refused; log in with an account the owner created"
)
_MARK = "__fedrec_guest_refusal__"
WRAPPED = ("handle_api_call_with_unsigned_result", "get_api")  # PySyft 0.9.5's Server methods


def _is_account(server: Any, credentials: Any) -> bool:
    """Whether ``credentials`` (a verify key) belongs to an account of data-scientist role or above."""
    from syft.service.user.user_roles import ServiceRole

    if credentials is None:
        return False
    try:
        role = server.get_role_for_credentials(credentials=credentials)
    except Exception:  # an unreadable key or a store error: not an account (fail closed)
        return False
    return isinstance(role, ServiceRole) and role.value >= ServiceRole.DATA_SCIENTIST.value


def install_guest_refusal() -> None:
    """Wrap PySyft's server so that requests signed by no account are refused (idempotent).

    Call it in the process that launches the datasite, before ``sy.orchestra.launch``.
    """
    if multiprocessing.get_start_method(allow_none=False) != "fork":
        raise DeployError(
            f"multiprocessing start method {multiprocessing.get_start_method()!r}: the guest refusal "
            "reaches PySyft's server process only when it is forked (expected 'fork')"
        )
    from fastapi import HTTPException
    from syft.server.server import Server
    from syft.service.response import SyftError

    missing = [name for name in WRAPPED if not callable(getattr(Server, name, None))]
    if missing:  # another PySyft: nothing to wrap, so no refusal (the owner does not start)
        raise DeployError(
            f"PySyft {getattr(sys.modules.get('syft'), '__version__', '?')}: its server has no "
            f"{', '.join(missing)}; the guest refusal is written for PySyft 0.9.5"
        )
    handle = Server.handle_api_call_with_unsigned_result
    if not getattr(handle, _MARK, False):

        @functools.wraps(handle)
        def handle_api_call_with_unsigned_result(self: Any, api_call: Any, *args: Any, **kwargs: Any) -> Any:
            if not _is_account(self, getattr(api_call, "credentials", None)):
                return SyftError(message=GUEST_REFUSAL)
            return handle(self, api_call, *args, **kwargs)

        setattr(handle_api_call_with_unsigned_result, _MARK, True)
        Server.handle_api_call_with_unsigned_result = handle_api_call_with_unsigned_result  # type: ignore[method-assign]

    get_api = Server.get_api
    if not getattr(get_api, _MARK, False):

        @functools.wraps(get_api)
        def guarded_get_api(self: Any, for_user: Any = None, *args: Any, **kwargs: Any) -> Any:
            if not _is_account(self, for_user):  # an HTTP 403 on /api, without a server traceback
                raise HTTPException(status_code=403, detail=GUEST_REFUSAL)
            return get_api(self, for_user, *args, **kwargs)

        setattr(guarded_get_api, _MARK, True)
        Server.get_api = guarded_get_api  # type: ignore[method-assign]


def guest_refusal_installed() -> bool:
    """Whether this process's PySyft server class carries the refusal."""
    from syft.server.server import Server

    return bool(
        getattr(Server.handle_api_call_with_unsigned_result, _MARK, False)
        and getattr(Server.get_api, _MARK, False)
    )


def _raw_dataset_listing(guest: Any) -> Any:
    """``dataset.get_all`` signed by the guest's own key and posted to ``/api_call`` directly: what a
    guest sends without first fetching the service listing (which :func:`install_guest_refusal` also
    refuses)."""
    from syft.client.api import SyftAPICall, debox_signed_syftapicall_response

    call = SyftAPICall(server_uid=guest.id, path="dataset.get_all", args=[], kwargs={}, blocking=True)
    signed = guest.connection.make_call(call.sign(guest.credentials))
    result = debox_signed_syftapicall_response(signed).unwrap()
    return getattr(result, "value", result) if type(result).__name__ == "SyftSuccess" else result


def guest_reads(url: str, port: int, dataset: str) -> dict[str, str]:
    """Try, as a fresh anonymous guest each time, what an unauthenticated visitor would read.

    Returns ``{read: outcome}`` where outcome is ``"refused: ..."`` or ``"answered: <type>"``.
    """
    import syft as sy

    reads = {
        "raw api_call dataset.get_all": _raw_dataset_listing,
        "service listing": lambda g: g.api,
        "list datasets": lambda g: g.datasets.get_all(),
        "dataset by name": lambda g: g.datasets[dataset],
        "mock": lambda g: g.datasets[dataset].assets[0].mock,
    }
    outcomes: dict[str, str] = {}
    for label, read in reads.items():
        try:
            guest = sy.login_as_guest(url=url, port=port, verbose=False)
            result = read(guest)
        except Exception as err:  # PySyft raises its refusal (or a transport error) on the client
            outcomes[label] = f"refused: {type(err).__name__}: {str(err).strip().splitlines()[:1]}"
            continue
        if result is None or type(result).__name__ == "SyftError":
            outcomes[label] = f"refused: {result}"
        else:
            outcomes[label] = f"answered: {type(result).__name__}"
    return outcomes


def check_guests_refused(url: str, port: int, dataset: str) -> None:
    """Raise :class:`DeployError` unless every anonymous read of the running datasite is refused."""
    answered = {k: v for k, v in guest_reads(url, port, dataset).items() if v.startswith("answered")}
    if answered:
        raise DeployError(
            f"{url}:{port}: an anonymous guest session was answered ({', '.join(sorted(answered))}); "
            "refusing to serve"
        )
