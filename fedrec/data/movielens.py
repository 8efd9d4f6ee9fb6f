"""MovieLens ratings (GroupLens; Harper & Konstan 2015) -> per-user evaluation splits -> arrays.

Three raw formats, detected from the file's first line:

- ``ml-100k``  ``u.data``:      ``user \\t item \\t rating \\t timestamp``
- ``ml-1m``    ``ratings.dat``: ``user::item::rating::timestamp``
- ``ml-latest`` ``ratings.csv``: header ``userId,movieId,rating,timestamp``, then e.g. ``1,31,2.5,1260759144``

User and item ids are remapped to dense 0..n-1 (the original ids are kept, in id order, in
``user_ids.npy`` and ``item_ids.npy``). Evaluation is per user, because users become the federated
clients later: 'leave_last_out' holds out each user's latest rating as test and the one before as
validation (users with at least 3 ratings; ties in time are broken by file order, later line =
later), 'random' holds out ``eval_fraction`` of each user's ratings (rounded, at least one kept
for training), half test and half validation, drawn with the fixed seed ``SPLIT_SEED``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fedrec import registry
from fedrec.data.base import Dataset, ProcessedData
from fedrec.data.processed import (
    AtomicDir,
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
from fedrec.errors import DataError

SPLITS = ("train", "val", "test")
ARRAYS = ("user", "item", "label", "timestamp")
PARSER_VERSION = 1
SPLIT_SEED = 0  # the 'random' split's seed: fixed, so a file always splits the same way
WHAT = "MovieLens ratings (u.data, ratings.dat or ratings.csv)"
CSV_HEADER = b"userId,movieId,rating,timestamp"
MAX_REPORTED_BAD_LINES = 10
BLOCK_BYTES = 4 << 20
# Every MovieLens format rates in [0.5, 5] (ml-100k/ml-1m: whole stars 1-5; ml-latest: half stars).
RATING_MIN, RATING_MAX = 0.5, 5.0

# format name -> (field separator, has a header line)
FORMATS = {
    "ml-100k": (b"\t", False),
    "ml-1m": (b"::", False),
    "ml-latest": (b",", True),
}


def detect_format(path: str) -> str:
    """'ml-100k', 'ml-1m' or 'ml-latest' from the first line, or a one-line DataError."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if head[:2] == b"\x1f\x8b":
        raise DataError(f"{path}: is gzip-compressed; decompress it first, expected {WHAT}")
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if first.startswith(b"\xef\xbb\xbf"):
        first = first[3:]  # UTF-8 byte-order mark
    if first.replace(b'"', b"") == CSV_HEADER:
        return "ml-latest"
    for name, (sep, header) in FORMATS.items():
        if header or sep not in first:
            continue
        parsed = parse_line(first, sep)
        if isinstance(parsed, str):
            sep_name = "tab" if sep == b"\t" else repr(sep.decode())
            parsed = parsed.replace(" fields, ", f" {sep_name}-separated fields, ", 1)
            raise DataError(f"{path}: does not look like {WHAT}, as {name}: line 1{_phrase(parsed)}")
        return name
    fields = {"tab": first.count(b"\t") + 1, "comma": first.count(b",") + 1}
    found = ", ".join(f"{n} {k}-separated field{'s' if n != 1 else ''}" for k, n in fields.items())
    raise DataError(
        f"{path}: does not look like {WHAT}: line 1 has {found}, expected 'user<TAB>item<TAB>rating<TAB>timestamp',"
        f" 'user::item::rating::timestamp' or the header '{CSV_HEADER.decode()}'"
    )


def parse_line(line: bytes, sep: bytes) -> tuple[int, int, float, int] | str:
    """Exact parser for one ratings line (one trailing CR allowed): (user, item, rating,
    timestamp), or a one-line reason why it is malformed."""
    if line.endswith(b"\r"):
        line = line[:-1]
    parts = line.split(sep)
    if len(parts) != 4:
        return f"has {len(parts)} field{'s' if len(parts) != 1 else ''}, expected 4 (user, item, rating, timestamp)"
    names = ("user id", "item id", "rating", "timestamp")
    values: list[Any] = []
    for name, raw in zip(names, parts):
        text = raw.strip()
        try:
            if name == "rating":
                value = float(text)
                if not np.isfinite(value):
                    raise ValueError
                if not RATING_MIN <= value <= RATING_MAX:
                    return f"rating {value:g} is outside the format's range [{RATING_MIN:g}, {RATING_MAX:g}]"
            else:
                if not text.isdigit():
                    raise ValueError
                value = int(text)
                if value >= 2**63:
                    raise ValueError
        except ValueError:
            shown = repr(raw[:24])[1:]
            return f"{name} {shown} is not {'a number' if name == 'rating' else 'a non-negative integer'}"
        values.append(value)
    if values[0] >= 2**31 or values[1] >= 2**31:
        return "user or item id is 2^31 or more"
    return values[0], values[1], values[2], values[3]


def _phrase(reason: str) -> str:
    """' has 3 fields, ...' or ': rating ...' to follow 'line N'."""
    return f" {reason}" if reason.startswith(("has ", "is ")) else f": {reason}"


# Bytes the fast path accepts (anything else sends the block to the exact per-line parser).
_FAST_BYTES = np.zeros(256, dtype=bool)
_FAST_BYTES[list(b"0123456789.\t\r\n")] = True


def _blocks(path: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[bytes, int]]:
    """(whole lines, 0-based number of the first) in blocks; a last line without newline gets one."""
    line = 0
    carry = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block_bytes)
            if not chunk:
                if carry:
                    yield carry + b"\n", line
                return
            data = carry + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            block, carry = data[: cut + 1], data[cut + 1 :]
            yield block, line
            line += block.count(b"\n")


def _parse_block(block: bytes, sep: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Fast path: (user, item, timestamp as int64 [n, 3], rating float64 [n]) when every line is 4
    non-empty numeric fields; None when any line needs the exact per-line parser."""
    if sep != b"\t":
        block = block.replace(sep, b"\t")
    if not _FAST_BYTES[np.frombuffer(block, dtype=np.uint8)].all():
        return None
    lines = block.count(b"\n")
    if block.count(b"\t") != 3 * lines or block.startswith((b"\t", b"\n")):
        return None
    if b"\t\t" in block or b"\n\t" in block or b"\t\n" in block or b"\t\r" in block or b"\n\n" in block:
        return None
    tokens = block.split()
    if len(tokens) != 4 * lines:
        return None
    try:
        table = np.array(tokens).reshape(lines, 4)
        ids = table[:, [0, 1, 3]].astype(np.int64)
        rating = table[:, 2].astype(np.float64)
    except (ValueError, OverflowError):
        return None
    if ids[:, :2].max(initial=0) >= 2**31:
        return None
    if ((rating < RATING_MIN) | (rating > RATING_MAX)).any():
        return None  # the exact parser names the line and the out-of-range rating
    return ids, rating


def read_ratings(
    path: str, fmt: str, *, strict: bool, log: Callable[[str], Any]
) -> tuple[dict[str, np.ndarray], int, list[dict[str, Any]], int]:
    """(columns user/item/rating/timestamp, skipped count, first bad lines, lines read)."""
    sep, header = FORMATS[fmt]
    users, items, ratings, stamps = [], [], [], []
    skipped = 0
    examples: list[dict[str, Any]] = []
    total_lines = 0
    for block, first_line in _blocks(path):
        total_lines = first_line + block.count(b"\n")
        if header and first_line == 0:
            block = block.split(b"\n", 1)[1]
            first_line = 1
            if not block:
                continue
        fast = _parse_block(block, sep)
        if fast is not None:
            ids, rating = fast
            users.append(ids[:, 0].astype(np.int32))
            items.append(ids[:, 1].astype(np.int32))
            ratings.append(rating.astype(np.float32))
            stamps.append(ids[:, 2])
            continue
        parsed = []
        for i, line in enumerate(block.split(b"\n")[:-1]):
            result = parse_line(line, sep)
            if isinstance(result, str):
                number = first_line + i + 1
                if strict:
                    raise DataError(f"{path}: line {number}{_phrase(result)} (strict=true)")
                skipped += 1
                if len(examples) < MAX_REPORTED_BAD_LINES:
                    examples.append({"line": number, "reason": result})
                continue
            parsed.append(result)
        if parsed:
            cols = list(zip(*parsed))
            users.append(np.array(cols[0], dtype=np.int32))
            items.append(np.array(cols[1], dtype=np.int32))
            ratings.append(np.array(cols[2], dtype=np.float32))
            stamps.append(np.array(cols[3], dtype=np.int64))
    if not users:
        if examples:
            first = examples[0]
            raise DataError(
                f"{path}: no usable rating among {total_lines} lines (line {first['line']}{_phrase(first['reason'])})"
            )
        raise DataError(f"{path}: no ratings (only a header), expected {WHAT}")
    columns = {
        "user": np.concatenate(users),
        "item": np.concatenate(items),
        "rating": np.concatenate(ratings),
        "timestamp": np.concatenate(stamps),
    }
    return columns, skipped, examples, total_lines


def split_per_user(
    user: np.ndarray, timestamp: np.ndarray, *, method: str, eval_fraction: float
) -> np.ndarray:
    """Split label per rating: 0 train, 1 val, 2 test (``user`` dense ids, rows in file order)."""
    n = len(user)
    counts = np.bincount(user)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    if method == "leave_last_out":
        order = np.lexsort((np.arange(n), timestamp, user))  # by user, time, then file order
        rank_from_end = np.empty(n, dtype=np.int64)
        position = np.arange(n) - starts[user[order]]
        rank_from_end[order] = counts[user[order]] - 1 - position
        eligible = counts[user] >= 3
        label = np.zeros(n, dtype=np.int8)
        label[eligible & (rank_from_end == 0)] = 2
        label[eligible & (rank_from_end == 1)] = 1
        return label
    if method == "random":
        keys = np.random.default_rng(SPLIT_SEED).random(n)
        order = np.lexsort((keys, user))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts[user[order]]
        held = np.minimum(np.floor(eval_fraction * counts + 0.5).astype(np.int64), np.maximum(counts - 1, 0))
        test = (held + 1) // 2
        label = np.zeros(n, dtype=np.int8)
        label[rank < test[user]] = 2
        label[(rank >= test[user]) & (rank < held[user])] = 1
        return label
    raise DataError(f"split = {method!r}: expected 'leave_last_out' or 'random'")


def preprocess(
    datafile: str,
    *,
    processed_dir: str | None = None,
    split: str = "leave_last_out",
    eval_fraction: float = 0.2,
    strict: bool = False,
    log: Callable[[str], Any] = print,
) -> ProcessedData:
    """Preprocess a MovieLens ratings file (or reuse an up-to-date result); return its splits.

    Raises:
        DataError: missing/empty/unreadable file, an unknown format, a malformed line with
            ``strict``, or no usable rating. Nothing partial is left behind.
    """
    datafile = check_input_file(datafile, WHAT)
    processed_dir = os.path.abspath(processed_dir or default_processed_dir(datafile))
    settings: dict[str, Any] = {"split": split}
    if split == "random":
        settings.update(eval_fraction=float(eval_fraction), split_seed=SPLIT_SEED)
    elif split != "leave_last_out":
        raise DataError(f"split = {split!r}: expected 'leave_last_out' or 'random'")
    ensure_writable_parent(processed_dir)
    with locked(processed_dir):
        inputs = {
            "dataset": "movielens",
            "parser_version": PARSER_VERSION,
            "raw": fingerprint(datafile),
            "settings": settings,
        }
        manifest = current_manifest(processed_dir, inputs)
        if manifest is not None and not (strict and manifest["meta"]["skipped_lines"]):
            log(f"movielens: reusing {processed_dir} (made from {datafile}, unchanged)")
            return _load(processed_dir, manifest["meta"], reused=True)
        fmt = detect_format(datafile)
        meta = _run(datafile, fmt, processed_dir, inputs, strict=strict, log=log)
        return _load(processed_dir, meta, reused=False)


def _run(
    datafile: str,
    fmt: str,
    processed_dir: str,
    inputs: dict[str, Any],
    *,
    strict: bool,
    log: Callable[[str], Any],
) -> dict[str, Any]:
    started = time.perf_counter()
    log(f"movielens: preprocessing {datafile} ({fmt} format) into {processed_dir}")
    columns, skipped, examples, lines = read_ratings(datafile, fmt, strict=strict, log=log)
    user_ids, user = np.unique(columns["user"], return_inverse=True)
    item_ids, item = np.unique(columns["item"], return_inverse=True)
    user, item = user.astype(np.int32), item.astype(np.int32)
    settings = inputs["settings"]
    label = split_per_user(
        user, columns["timestamp"], method=settings["split"], eval_fraction=settings.get("eval_fraction", 0.0)
    )
    rating, timestamp = columns["rating"], columns["timestamp"]
    rows = {}
    with AtomicDir(processed_dir) as out:
        for code, name in enumerate(SPLITS):
            chosen = np.flatnonzero(label == code)
            chosen = chosen[np.lexsort((chosen, timestamp[chosen], user[chosen]))]  # by user, then time
            arrays = {
                "user": user[chosen],
                "item": item[chosen],
                "label": rating[chosen],
                "timestamp": timestamp[chosen],
            }
            for array_name, values in arrays.items():
                _save(out.file(f"{name}_{array_name}.npy"), values)
            rows[name] = len(chosen)
        _save(out.file("user_ids.npy"), user_ids.astype(np.int64))
        _save(out.file("item_ids.npy"), item_ids.astype(np.int64))
        train_ratings = rating[label == 0]
        seconds = time.perf_counter() - started
        meta = {
            "dataset": "movielens",
            "format": fmt,
            "task": "rating",
            "num_users": len(user_ids),
            "num_items": len(item_ids),
            "rating_min": float(rating.min()),
            "rating_max": float(rating.max()),
            "global_mean": float(train_ratings.mean()) if len(train_ratings) else float(rating.mean()),
            "rows": rows,
            "lines": lines,
            "users_with_eval": len(np.unique(user[label != 0])),
            "skipped_lines": skipped,
            "skipped_examples": examples,
            "fingerprint": inputs["raw"],
            "settings": settings,
            "seconds": round(seconds, 3),
            "rows_per_second": round(len(user) / seconds, 1) if seconds > 0 else None,
        }
        out.commit({"inputs": inputs, "meta": meta})
    if skipped:
        first = examples[0]
        log(
            f"movielens: skipped {skipped} malformed line(s) (first: line {first['line']}{_phrase(first['reason'])})"
        )
    log(
        f"movielens: {len(user)} ratings, {len(user_ids)} users, {len(item_ids)} items "
        f"(train {rows['train']}, val {rows['val']}, test {rows['test']}) in {seconds:.1f} s"
    )
    return meta


def _save(path: str, values: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, values, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _load(processed_dir: str, meta: dict[str, Any], *, reused: bool) -> ProcessedData:
    splits = load_splits(processed_dir, SPLITS, ARRAYS)
    for name, part in splits.items():
        if len(part) != meta["rows"][name]:
            raise DataError(
                f"{processed_dir}: split {name} has {len(part)} rows, manifest says {meta['rows'][name]}"
            )
    meta = dict(meta, reused=reused, processed_dir=processed_dir)
    meta["summary"] = summary(meta)
    return ProcessedData(splits, meta)


def load_id_maps(processed_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Original (user ids, item ids), indexed by the dense ids used in the arrays."""
    return (
        load_array(os.path.join(processed_dir, "user_ids.npy")),
        load_array(os.path.join(processed_dir, "item_ids.npy")),
    )


@registry.load("dataset", "movielens")
class MovieLens(Dataset):
    """MovieLens explicit ratings: (user, item) -> rating, evaluation held out per user.

    Splits 'train', 'val', 'test', each with arrays ``user`` int32, ``item`` int32 (dense ids),
    ``label`` float32 (the rating) and ``timestamp`` int64, rows ordered by user then time.
    """

    TASK = "rating"

    @classmethod
    def prepare(cls, preproc: Any, *, log: Any = print, progress: bool = True) -> ProcessedData:
        """Preprocess ``preproc.datafile`` (generating a synthetic ``u.data`` when it is null) or
        reuse an up-to-date result."""
        datafile = preproc.datafile
        if datafile is None:
            from fedrec.data.synthetic import ensure_synthetic_file

            datafile = ensure_synthetic_file("movielens", preproc, log=log)
        return preprocess(
            datafile,
            processed_dir=preproc.processed_dir,
            split=preproc.split,
            eval_fraction=preproc.eval_fraction,
            strict=preproc.strict,
            log=log,
        )
