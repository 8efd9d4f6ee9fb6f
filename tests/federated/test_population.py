"""Large populations: sampling in O(clients per round), bounded ranking evaluation, fl.eval_users."""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest
import yaml
from fl_helpers import ROOT

from fedrec.config.loader import build_experiment
from fedrec.data.partition import natural_partition, partition_statistics
from fedrec.errors import ConfigError
from fedrec.federated.simulation import Simulation
from fedrec.federated.user_dp import poisson_sample
from fedrec.trainers import metrics as M


@pytest.fixture(scope="module")
def mf_plain(tmp_path_factory) -> dict:
    """configs/mf_movielens_fl.yml, plain, no user-level DP, on a small realistic synthetic set."""
    data = yaml.safe_load((ROOT / "configs" / "mf_movielens_fl.yml").read_text())
    data["model"]["preproc"]["synthetic"].update({"rows": 4000, "users": 80, "items": 150})
    data["model"]["preproc"]["cache_dir"] = str(tmp_path_factory.mktemp("population-data"))
    data["train"]["progress"] = False
    data["fl"].update(
        {"secure": False, "user_dp": None, "client_num_per_round": 10, "rounds": 1, "local_epochs": 1}
    )
    return data


def run(data: dict, logdir) -> dict:
    return Simulation(build_experiment(copy.deepcopy(data)), str(logdir), log=lambda message: None).run()


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["seeded", "hmac"])
def test_poisson_sample_costs_the_sample_not_the_population(key):
    # A billion clients at q = 1e-7: ~100 kept. One draw per client would take minutes.
    started = time.perf_counter()
    sample = poisson_sample(0, 1, 0, num_clients=10**9, rate=1e-7, key=key)
    assert time.perf_counter() - started < 2.0
    assert 50 < len(sample) < 160 and sample == sorted(set(sample)) and sample[0] >= 0 and sample[-1] < 10**9


@pytest.mark.parametrize("key", [None, os.urandom(32)], ids=["seeded", "hmac"])
def test_poisson_sample_keeps_every_client_independently_with_probability_q(key):
    clients, rate, rounds = 40, 0.3, 3000
    hits = np.zeros(clients)
    pairs = 0
    for r in range(rounds):
        sample = poisson_sample(7, r, 0, num_clients=clients, rate=rate, key=key)
        hits[sample] += 1
        pairs += int(0 in sample and 1 in sample)
    frequency = hits / rounds
    # Binomial sd sqrt(.3 * .7 / 3000) = 0.0084: 5 sd either side, for every client (first and last too).
    assert np.all(np.abs(frequency - rate) < 0.042), frequency
    assert abs(pairs / rounds - rate**2) < 0.03  # clients 0 and 1 kept independently
    assert poisson_sample(7, 1, 0, num_clients=clients, rate=1.0, key=key) == list(range(clients))


def test_poisson_sample_is_keyed_by_round_attempt_and_key():
    a = poisson_sample(0, 3, 0, num_clients=100_000, rate=0.01)
    assert a == poisson_sample(0, 3, 0, num_clients=100_000, rate=0.01)
    assert a != poisson_sample(0, 3, 1, num_clients=100_000, rate=0.01)
    assert a != poisson_sample(0, 3, 0, num_clients=100_000, rate=0.01, key=b"x" * 32)
    with pytest.raises(ValueError, match="16 bytes"):
        poisson_sample(0, 3, 0, num_clients=10, rate=0.5, key=b"short")


def test_batched_ranking_bounds_memory_and_ranks_correctly():
    num_users, num_items = 500, 300
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(num_users), 5)
    items = rng.integers(0, num_items, size=len(users))
    rated = M.RatedItems.from_pairs(users, items, num_users, num_items)
    held_users, held_items = np.arange(num_users), items[::5]
    widest = []

    def perfect(batch_users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        widest.append(len(batch_users))
        # negatives are never items the user rated
        keys = batch_users[:, None] * num_items + candidates[:, 1:]
        assert not np.isin(keys, rated.keys).any()
        return np.where(np.arange(candidates.shape[1]) == 0, 1.0, 0.0)[None, :].repeat(len(batch_users), 0)

    hr, ndcg = M.ranking_in_batches(
        perfect, held_users, held_items, rated, num_negatives=99, seed=0, batch_rows=64
    )
    assert hr == 1.0 and ndcg == 1.0 and max(widest) <= 64 and sum(widest) == num_users

    def constant(batch_users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return np.zeros(candidates.shape)

    assert M.ranking_in_batches(constant, held_users, held_items, rated, num_negatives=99, seed=0) == (
        0.0,
        0.0,
    )


def test_batched_ranking_matches_the_whole_population_figure():
    """The batch size only changes which negatives are drawn: a model's HR@10 stays the same figure."""
    num_users, num_items, dim = 3000, 400, 8
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(num_users, dim)), rng.normal(size=(num_items, dim))
    users = np.arange(num_users)
    items = np.argmax(p @ q.T + rng.normal(scale=3.0, size=(num_users, num_items)), axis=1)
    rated = M.RatedItems.from_pairs(users, items, num_users, num_items)

    def score(batch_users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return np.einsum("bd,bkd->bk", p[batch_users], q[candidates])

    small = M.ranking_in_batches(score, users, items, rated, num_negatives=99, seed=0, batch_rows=100)
    whole = M.ranking_in_batches(score, users, items, rated, num_negatives=99, seed=0, batch_rows=num_users)
    assert 0.2 < whole[0] < 1.0 and abs(small[0] - whole[0]) < 0.03 and abs(small[1] - whole[1]) < 0.03


def test_eval_users_is_a_seeded_sample():
    a = M.sample_eval_users(1000, 100, seed=0)
    assert a is not None and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0) and a[-1] < 1000
    assert np.array_equal(a, M.sample_eval_users(1000, 100, seed=0))
    assert not np.array_equal(a, M.sample_eval_users(1000, 100, seed=1))
    assert M.sample_eval_users(1000, None, seed=0) is None and M.sample_eval_users(1000, 1000, seed=0) is None


def test_eval_users_evaluates_the_sampled_users_only(mf_plain, tmp_path):
    data = copy.deepcopy(mf_plain)
    data["fl"]["eval_users"] = 20
    final = run(data, tmp_path / "sample")
    whole = run(mf_plain, tmp_path / "all")
    assert whole["test"]["rows"] == 80  # leave-last-out: one test rating per user
    assert final["test"]["rows"] == 20 and np.isfinite(final["test"]["hr@10"])
    assert final["final_model_digest"] == whole["final_model_digest"]  # training does not change
    setup = json.loads((tmp_path / "sample" / "summary.json").read_text())["federated"]["setup_seconds"]
    assert set(setup) == {"data", "total"} and 0 < setup["data"] <= setup["total"]


def test_eval_users_above_the_population_fails_before_round_0(mf_plain, tmp_path):
    data = copy.deepcopy(mf_plain)
    data["fl"]["eval_users"] = 81
    with pytest.raises(ConfigError, match=r"fl.eval_users' = 81: above the population \(80 users\)"):
        run(data, tmp_path)
    assert not (tmp_path / "fl" / "checkpoint.json").exists()
    data["fl"]["eval_users"] = 0
    with pytest.raises(ConfigError, match="eval_users"):
        build_experiment(data)


def test_a_population_larger_than_the_rows_can_serve_is_an_error(mf_plain, tmp_path):
    data = copy.deepcopy(mf_plain)
    data["model"]["preproc"]["synthetic"].update({"users": 1000, "rows": 4000})  # 20 ratings per user needed
    with pytest.raises(ConfigError, match=r"synthetic.rows' = 4000: expected at least"):
        run(data, tmp_path)
    assert not (tmp_path / "fl" / "checkpoint.json").exists()


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled_rows", "rows_grouped_by_user"])
def test_array_partition_matches_a_per_client_reference_on_a_small_population(grouped):
    """The array set-up (natural partition, client sizes, statistics) gives what one Python object per
    client would: each user's rows, in order, and the same label-mix figures."""
    rng = np.random.default_rng(3)
    users = rng.integers(0, 60, size=2000).astype(np.int32)
    if grouped:  # the MovieLens splits' layout: the no-sort path
        users = np.sort(users)
    labels = rng.integers(1, 6, size=2000).astype(np.float32)
    partition = natural_partition(users, None, seed=0)
    distinct = np.unique(users)
    assert partition.num_clients == len(distinct)
    for client, user in enumerate(distinct):
        rows = [i for i, u in enumerate(users) if u == user]
        assert partition.client_rows(client).tolist() == rows
        assert partition.client_users(client).tolist() == [user]
    stats = partition_statistics(partition, labels)
    mixes = []
    for user in distinct:
        own = labels[users == user]
        mixes.append([np.mean(own == v) for v in range(1, 6)])
    global_mix = np.array([np.mean(labels == v) for v in range(1, 6)])
    tv = 0.5 * np.abs(np.array(mixes) - global_mix).sum(axis=1)
    assert stats["mean_tv_distance_to_global_mix"] == pytest.approx(float(tv.mean()), abs=1e-12)
    assert stats["client_rows"]["max"] == max(int(np.sum(users == u)) for u in distinct)


def test_one_client_per_user_partition_stores_no_row_order(tmp_path, monkeypatch):
    """Rows grouped by user: the partition is offsets and user ids (the identity order is not kept), it
    saves and loads as such, and its statistics come out the same whatever the block size."""
    import fedrec.data.partition as P

    rng = np.random.default_rng(5)
    users = np.sort(rng.integers(0, 300, size=5000)).astype(np.int32)
    labels = rng.integers(1, 6, size=5000).astype(np.int8)
    compact = natural_partition(users, None, seed=0)
    assert compact.order is None and compact.user_offsets is None and compact.num_rows == 5000
    path = str(tmp_path / "p.npz")
    compact.save(path)
    with np.load(path) as npz:
        assert set(npz.files) == {"kind", "offsets", "users"}
    # the same clients as the explicit form (an identity order and one user each), saved by older runs
    explicit = P.Partition(
        "natural",
        np.arange(5000, dtype=np.int32),
        compact.offsets,
        compact.users,
        np.arange(compact.num_clients + 1),
    )
    explicit.save(str(tmp_path / "old.npz"))
    for loaded in (P.Partition.load(path), P.Partition.load(str(tmp_path / "old.npz"))):
        for client in (0, 7, loaded.num_clients - 1):
            assert np.array_equal(loaded.client_rows(client), np.flatnonzero(users == compact.users[client]))
            assert loaded.client_users(client).tolist() == [compact.users[client]]
    whole = partition_statistics(compact, labels)
    assert partition_statistics(explicit, labels) == whole
    monkeypatch.setattr(P, "STATISTICS_BLOCK_ROWS", 7)  # many blocks, some of one client only
    blocked = partition_statistics(compact, labels)
    assert blocked.pop("mean_tv_distance_to_global_mix") == pytest.approx(
        whole.pop("mean_tv_distance_to_global_mix")
    )
    assert blocked == whole
    float_labels = labels.astype(np.float32) + 0.2  # ratings: classes by rounding, in blocks too
    assert partition_statistics(compact, float_labels)["label_values"] == [1, 2, 3, 4, 5]
