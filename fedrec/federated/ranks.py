"""Ranks, hosts and GPUs (``communications.gpu_map``), and the pools that run client tasks.

Under ``python -m mpi4py.futures`` rank 0 is the aggregator and the other ranks form an
``MPIPoolExecutor`` pool; without it an in-process pool of one worker thread runs the same tasks.
Every worker rank is set up (device check, data, partition, model) before round 0, so no client's
timeout pays for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

from fedrec.errors import ConfigError
from fedrec.federated.run import RunSpec, one_line

# --------------------------------------------------------------------------------------------------
# Ranks, hosts and GPUs (communications.gpu_map: the seed's / FedML's format)
# --------------------------------------------------------------------------------------------------


def gpu_assignments(gpu_map: dict[str, list[int]]) -> list[tuple[str, int]]:
    """Process i -> (host, GPU index): ``host: [n_0, n_1, ...]`` puts n_j processes on GPU j, in order."""
    out = []
    for host, counts in gpu_map.items():
        for gpu, count in enumerate(counts):
            out.extend([(host, gpu)] * int(count))
    return out


def _is_this_host(host: str) -> bool:
    return host in (platform.node(), "localhost", "127.0.0.1")


def check_gpu_map(gpu_map: dict[str, list[int]], world_size: int, *, cuda_devices: int) -> None:
    """Errors before the first round: rank count differs from the map, or a GPU of this host is missing."""
    assigned = gpu_assignments(gpu_map)
    launch = "one process (no mpirun)" if world_size == 1 else f"{world_size} ranks (mpirun -np {world_size})"
    if len(assigned) > world_size:
        raise ConfigError(
            f"config key 'communications.gpu_map' asks for {len(assigned)} processes but the job has {launch}"
        )
    if len(assigned) < world_size:
        raise ConfigError(
            f"config key 'communications.gpu_map' assigns {len(assigned)} processes but the job has {launch}; "
            "every rank needs an entry"
        )
    host0, _ = assigned[0]
    if not _is_this_host(host0):
        raise ConfigError(
            f"config key 'communications.gpu_map': rank 0 is mapped to host {host0!r} but runs on "
            f"{platform.node()!r} (use the host's name or 'localhost')"
        )
    for host, counts in gpu_map.items():
        if not _is_this_host(host):
            continue  # checked by that host's worker ranks when the pool starts
        for gpu, count in enumerate(counts):
            if count > 0 and gpu >= cuda_devices:
                raise ConfigError(
                    f"config key 'communications.gpu_map.{host}' = {counts!r}: GPU {gpu} does not exist "
                    f"({cuda_devices} CUDA device(s) on {platform.node()})"
                )


def import_modules(modules: list[str]) -> None:
    """Import ``fl.import_modules`` (your own ``@registry.load('fl_algo', ...)``) on this rank."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"config key 'fl.import_modules': cannot import {module!r} ({err})") from None


def world_rank() -> int:
    """This process's rank in MPI.COMM_WORLD (0 without MPI)."""
    if "mpi4py.MPI" not in sys.modules:
        return 0
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def rank_device(spec: RunSpec) -> torch.device:
    gpu_map = spec.config.communications.gpu_map if spec.config.communications else None
    if not gpu_map:
        return torch.device(spec.device)
    host, gpu = gpu_assignments(gpu_map)[world_rank()]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not _is_this_host(host):
        raise ConfigError(
            f"config key 'communications.gpu_map': rank {world_rank()} is mapped to host {host!r} but runs on "
            f"{platform.node()!r}"
        )
    if gpu >= available:
        raise ConfigError(
            f"config key 'communications.gpu_map.{host}': GPU {gpu} does not exist ({available} CUDA device(s) "
            f"on {platform.node()})"
        )
    return torch.device("cuda", gpu)


def _init_worker_rank(spec: RunSpec) -> None:
    """Pool initializer on every worker rank, before round 0: check (and select) this rank's device and
    build the rank's context (data, partition, model), so no client's timeout pays for the setup."""
    try:
        device = rank_device(spec)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from fedrec.federated.clients import rank_context  # the client side imports this module

        rank_context(spec)
    except Exception as err:
        print(f"train_fl.py (rank {world_rank()}): error: {one_line(err)}", file=sys.stderr, flush=True)
        raise


# --------------------------------------------------------------------------------------------------
# Pools: mpi4py.futures under mpirun, one worker thread otherwise
# --------------------------------------------------------------------------------------------------


def mpi_world_size() -> int:
    """Ranks of the surrounding ``python -m mpi4py.futures`` job (1 when not under one)."""
    core = sys.modules.get("mpi4py.futures._core")
    if core is None or getattr(core, "SharedPool", None) is None:
        return 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def launcher_ranks() -> int:
    """Ranks announced by an MPI launcher's environment (mpich/hydra, Open MPI), or 1."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


class InProcessPool:
    """The pool of a run without mpirun: one worker thread in this process."""

    mode = "in-process"
    num_workers = 1

    def __init__(self, spec: RunSpec) -> None:
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fl-client")
        from fedrec.federated.clients import rank_context

        self._executor.submit(rank_context, spec).result()  # set up before round 0 (errors surface here)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self._executor.submit(fn, *args)

    def shutdown(self, *, stuck: bool) -> None:
        self._executor.shutdown(wait=not stuck, cancel_futures=True)


class MPIPool:
    """The ``mpi4py.futures`` pool of the worker ranks (rank 0 is the aggregator)."""

    mode = "mpi"

    def __init__(self, spec: RunSpec) -> None:
        from mpi4py.futures import MPIPoolExecutor

        self._executor = MPIPoolExecutor(initializer=_init_worker_rank, initargs=(spec,))
        try:
            self._executor.bootup(wait=True)
            self.num_workers = self._executor.num_workers
        except Exception as err:
            raise ConfigError(f"the MPI worker pool did not start: {err}") from None
        if self.num_workers < 1:
            raise ConfigError(
                "the MPI worker pool did not start: a worker rank failed its setup "
                "(for example its communications.gpu_map entry; see the rank's error above)"
            )

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self._executor.submit(fn, *args)

    def shutdown(self, *, stuck: bool) -> None:
        self._executor.shutdown(wait=not stuck, cancel_futures=True)
