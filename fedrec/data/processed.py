"""Storage shared by the dataset parsers: input checks, fingerprints, reuse manifests, atomic output.

A processed dataset is a directory of ``.npy`` arrays plus ``manifest.json``. The manifest records
what the arrays were made from (raw file path, size, mtime, a hash of its first and last 64 KiB, and
the settings that change the output); a later run reuses the directory only while all of these
match. Output is written into a hidden sibling directory and renamed into place when complete, and
``manifest.json`` is written last, so a crash never leaves something a later run could take for a
finished preprocessing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from fedrec.data.base import ArraySplit, write_json_atomic
from fedrec.errors import DataError

MANIFEST = "manifest.json"
_SAMPLE_BYTES = 64 * 1024


def check_input_file(path: str | os.PathLike, what: str) -> str:
    """Return ``path`` as a string if it is a readable, non-empty regular file.

    Raises:
        DataError: missing, a directory, not a regular file, unreadable or empty; names the path.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (expected {what})")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected {what}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file, expected {what}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty, expected {what}")
    return path


def ensure_writable_parent(processed_dir: str) -> None:
    """The directory that will hold ``processed_dir`` exists (or is created) and is writable."""
    parent = os.path.dirname(os.path.abspath(processed_dir))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise DataError(f"{parent}: cannot create the processed-data directory ({err.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(
            f"{parent}: not writable; set model.preproc.processed_dir to a writable directory for {processed_dir}"
        )


def fingerprint(path: str) -> dict[str, Any]:
    """Identity of a raw file: absolute path, size, mtime_ns and a SHA-256 of its ends."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(_SAMPLE_BYTES))
        if stat.st_size > _SAMPLE_BYTES:
            fh.seek(max(_SAMPLE_BYTES, stat.st_size - _SAMPLE_BYTES))
            digest.update(fh.read(_SAMPLE_BYTES))
    return {
        "path": os.path.abspath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sample_sha256": digest.hexdigest(),
    }


def default_processed_dir(datafile: str) -> str:
    """``<dir>/<stem>_processed`` beside the raw file."""
    directory, name = os.path.split(os.path.abspath(datafile))
    stem = name.split(".", 1)[0] or name
    return os.path.join(directory, f"{stem}_processed")


def read_manifest(processed_dir: str) -> dict[str, Any] | None:
    """The manifest of a completed preprocessing, or None if there is none (or it is unreadable)."""
    path = os.path.join(processed_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def current_manifest(processed_dir: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest if ``processed_dir`` was made from exactly ``inputs``; otherwise None."""
    manifest = read_manifest(processed_dir)
    if manifest is None or manifest.get("inputs") != json.loads(json.dumps(inputs)):
        return None
    return manifest


@contextlib.contextmanager
def locked(processed_dir: str) -> Iterator[None]:
    """Hold an exclusive lock for ``processed_dir`` (a hidden sibling lock file), so that two
    processes preparing the same data (for example MPI ranks) do the work once."""
    parent, name = os.path.split(os.path.abspath(processed_dir))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.lock")
    with _lock_current(path) as fh:
        try:
            yield
        finally:
            # Removed while still held, success or failure, so no lock file is left behind; a waiter
            # holding the removed file notices (_lock_current) and retries on a fresh one.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _lock_current(path: str) -> BinaryIO:
    """Open ``path`` and lock it exclusively, retrying until the locked file is the one at ``path``."""
    while True:
        fh = open(path, "a+b")  # noqa: SIM115 - handed to the caller's with-block once locked
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            fh.close()
            raise
        if same:
            return fh
        fh.close()  # the holder before us removed the file when it finished: lock the current one


_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def remove_stale(parent: str, name: str) -> None:
    """Delete leftovers of ``name`` from runs whose process no longer exists (crashes, kills)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        match = _STALE.match(entry)
        if not match or match.group("name") != name:
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        target = os.path.join(parent, entry)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(target)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicDir:
    """A hidden temporary directory that becomes ``final`` only through ``commit``.

    Used as a context manager: leaving the block without ``commit`` (an error, an interrupt)
    deletes the temporary directory, so nothing partial is left behind.
    """

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        parent, name = os.path.split(self.final)
        os.makedirs(parent, exist_ok=True)
        remove_stale(parent, name)
        self.path = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        self.committed = False

    def __enter__(self) -> AtomicDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the manifest last, then swap the directory into place."""
        write_json_atomic(self.file(MANIFEST), manifest)
        _fsync_dir(self.path)
        parent, name = os.path.split(self.final)
        old = None
        if os.path.lexists(self.final):
            old = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
            os.rmdir(old)
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        _fsync_dir(parent)
        self.committed = True
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.unlink(old)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class NpyWriter:
    """Append rows to a ``.npy`` file, then fix its header for the rows actually written.

    The header is written first for ``capacity`` rows, padded so that any smaller row count fits
    in the same bytes; rows are appended with plain sequential writes (cheaper than faulting in
    memory-mapped pages); ``finish`` rewrites the header, fsyncs and closes. Peak memory is the
    rows of one append, whatever the file size.
    """

    def __init__(self, path: str, dtype: Any, capacity: int, row_shape: tuple[int, ...] = ()):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.capacity = int(capacity)
        self.rows = 0
        header = _npy_header(self.dtype, (self.capacity, *self.row_shape))
        self._header_len = len(header)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in finish/close
        self._fh.write(header)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape[1:] != self.row_shape:
            raise DataError(f"{self.path}: rows of shape {values.shape[1:]}, expected {self.row_shape}")
        if self.rows + len(values) > self.capacity:
            raise DataError(f"{self.path}: more rows than the {self.capacity} reserved")
        self._fh.write(values.data)
        self.rows += len(values)

    def finish(self) -> None:
        self._fh.seek(0)
        self._fh.write(_npy_header(self.dtype, (self.rows, *self.row_shape), self._header_len))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def close(self) -> None:
        self._fh.close()


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], total: int | None = None) -> bytes:
    """A version 1.0 ``.npy`` header for ``shape``, padded with spaces to ``total`` bytes (by
    default the smallest multiple of 64 that fits, as numpy aligns the data)."""
    descr = np.lib.format.dtype_to_descr(dtype)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    if total is None:
        total = -(-(10 + len(text) + 1) // 64) * 64
    body_len = total - 10
    if len(text) + 1 > body_len or body_len > 0xFFFF:
        raise ValueError(f"npy header for shape {shape} does not fit in {total} bytes")
    body = text + " " * (body_len - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


def load_array(path: str) -> np.ndarray:
    """Memory-map a ``.npy`` file read-only (no pickles)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(
            f"{path}: processed array missing; delete its directory to redo preprocessing"
        ) from None
    except ValueError as err:
        raise DataError(f"{path}: unreadable processed array ({err})") from None


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The few preprocessing facts a training run records in its summary.json."""
    keys = (
        "dataset",
        "format",
        "rows",
        "skipped_lines",
        "rows_per_second",
        "seconds",
        "processed_dir",
        "reused",
    )
    return {key: meta[key] for key in keys if key in meta}


def load_splits(
    processed_dir: str, splits: tuple[str, ...], arrays: tuple[str, ...]
) -> dict[str, ArraySplit]:
    """``{split: ArraySplit({name: memmap of '<split>_<name>.npy'})}``."""
    return {
        split: ArraySplit(
            {name: load_array(os.path.join(processed_dir, f"{split}_{name}.npy")) for name in arrays}
        )
        for split in splits
    }
