"""Parallel parsing of Criteo ranges in worker processes: ``python -m fedrec.data.criteo_worker PATH SCRATCH``.

numpy's many small calls per block hold the GIL long enough that parsing threads run one at a
time, so the parallel path uses processes. They are plain subprocesses of this module (not
``multiprocessing``): nothing of the caller's ``__main__`` is re-run in them, nothing is forked
from a parent that may hold threads, MPI or CUDA state, and no pickle crosses the pipes.

Protocol, one worker per process, jobs answered in order:

- parent -> worker, one line per job: ``number start stop block_bytes``; end of input ends it;
- worker -> parent, per job: one JSON line (``num_lines``, ``bad`` as [line, reason] pairs and
  ``file``, or ``error``); ``file`` (in the scratch directory given as the second argument) holds
  the arrays ``line``, ``label``, ``dense``, ``cat`` as consecutive ``.npy`` data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np

import fedrec
from fedrec.data.criteo_parser import BLOCK_BYTES, ParsedBlock, parse_range
from fedrec.errors import DataError

_ARRAYS = ("line", "label", "dense", "cat")
AHEAD = 4  # ranges queued per worker (each result is a few MiB in the scratch directory)


def _write_array(out: IO[bytes], array: np.ndarray) -> None:
    np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)


def _read_array(stream: IO[bytes]) -> np.ndarray:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject or fortran:
        raise DataError("criteo worker sent an unexpected array")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = stream.read(size)
    if len(data) != size:
        raise WorkerLost("a criteo parsing worker stopped in the middle of an array")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def serve(path: str, scratch: str, jobs: IO[str], out: IO[bytes]) -> None:
    """Answer jobs until the input ends (the worker's main loop)."""
    for job in jobs:
        number, start, stop, block_bytes = (int(x) for x in job.split())
        try:
            parsed = parse_range(path, start, stop, block_bytes)
            # The arrays go to a scratch file, not the pipe: a pipe holds 64 KiB, so a worker
            # writing megabytes into it would wait for the parent instead of parsing ahead.
            name = os.path.join(scratch, f"range-{number}.npys")
            with open(name + ".tmp", "wb") as fh:
                for array_name in _ARRAYS:
                    _write_array(fh, getattr(parsed, array_name))
            os.replace(name + ".tmp", name)
        except Exception as err:  # reported to the parent, which raises it
            out.write((json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n").encode())
            out.flush()
            continue
        header = {
            "num_lines": int(parsed.num_lines),
            "bad": [[int(i), str(reason)] for i, reason in parsed.bad],
            "file": name,
        }
        out.write((json.dumps(header) + "\n").encode())
        out.flush()


class WorkerLost(RuntimeError):
    """A worker process could not be started or stopped answering (not a problem with the data)."""


def _receive(stream: IO[bytes]) -> ParsedBlock:
    line = stream.readline()
    if not line:
        raise WorkerLost("a criteo parsing worker stopped unexpectedly")
    header = json.loads(line)
    if "error" in header:
        raise DataError(f"criteo parsing worker failed: {header['error']}")
    with open(header["file"], "rb") as fh:
        arrays = {name: _read_array(fh) for name in _ARRAYS}
    os.unlink(header["file"])
    bad = [(int(i), str(reason)) for i, reason in header["bad"]]
    return ParsedBlock(
        arrays["line"], arrays["label"], arrays["dense"], arrays["cat"], int(header["num_lines"]), bad
    )


def parallel_ranges(
    path: str,
    ranges: list[tuple[int, int, int]],
    *,
    workers: int,
    block_bytes: int = BLOCK_BYTES,
    on_bytes: Callable[[int], Any] | None = None,
) -> Iterator[tuple[ParsedBlock, int]]:
    """(parsed range, its first line number) in file order, parsed by ``workers`` subprocesses,
    each kept AHEAD ranges ahead; their results wait in a scratch directory (deleted after)."""
    # The workers import this package from where the parent found it, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fedrec.__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    )
    scratch = tempfile.mkdtemp(prefix="fedrec-criteo-")
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "fedrec.data.criteo_worker", path, scratch],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            for _ in range(workers)
        ]
    except OSError as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise WorkerLost(f"cannot start criteo parsing workers ({err})") from None
    queued: deque[tuple[int, int, int]] = deque()  # (worker, first line, bytes) of sent jobs
    try:
        jobs = iter(enumerate(ranges))
        for k, (start, stop, first) in jobs:
            proc = procs[k % workers]
            assert proc.stdin is not None
            try:
                proc.stdin.write(f"{k} {start} {stop} {block_bytes}\n".encode())
                proc.stdin.flush()
            except BrokenPipeError:
                raise WorkerLost("a criteo parsing worker stopped unexpectedly") from None
            queued.append((k % workers, first, stop - start))
            if len(queued) >= AHEAD * workers:
                yield _next(procs, queued, on_bytes)
        while queued:
            yield _next(procs, queued, on_bytes)
    finally:
        for proc in procs:
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        for proc in procs:
            if queued:  # stopped early (an error, or the consumer gave up): do not wait for the rest
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _next(
    procs: list[subprocess.Popen], queued: deque[tuple[int, int, int]], on_bytes: Callable[[int], Any] | None
) -> tuple[ParsedBlock, int]:
    worker, first, size = queued[0]
    stdout = procs[worker].stdout
    assert stdout is not None
    parsed = _receive(stdout)
    queued.popleft()
    if on_bytes is not None:
        on_bytes(size)
    return parsed, first


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.stdin, sys.stdout.buffer)
