"""Bad data input from the attack run (issue 14, finding 8), each now one clear error.

MovieLens ratings 99, -1e300 and 1e308 were accepted (the model then diverged: "lower train.lr?");
four failed Criteo preprocessings left a ``.train_processed.lock`` behind; a 5-row Criteo file was
accepted with empty validation and test splits.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from fedrec.data import criteo, movielens
from fedrec.data.processed import locked
from fedrec.data.synthetic import write_criteo
from fedrec.errors import DataError


def quiet(_message: str) -> None:
    pass


GOOD = "".join(
    f"{u}\t{i}\t{(u + i) % 5 + 1}\t{1000 + 10 * u + i}\n" for u in range(1, 6) for i in range(1, 6)
)


@pytest.mark.parametrize("rating", ["99", "-1e300", "1e308", "0", "5.5"])
def test_movielens_rating_outside_the_format_is_refused(tmp_path, rating):
    path = tmp_path / "u.data"
    path.write_text(GOOD + f"7\t3\t{rating}\t5000\n")
    line = GOOD.count("\n") + 1
    with pytest.raises(DataError) as err:
        movielens.preprocess(str(path), strict=True, log=quiet, processed_dir=str(tmp_path / "strict"))
    message = str(err.value)
    assert (
        message.startswith(f"{path}: line {line}: rating ")
        and "outside the format's range [0.5, 5]" in message
    )
    assert "\n" not in message
    data = movielens.preprocess(str(path), log=quiet)  # default: skipped and counted
    assert data.meta["skipped_lines"] == 1 and data.meta["skipped_examples"][0]["line"] == line
    labels = np.concatenate([np.asarray(data.split(s).arrays["label"]) for s in ("train", "val", "test")])
    assert labels.max() <= 5 and labels.min() >= 1


def test_movielens_file_of_only_impossible_ratings_is_one_error(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t99\t4\n1\t3\t1e308\t5\n")
    with pytest.raises(
        DataError, match=r"u\.data: .*line 1: rating 99 is outside the format's range \[0\.5, 5\]$"
    ):
        movielens.preprocess(str(path), log=quiet)


def test_criteo_file_too_small_for_its_splits_names_file_and_split(tmp_path):
    path = tmp_path / "train.txt"
    write_criteo(str(path), rows=5, seed=1, vocab_size=10)
    processed = tmp_path / "train_processed"
    with pytest.raises(DataError) as err:
        criteo.preprocess(str(path), log=quiet, progress=False)
    assert str(err.value) == (
        f"{path}: 5 lines leave split 'val' empty with num_days=7 (expected at least 14 lines)"
    )
    assert not processed.exists()
    path.write_text(path.read_text() * 3)  # 15 lines: every split has a row now
    data = criteo.preprocess(str(path), log=quiet, progress=False)
    assert all(len(data.split(s)) > 0 for s in ("train", "val", "test"))


def test_failed_preprocessing_leaves_no_lock_file(tmp_path):
    path = tmp_path / "train.txt"
    write_criteo(str(path), rows=5, seed=1, vocab_size=10)
    for _ in range(4):
        with pytest.raises(DataError):
            criteo.preprocess(str(path), log=quiet, progress=False)
    assert [name for name in os.listdir(tmp_path) if name.endswith(".lock")] == []
    path.write_text(path.read_text() * 3)
    criteo.preprocess(str(path), log=quiet, progress=False)
    assert [name for name in os.listdir(tmp_path) if name.endswith(".lock")] == []


def test_lock_still_excludes_while_removing_its_file(tmp_path):
    """Removing the lock file on release must not let two holders in at once."""
    target = str(tmp_path / "out")
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def work():
        try:
            for _ in range(15):
                with locked(target):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.001)
                    with guard:
                        inside[0] -= 1
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and most[0] == 1
    assert not os.path.exists(tmp_path / ".out.lock")
