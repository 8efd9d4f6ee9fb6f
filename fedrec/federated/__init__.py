"""Federated learning: FederatedWorker and its algorithms, the pure aggregation maths, the MPI simulation.

Import what you need from the submodules (``fedrec.federated.worker``, ``.simulation``, ...); this
package imports nothing heavy on its own.
"""
