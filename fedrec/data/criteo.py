"""Criteo Kaggle display-advertising data (``train.txt``) -> day splits -> memory-mappable arrays.

Format (Criteo Labs, Kaggle Display Advertising Challenge 2014): one impression per line,
``label \\t I1..I13 \\t C1..C26``; the integers may be negative or empty, the categoricals are 8 hex
digits or empty. 45,840,617 lines over 7 days in time order.

Preprocessing follows the DLRM reference (Naumov et al. 2019, "Deep Learning Recommendation Model
for Personalization and Recommendation Systems", ``dlrm_data_pytorch.py``): the lines are split by
equal counts into ``num_days`` days; dense x -> log(1 + max(x, 0)) (empty -> 0); categoricals ->
indices, either a vocabulary built from the training days (categories seen fewer than
``min_count`` times, unseen or empty share index 0) or hashing modulo ``max_ind_range``; days
0..n-2 are 'train' and the last day is halved into 'val' and 'test'.

The file is streamed twice: a line count (to place the day boundaries), then blocks of whole lines
parsed with vectorised numpy (``fedrec.data.criteo_parser``) whose rows go straight into ``.npy``
files of the right split. Memory is a few blocks plus the vocabulary, whatever the file size.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedrec import registry
from fedrec.data.base import Dataset, ProcessedData
from fedrec.data.criteo_parser import (
    BLOCK_BYTES,
    CAT_FEATURE_COUNT,
    INT_FEATURE_COUNT,
    WHAT,
    line_ranges,
    parsed_ranges,
    sniff,
)
from fedrec.data.processed import (
    AtomicDir,
    NpyWriter,
    check_input_file,
    current_manifest,
    default_processed_dir,
    ensure_writable_parent,
    fingerprint,
    load_array,
    load_splits,
    locked,
    summary,
)
from fedrec.data.vocabulary import CategoryIndexer
from fedrec.errors import DataError

SPLITS = ("train", "val", "test")
ARRAYS = ("dense", "sparse", "label")
# Bumped whenever the output for the same input and settings changes; part of the reuse manifest.
PARSER_VERSION = 1
MAX_REPORTED_BAD_LINES = 10
PARALLEL_MIN_BYTES = 32 << 20  # smaller files are parsed in-process (worker start-up would dominate)


# ----------------------------------------------------------------------------- preprocessing


def default_workers(file_bytes: int) -> int:
    """Parsing processes for a file: 2 where the machine has a second CPU and the file is large enough
    to repay their start-up, else 1 (parse here).

    On a quiet 2-CPU machine two workers parsed 1.5-1.6x faster than one process; on a 2-CPU machine
    busy with other work they were no faster (they add about 0.5 us of CPU per row: start-up and
    passing results). See docs/PERFORMANCE.md.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cpus >= 2 and file_bytes >= PARALLEL_MIN_BYTES else 1


def day_bounds(num_lines: int, num_days: int) -> list[int]:
    """First line of each day and the end: equal counts, the first ``num_lines % num_days`` days
    one line longer (as the DLRM reference splits)."""
    base, extra = divmod(num_lines, num_days)
    bounds = [0]
    for day in range(num_days):
        bounds.append(bounds[-1] + base + (day < extra))
    return bounds


def split_bounds(days: list[int]) -> dict[str, tuple[int, int]]:
    """Line ranges of train (all days but the last) and val/test (the last day's two halves)."""
    last_start, end = days[-2], days[-1]
    mid = last_start + (end - last_start + 1) // 2
    return {"train": (0, last_start), "val": (last_start, mid), "test": (mid, end)}


def preprocess(
    datafile: str,
    *,
    processed_dir: str | None = None,
    num_days: int = 7,
    max_ind_range: int = -1,
    min_count: int = 1,
    strict: bool = False,
    log: Callable[[str], Any] = print,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
    workers: int | None = None,
) -> ProcessedData:
    """Preprocess ``datafile`` (or reuse an up-to-date result) and return its memory-mapped splits.

    ``workers`` processes parse the file's ranges in parallel (default: ``default_workers``); the
    output does not depend on it.

    Raises:
        DataError: missing/empty/unreadable file, not Criteo, a malformed line with ``strict``,
            or no usable line at all. Nothing partial is left behind.
    """
    datafile = check_input_file(datafile, WHAT)
    if workers is None:
        workers = default_workers(os.path.getsize(datafile))
    processed_dir = os.path.abspath(processed_dir or default_processed_dir(datafile))
    settings = {
        "num_days": int(num_days),
        "max_ind_range": int(max_ind_range),
        "min_count": int(min_count) if max_ind_range <= 0 else None,
    }
    if num_days < 2:
        raise DataError(f"num_days = {num_days}: expected at least 2 (the last day becomes val and test)")
    ensure_writable_parent(processed_dir)
    with locked(processed_dir):
        inputs = {
            "dataset": "criteo",
            "parser_version": PARSER_VERSION,
            "raw": fingerprint(datafile),
            "settings": settings,
        }
        manifest = current_manifest(processed_dir, inputs)
        if manifest is not None and not (strict and manifest["meta"]["skipped_lines"]):
            log(f"criteo: reusing {processed_dir} (made from {datafile}, unchanged)")
            return _load(processed_dir, manifest["meta"], reused=True)
        sniff(datafile)
        meta = _run(
            datafile,
            processed_dir,
            inputs,
            strict=strict,
            log=log,
            progress=progress,
            block_bytes=block_bytes,
            workers=workers,
        )
        return _load(processed_dir, meta, reused=False)


def _load(processed_dir: str, meta: dict[str, Any], *, reused: bool) -> ProcessedData:
    splits = load_splits(processed_dir, SPLITS, ARRAYS)
    for name, split in splits.items():
        if len(split) != meta["rows"][name]:
            raise DataError(
                f"{processed_dir}: split {name} has {len(split)} rows, manifest says {meta['rows'][name]}"
            )
    meta = dict(meta, reused=reused, processed_dir=processed_dir)
    meta["summary"] = summary(meta)
    return ProcessedData(splits, meta)


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal. Under mpirun's gforker stderr is a pipe whose
    # reader gives up on long carriage-return lines: a bar there killed the rank with EPIPE (make demo
    # on a fresh checkout, where the data is preprocessed inside the MPI job).
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        disable=None,
    )


def _run(
    datafile: str,
    processed_dir: str,
    inputs: dict[str, Any],
    *,
    strict: bool,
    log: Callable[[str], Any],
    progress: bool,
    block_bytes: int,
    workers: int,
) -> dict[str, Any]:
    settings = inputs["settings"]
    num_days = settings["num_days"]
    size = inputs["raw"]["size"]
    started = time.perf_counter()
    log(f"criteo: preprocessing {datafile} ({size / 2**20:.1f} MiB) into {processed_dir}")
    show = progress and size > 64 << 20

    bar = _progress_bar(show, size, "criteo: counting lines")
    num_lines, line_chunks = line_ranges(datafile, on_bytes=bar.update if bar else None)
    if bar:
        bar.close()
    days = day_bounds(num_lines, num_days)
    ranges = split_bounds(days)
    indexer = CategoryIndexer(
        CAT_FEATURE_COUNT, max_ind_range=settings["max_ind_range"], min_count=settings["min_count"] or 1
    )
    skipped = 0
    bad_examples: list[dict[str, Any]] = []
    day_rows = np.zeros(num_days, dtype=np.int64)
    positives = dict.fromkeys(SPLITS, 0.0)

    with AtomicDir(processed_dir) as out:
        writers = {
            split: {
                "dense": NpyWriter(out.file(f"{split}_dense.npy"), np.float32, hi - lo, (INT_FEATURE_COUNT,)),
                "sparse": NpyWriter(out.file(f"{split}_sparse.npy"), np.int32, hi - lo, (CAT_FEATURE_COUNT,)),
                "label": NpyWriter(out.file(f"{split}_label.npy"), np.float32, hi - lo),
            }
            for split, (lo, hi) in ranges.items()
        }
        bar = _progress_bar(show, size, "criteo: parsing")
        lines_parsed = 0
        chunks = parsed_ranges(
            datafile,
            line_chunks,
            workers=workers,
            block_bytes=block_bytes,
            on_bytes=bar.update if bar else None,
            on_worker_lost=lambda message: log(f"criteo: {message}"),
        )
        for parsed, first_line in chunks:
            lines_parsed += parsed.num_lines
            if parsed.bad:
                if strict:
                    line, reason = parsed.bad[0]
                    raise DataError(
                        f"{datafile}: line {first_line + line + 1}{_phrase(reason)} (strict=true)"
                    )
                skipped += len(parsed.bad)
                for line, reason in parsed.bad[: MAX_REPORTED_BAD_LINES - len(bad_examples)]:
                    bad_examples.append({"line": first_line + line + 1, "reason": reason})
            lines = parsed.line + first_line
            if not len(lines):
                continue
            day_rows += np.bincount(np.searchsorted(days, lines, side="right") - 1, minlength=num_days)[
                :num_days
            ]
            for split, (lo, hi) in ranges.items():
                a, b = (
                    (0, len(lines)) if lo <= lines[0] and lines[-1] < hi else np.searchsorted(lines, [lo, hi])
                )
                if a == b:
                    continue
                keys = parsed.cat[a:b]
                sparse = indexer.train_indices(keys) if split == "train" else indexer.eval_indices(keys)
                w = writers[split]
                w["dense"].append(parsed.dense[a:b])
                w["sparse"].append(sparse)
                w["label"].append(parsed.label[a:b])
                positives[split] += float(parsed.label[a:b].sum())
        if bar:
            bar.close()
        if lines_parsed != num_lines:
            raise DataError(
                f"{datafile}: changed while being read ({num_lines} lines counted, {lines_parsed} parsed)"
            )

        indexer.finalize()
        rows = {split: writers[split]["label"].rows for split in SPLITS}
        for group in writers.values():
            for writer in group.values():
                writer.finish()
        if indexer.needs_train_remap:
            _remap_in_place(writers["train"]["sparse"].path, indexer)
        total_rows = sum(rows.values())
        if total_rows == 0:
            first = bad_examples[0]
            raise DataError(
                f"{datafile}: no usable line among {num_lines} (line {first['line']}{_phrase(first['reason'])})"
            )
        # Refused before the output is committed: a model evaluated on nothing reports nothing.
        for split in SPLITS:
            lo, hi = ranges[split]
            if hi <= lo:
                raise DataError(
                    f"{datafile}: {num_lines} lines leave split {split!r} empty with num_days={num_days} "
                    f"(expected at least {2 * num_days} lines)"
                )
            if rows[split] == 0:
                raise DataError(
                    f"{datafile}: split {split!r} has no usable line (lines {lo + 1}-{hi} were all malformed)"
                )
        if not indexer.hashing:
            values, offsets = indexer.categories()
            np.save(out.file("categories.npy"), values, allow_pickle=False)
            np.save(out.file("categories_offsets.npy"), offsets, allow_pickle=False)

        seconds = time.perf_counter() - started
        meta = {
            "dataset": "criteo",
            "format": "criteo_kaggle_tsv",
            "task": "ctr",
            "num_dense": INT_FEATURE_COUNT,
            "num_sparse": CAT_FEATURE_COUNT,
            "categorical_mode": "hashing" if indexer.hashing else "vocabulary",
            "table_sizes": indexer.table_sizes(),
            "rows": rows,
            "lines": num_lines,
            "days": _day_meta(days, day_rows),
            "split_lines": {split: [lo + 1, hi] for split, (lo, hi) in ranges.items()},
            "positive_rate": {s: (round(positives[s] / rows[s], 6) if rows[s] else None) for s in SPLITS},
            "skipped_lines": skipped,
            "skipped_examples": bad_examples,
            "fingerprint": inputs["raw"],
            "settings": settings,
            "seconds": round(seconds, 3),
            "rows_per_second": round(total_rows / seconds, 1) if seconds > 0 else None,
        }
        out.commit({"inputs": inputs, "meta": meta})
    if skipped:
        first = bad_examples[0]
        log(
            f"criteo: skipped {skipped} malformed line(s) of {num_lines} "
            f"(first: line {first['line']}{_phrase(first['reason'])})"
        )
    log(
        f"criteo: {total_rows} rows (train {rows['train']}, val {rows['val']}, test {rows['test']}) "
        f"in {seconds:.1f} s, {total_rows / max(seconds, 1e-9):,.0f} rows/s"
    )
    return meta


def _day_meta(days: list[int], day_rows: np.ndarray) -> list[dict[str, Any]]:
    """Per day: its lines (1-based first line and count), rows kept, and where they sit in 'train'."""
    num_days = len(days) - 1
    meta = []
    train_row = 0
    for day in range(num_days):
        entry: dict[str, Any] = {
            "day": day,
            "first_line": days[day] + 1,
            "lines": days[day + 1] - days[day],
            "rows": int(day_rows[day]),
        }
        if day < num_days - 1:
            entry["split"] = "train"
            entry["train_rows"] = [train_row, train_row + int(day_rows[day])]
            train_row += int(day_rows[day])
        else:
            entry["split"] = "val+test"
        meta.append(entry)
    return meta


def _phrase(reason: str) -> str:
    """' has 4 fields, ...' or ': label ...' to follow 'line N'."""
    return f" {reason}" if reason.startswith(("has ", "is ")) else f": {reason}"


def _remap_in_place(path: str, indexer: CategoryIndexer, rows_per_chunk: int = 1 << 16) -> None:
    """Replace the training rows' first-appearance ids by final indices, a chunk at a time."""
    sparse = np.load(path, mmap_mode="r+", allow_pickle=False)
    for start in range(0, len(sparse), rows_per_chunk):
        sparse[start : start + rows_per_chunk] = indexer.remap(
            np.asarray(sparse[start : start + rows_per_chunk])
        )
    sparse.flush()
    del sparse


def load_categories(processed_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary of a vocabulary-mode preprocessing: (values uint32, offsets int64 [27]);
    field f's category with index i >= 1 is ``values[offsets[f] + i - 1]``."""
    return (
        load_array(os.path.join(processed_dir, "categories.npy")),
        load_array(os.path.join(processed_dir, "categories_offsets.npy")),
    )


@registry.load("dataset", "criteo")
class Criteo(Dataset):
    """Criteo Kaggle click logs: 13 dense and 26 categorical features, binary click label.

    Splits 'train', 'val', 'test', each with arrays ``dense`` float32 [n, 13], ``sparse`` int32
    [n, 26] (embedding indices, 0 = empty/rare/unseen) and ``label`` float32 [n].
    """

    TASK = "ctr"
    NUM_DENSE = INT_FEATURE_COUNT
    NUM_SPARSE = CAT_FEATURE_COUNT

    @classmethod
    def prepare(cls, preproc: Any, *, log: Any = print, progress: bool = True) -> ProcessedData:
        """Preprocess ``preproc.datafile`` (generating synthetic data in the same format when it is
        null) or reuse an up-to-date result."""
        datafile = preproc.datafile
        if datafile is None:
            from fedrec.data.synthetic import ensure_synthetic_file

            datafile = ensure_synthetic_file("criteo", preproc, log=log)
        return preprocess(
            datafile,
            processed_dir=preproc.processed_dir,
            num_days=preproc.num_days,
            max_ind_range=preproc.max_ind_range,
            min_count=preproc.min_count,
            strict=preproc.strict,
            log=log,
            progress=progress,
        )
