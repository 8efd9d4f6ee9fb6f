"""Errors of the datasite deployment (owner side, coordinator side, the code run on datasites)."""

from __future__ import annotations

from fedrec.errors import FedrecError


class DeployError(FedrecError):
    """A deployment step that cannot go on: a datasite that refuses, a bad credential, a bad payload."""


class RejectedOutput(DeployError):
    """A datasite's output that is not a well-formed encrypted update of this round (never aggregated)."""
