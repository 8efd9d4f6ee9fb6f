"""Federated simulation benchmarks: secure vs plaintext rounds, rank scaling, memory vs users, MF quality.

Prints JSON. Every figure comes from real ``scripts/train_fl.py`` / ``scripts/train.py`` runs started
here (under ``mpirun`` where ranks are compared) and read back from their summary.json:

- ``client_breakdown``: per-client milliseconds of local training (plain vs DP-SGD), encoding
  (plain) or BFV encryption, and the ledger record, timed in one process on the same clients.
- ``secure_vs_plain``: DLRM (configs/dlrm_fl.yml) on the same clients, model and data, once with
  ``fl.secure=false`` and once secure (DP-SGD + BFV + ledger), both under ``mpirun -np 3``; the
  median round time of rounds >= 1 (round 0 is reported but left out: first-use costs).
- ``rank_scaling``: plaintext client updates per second with 1 worker rank (``mpirun -np 2``) and
  2 worker ranks (``mpirun -np 3``); the two runs alternate ``--repeats`` times so machine load
  drifts hit both alike.
- ``memory``: 1000 and 4000 simulated clients over the same data, 100 per round: peak RSS of the
  aggregator (rank 0) and of every worker rank.
- ``population``: MF, one client per user, on the population-1m generator scaled to 10k, 100k and
  1M users (20 ratings each), 100 clients per round, 3 rounds, plain and secure: set-up seconds,
  round seconds, peak RSS and bytes per added user (docs/PERFORMANCE.md); ``--population-ranks 2,3``
  runs each size under ``mpirun -np 2`` and ``-np 3`` and reports the ratio of client updates per second.
- ``quality``: plaintext federated MF (configs/mf_movielens_fl.yml, natural partition: each user a
  client) against centralised MF (configs/mf_movielens.yml), same data and split: test RMSE.
- ``ctr_quality``: on the realistic Criteo-like generator, two generator seeds, the same rows for
  every model: logistic regression (a torch peer: one weight per category and dense feature,
  Adagrad), central DLRM (scripts/train.py, configs/dlrm.yml), secure federated DLRM
  (configs/dlrm_fl_silo.yml: example-level DP-SGD in each silo, BFV, ledger) and central DP-SGD
  (scripts/train_dp.py) with the federated run's model, data and epsilon: test AUC and log loss.

    flock /tmp/fedrec-bench.lock .venv/bin/python bench/federated.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MPIRUN = str(Path(PYTHON).parent / "mpirun")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_fl(config: str, logdir: Path, overrides: list[str], *, ranks: int = 0) -> dict[str, Any]:
    """One train_fl.py run; returns its summary.json plus the wall time of the whole command."""
    command = [PYTHON, str(ROOT / "scripts" / "train_fl.py"), "--config", config, "--logdir", str(logdir)]
    command += ["train.progress=false", *overrides]
    if ranks:
        command = [MPIRUN, "-np", str(ranks), PYTHON, "-m", "mpi4py.futures", *command[1:]]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-1500:]}")
    summary = json.loads((logdir / "summary.json").read_text())
    summary["command_seconds"] = wall
    summary["command"] = " ".join(command[command.index(str(ROOT / "scripts" / "train_fl.py")) :])
    return summary


def round_figures(summary: dict[str, Any]) -> dict[str, Any]:
    rounds = summary["rounds"]
    steady = rounds[1:] or rounds
    return {
        "round_seconds_median": statistics.median(r["round_seconds"] for r in steady),
        "round0_seconds": rounds[0]["round_seconds"],
        "client_updates_per_second": sum(r["completed"] for r in steady)
        / sum(r["round_seconds"] for r in steady),
        "client_seconds_per_update": sum(r["client_seconds"] for r in steady)
        / sum(r["completed"] for r in steady),
        "bytes_sent_per_client": steady[-1]["bytes_sent"] / max(1, steady[-1]["completed"]),
        "bytes_received_per_client": steady[-1]["bytes_received"] / max(1, steady[-1]["completed"]),
        "rounds": len(rounds),
        "completed_per_round": [r["completed"] for r in rounds],
        "val": rounds[-1].get("val"),
        "epsilon": rounds[-1].get("epsilon"),
    }


def bench_secure_vs_plain(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    common = [f"fl.rounds={args.rounds}", "fl.num_workers=1000", f"fl.client_num_per_round={args.clients}"]
    out: dict[str, Any] = {"setup": {"config": "configs/dlrm_fl.yml", "ranks": 3, "overrides": common}}
    for mode in ("plain", "secure"):
        summary = run_fl(
            "configs/dlrm_fl.yml", work / f"sv_{mode}", [*common, f"fl.secure={mode == 'secure'}"], ranks=3
        )
        out[mode] = round_figures(summary)
        out[mode]["model_parameters_shared"] = summary["federated"]["model_parameters_shared"]
        out[mode]["command"] = summary["command"]
    out["secure_over_plain_round_time"] = (
        out["secure"]["round_seconds_median"] / out["plain"]["round_seconds_median"]
    )
    out["secure_over_plain_client_seconds"] = (
        out["secure"]["client_seconds_per_update"] / out["plain"]["client_seconds_per_update"]
    )
    out["goal"] = "secure round time <= 1.5x plaintext"
    return out


def bench_rank_scaling(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    common = [
        f"fl.rounds={args.rounds}",
        "fl.num_workers=1000",
        f"fl.client_num_per_round={args.clients}",
        "fl.secure=false",
        "fl.local_epochs=2",
    ]
    rates: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for workers in (1, 2):
            summary = run_fl(
                "configs/dlrm_fl.yml", work / f"scale_{workers}_{repeat}", common, ranks=workers + 1
            )
            rates[workers].append(round_figures(summary)["client_updates_per_second"])
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    return {
        "setup": {"config": "configs/dlrm_fl.yml", "overrides": common, "repeats": args.repeats},
        "updates_per_second_1_worker_rank": rates[1],
        "updates_per_second_2_worker_ranks": rates[2],
        "speedup_2_over_1": two / one,
        "goal": "2 worker ranks >= 1.7x of 1",
    }


def bench_memory(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clients in (1000, 4000):
        overrides = [
            "fl.rounds=3",
            f"fl.num_workers={clients}",
            "fl.client_num_per_round=100",
            "fl.secure=false",
        ]
        summary = run_fl("configs/dlrm_fl.yml", work / f"mem_{clients}", overrides, ranks=3)
        out[f"{clients}_clients"] = {
            "aggregator_peak_rss_mb": summary["peak_rss_mb"],
            "worker_rank_peak_rss_mb": summary["federated"]["rank_peak_rss_mb"],
            "client_rows_mean": summary["federated"]["partition"]["client_rows"]["mean"],
            "overrides": overrides,
        }
    a, b = out["1000_clients"], out["4000_clients"]
    out["aggregator_growth_mb"] = b["aggregator_peak_rss_mb"] - a["aggregator_peak_rss_mb"]
    out["worker_growth_mb"] = max(b["worker_rank_peak_rss_mb"].values()) - max(
        a["worker_rank_peak_rss_mb"].values()
    )
    return out


POPULATION_RATINGS_PER_USER = 20  # the population-1m preset's floor: every user can train and be tested


def population_updates_per_second(rounds: list[dict[str, Any]]) -> float | None:
    """Client updates per second over the rounds that neither pay first-use costs (round 0) nor evaluate."""
    steady = [r for r in rounds[1:] if r.get("val") is None and r.get("test") is None]
    if not steady:
        return None
    return sum(r["completed"] for r in steady) / sum(r["round_seconds"] for r in steady)


def bench_population(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """MF (configs/mf_movielens_fl.yml, one client per user) on the realistic population-1m generator
    scaled to each size, 100 clients per round, 3 rounds, plain and secure, in one process or under
    ``mpirun -np R`` for each R of --population-ranks: set-up seconds (data load or generation, and the
    rest), round seconds, client updates per second, peak RSS, bytes per added user; with ranks 2 and 3
    both given, the -np 3 / -np 2 ratio of client updates per second (the runs alternate --repeats times)."""
    out: dict[str, Any] = {"runs": {}}
    cache = Path(args.population_cache)
    cache.mkdir(parents=True, exist_ok=True)
    sizes = [int(n) for n in args.population_users.split(",")]
    rank_counts = [int(r) for r in args.population_ranks.split(",")]
    repeats = args.population_repeats
    for mode in args.population_modes.split(","):
        for users in sizes:
            overrides = [
                "model.preproc.synthetic.preset=population-1m",
                f"model.preproc.synthetic.users={users}",
                f"model.preproc.synthetic.rows={users * POPULATION_RATINGS_PER_USER}",
                f"model.preproc.cache_dir={cache}",
                f"fl.secure={'true' if mode == 'secure' else 'false'}",
                "fl.user_dp=null",
                f"fl.rounds={args.population_rounds}",
                f"fl.client_num_per_round={args.population_clients}",
                f"fl.eval_every={args.population_rounds}",
                f"fl.eval_users={min(users, args.population_eval_users)}",
            ]
            for repeat in range(repeats):
                for ranks in rank_counts:
                    key = (
                        f"{mode}_{users}"
                        + (f"_np{ranks}" if ranks else "")
                        + (f"_r{repeat}" if repeats > 1 else "")
                    )
                    load = os.getloadavg()
                    summary = run_fl(
                        "configs/mf_movielens_fl.yml", work / f"pop_{key}", overrides, ranks=ranks
                    )
                    rounds = summary["rounds"]
                    setup = summary["federated"]["setup_seconds"]
                    out["runs"][key] = {
                        "users": users,
                        "mode": mode,
                        "ranks": ranks or None,
                        "pool_workers": summary["federated"]["pool_workers"],
                        "setup_seconds": setup["total"],
                        "data_seconds": setup["data"],
                        "setup_seconds_without_data": setup["total"] - setup["data"],
                        "round_seconds": [r["round_seconds"] for r in rounds],
                        # round 0 carries first-use costs (each rank's context: data maps, template model)
                        "round_seconds_median": statistics.median(
                            r["round_seconds"] for r in rounds[1:] or rounds
                        ),
                        "client_updates_per_second": population_updates_per_second(rounds),
                        "peak_rss_mb": summary["peak_rss_mb"],
                        "worker_rank_peak_rss_mb": summary["federated"].get("rank_peak_rss_mb"),
                        "command_seconds": summary["command_seconds"],
                        "test": (summary.get("final") or {}).get("test"),
                        "load_average_before": load,
                        "load_average_after": os.getloadavg(),
                        "command": (f"mpirun -np {ranks} python -m mpi4py.futures " if ranks else "python ")
                        + summary["command"],
                    }
                    print(f"population: {key} done", file=sys.stderr, flush=True)
            if 2 in rank_counts and 3 in rank_counts:
                rates = {
                    r: [
                        out["runs"][f"{mode}_{users}_np{r}" + (f"_r{i}" if repeats > 1 else "")][
                            "client_updates_per_second"
                        ]
                        for i in range(repeats)
                    ]
                    for r in (2, 3)
                }
                out[f"{mode}_{users}_updates_per_second_np3_over_np2"] = statistics.median(
                    rates[3]
                ) / statistics.median(rates[2])
        first_rank = rank_counts[0]
        runs = [
            out["runs"][
                f"{mode}_{n}" + (f"_np{first_rank}" if first_rank else "") + ("_r0" if repeats > 1 else "")
            ]
            for n in sizes
        ]
        first, last = runs[0], runs[-1]
        if len(runs) > 1:
            out[f"{mode}_round_ratio_largest_over_smallest"] = (
                last["round_seconds_median"] / first["round_seconds_median"]
            )
            out[f"{mode}_bytes_per_added_user"] = (
                (last["peak_rss_mb"] - first["peak_rss_mb"]) * 2**20 / (last["users"] - first["users"])
            )
    return out


def bench_quality(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    central_dir = work / "mf_central"
    command = [PYTHON, str(ROOT / "scripts" / "train.py"), "--config", "configs/mf_movielens.yml"]
    command += ["--logdir", str(central_dir), "train.progress=false"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"central MF failed: {done.stderr[-1500:]}")
    central = json.loads((central_dir / "summary.json").read_text())
    central_seconds = time.perf_counter() - started
    overrides = ["fl.secure=false", f"fl.rounds={args.mf_rounds}"]
    federated = run_fl("configs/mf_movielens_fl.yml", work / "mf_fl", overrides)
    fed_test = federated["final"]["test"]
    return {
        "central": {
            "config": "configs/mf_movielens.yml",
            "test": central["test"],
            "seconds": central_seconds,
        },
        "federated": {
            "config": "configs/mf_movielens_fl.yml",
            "overrides": overrides,
            "test": fed_test,
            "seconds": federated["command_seconds"],
            "val_rmse_by_round": [
                (r["round"], r["val"]["rmse"]) for r in federated["rounds"] if r.get("val") is not None
            ],
            "clients": federated["federated"]["num_clients"],
        },
        "rmse_federated_minus_central": fed_test["rmse"] - central["test"]["rmse"],
        "goal": "federated MF test RMSE within 0.02 of centralised MF",
    }


def logistic_regression_peer(config_path: str, overrides: list[str], *, epochs: int = 2) -> dict[str, float]:
    """The plain CTR peer: logistic regression on the same processed rows (one weight per category)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from fedrec.config import load_config
    from fedrec.data.synthetic import auc
    from fedrec.experiment import prepare_data

    config = load_config(config_path, overrides)
    data = prepare_data(config, log=lambda message: None, progress=False)
    sizes = [int(s) for s in data.meta["table_sizes"]]
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))

    def tensors(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        arrays = data.split(name).arrays
        sparse = np.asarray(arrays["sparse"]).astype(np.int64) + offsets
        return (
            torch.from_numpy(np.asarray(arrays["dense"], dtype=np.float32)),
            torch.from_numpy(sparse),
            torch.from_numpy(np.asarray(arrays["label"], dtype=np.float32)),
        )

    dense, sparse, label = tensors("train")
    test_dense, test_sparse, test_label = tensors("test")
    torch.manual_seed(0)
    weights = torch.nn.Embedding(sum(sizes), 1)
    torch.nn.init.zeros_(weights.weight)
    linear = torch.nn.Linear(dense.shape[1], 1)
    optimizer = torch.optim.Adagrad([*weights.parameters(), *linear.parameters()], lr=0.05)
    for _ in range(epochs):
        order = torch.randperm(len(label))
        for lo in range(0, len(label), 256):
            batch = order[lo : lo + 256]
            score = linear(dense[batch]).squeeze(1) + weights(sparse[batch]).sum((1, 2))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(score, label[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        score = linear(test_dense).squeeze(1) + weights(test_sparse).sum((1, 2))
        logloss = float(torch.nn.functional.binary_cross_entropy_with_logits(score, test_label))
    return {"auc": auc(test_label.numpy(), score.numpy()), "logloss": logloss, "epochs": epochs}


def run_script(script: str, config: str, logdir: Path, overrides: list[str]) -> dict[str, Any]:
    """One scripts/train.py or train_dp.py run; returns its summary.json plus the command's wall time."""
    command = [PYTHON, str(ROOT / "scripts" / script), "--config", config, "--logdir", str(logdir)]
    command += ["train.progress=false", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-1500:]}")
    summary = json.loads((logdir / "summary.json").read_text())
    summary["command_seconds"] = time.perf_counter() - started
    summary["command"] = " ".join(command[1:])
    return summary


def central_dp_config(fl_config: str, work: Path, *, epsilon: float) -> str:
    """The federated config as a central DP-SGD run: same model, data and delta rule, at ``epsilon``,
    with as many steps as each silo took."""
    import yaml

    data = yaml.safe_load((ROOT / fl_config).read_text())
    fl = data.pop("fl")
    data["privacy"].update(
        {"noise_multiplier": None, "target_epsilon": float(epsilon), "epsilon_budget": None}
    )
    # As many DP steps as each silo takes over the run (a step-matched comparison).
    data["train"].update(epochs=1, max_steps=int(fl["rounds"]) * int(fl["local_steps"]))
    path = work / "central_dp.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def bench_ctr_quality(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """CTR quality on the Criteo-like generator: LR, central DLRM, secure federated DLRM, central DP-SGD."""
    out: dict[str, Any] = {"generator_seeds": list(args.ctr_seeds)}
    fl_config = "configs/dlrm_fl_silo.yml"
    for seed in args.ctr_seeds:
        cache = str(work / "ctr_data")
        data = [f"model.preproc.synthetic.seed={seed}", f"model.preproc.cache_dir={cache}"]
        rows = f"model.preproc.synthetic.rows={args.ctr_rows}"
        result: dict[str, Any] = {}
        federated = run_fl(fl_config, work / f"ctr_fl_{seed}", [*data, rows], ranks=2)
        epsilon = federated["final"]["epsilon"]
        result["secure_federated"] = {
            "config": fl_config,
            "test": federated["final"]["test"],
            "epsilon": epsilon,
            "delta": federated["federated"]["privacy"]["delta"],
            "privacy_unit": "example (DP-SGD in each silo)",
            "seconds": federated["command_seconds"],
            "command": federated["command"],
        }
        dp_config = central_dp_config(fl_config, work, epsilon=epsilon)
        dp = run_script("train_dp.py", dp_config, work / f"ctr_dp_{seed}", [*data, rows])
        result["central_dp"] = {
            "test": dp["test"],
            "privacy": {k: dp["privacy"][k] for k in ("epsilon", "delta")},
        }
        result["logistic_regression"] = logistic_regression_peer(fl_config, [*data, rows])
        central = run_script("train.py", "configs/dlrm.yml", work / f"ctr_central_{seed}", [*data, rows])
        result["central_dlrm"] = {"config": "configs/dlrm.yml", "test": central["test"]}
        result["federated_minus_central_dp_auc"] = (
            result["secure_federated"]["test"]["auc"] - result["central_dp"]["test"]["auc"]
        )
        out[f"seed_{seed}"] = result
    return out


def bench_client_breakdown(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Where a secure client's time goes: one process, the same clients trained plain and secure."""
    import asyncio

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from fedrec.config import load_config
    from fedrec.federated.clients import rank_context
    from fedrec.federated.private_store import attempt_tag
    from fedrec.federated.simulation import Simulation

    out: dict[str, Any] = {
        "setup": {"config": "configs/dlrm_fl.yml", "clients_timed": args.breakdown_clients}
    }
    for secure in (False, True):
        config = load_config(
            "configs/dlrm_fl.yml", [f"fl.secure={secure}", "fl.rounds=1", "train.progress=false"]
        )
        sim = Simulation(config, str(work / f"breakdown_{secure}"), log=lambda message: None)
        sim.prepare()

        def time_clients(sim: Simulation = sim, secure: bool = secure) -> dict[str, float]:
            context = rank_context(sim.spec)
            tag = attempt_tag(0, 0)
            totals = {"local_training": 0.0, "encode_or_encrypt": 0.0, "ledger_record": 0.0}
            clients = range(100, 100 + args.breakdown_clients)
            for client in [0, *clients]:  # client 0 warms up (first use of the codec, the key)
                t0 = time.perf_counter()
                worker = context.trainer_worker(client, 0, 0, sim.digest)
                asyncio.run(worker.run())
                t1 = time.perf_counter()
                if context.ledger is not None:
                    extra = worker.update.extra
                    context.ledger.record_client_spend(
                        client=client,
                        round=0,
                        noise_multiplier=extra["noise_multiplier"],
                        sample_rate=extra["sample_rate"],
                        steps=extra["dp_steps"],
                    )
                t2 = time.perf_counter()
                context.codec.encode(worker.update, tag=tag, rng=np.random.default_rng(client))
                t3 = time.perf_counter()
                if client:
                    totals["local_training"] += t1 - t0
                    totals["ledger_record"] += t2 - t1
                    totals["encode_or_encrypt"] += t3 - t2
            return {k: v / args.breakdown_clients * 1000 for k, v in totals.items()}

        out["secure_ms_per_client" if secure else "plain_ms_per_client"] = sim.pool.submit(
            time_clients
        ).result()
        sim.pool.shutdown(stuck=False)
    plain, secure = out["plain_ms_per_client"], out["secure_ms_per_client"]
    out["secure_over_plain_client"] = sum(secure.values()) / sum(plain.values())
    out["dp_training_over_plain_training"] = secure["local_training"] / plain["local_training"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and clients (a smoke run)")
    parser.add_argument("--parts", default="client_breakdown,secure_vs_plain,rank_scaling,memory,quality")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--population-users", default="10000,100000,1000000", help="population part: sizes")
    parser.add_argument("--population-modes", default="plain,secure", help="population part: plain,secure")
    parser.add_argument(
        "--population-eval-users", type=int, default=10000, help="population part: fl.eval_users"
    )
    parser.add_argument(
        "--population-cache",
        default=os.path.join(tempfile.gettempdir(), "fedrec-bench-population-data"),
        help="population part: where the generated data is kept between runs (generation is timed apart)",
    )
    parser.add_argument(
        "--population-ranks",
        default="0",
        help="population part: 0 (one process) and/or mpirun -np counts, e.g. 2,3 (updates/s ratio of 3 over 2)",
    )
    parser.add_argument("--population-rounds", type=int, default=3, help="population part: fl.rounds")
    parser.add_argument(
        "--population-clients", type=int, default=100, help="population part: fl.client_num_per_round"
    )
    parser.add_argument(
        "--population-repeats", type=int, default=1, help="population part: alternate the rank counts N times"
    )
    args = parser.parse_args()
    args.rounds = 2 if args.quick else 4
    args.clients = 20 if args.quick else 100
    args.repeats = 1 if args.quick else 2
    args.mf_rounds = 5 if args.quick else 100
    args.breakdown_clients = 5 if args.quick else 40
    args.ctr_seeds = (0, 1)
    args.ctr_rows = 200_000 if args.quick else 1_000_000
    parts = {
        "client_breakdown": bench_client_breakdown,
        "secure_vs_plain": bench_secure_vs_plain,
        "rank_scaling": bench_rank_scaling,
        "ctr_quality": bench_ctr_quality,
        "memory": bench_memory,
        "quality": bench_quality,
        "population": bench_population,
    }
    results: dict[str, Any] = {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-fl-") as tmp:
        for name in args.parts.split(","):
            started = time.perf_counter()
            results[name] = parts[name](Path(tmp), args)
            results[name]["bench_seconds"] = time.perf_counter() - started
            print(f"{name}: done in {results[name]['bench_seconds']:.0f}s", file=sys.stderr, flush=True)
    results["load_average_after"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
