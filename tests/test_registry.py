"""Registry: lookup by kind and name; unknown names list the known ones; duplicates are errors."""

from __future__ import annotations

import pytest

from fedrec import registry
from fedrec.errors import RegistryError


def test_builtin_models_and_datasets_are_registered():
    assert {"dlrm", "mf"} <= set(registry.names("model"))
    assert {"criteo", "movielens"} <= set(registry.names("dataset"))


def test_unknown_name_lists_known_ones():
    with pytest.raises(RegistryError) as err:
        registry.lookup("model", "dlmr")
    message = str(err.value)
    assert "did you mean 'dlrm'" in message
    assert "mf" in message


def test_unknown_kind():
    with pytest.raises(RegistryError, match="unknown registry kind"):
        registry.load("widget", "x")


def test_duplicate_name_is_an_error():
    @registry.load("model", "_test_dup")
    class First:
        pass

    with pytest.raises(RegistryError, match="duplicate model name '_test_dup'"):

        @registry.load("model", "_test_dup")
        class Second:
            pass

    # Re-registering the same object (a module imported twice) is harmless.
    registry.load("model", "_test_dup")(First)
