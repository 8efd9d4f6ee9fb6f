"""Criteo preprocessing: day splits, vocabulary and hashing, reuse and invalidation, atomic output."""

from __future__ import annotations

import os

import numpy as np
import pytest
from criteo_reference import edge_case_file, expected_arrays, reference_rows

from fedrec import registry
from fedrec.config.schema import PreprocConfig, SyntheticConfig
from fedrec.data import criteo
from fedrec.data.synthetic import write_criteo
from fedrec.errors import DataError


def quiet(_message: str) -> None:
    pass


def prepare(path, **kwargs):
    kwargs.setdefault("log", quiet)
    kwargs.setdefault("progress", False)
    return criteo.preprocess(str(path), **kwargs)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("criteo") / "train.txt"
    write_criteo(str(path), rows=5000, seed=3, vocab_size=300)
    return path


def test_day_bounds_equal_counts():
    assert criteo.day_bounds(1000, 7) == [0, 143, 286, 429, 572, 715, 858, 1000]
    assert criteo.split_bounds(criteo.day_bounds(1000, 7)) == {
        "train": (0, 858),
        "val": (858, 929),
        "test": (929, 1000),
    }


def test_splits_days_and_arrays(tmp_path):
    data = edge_case_file(11, 2000, bad_rate=0.03)
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    result = prepare(path, num_days=5, max_ind_range=1000)
    rows, good, bad = reference_rows(data)
    expected = expected_arrays(rows)
    good = np.array(good)
    meta = result.meta
    assert meta["lines"] == 2000 and meta["skipped_lines"] == len(bad)
    assert [e["line"] for e in meta["skipped_examples"]] == bad[:10]
    days = criteo.day_bounds(2000, 5)
    assert [d["lines"] for d in meta["days"]] == [400] * 5
    for d, entry in enumerate(meta["days"]):
        assert entry["rows"] == int(((good > days[d]) & (good <= days[d + 1])).sum())
    ranges = {"train": (0, 1600), "val": (1600, 1800), "test": (1800, 2000)}
    for split, (lo, hi) in ranges.items():
        chosen = (good > lo) & (good <= hi)
        part = result.split(split)
        assert len(part) == meta["rows"][split] == int(chosen.sum())
        assert part.arrays["dense"].dtype == np.float32 and part.arrays["dense"].shape[1] == 13
        assert part.arrays["sparse"].dtype == np.int32 and part.arrays["sparse"].shape[1] == 26
        assert part.arrays["label"].dtype == np.float32
        np.testing.assert_array_equal(part.arrays["dense"], expected["dense"][chosen])
        np.testing.assert_array_equal(part.arrays["label"], expected["label"][chosen])
    train_rows = [e["train_rows"] for e in meta["days"][:-1]]
    assert train_rows[0][0] == 0 and train_rows[-1][1] == meta["rows"]["train"]


def expected_vocabulary_indices(keys_train, keys_eval, min_count):
    """Reference: per field, ids by first appearance among categories seen >= min_count times."""
    train_out = np.zeros(keys_train.shape, dtype=np.int64)
    eval_out = np.zeros(keys_eval.shape, dtype=np.int64)
    sizes = []
    for f in range(26):
        counts: dict[int, int] = {}
        order: list[int] = []
        for key in keys_train[:, f].tolist():
            if key == 0:
                continue
            if key not in counts:
                order.append(key)
            counts[key] = counts.get(key, 0) + 1
        index = {}
        for key in order:
            if counts[key] >= min_count:
                index[key] = len(index) + 1
        train_out[:, f] = [index.get(k, 0) for k in keys_train[:, f].tolist()]
        eval_out[:, f] = [index.get(k, 0) for k in keys_eval[:, f].tolist()]
        sizes.append(len(index) + 1)
    return train_out, eval_out, sizes


@pytest.mark.parametrize("min_count", [1, 3])
def test_vocabulary_threshold(tmp_path, small_file, min_count):
    data = small_file.read_bytes()
    rows, _, _ = reference_rows(data)
    keys = expected_arrays(rows)["cat"]
    n_train = criteo.split_bounds(criteo.day_bounds(5000, 7))["train"][1]
    want_train, want_eval, sizes = expected_vocabulary_indices(keys[:n_train], keys[n_train:], min_count)
    result = prepare(small_file, processed_dir=str(tmp_path / "out"), min_count=min_count)
    assert result.meta["categorical_mode"] == "vocabulary"
    assert result.meta["table_sizes"] == sizes
    np.testing.assert_array_equal(result.split("train").arrays["sparse"], want_train)
    got_eval = np.concatenate([result.split("val").arrays["sparse"], result.split("test").arrays["sparse"]])
    np.testing.assert_array_equal(got_eval, want_eval)
    # The saved vocabulary maps each index back to its category.
    values, offsets = criteo.load_categories(str(tmp_path / "out"))
    sparse = np.asarray(result.split("train").arrays["sparse"])
    for f in (0, 7, 25):
        present = sparse[:, f] > 0
        raw = (keys[:n_train][present, f] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        np.testing.assert_array_equal(values[offsets[f] + sparse[present, f] - 1], raw)
    if min_count > 1:
        assert max(sizes) < 301  # rare categories were dropped


def test_hashing_mode(tmp_path, small_file):
    data = small_file.read_bytes()
    rows, _, _ = reference_rows(data)
    keys = expected_arrays(rows)["cat"]
    result = prepare(small_file, processed_dir=str(tmp_path / "out"), max_ind_range=97)
    assert result.meta["categorical_mode"] == "hashing" and result.meta["table_sizes"] == [97] * 26
    values = keys & np.uint64(0xFFFFFFFF)
    want = np.where(keys == 0, 0, 1 + values % np.uint64(96)).astype(np.int32)
    got = np.concatenate([result.split(s).arrays["sparse"] for s in ("train", "val", "test")])
    np.testing.assert_array_equal(got, want)
    assert not (tmp_path / "out" / "categories.npy").exists()


def test_reuse_and_invalidation(tmp_path):
    path = tmp_path / "train.txt"
    write_criteo(str(path), rows=3000, seed=5, vocab_size=100)
    first = prepare(path)
    manifest = tmp_path / "train_processed" / "manifest.json"
    assert first.meta["reused"] is False and manifest.exists()
    stamp = manifest.stat().st_mtime_ns
    second = prepare(path)
    assert second.meta["reused"] is True and manifest.stat().st_mtime_ns == stamp
    assert second.meta["rows"] == first.meta["rows"]
    # Same bytes, new mtime: redone.
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert prepare(path).meta["reused"] is False
    # A setting that changes the output: redone; the same again: reused.
    assert prepare(path, min_count=2).meta["reused"] is False
    assert prepare(path, min_count=2).meta["reused"] is True
    # Changed content: redone, with the new rows.
    with open(path, "ab") as fh:
        fh.write(path.read_bytes().split(b"\n", 1)[0] + b"\n")
    third = prepare(path, min_count=2)
    assert third.meta["reused"] is False and third.meta["lines"] == 3001


def test_strict_names_file_and_line_and_leaves_nothing(tmp_path):
    data = edge_case_file(2, 200, bad_rate=0.0).rstrip(b"\n").split(b"\n")
    data[41] = b"1\t2\t3"
    path = tmp_path / "train.txt"
    path.write_bytes(b"\n".join(data) + b"\n")
    with pytest.raises(DataError) as err:
        prepare(path, strict=True)
    assert str(err.value) == f"{path}: line 42 has 3 fields, expected 40 (strict=true)"
    assert sorted(os.listdir(tmp_path)) == ["train.txt"]  # no lock file left behind either
    lenient = prepare(path)
    assert lenient.meta["skipped_lines"] == 1 and lenient.meta["skipped_examples"][0]["line"] == 42
    # A strict run does not reuse a result that skipped lines.
    with pytest.raises(DataError, match="line 42"):
        prepare(path, strict=True)


def test_stale_temporary_output_is_never_taken_for_complete(tmp_path, small_file):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999999999-abc"  # a run that died (no such pid)
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    result = prepare(small_file, processed_dir=str(out))
    assert result.meta["reused"] is False and not stale.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        (b"", "file is empty"),
        ("dir", "is a directory"),
        (b"1::2::5::978300760\n", "does not look like Criteo train.txt: line 1 has 1 field, expected 40"),
        (
            b"\xff\xfe\x00garbage\n" * 30,
            "does not look like Criteo train.txt: line 1 has 1 field, expected 40",
        ),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "train.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "train_processed").exists()


def test_all_lines_malformed_names_the_first_problem(tmp_path):
    good = b"\t".join([b"1", *[b"5"] * 13, *[b"0123abcd"] * 26])
    path = tmp_path / "train.txt"
    path.write_bytes(good[:-3] + b"zzz\n" + b"x\t" * 39 + b"y\n")
    with pytest.raises(DataError) as err:
        prepare(path)
    assert str(err.value) == (
        f"{path}: does not look like Criteo train.txt: line 1: categorical field C26 '0123azzz' is not 1 to 8 hex digits"
    )


def test_registered_dataset_generates_synthetic_data(tmp_path):
    cls = registry.lookup("dataset", "criteo")
    assert cls is criteo.Criteo and cls.TASK == "ctr" and (cls.NUM_DENSE, cls.NUM_SPARSE) == (13, 26)
    preproc = PreprocConfig(
        cache_dir=str(tmp_path), synthetic=SyntheticConfig(rows=4000, seed=1, vocab_size=50)
    )
    data = cls.prepare(preproc, log=quiet, progress=False)
    assert data.meta["skipped_lines"] == 0 and sum(data.meta["rows"].values()) == 4000
    assert data.meta["processed_dir"].startswith(str(tmp_path / "synthetic_criteo_r4000_s1_v50_"))
    assert max(data.meta["table_sizes"]) <= 51
    assert cls.prepare(preproc, log=quiet, progress=False).meta["reused"] is True
    batch = next(data.split("train").batches(32))
    assert batch["sparse"].dtype.is_floating_point is False and batch["dense"].shape == (32, 13)


def test_no_progress_bar_is_drawn_on_a_pipe(monkeypatch):
    # Under mpirun (gforker) stderr is a pipe whose reader gave up on a bar's carriage-return lines and
    # the rank died with EPIPE while preprocessing (make demo on a fresh checkout): nothing may be drawn.
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        monkeypatch.setattr("sys.stderr", pipe)
        bar = criteo._progress_bar(True, 1000, "criteo: parsing")
        assert bar is not None
        bar.update(500)
        bar.close()
    with os.fdopen(read_end) as written:
        assert written.read() == ""
