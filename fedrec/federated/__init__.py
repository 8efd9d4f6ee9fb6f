"""Federated learning: FederatedWorker and its algorithms, the aggregation maths, the round engine, the MPI simulation.

Import what you need from the submodules (``fedrec.federated.worker``, ``.simulation``, ...); this
package imports nothing heavy on its own.
"""
