"""MovieLens: the three formats are detected, ids remapped, and evaluation held out per user."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedrec import registry
from fedrec.config.schema import PreprocConfig, SyntheticConfig
from fedrec.data import movielens
from fedrec.errors import DataError

RATINGS = [  # user, item, rating, timestamp (file order)
    (10, 100, 4.0, 50),
    (10, 200, 3.0, 10),
    (10, 300, 5.0, 30),
    (10, 400, 2.0, 40),  # 10: latest 50 (item 100) -> test, then 40 (item 400) -> val
    (20, 100, 1.0, 70),
    (20, 200, 2.0, 70),  # 20: tie at 70, the later line (item 200) counts as later -> test
    (20, 500, 3.5, 60),
    (30, 300, 4.5, 5),
    (30, 400, 3.0, 6),  # 30: only 2 ratings -> all train
]


def write(path, fmt: str, ratings=RATINGS) -> None:
    if fmt == "ml-100k":
        lines = [f"{u}\t{i}\t{r:g}\t{t}" for u, i, r, t in ratings]
    elif fmt == "ml-1m":
        lines = [f"{u}::{i}::{r:g}::{t}" for u, i, r, t in ratings]
    else:
        lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r:.1f},{t}" for u, i, r, t in ratings]
    path.write_text("\n".join(lines) + "\n")


def prepare(path, **kwargs):
    kwargs.setdefault("log", lambda _m: None)
    return movielens.preprocess(str(path), **kwargs)


@pytest.mark.parametrize(
    ("fmt", "name"), [("ml-100k", "u.data"), ("ml-1m", "ratings.dat"), ("ml-latest", "ratings.csv")]
)
def test_formats_detected_and_leave_last_out(tmp_path, fmt, name):
    path = tmp_path / name
    write(path, fmt)
    data = prepare(path)
    meta = data.meta
    assert meta["format"] == fmt
    assert (meta["num_users"], meta["num_items"]) == (3, 5)
    assert (meta["rating_min"], meta["rating_max"]) == (1.0, 5.0)
    assert meta["rows"] == {"train": 5, "val": 2, "test": 2}
    users, items = movielens.load_id_maps(meta["processed_dir"])
    assert users.tolist() == [10, 20, 30] and items.tolist() == [100, 200, 300, 400, 500]
    test = data.split("test").arrays
    assert [(users[u], items[i]) for u, i in zip(test["user"], test["item"])] == [(10, 100), (20, 200)]
    val = data.split("val").arrays
    assert [(users[u], items[i]) for u, i in zip(val["user"], val["item"])] == [(10, 400), (20, 100)]
    train = data.split("train").arrays
    assert train["user"].dtype == np.int32 and train["item"].dtype == np.int32
    assert train["label"].dtype == np.float32 and train["timestamp"].dtype == np.int64
    assert train["timestamp"].tolist() == [10, 30, 60, 5, 6]  # by user, then time
    assert meta["global_mean"] == pytest.approx(np.mean([3.0, 5.0, 3.5, 4.5, 3.0]))


def test_leave_last_out_picks_latest_on_random_data():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 50, 2000)
    stamp = rng.integers(0, 10**6, 2000)
    label = movielens.split_per_user(user, stamp, method="leave_last_out", eval_fraction=0.2)
    for u in range(50):
        mine = np.flatnonzero(user == u)
        latest = mine[np.lexsort((mine, stamp[mine]))]
        assert label[latest[-1]] == 2 and label[latest[-2]] == 1
        assert (label[latest[:-2]] == 0).all()


def test_random_split_fraction_and_determinism():
    rng = np.random.default_rng(1)
    user = np.repeat(np.arange(40), rng.integers(1, 60, 40))
    stamp = np.arange(len(user))
    first = movielens.split_per_user(user, stamp, method="random", eval_fraction=0.2)
    again = movielens.split_per_user(user, stamp, method="random", eval_fraction=0.2)
    np.testing.assert_array_equal(first, again)
    for u in range(40):
        mine = first[user == u]
        held = min(int(np.floor(0.2 * len(mine) + 0.5)), len(mine) - 1)
        assert (mine != 0).sum() == held and (mine == 2).sum() == (held + 1) // 2
        assert (mine == 0).sum() >= 1


def test_random_split_through_preprocess_and_reuse(tmp_path):
    path = tmp_path / "u.data"
    write(path, "ml-100k")
    data = prepare(path, split="random", eval_fraction=0.5)
    assert data.meta["settings"] == {"split": "random", "eval_fraction": 0.5, "split_seed": 0}
    assert sum(data.meta["rows"].values()) == len(RATINGS)
    assert prepare(path, split="random", eval_fraction=0.5).meta["reused"] is True
    assert prepare(path).meta["reused"] is False  # another split: redone


def test_bad_lines_skipped_or_strict(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n1\t3\tfive\t5\n2\t2\t4\n2\t3\t4\t9\n")
    data = prepare(path)
    assert data.meta["skipped_lines"] == 2
    assert [e["line"] for e in data.meta["skipped_examples"]] == [2, 3]
    with pytest.raises(DataError) as err:
        prepare(path, strict=True, processed_dir=str(tmp_path / "strict"))
    assert str(err.value) == f"{path}: line 2: rating 'five' is not a number (strict=true)"
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"user,item,rating\n1,2,3\n", "does not look like MovieLens ratings"),
        (b"\t".join([b"0"] * 40) + b"\n", "as ml-100k: line 1 has 40 tab-separated fields, expected 4"),
        (b"1::2::x::4\n", "as ml-1m: line 1: rating 'x' is not a number"),
        (b"1::2::3\n", "as ml-1m: line 1 has 3 '::'-separated fields, expected 4"),
        (b"\xff\xfe\x00\x01binary\n", "does not look like MovieLens ratings"),
        (b"", "file is empty"),
    ],
)
def test_unknown_format_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "ratings.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare(path)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ratings_processed").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_registered_dataset_generates_synthetic_ratings(tmp_path):
    cls = registry.lookup("dataset", "movielens")
    assert cls is movielens.MovieLens and cls.TASK == "rating"
    preproc = PreprocConfig(
        dataset="movielens",
        cache_dir=str(tmp_path),
        synthetic=SyntheticConfig(rows=3000, seed=2, users=60, items=200, rank=4),
    )
    data = cls.prepare(preproc, log=lambda _m: None)
    assert data.meta["format"] == "ml-100k" and data.meta["num_users"] == 60
    assert data.meta["rows"]["test"] == 60 and data.meta["skipped_lines"] == 0
    assert cls.prepare(preproc, log=lambda _m: None).meta["reused"] is True
