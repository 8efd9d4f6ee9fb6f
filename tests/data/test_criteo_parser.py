"""The vectorised Criteo parser agrees exactly with a plain-Python reference, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from criteo_reference import (
    BAD_CATS,
    BAD_INTS,
    GOOD_CATS,
    GOOD_INTS,
    edge_case_file,
    expected_arrays,
    reference_rows,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.data import criteo_parser as parser
from fedrec.errors import DataError


def parse_file(
    path, block_bytes: int = parser.BLOCK_BYTES, workers: int = 1, range_bytes: int = parser.RANGE_BYTES
):
    """All rows of a file through line_ranges/parsed_ranges, with 1-based line numbers."""
    total, ranges = parser.line_ranges(str(path), range_bytes)
    assert total == parser.count_lines(str(path))
    numbers, bad, labels, dense, cats = [], [], [], [], []
    lines = 0
    for block, first in parser.parsed_ranges(str(path), ranges, workers=workers, block_bytes=block_bytes):
        assert first == lines
        numbers.append(block.line + first + 1)
        bad.extend(first + i + 1 for i, _ in block.bad)
        labels.append(block.label)
        dense.append(block.dense)
        cats.append(block.cat)
        lines += block.num_lines
    assert lines == total
    return {
        "lines": lines,
        "good": np.concatenate(numbers).tolist(),
        "bad": bad,
        "label": np.concatenate(labels),
        "dense": np.concatenate(dense),
        "cat": np.concatenate(cats),
    }


def assert_matches_reference(data: bytes, parsed: dict) -> None:
    rows, good, bad = reference_rows(data)
    expected = expected_arrays(rows)
    assert parsed["good"] == good
    assert parsed["bad"] == bad
    assert parsed["label"].dtype == np.float32 and parsed["dense"].dtype == np.float32
    np.testing.assert_array_equal(parsed["label"], expected["label"])
    np.testing.assert_array_equal(parsed["dense"], expected["dense"])
    np.testing.assert_array_equal(parsed["cat"], expected["cat"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_case_files_match_reference(tmp_path, seed):
    data = edge_case_file(seed, 3000)
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    parsed = parse_file(path)
    assert parsed["bad"], "the generator should have produced malformed lines"
    assert_matches_reference(data, parsed)


@pytest.mark.parametrize("block_bytes", [64, 1000, 4096])
@pytest.mark.parametrize(("workers", "range_bytes"), [(1, parser.RANGE_BYTES), (1, 5000), (2, 7000)])
def test_block_and_range_boundaries_and_workers_do_not_change_the_result(
    tmp_path, block_bytes, workers, range_bytes
):
    data = edge_case_file(7, 400)
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    assert_matches_reference(data, parse_file(path, block_bytes, workers, range_bytes))


def test_missing_trailing_newline_and_crlf(tmp_path):
    line = b"\t".join([b"1", *[b"5"] * 13, *[b"0123abcd"] * 26])
    data = line + b"\r\n" + line  # CRLF on the first, no newline after the last
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    parsed = parse_file(path)
    assert parsed["lines"] == 2 and parsed["bad"] == []
    assert_matches_reference(data, parsed)
    assert parser.count_lines(str(path)) == 2


def test_truncated_last_line_is_malformed(tmp_path):
    line = b"\t".join([b"0", *[b"5"] * 13, *[b"0123abcd"] * 26])
    data = line + b"\n" + line[:57]
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    parsed = parse_file(path)
    assert parsed["good"] == [1] and parsed["bad"] == [2]


def test_known_values():
    fields = [
        b"1",
        b"",
        b"-3",
        b"0",
        b"12345678",
        b"7",
        *[b""] * 8,
        b"68fd1e64",
        b"FFFFFFFF",
        b"",
        *[b"00000001"] * 23,
    ]
    block = parser.parse_block(b"\t".join(fields) + b"\n")
    assert block.bad == [] and block.label.tolist() == [1.0]
    np.testing.assert_array_equal(block.dense[0, :5], np.log1p([0, 0, 0, 12345678, 7]).astype(np.float32))
    assert block.cat[0, 0] == (1 << 32) | 0x68FD1E64
    assert block.cat[0, 1] == (2 << 32) | 0xFFFFFFFF
    assert block.cat[0, 2] == 0  # empty
    assert block.cat[0, 3] == (4 << 32) | 1


def test_reasons_name_the_problem():
    assert parser.parse_line(b"1\t2\t3\t4") == "has 4 fields, expected 40"
    line = [b"1", *[b"5"] * 13, *[b"0123abcd"] * 26]
    assert "label" in parser.parse_line(b"\t".join([b"2", *line[1:]]))
    assert "I3" in parser.parse_line(b"\t".join([*line[:3], b"+5", *line[4:]]))
    assert "C2" in parser.parse_line(b"\t".join([*line[:15], b"xyz", *line[16:]]))


def test_long_line_is_bounded_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(parser, "MAX_LINE_BYTES", 300)
    good = b"\t".join([b"0", *[b"5"] * 13, *[b"0123abcd"] * 26])
    data = good + b"\n" + b"1" * 1000 + b"\n" + good + b"\n" + b"2" * 5000
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    blocks = [block.parse() for block in parser.iter_blocks(str(path), 128)]
    reasons = [reason for block in blocks for _, reason in block.bad]
    assert sum(len(b.label) for b in blocks) == 2
    assert reasons == ["is longer than 300 bytes"] * 2


def test_sniff_rejects_other_formats(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    with pytest.raises(
        DataError, match=r"does not look like Criteo train.txt: line 1 has 4 fields, expected 40"
    ):
        parser.sniff(str(path))
    path.write_bytes(b"\t".join([b"5"] * 13 + [b"0123abcd"] * 26) + b"\n")
    with pytest.raises(DataError, match=r"test\.txt has no label column"):
        parser.sniff(str(path))
    path.write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(DataError, match="gzip"):
        parser.sniff(str(path))


field_int = st.one_of(
    st.sampled_from(GOOD_INTS + BAD_INTS), st.integers(-(10**9), 10**12).map(lambda v: str(v).encode())
)
field_cat = st.one_of(
    st.sampled_from(GOOD_CATS + BAD_CATS), st.integers(0, 2**32 - 1).map(lambda v: f"{v:08x}".encode())
)
line_strategy = st.tuples(
    st.sampled_from([b"0", b"1", b"2", b""]),
    st.lists(field_int, min_size=13, max_size=13),
    st.lists(field_cat, min_size=25, max_size=27),
).map(lambda t: b"\t".join([t[0], *t[1], *t[2]]))


@settings(max_examples=60, deadline=None)
@given(st.lists(line_strategy, min_size=1, max_size=30), st.booleans())
def test_property_matches_reference(lines, trailing_newline):
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    block = parser.parse_block(data if data.endswith(b"\n") else data + b"\n")
    rows, good, bad = reference_rows(data)
    expected = expected_arrays(rows)
    assert (block.line + 1).tolist() == good
    assert [i + 1 for i, _ in block.bad] == bad
    np.testing.assert_array_equal(block.dense, expected["dense"])
    np.testing.assert_array_equal(block.cat, expected["cat"])


def test_lost_workers_fall_back_to_this_process(tmp_path, monkeypatch):
    data = edge_case_file(5, 300)
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    monkeypatch.setattr("sys.executable", str(tmp_path / "no-such-python"))
    messages = []
    total, ranges = parser.line_ranges(str(path), 4000)
    blocks = list(parser.parsed_ranges(str(path), ranges, workers=2, on_worker_lost=messages.append))
    assert len(blocks) == len(ranges) > 1
    assert messages and "cannot start criteo parsing workers" in messages[0]
    assert sum(b.num_lines for b, _ in blocks) == total
