"""Fixtures of the deployment tests (defined in deploy_helpers)."""

from deploy_helpers import deploy_cache, deployed_run, federation, simulation

__all__ = ["deploy_cache", "deployed_run", "federation", "simulation"]
