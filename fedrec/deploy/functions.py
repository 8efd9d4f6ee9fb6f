"""The syft functions a coordinator submits to each datasite, defined in a file so PySyft can read them.

An owner approves code by its SHA-256 digest: the digest of the function's source exactly as PySyft
stores it (``UserCode.raw_code``, the dedented source of the function). Each function is two lines
that call :mod:`fedrec.deploy.training` from the fedrec installed *on the datasite*, so what runs is
pinned by the approved digest plus the owner's own installation; a coordinator can change neither
without a new approval. ``python -m fedrec.deploy.owner digests`` prints the digests to pin.

This module imports no PySyft; :func:`syft_functions` wraps the functions with ``sy.syft_function``
(input policy: the two assets of this datasite plus a dict the data scientist owns; output policy: at
most ``max_executions`` runs).
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from collections.abc import Callable
from typing import Any


def fedrec_train_round(data, owner, request):
    from fedrec.deploy.training import train_round

    return train_round(data, owner, request)


def fedrec_apply_round(owner, request):
    from fedrec.deploy.training import apply_round

    return apply_round(owner, request)


TRAIN_FUNCTION = "fedrec_train_round"
APPLY_FUNCTION = "fedrec_apply_round"
FUNCTIONS: dict[str, Callable[..., Any]] = {
    TRAIN_FUNCTION: fedrec_train_round,
    APPLY_FUNCTION: fedrec_apply_round,
}


def source_digest(source: str) -> str:
    """SHA-256 (hex) of a function's source text as PySyft stores it."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def function_source(function: Callable[..., Any]) -> str:
    """The source PySyft submits for ``function`` (``dedent(inspect.getsource(f))``)."""
    return textwrap.dedent(inspect.getsource(function))


def function_digest(function: Callable[..., Any]) -> str:
    return source_digest(function_source(function))


def approved_digests() -> dict[str, str]:
    """``name -> digest`` of the functions this fedrec installation submits."""
    return {name: function_digest(function) for name, function in FUNCTIONS.items()}


def syft_functions(
    client: Any,
    data_asset: Any,
    owner_asset: Any,
    *,
    max_executions: int,
    functions: dict[str, Callable[..., Any]] | None = None,
) -> dict[str, Any]:
    """``name -> SubmitUserCode`` for one datasite (needs PySyft)."""
    import syft as sy
    from syft.service.policy.policy import OutputPolicyExecuteCount

    out = {}
    for name, function in (functions or FUNCTIONS).items():
        params = inspect.signature(function).parameters
        rules: dict[str, Any] = {}
        if "data" in params:
            rules["data"] = data_asset
        rules["owner"] = owner_asset
        rules["request"] = dict
        policy = sy.MixedInputPolicy(client=client, **rules)
        out[name] = sy.syft_function(
            input_policy=policy, output_policy=OutputPolicyExecuteCount(limit=int(max_executions))
        )(function)
    return out
