"""Read rows of a memory-mapped ``.npy`` array with file reads instead of through the mapping.

Touching a memory map maps the touched pages (and, on a read fault, the pages around them) into the
process: they count in its resident set until it unmaps the file. A scan of a column of 18M ratings
then adds the whole column to the peak RSS, and a few thousand scattered per-client reads map most of
a file. Reading the same bytes with ``np.fromfile`` at an offset goes through the page cache without
mapping it: the process holds only the copy it asked for. The result is the same array.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping

import numpy as np

SCAN_CHUNK_ROWS = 1 << 20


def backing_file(array: np.ndarray) -> tuple[str, int] | None:
    """``(path, byte offset of row 0)`` when ``array`` is a whole, C-ordered memory-mapped ``.npy`` file
    (as ``np.load(mmap_mode=...)`` returns it), else None (an in-memory array or a view of a map)."""
    filename = getattr(array, "filename", None)
    if not isinstance(array, np.memmap) or not filename or not array.flags.c_contiguous:
        return None
    try:
        size = os.path.getsize(filename)
    except OSError:
        return None
    offset = int(array.offset)
    if offset + array.nbytes != size:  # a slice of the map keeps the file's name and offset: not ours
        return None
    return str(filename), offset


def read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]`` as a new in-memory array (read from the file when ``array`` maps one)."""
    start, stop = max(0, int(start)), min(len(array), int(stop))
    stop = max(start, stop)
    backing = backing_file(array)
    if backing is None:
        return np.array(array[start:stop])
    path, offset = backing
    row_items = math.prod(array.shape[1:])
    rows = np.fromfile(
        path,
        dtype=array.dtype,
        count=(stop - start) * row_items,
        offset=offset + start * row_items * array.dtype.itemsize,
    )
    return rows.reshape((stop - start, *array.shape[1:]))


def scan_rows(array: np.ndarray, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, array[start:start + chunk_rows])`` over the whole array (chunks of SCAN_CHUNK_ROWS by
    default), each chunk a fresh copy."""
    chunk_rows = chunk_rows or SCAN_CHUNK_ROWS
    for start in range(0, len(array), chunk_rows):
        yield start, read_rows(array, start, start + chunk_rows)


def rows_where_in(arrays: Mapping[str, np.ndarray], column: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of ``arrays`` (columns of equal length) whose ``column`` is in ``values``, in order, as new
    in-memory arrays: scanned a chunk at a time with file reads (a mapped column scanned whole would
    join the peak RSS), the other columns read only where a chunk keeps a row."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
    for start, key in scan_rows(arrays[column]):
        keep = np.flatnonzero(np.isin(key, values))
        if not len(keep):
            continue
        for name, array in arrays.items():
            chunk = key if name == column else read_rows(array, start, start + len(key))
            parts[name].append(chunk[keep])
    return {
        name: np.concatenate(chunks)
        if chunks
        else np.zeros((0, *arrays[name].shape[1:]), dtype=arrays[name].dtype)
        for name, chunks in parts.items()
    }


def read_items(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[index]`` for a 1-d integer ``index`` into the first axis, read item by item from the file
    behind a memory map (scattered rows: one small read each, nothing mapped)."""
    index = np.asarray(index, dtype=np.int64)
    backing = backing_file(array)
    if backing is None:
        return np.asarray(array[index])
    path, offset = backing
    row_shape = array.shape[1:]
    row_bytes = math.prod(row_shape) * array.dtype.itemsize
    out = np.empty((len(index), *row_shape), dtype=array.dtype)
    if not len(index):
        return out
    flat = out.reshape(len(index), -1).view(np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, row in enumerate(index.tolist()):
            if not 0 <= row < len(array):
                raise IndexError(f"row {row} out of range for {len(array)} rows of {path}")
            data = os.pread(fd, row_bytes, offset + row * row_bytes)
            if len(data) != row_bytes:
                raise OSError(f"{path}: short read at row {row}")
            flat[i] = np.frombuffer(data, dtype=np.uint8)
    finally:
        os.close(fd)
    return out
