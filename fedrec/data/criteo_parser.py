"""Vectorised parser for Criteo Kaggle ``train.txt`` lines (``label \\t I1..I13 \\t C1..C26``).

A block of whole lines is parsed with a fixed number of numpy operations, whatever its length:
one pass finds every tab and newline; lines with exactly 40 fields are then decoded field-wise, each
field read as one unaligned little-endian 64-bit word and turned into its value with SWAR
arithmetic (eight decimal digits per word, after Lemire, "Faster integer parsing", 2018; eight
hex digits per word by multiply-shift packing). Lines the fast path does not accept (long or
negative integers are fixed up vectorised; CRLF endings, short or mixed-case hex and anything
malformed go to ``parse_line``) are parsed exactly, one by one, or reported with a reason.

Field definitions (both paths agree): label '0' or '1'; an integer is empty (read as 0) or
``-?[0-9]+`` with at most 18 digits; a categorical is empty or 1-8 hex digits (either case).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrec.errors import DataError

INT_FEATURE_COUNT = 13
CAT_FEATURE_COUNT = 26
NUM_FIELDS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT
WHAT = "Criteo Kaggle train.txt (label, 13 integer and 26 categorical tab-separated fields)"
BLOCK_BYTES = 256 << 10
RANGE_BYTES = 4 << 20  # unit of work of a parsing process
MAX_LINE_BYTES = 1 << 20

# A categorical is carried as the key (field + 1) << 32 | value, 0 when empty: one uint64 per
# field that the vocabulary can hash without looking at its column.
FIELD_TAGS = (np.arange(1, CAT_FEATURE_COUNT + 1, dtype=np.uint64) << np.uint64(32)).astype(np.uint64)
VALUE_MASK = np.uint64(0xFFFFFFFF)

_PAD = 8
_ONES = np.uint64(0x0101010101010101)
_ASCII_ZEROS = np.uint64(0x3030303030303030)
_NIBBLE_HIGH = np.uint64(0xF0F0F0F0F0F0F0F0)
_NIBBLE_LOW = np.uint64(0x0F0F0F0F0F0F0F0F)
_SIXES = np.uint64(0x0606060606060606)
_THREES = np.uint64(0x3333333333333333)
_ABOVE_NINE = np.uint64(0x7676767676767676)  # + nibble sets the byte's high bit iff nibble > 9
# _JUNK_BY_LENGTH[n]: mask of the bytes before a right-aligned field of n bytes (the 8 - n low ones).
_JUNK_BY_LENGTH = np.array(
    [(1 << (8 * (8 - n))) - 1 if n else (1 << 64) - 1 for n in range(9)], dtype=np.uint64
)
_U = {bits: np.uint64(bits) for bits in (6, 7, 8, 16, 32)}
_INT_RE = re.compile(rb"-?[0-9]{1,18}\Z")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,8}\Z")


@dataclass
class ParsedBlock:
    """Rows of the good lines of one block, in line order, and what was wrong with the others."""

    line: np.ndarray  # int64 [n]: line index within the block of each row
    label: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, 13]: log(1 + max(x, 0)), empty -> 0
    cat: np.ndarray  # uint64 [n, 26]: (field + 1) << 32 | 32-bit value; 0 where empty
    num_lines: int
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line index within block, reason)


def dense_transform(values: np.ndarray) -> np.ndarray:
    """DLRM's dense transform, log(1 + max(x, 0)), as float32."""
    return np.log1p(np.maximum(values, 0).astype(np.float64)).astype(np.float32)


def parse_line(line: bytes) -> tuple[int, list[int], list[int | None]] | str:
    """Exact parser for one line (without its newline; one trailing CR is allowed).

    Returns ``(label, ints, cats)`` with empty integers as 0 and empty categoricals as None, or a
    one-line reason why the line is malformed.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    fields = line.split(b"\t")
    if len(fields) != NUM_FIELDS:
        return f"has {len(fields)} field{'s' if len(fields) != 1 else ''}, expected {NUM_FIELDS}"
    label = fields[0]
    if label not in (b"0", b"1"):
        return f"label {_show(label)} is not 0 or 1"
    ints = []
    for j, raw in enumerate(fields[1 : 1 + INT_FEATURE_COUNT], start=1):
        if not raw:
            ints.append(0)
        elif _INT_RE.match(raw):
            ints.append(int(raw))
        else:
            return f"integer field I{j} {_show(raw)} is not an integer of at most 18 digits"
    cats: list[int | None] = []
    for j, raw in enumerate(fields[1 + INT_FEATURE_COUNT :], start=1):
        if not raw:
            cats.append(None)
        elif _HEX_RE.match(raw):
            cats.append(int(raw, 16))
        else:
            return f"categorical field C{j} {_show(raw)} is not 1 to 8 hex digits"
    return int(label), ints, cats


def _show(raw: bytes) -> str:
    text = repr(raw[:24])[1:]
    return text[:-1] + "...'" if len(raw) > 24 else text


# ----------------------------------------------------------------------------- SWAR helpers


def _words(buf: np.ndarray) -> np.ndarray:
    """Little-endian uint64 starting at every byte offset of ``buf`` (an overlapping view, no copy)."""
    return np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _right_aligned(words: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Words holding a field in their high ``length`` bytes (at most 8; longer fields keep their
    last 8 bytes), the bytes before the field made ASCII '0'."""
    fixed = words ^ _ASCII_ZEROS
    fixed &= np.take(_JUNK_BY_LENGTH, length, mode="clip")
    fixed ^= words
    return fixed


def _all_digits(words: np.ndarray) -> np.ndarray:
    """Per word: are all eight bytes ASCII digits? (Lemire's check.)"""
    check = words + _SIXES
    check &= _NIBBLE_HIGH
    check >>= np.uint64(4)
    check |= words & _NIBBLE_HIGH
    return check == _THREES


def _digits_value(words: np.ndarray) -> np.ndarray:
    """Eight ASCII digits per word (first digit in the low byte) -> their value (as int64)."""
    v = words - _ASCII_ZEROS
    v *= np.uint64(2561)  # each byte pair: 10 * first + second, in the pair's low byte
    v >>= _U[8]
    mask = np.uint64(0x000000FF000000FF)
    high = v >> _U[16]
    high &= mask
    high *= np.uint64(0x0000271000000001)
    v &= mask
    v *= np.uint64(0x000F424000000064)
    v += high
    v >>= _U[32]
    return v.view(np.int64)


def _nibbles(words: np.ndarray) -> np.ndarray:
    """Per byte, its hex value if it is a hex digit ('0'-'9' -> 0-9, 'a'-'f'/'A'-'F' -> 10-15)."""
    n = words >> _U[6]
    n &= _ONES
    n *= np.uint64(9)
    n += words & _NIBBLE_LOW
    return n


def _hex_text(nibbles: np.ndarray, letter_offset: int) -> np.ndarray:
    """The text of nibbles (low 4 bits of each byte): '0'-'9', then letters starting at
    '0' + 10 + ``letter_offset`` (0x27 gives 'a'-'f', 0x07 gives 'A'-'F')."""
    n = nibbles & _NIBBLE_LOW
    text = n + _ABOVE_NINE
    text >>= _U[7]
    text &= _ONES
    text *= np.uint64(letter_offset)
    text += n
    text += _ASCII_ZEROS
    return text


def _pack_nibbles(n: np.ndarray) -> np.ndarray:
    """Eight nibbles (first = most significant, in the low byte) -> the 32-bit value, in place."""
    n *= np.uint64(0x1001)
    n >>= _U[8]
    n &= np.uint64(0x00FF00FF00FF00FF)
    n *= np.uint64(0x01000001)
    n >>= _U[16]
    n &= np.uint64(0x0000FFFF0000FFFF)
    n *= np.uint64(0x0001000000000001)
    n >>= _U[32]
    return n


# ----------------------------------------------------------------------------- blocks


def parse_block(block: bytes) -> ParsedBlock:
    """Parse whole lines (``block`` ends with a newline) into rows; malformed lines are reported."""
    buf = np.frombuffer(b"0" * _PAD + block + b"0" * _PAD, dtype=np.uint8)
    return parse_buffer(buf, _PAD, _PAD + len(block))


def parse_buffer(buf: np.ndarray, begin: int, end: int) -> ParsedBlock:
    """Parse the lines in ``buf[begin:end]`` (ending with a newline; ``buf`` has at least 8
    readable bytes on either side).

    The fast path takes lines of exactly 40 fields whose integers have at most 8 characters and
    whose categoricals are empty or exactly 8 lowercase or 8 uppercase hex digits. Negative
    integers are fixed up vectorised; every other line goes through ``parse_line``.
    """
    text = buf[begin:end]
    # Positions below are relative to ``begin``; these views read the word ending just before
    # a position (integers, right-aligned) and the word starting just after it (categoricals).
    word_before = _words(buf[begin - 8 :])
    word_after = _words(buf[begin + 1 :])
    seps = np.flatnonzero(text <= 10)  # tabs, newlines and stray control bytes
    sep_bytes = text[seps]
    newline_at = np.flatnonzero(sep_bytes == 10)
    num_lines = len(newline_at)
    line_end = seps[newline_at]
    line_start = np.empty(num_lines, dtype=np.int64)
    if num_lines:
        line_start[0] = 0
        line_start[1:] = line_end[:-1] + 1

    if (
        len(seps) == NUM_FIELDS * num_lines
        and sep_bytes.min(initial=9) == 9  # no stray control byte
        and np.array_equal(newline_at, np.arange(NUM_FIELDS - 1, NUM_FIELDS * num_lines, NUM_FIELDS))
    ):
        candidate = None
        bounds = seps.reshape(num_lines, NUM_FIELDS)
        first = line_start
    else:
        first_sep = np.concatenate(([0], newline_at[:-1] + 1))
        seps_per_line = newline_at - first_sep + 1
        not_tab = np.cumsum(sep_bytes != 9)  # each line's newline counts once
        stray = not_tab[newline_at] - np.concatenate(([0], not_tab[newline_at[:-1]])) - 1
        candidate = (seps_per_line == NUM_FIELDS) & (stray == 0)
        bounds = seps[np.repeat(candidate, seps_per_line)].reshape(-1, NUM_FIELDS)
        first = line_start[candidate]

    lengths = np.diff(bounds, axis=1)
    lengths -= 1  # lengths[:, j] is the length of field j + 1

    # Label: one byte, '0' or '1'.
    label_byte = text[first]
    ok = bounds[:, 0] - first == 1
    ok &= (label_byte == 48) | (label_byte == 49)

    # Integers: the word ending where the field ends, the bytes before the field made '0'.
    int_len = lengths[:, :INT_FEATURE_COUNT]
    int_ends = bounds[:, 1 : 1 + INT_FEATURE_COUNT]
    int_words = _right_aligned(word_before[int_ends], int_len)
    int_ok = _all_digits(int_words)
    if int_len.max(initial=0) > 8:
        int_ok &= int_len <= 8
    values = _digits_value(int_words)
    if not int_ok.all():
        _fix_negative(text, word_before, int_ends, int_len, int_ok, values)
        ok &= int_ok.all(axis=1)

    # Categoricals: empty, or 8 hex digits read as one word and checked by rewriting them.
    cat_len = lengths[:, INT_FEATURE_COUNT:]
    cat_empty = cat_len == 0
    cat_words = word_after[bounds[:, INT_FEATURE_COUNT:-1]]
    cat = _nibbles(cat_words)
    cat_ok = _hex_text(cat, 0x27) == cat_words
    cat_ok &= cat_len == 8
    cat_ok |= cat_empty
    if not cat_ok.all():
        _accept_uppercase(cat_words, cat, cat_len, cat_ok)
        ok &= cat_ok.all(axis=1)
    _pack_nibbles(cat)
    cat |= FIELD_TAGS
    cat[cat_empty] = 0

    label = label_byte.astype(np.float32)
    label -= 48
    dense = dense_transform(values)
    line_index = np.arange(num_lines) if candidate is None else np.flatnonzero(candidate)
    if len(line_index) == num_lines and ok.all():
        return ParsedBlock(line_index, label, dense, cat, num_lines)
    return _merge_slow_lines(text, line_start, line_end, line_index, ok, label, dense, cat)


def _fix_negative(
    text: np.ndarray,
    word_before: np.ndarray,
    ends: np.ndarray,
    length: np.ndarray,
    ok: np.ndarray,
    values: np.ndarray,
) -> None:
    """Accept the rejected integer fields that are '-' followed by 1 to 8 digits."""
    rows, cols = np.nonzero(~ok)
    n = length[rows, cols]
    e = ends[rows, cols]
    negative = (n >= 2) & (n <= 9)
    negative[negative] = text[(e - n)[negative]] == 45
    rows, cols, n, e = rows[negative], cols[negative], n[negative], e[negative]
    digits = _right_aligned(word_before[e], n - 1)
    good = _all_digits(digits)
    ok[rows[good], cols[good]] = True
    values[rows[good], cols[good]] = -_digits_value(digits[good])


def _accept_uppercase(words: np.ndarray, nibbles: np.ndarray, length: np.ndarray, ok: np.ndarray) -> None:
    """Accept the rejected 8-character categoricals that are uppercase hex."""
    rows, cols = np.nonzero(~ok & (length == 8))
    upper = _hex_text(nibbles[rows, cols], 0x07) == words[rows, cols]
    ok[rows[upper], cols[upper]] = True


def _merge_slow_lines(
    text: np.ndarray,
    line_start: np.ndarray,
    line_end: np.ndarray,
    line_index: np.ndarray,
    ok: np.ndarray,
    label: np.ndarray,
    dense: np.ndarray,
    cat: np.ndarray,
) -> ParsedBlock:
    """Parse the lines the fast path did not accept one by one and merge them in line order."""
    num_lines = len(line_start)
    fast = np.zeros(num_lines, dtype=bool)
    fast[line_index[ok]] = True
    bad: list[tuple[int, str]] = []
    slow_rows: list[int] = []
    slow_label, slow_ints, slow_cats = [], [], []
    for i in np.flatnonzero(~fast).tolist():
        parsed = parse_line(bytes(text[line_start[i] : line_end[i]]))
        if isinstance(parsed, str):
            bad.append((i, parsed))
            continue
        slow_rows.append(i)
        slow_label.append(parsed[0])
        slow_ints.append(parsed[1])
        slow_cats.append([0 if c is None else (f + 1) << 32 | c for f, c in enumerate(parsed[2])])
    keep = line_index[ok]
    label, dense, cat = label[ok], dense[ok], cat[ok]
    if slow_rows:
        order = np.argsort(np.concatenate((keep, slow_rows)), kind="stable")
        keep = np.concatenate((keep, slow_rows))[order]
        label = np.concatenate((label, np.array(slow_label, dtype=np.float32)))[order]
        ints = np.array(slow_ints, dtype=np.int64).reshape(-1, INT_FEATURE_COUNT)
        dense = np.concatenate((dense, dense_transform(ints)))[order]
        cats = np.array(slow_cats, dtype=np.uint64).reshape(-1, CAT_FEATURE_COUNT)
        cat = np.concatenate((cat, cats))[order]
    return ParsedBlock(keep, label, dense, cat, num_lines, bad)


@dataclass
class Block:
    """Whole lines ``buf[begin:end]`` of the file, the last ending with a newline. ``buf`` is
    reused for the next block and has at least 8 readable bytes on either side."""

    buf: np.ndarray
    begin: int
    end: int
    first_is_long: bool = False  # the first line stands for a line over MAX_LINE_BYTES

    def parse(self) -> ParsedBlock:
        parsed = parse_buffer(self.buf, self.begin, self.end)
        if self.first_is_long and parsed.bad and parsed.bad[0][0] == 0:
            parsed.bad[0] = (0, f"is longer than {MAX_LINE_BYTES} bytes")
        return parsed


def iter_blocks(
    path: str,
    block_bytes: int = BLOCK_BYTES,
    on_bytes: Callable[[int], Any] | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Block]:
    """Blocks of whole lines of ``path[start:stop]`` (``start`` at a line start), read into one
    reused buffer (a block is valid until the next is read). A last line without a newline gets
    one; a line longer than MAX_LINE_BYTES is read as an empty (malformed) line to bound memory."""
    storage = bytearray(_PAD + block_bytes + MAX_LINE_BYTES + 1 + _PAD)
    buf = np.frombuffer(storage, dtype=np.uint8)
    carry = 0  # bytes of an unfinished line at storage[_PAD : _PAD + carry]
    skipping = False  # inside an over-long line, discarding bytes until its newline
    long_first = False
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = (os.fstat(fh.fileno()).st_size if stop is None else stop) - start
        while True:
            want = min(block_bytes, remaining)
            got = fh.readinto(memoryview(storage)[_PAD + carry : _PAD + carry + want]) if want > 0 else 0
            remaining -= got
            if on_bytes is not None and got:
                on_bytes(got)
            stop_at = _PAD + carry + got
            if not got:
                if skipping:
                    carry, long_first = 0, True
                if skipping or carry:
                    storage[_PAD + carry] = 10
                    yield Block(buf, _PAD, _PAD + carry + 1, long_first)
                return
            if skipping:
                cut = storage.find(b"\n", _PAD, stop_at)
                if cut < 0:
                    continue
                skipping, long_first = False, True
                storage[_PAD] = 10  # the long line becomes an empty line
                rest = stop_at - cut - 1
                storage[_PAD + 1 : _PAD + 1 + rest] = storage[cut + 1 : stop_at]
                stop_at = _PAD + 1 + rest
            cut = storage.rfind(b"\n", _PAD, stop_at)
            if cut < 0:
                carry = stop_at - _PAD
                if carry > MAX_LINE_BYTES:
                    carry, skipping = 0, True
                continue
            yield Block(buf, _PAD, cut + 1, long_first)
            long_first = False
            carry = stop_at - cut - 1
            if carry > MAX_LINE_BYTES:
                carry, skipping = 0, True
            else:
                storage[_PAD : _PAD + carry] = storage[cut + 1 : stop_at]


def parse_range(path: str, start: int, stop: int | None, block_bytes: int = BLOCK_BYTES) -> ParsedBlock:
    """All lines of ``path[start:stop]`` parsed, as one block (runs in worker processes)."""
    return merge_blocks([block.parse() for block in iter_blocks(path, block_bytes, start=start, stop=stop)])


def line_ranges(
    path: str, range_bytes: int = RANGE_BYTES, on_bytes: Callable[[int], Any] | None = None
) -> tuple[int, list[tuple[int, int, int]]]:
    """Count the lines, and cut the file at line starts about every ``range_bytes``.

    Returns (lines, [(start byte, stop byte, first line number)]); a last line without a newline
    counts. The ranges can be parsed independently and in any order.
    """
    storage = bytearray(range_bytes)
    view = memoryview(storage)
    array = np.frombuffer(storage, dtype=np.uint8)
    lines = 0
    cuts = [(0, 0)]  # (byte offset of a line start, its line number)
    offset = 0
    last = 10
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while got := fh.readinto(view):
            newlines = np.flatnonzero(array[:got] == 10) if offset else None
            if newlines is not None and len(newlines) and offset + newlines[0] + 1 < size:
                cuts.append((offset + int(newlines[0]) + 1, lines + 1))
            lines += int(np.count_nonzero(array[:got] == 10)) if newlines is None else len(newlines)
            last = storage[got - 1]
            offset += got
            if on_bytes is not None:
                on_bytes(got)
    lines += last != 10
    bounds = [*cuts, (offset, lines)]
    ranges = [(a, b, first) for (a, first), (b, _) in itertools.pairwise(bounds) if b > a]
    return lines, ranges


def parsed_ranges(
    path: str,
    ranges: list[tuple[int, int, int]],
    *,
    workers: int = 1,
    block_bytes: int = BLOCK_BYTES,
    on_bytes: Callable[[int], Any] | None = None,
    on_worker_lost: Callable[[str], Any] | None = None,
) -> Iterator[tuple[ParsedBlock, int]]:
    """(parsed range, its first line number), in file order; with ``workers`` > 1 the ranges are
    parsed by that many worker processes (``fedrec.data.criteo_worker``). Should the workers fail
    to start or die, the remaining ranges are parsed in this process (``on_worker_lost`` is told)."""
    done = 0
    if workers > 1 and len(ranges) > 1:
        from fedrec.data.criteo_worker import WorkerLost, parallel_ranges

        try:
            for parsed, first in parallel_ranges(
                path, ranges, workers=workers, block_bytes=block_bytes, on_bytes=on_bytes
            ):
                yield parsed, first
                done += 1
            return
        except WorkerLost as err:  # parse the rest here: slower, same result
            if on_worker_lost is not None:
                on_worker_lost(f"{err}; parsing the rest in this process")
    for start, stop, first in ranges[done:]:
        yield parse_range(path, start, stop, block_bytes), first
        if on_bytes is not None:
            on_bytes(stop - start)


def merge_blocks(blocks: list[ParsedBlock]) -> ParsedBlock:
    """Consecutive blocks as one (line indices continue across them)."""
    if len(blocks) == 1:
        return blocks[0]
    offsets = np.cumsum([0] + [b.num_lines for b in blocks])
    bad = [(offset + line, reason) for b, offset in zip(blocks, offsets) for line, reason in b.bad]
    return ParsedBlock(
        np.concatenate([b.line + offset for b, offset in zip(blocks, offsets)]),
        np.concatenate([b.label for b in blocks]),
        np.concatenate([b.dense for b in blocks]),
        np.concatenate([b.cat for b in blocks]),
        int(offsets[-1]),
        bad,
    )


def count_lines(path: str, on_bytes: Callable[[int], Any] | None = None) -> int:
    """Lines in the file; a last line without a newline counts."""
    storage = bytearray(4 << 20)
    view = memoryview(storage)
    array = np.frombuffer(storage, dtype=np.uint8)
    total = 0
    last = 10
    with open(path, "rb") as fh:
        while got := fh.readinto(view):
            total += int(np.count_nonzero(array[:got] == 10))
            last = storage[got - 1]
            if on_bytes is not None:
                on_bytes(got)
    return total + (last != 10)


def sniff(path: str, max_lines: int = 20) -> None:
    """Fail early, naming the path and line 1, when the file is not Criteo Kaggle ``train.txt``:
    all of its first ``max_lines`` lines are malformed."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if head[:2] == b"\x1f\x8b":
        raise DataError(f"{path}: is gzip-compressed; decompress it first (gunzip), expected {WHAT}")
    lines = head.split(b"\n")
    if len(lines) > 1 and (len(head) == 1 << 16 or not lines[-1]):
        lines = lines[:-1]  # the piece after the last newline is cut or empty
    reasons = [parse_line(line) for line in lines[:max_lines]]
    if reasons and all(isinstance(r, str) for r in reasons):
        reason = str(reasons[0])
        if reason.startswith(f"has {NUM_FIELDS - 1} fields"):
            reason += " (Criteo test.txt has no label column; use train.txt)"
        sep = " " if reason.startswith("has ") else ": "
        raise DataError(f"{path}: does not look like Criteo train.txt: line 1{sep}{reason}")
