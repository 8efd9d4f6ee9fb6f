"""A plain-Python reference for Criteo lines and a generator of files full of edge cases.

Written independently of ``fedrec.data.criteo_parser`` (regular expressions, one line at a time), to
check the vectorised parser against.
"""

from __future__ import annotations

import random
import re

import numpy as np

INT_RE = re.compile(rb"-?[0-9]{1,18}")
HEX_RE = re.compile(rb"[0-9a-fA-F]{1,8}")


def reference_rows(data: bytes) -> tuple[list[tuple[int, list[int], list[int | None]]], list[int], list[int]]:
    """(rows, 1-based numbers of the good lines, 1-based numbers of the bad lines)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    rows, good, bad = [], [], []
    for number, line in enumerate(lines, start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        fields = line.split(b"\t")
        parsed = _fields(fields) if len(fields) == 40 else None
        if parsed is None:
            bad.append(number)
        else:
            rows.append(parsed)
            good.append(number)
    return rows, good, bad


def _fields(fields: list[bytes]) -> tuple[int, list[int], list[int | None]] | None:
    if fields[0] not in (b"0", b"1"):
        return None
    ints: list[int] = []
    for raw in fields[1:14]:
        if raw == b"":
            ints.append(0)
        elif INT_RE.fullmatch(raw):
            ints.append(int(raw.decode("ascii")))
        else:
            return None
    cats: list[int | None] = []
    for raw in fields[14:]:
        if raw == b"":
            cats.append(None)
        elif HEX_RE.fullmatch(raw):
            cats.append(int(raw.decode("ascii"), 16))
        else:
            return None
    return int(fields[0]), ints, cats


def expected_arrays(rows: list[tuple[int, list[int], list[int | None]]]) -> dict[str, np.ndarray]:
    """label float32, dense float32 (log1p of max(x, 0)), cat keys uint64 ((field + 1) << 32 | value)."""
    label = np.array([r[0] for r in rows], dtype=np.float32)
    ints = np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 13)
    dense = np.log1p(np.maximum(ints, 0)).astype(np.float32)
    keys = [[0 if c is None else ((f + 1) << 32) | c for f, c in enumerate(r[2])] for r in rows]
    return {"label": label, "dense": dense, "cat": np.array(keys, dtype=np.uint64).reshape(-1, 26)}


GOOD_INTS = [b"", b"0", b"7", b"42", b"1382", b"99999999", b"00000007", b"-1", b"-2", b"-0", b"-12345678",
             b"123456789", b"999999999999999999", b"-999999999999999999", b"0000000000012"]  # fmt: skip
GOOD_CATS = [b"", b"68fd1e64", b"00000000", b"ffffffff", b"FFFFFFFF", b"A73EE510", b"aBcDeF01", b"1", b"abc",
             b"7e0cccc"]  # fmt: skip
BAD_INTS = [
    b"+5",
    b"--5",
    b"-",
    b"1.5",
    b" 5",
    b"5 ",
    b"0x10",
    b"1e3",
    b"\xff",
    b"1234567890123456789",
    b"1_0",
]
BAD_CATS = [b"g1234567", b"123456789", b"68fd1e6\xc3", b"68fd 1e6", b"-1", b"\x00\x00", b"0x1234"]


def edge_case_file(seed: int, lines: int, *, bad_rate: float = 0.05, crlf_rate: float = 0.02) -> bytes:
    """Random Criteo-like lines: mostly ordinary ones, with every kind of odd field mixed in."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        label = rng.choice([b"0", b"1"])
        ints = [
            rng.choice(GOOD_INTS) if rng.random() < 0.2 else str(rng.randrange(0, 5000)).encode()
            for _ in range(13)
        ]
        cats = [
            rng.choice(GOOD_CATS) if rng.random() < 0.2 else f"{rng.getrandbits(32):08x}".encode()
            for _ in range(26)
        ]
        fields = [label, *ints, *cats]
        if rng.random() < bad_rate:
            kind = rng.randrange(7)
            if kind == 0:
                fields = fields[: rng.choice([1, 4, 39])]
            elif kind == 1:
                fields = [*fields, b"extra"]
            elif kind == 2:
                fields[0] = rng.choice([b"2", b"", b"01", b"-1", b"x"])
            elif kind == 3:
                fields[1 + rng.randrange(13)] = rng.choice(BAD_INTS)
            elif kind == 4:
                fields[14 + rng.randrange(26)] = rng.choice(BAD_CATS)
            elif kind == 5:
                fields[rng.randrange(40)] += b"\x01"
            else:
                fields = [b""]
        line = b"\t".join(fields)
        if rng.random() < crlf_rate:
            line += b"\r"
        out.append(line)
    data = b"\n".join(out)
    return data if rng.random() < 0.5 else data + b"\n"
