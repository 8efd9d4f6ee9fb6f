"""Registry of named components: ``@registry.load(kind, name)`` and construction from config.

Extension works like Opacus's ``@register_grad_sampler``: a class registers itself under a
(kind, name) pair; configs refer to it by name. Unknown names and duplicates are errors that
list what is known.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from fedrec.errors import RegistryError

T = TypeVar("T")

KINDS = ("model", "dataset", "fl_algo", "accountant", "encryptor")

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown registry kind {kind!r}; known kinds: {', '.join(sorted(_REGISTRY))}")


def load(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator registering ``obj`` under ``(kind, name)``.

    Raises:
        RegistryError: the kind is unknown or the name is already taken.
    """
    _check_kind(kind)

    def register(obj: T) -> T:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not obj:
            raise RegistryError(f"duplicate {kind} name {name!r}: already registered to {existing!r}")
        _REGISTRY[kind][name] = obj
        return obj

    return register


def lookup(kind: str, name: str) -> Any:
    """Return the object registered as ``(kind, name)``.

    Raises:
        RegistryError: unknown name, with the known names and the closest match.
    """
    _check_kind(kind)
    _import_builtins()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = sorted(_REGISTRY[kind])
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RegistryError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known) or 'none'}") from None


def names(kind: str) -> list[str]:
    """Sorted names registered under ``kind``."""
    _check_kind(kind)
    _import_builtins()
    return sorted(_REGISTRY[kind])


def construct(kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """Look up ``(kind, name)`` and call it with the given arguments."""
    return lookup(kind, name)(*args, **kwargs)


_builtins_imported = False


def _import_builtins() -> None:
    """Import the modules that register the built-in components (lazily, to keep imports light)."""
    global _builtins_imported
    if _builtins_imported:
        return
    _builtins_imported = True
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


# Modules whose import registers built-in components. Later features append here.
BUILTIN_MODULES: list[str] = [
    "fedrec.models.dlrm",
    "fedrec.models.mf",
    "fedrec.data.criteo",
    "fedrec.data.movielens",
    "fedrec.federated.algorithms.fed_avg",
    "fedrec.federated.algorithms.fed_prox",
]
