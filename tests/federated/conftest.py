"""Fixtures of the federated tests (defined in fl_helpers, shared with tests/scripts/test_train_fl.py)."""

from fl_helpers import data_cache, tiny_config

__all__ = ["data_cache", "tiny_config"]
