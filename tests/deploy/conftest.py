"""Fixtures of the deployment tests (defined in deploy_helpers).

The datasites are session fixtures shared by every test here; they are shut down as soon as the last
test of this directory is done (not at the end of the whole session), and the process-wide logging
and warning settings that importing PySyft changes are put back then.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import deploy_helpers
from deploy_helpers import deploy_cache, deployed_run, federation, simulation

__all__ = ["deploy_cache", "deployed_run", "federation", "simulation"]

HERE = Path(__file__).resolve().parent
_ROOT_HANDLERS = list(logging.root.handlers)
_WARNING_FILTERS = list(warnings.filters)


def pytest_runtest_teardown(item, nextitem) -> None:
    if nextitem is not None and HERE in Path(str(nextitem.path)).resolve().parents:
        return
    deploy_helpers.stop_datasites()
    logging.root.handlers[:] = _ROOT_HANDLERS
    warnings.filters[:] = _WARNING_FILTERS
