"""DP-SGD cost and utility on DLRM: ours (privacy.dp) against non-private training and stock Opacus.

Prints JSON. Step time and peak memory of one training step of the DLRM Kaggle reference architecture
(bottom 13-512-256-64-16, top 367-512-256-1) with 26 embedding tables of dim 16 totalling ``--rows``
rows, batch 512, in steady state:

- ``nonprivate``: the standard path (BaseTrainer's step: mean loss, backward, SGD with sparse table
  gradients);
- ``dp_lazy``: privacy.dp.DPSGD with lazy row noise (Poisson batches of expected size 512);
- ``dp_dense``: the same with dense noise on every parameter every step (lazy_noise=False);
- ``dp_secure``: ``dp_lazy`` with ``secure_mode=True`` (noise from the OS CSPRNG);
- ``opacus``: the peer, stock ``opacus.PrivacyEngine.make_private`` on the same model, run at
  ``--rows`` and then at smaller sizes until one fits, each in a subprocess under an address-space
  limit (``--opacus-mem-gb``) so an out-of-memory cannot take the machine down.

Each mode runs in its own subprocess (peak memory belongs to one mode), modes alternate for
``--rounds`` rounds (the machine is shared: alternation spreads other jobs' load evenly) and the
median over rounds is reported. Utility: test AUC on the built-in planted synthetic Criteo data
at epsilon 1, 3 and 8 and without privacy, same data, batch size, learning rate and number of steps.

    flock /tmp/fedrec-bench.lock .venv/bin/python bench/dp_sgd.py --threads 2
    .venv/bin/python bench/dp_sgd.py --device cuda --skip-utility     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from fedrec.models.dlrm import DLRM, DLRMConfig  # noqa: E402

# 26 tables, Criteo-like skew: a few large tables and many small ones.
LARGE_SHARE = [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05]
SMALL_TABLES = 19


def table_sizes(total_rows: int) -> list[int]:
    small = max(1, int(total_rows * 0.05) // SMALL_TABLES)
    large = [max(1, int(total_rows * share)) for share in LARGE_SHARE]
    sizes = large + [small] * SMALL_TABLES
    sizes[0] += max(0, total_rows - sum(sizes))
    return sizes


def make_batches(sizes: list[int], batch_sizes: list[int], device: torch.device, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batch_sizes:
        dense = torch.log1p(torch.rand(b, 13, generator=gen) * 10)
        # Zipf-like skew: a few hot rows per table, as in click logs
        sparse = torch.stack(
            [(torch.rand(b, generator=gen) ** 3 * s).long().clamp(max=s - 1) for s in sizes], dim=1
        )
        label = (torch.rand(b, generator=gen) < 0.25).float()
        out.append({"dense": dense.to(device), "sparse": sparse.to(device), "label": label.to(device)})
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------- workers


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process; returns its step times and memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # Every mode imports the same libraries before the baseline, so memory compares the steps alone.
    import opacus  # noqa: F401

    import privacy.dp.optimizer  # noqa: F401

    baseline_rss = rss_mb()
    if args.mode == "opacus" and device.type == "cpu" and args.opacus_mem_gb:
        limit = int(args.opacus_mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sizes = table_sizes(args.rows)
    model = DLRM(DLRMConfig(), table_sizes=sizes, seed=0, sparse=args.mode == "nonprivate").to(device)
    steps = args.warmup + args.steps
    if args.mode == "nonprivate":
        batch_sizes = [args.batch] * steps
    else:  # Poisson batches: Binomial(N, q) with N q = batch
        rng = np.random.default_rng(1)
        batch_sizes = [int(rng.binomial(10**7, args.batch / 10**7)) for _ in range(steps)]
    batches = make_batches(sizes, batch_sizes[: min(steps, 16)], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    after_setup_rss = rss_mb()
    step = build_step(args, model, device, sizes)
    times = []
    try:
        for i in range(steps):
            batch = batches[i % len(batches)]
            started = time.perf_counter()
            step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append((time.perf_counter() - started) * 1000)
    except (RuntimeError, MemoryError) as err:  # torch raises RuntimeError for allocator failures
        message = str(err).splitlines()[0][:200]
        if "memory" not in message.lower() and "alloc" not in message.lower():
            raise
        return {"mode": args.mode, "rows": args.rows, "oom": True, "error": message, "steps_done": len(times)}
    # Steady-state peak: before the export-time flush, which is measured on its own below.
    step_peak_rss = peak_rss_mb()
    step_peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    extra = {}
    if args.mode in ("dp_lazy", "dp_secure", "dp_dense"):
        dp = step.dp  # type: ignore[attr-defined]
        started = time.perf_counter()
        dp.flush()
        if device.type == "cuda":
            torch.cuda.synchronize()
        extra["flush_ms"] = (time.perf_counter() - started) * 1000
        extra["peak_rss_with_flush_mb"] = peak_rss_mb()
        if device.type == "cuda":
            extra["peak_gpu_with_flush_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result = {
        "mode": args.mode,
        "rows": args.rows,
        "tables": len(sizes),
        "params": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "mean_batch": float(np.mean(batch_sizes[args.warmup :])),
        "threads": args.threads,
        "device": str(device),
        "step_ms_median": statistics.median(times),
        "step_ms_p10": float(np.percentile(times, 10)),
        "step_ms_p90": float(np.percentile(times, 90)),
        "samples_per_s": args.batch / (statistics.median(times) / 1000),
        "rss_after_import_mb": baseline_rss,
        "rss_after_setup_mb": after_setup_rss,
        "peak_rss_mb": step_peak_rss,
        "peak_above_import_mb": step_peak_rss - baseline_rss,
        **extra,
    }
    if step_peak_gpu is not None:
        result["peak_gpu_mb"] = step_peak_gpu
    return result


def interleaved(args: argparse.Namespace) -> dict:
    """Step times of several modes in one process, one step of each in turn.

    On a shared machine the load changes from second to second; alternating step by step gives
    every mode the same conditions, so the ratios hold even when absolute times wander.
    """
    import copy

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = args.modes.split(",")
    sizes = table_sizes(args.rows)
    steps = args.warmup + args.steps
    rng = np.random.default_rng(1)
    poisson = [int(rng.binomial(10**7, args.batch / 10**7)) for _ in range(16)]
    fixed = make_batches(sizes, [args.batch] * 16, device)
    varied = make_batches(sizes, poisson, device)
    runners = {}
    for mode in modes:
        mode_args = copy.copy(args)
        mode_args.mode = mode
        model = DLRM(DLRMConfig(), table_sizes=sizes, seed=0, sparse=mode == "nonprivate").to(device)
        runners[mode] = (
            build_step(mode_args, model, device, sizes),
            fixed if mode == "nonprivate" else varied,
        )
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(steps):
        for mode in modes:
            step, batches = runners[mode]
            started = time.perf_counter()
            step(batches[i % 16])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[mode].append((time.perf_counter() - started) * 1000)
    base = times[modes[0]]
    out = {
        "rows": args.rows,
        "batch": args.batch,
        "threads": args.threads,
        "device": str(device),
        "modes": {},
    }
    for mode in modes:
        t = times[mode]
        out["modes"][mode] = {
            "step_ms_median": statistics.median(t),
            "step_ms_p10": float(np.percentile(t, 10)),
            "step_ms_p90": float(np.percentile(t, 90)),
            # median of per-step ratios against the first mode (same moment, same load)
            "paired_ratio_median": statistics.median(a / b for a, b in zip(t, base)),
            "samples_per_s": args.batch / (statistics.median(t) / 1000),
        }
    return out


def build_step(args: argparse.Namespace, model: DLRM, device: torch.device, sizes: list[int]):
    if args.mode == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(batch):
            opt.zero_grad(set_to_none=True)
            loss = model.loss(model(batch), batch["label"])
            loss.backward()
            opt.step()

        return step
    if args.mode in ("dp_lazy", "dp_secure", "dp_dense"):
        from privacy.dp.optimizer import DPSGD

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dp = DPSGD(
            model,
            opt,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=args.batch / 10**7,
            num_examples=10**7,
            lazy_noise=args.mode != "dp_dense",
            secure_mode=args.mode == "dp_secure",
            seed=None if args.mode == "dp_secure" else 0,
        )

        def dp_step(batch):
            dp.step(model.loss(model(batch), batch["label"], reduction="none"))

        dp_step.dp = dp  # type: ignore[attr-defined]
        return dp_step
    if args.mode == "opacus":
        return opacus_step(args, model, device)
    raise ValueError(args.mode)


def opacus_step(args: argparse.Namespace, model: DLRM, device: torch.device):
    """Stock Opacus: PrivacyEngine.make_private over the same DLRM (default hooks, dense per-sample grads)."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    class Adapter(torch.nn.Module):  # Opacus feeds tensors; DLRM takes a dict
        def __init__(self, inner: DLRM):
            super().__init__()
            self.inner = inner

        def forward(self, dense, sparse):
            return self.inner({"dense": dense, "sparse": sparse})

    wrapped = Adapter(model)
    # A stand-in dataset: make_private reads only its length and batch size (sample rate ~ batch / N);
    # the step below feeds the same batches as the other modes.
    placeholder = TensorDataset(torch.zeros(20 * args.batch, 1))
    loader = DataLoader(placeholder, batch_size=args.batch)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private, popt, _ = engine.make_private(
            module=wrapped, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )

    def step(batch):
        popt.zero_grad(set_to_none=True)
        scores = private(batch["dense"], batch["sparse"])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, batch["label"])
        loss.backward()
        popt.step()

    return step


def run_worker(args: argparse.Namespace, mode: str, rows: int, timeout: int, modes: str = "") -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        "--rows",
        str(rows),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--steps",
        str(args.steps if mode != "opacus" else args.opacus_steps),
        "--warmup",
        str(args.warmup if mode != "opacus" else 2),
        "--opacus-mem-gb",
        str(args.opacus_mem_gb),
        *(["--modes", modes] if modes else []),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "rows": rows, "timeout_s": timeout}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        return {"mode": mode, "rows": rows, "exit_code": proc.returncode, "error": " ".join(tail)[:300],
                "oom": proc.returncode in (-9, 137) or "memory" in proc.stderr.lower()}  # fmt: skip
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------- utility


def utility(args: argparse.Namespace) -> dict:
    """Test AUC at epsilon 1, 3, 8 and non-private on the planted synthetic Criteo data."""
    from fedrec.config import load_config
    from fedrec.experiment import build_model, prepare_data, set_seed
    from fedrec.trainers.base_trainer import BaseTrainer
    from fedrec.trainers.dp_trainer import DPTrainer

    torch.set_num_threads(args.threads)
    common = [
        "train.progress=false",
        f"train.batch_size={args.batch}",
        f"train.lr={args.utility_lr}",
        f"train.epochs={args.utility_epochs}",
        f"model.preproc.synthetic.rows={args.utility_rows}",
        f"model.preproc.cache_dir={args.data_dir}",
        "train.eval_batch_size=16384",
    ]
    out: dict = {
        "rows": args.utility_rows,
        "epochs": args.utility_epochs,
        "lr": args.utility_lr,
        "max_grad_norm": args.utility_clip,
        "batch": args.batch,
        "runs": [],
    }
    steps = None
    for epsilon in args.epsilons:
        config = load_config(
            os.path.join(ROOT, "configs/dlrm_dp.yml"),
            [*common, f"privacy.target_epsilon={epsilon}", f"privacy.max_grad_norm={args.utility_clip}"],
        )
        set_seed(config.seed)
        data = prepare_data(config, progress=False)
        trainer = DPTrainer(build_model(config, data.meta), data, config)
        started = time.perf_counter()
        summary = trainer.fit(progress=False)
        steps = summary["steps"]
        p = summary["privacy"]
        out["runs"].append(
            {
                "epsilon_target": epsilon,
                "epsilon": p["epsilon"],
                "delta": p["delta"],
                "noise_multiplier": p["noise_multiplier"],
                "max_grad_norm": p["max_grad_norm"],
                "steps": steps,
                "test_auc": summary["test"]["auc"],
                "test_logloss": summary["test"]["logloss"],
                "seconds": time.perf_counter() - started,
            }
        )
    config = load_config(
        os.path.join(ROOT, "configs/dlrm.yml"), [*common, f"train.max_steps={steps}", f"train.epochs={10**6}"]
    )
    set_seed(config.seed)
    data = prepare_data(config, progress=False)
    trainer = BaseTrainer(build_model(config, data.meta, sparse=True), data, config)
    started = time.perf_counter()
    summary = trainer.fit(progress=False)
    out["runs"].append(
        {
            "epsilon_target": None,
            "steps": summary["steps"],
            "test_auc": summary["test"]["auc"],
            "test_logloss": summary["test"]["logloss"],
            "seconds": time.perf_counter() - started,
        }
    )
    return out


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--worker", choices=["nonprivate", "dp_lazy", "dp_secure", "dp_dense", "opacus", "interleaved"]
    )
    parser.add_argument(
        "--modes", default="nonprivate,dp_lazy", help="--worker interleaved: modes, baseline first"
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="embedding rows in all (26 tables)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing runs")
    parser.add_argument("--memory-rounds", type=int, default=1, help="one process per mode (peak memory)")
    parser.add_argument("--opacus-steps", type=int, default=5)
    parser.add_argument("--opacus-mem-gb", type=float, default=6.0)
    parser.add_argument("--opacus-rows", type=int, nargs="*", default=[1_000_000, 100_000, 30_000, 10_000])
    parser.add_argument("--skip-opacus", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-secure", action="store_true")
    parser.add_argument("--skip-utility", action="store_true")
    parser.add_argument("--only-utility", action="store_true")
    parser.add_argument("--utility-rows", type=int, default=200_000)
    parser.add_argument("--utility-epochs", type=int, default=3)
    parser.add_argument("--utility-lr", type=float, default=0.5)
    parser.add_argument(
        "--utility-clip", type=float, default=1.0, help="privacy.max_grad_norm of the DP runs"
    )
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    args = parser.parse_args()
    if args.worker == "interleaved":
        print(json.dumps(interleaved(args)))
        return
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    if args.only_utility:
        print(
            json.dumps(
                {"benchmark": "dp_sgd", "utility": utility(args), "loadavg": os.getloadavg()}, indent=2
            )
        )
        return
    load_before = os.getloadavg()
    report: dict = {
        "benchmark": "dp_sgd",
        "device": args.device,
        "threads": args.threads,
        "batch": args.batch,
        "rows": args.rows,
        "table_sizes": table_sizes(args.rows),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    modes = ["nonprivate", "dp_lazy"] + ([] if args.skip_dense else ["dp_dense"])
    modes += [] if args.skip_secure else ["dp_secure"]
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.memory_rounds):
        for mode in modes:
            rounds[mode].append(run_worker(args, mode, args.rows, timeout=1800))
    summary = {}
    for mode, results in rounds.items():
        ok = [r for r in results if "step_ms_median" in r]
        if not ok:
            summary[mode] = {"failed": results}
            continue
        summary[mode] = {
            "step_ms": statistics.median(r["step_ms_median"] for r in ok),
            "step_ms_rounds": [round(r["step_ms_median"], 2) for r in ok],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
            "peak_above_import_mb": statistics.median(r["peak_above_import_mb"] for r in ok),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in ok),
            **(
                {"peak_gpu_mb": statistics.median(r["peak_gpu_mb"] for r in ok)}
                if "peak_gpu_mb" in ok[0]
                else {}
            ),
            **({"flush_ms": statistics.median(r["flush_ms"] for r in ok)} if "flush_ms" in ok[0] else {}),
            **(
                {"peak_rss_with_flush_mb": statistics.median(r["peak_rss_with_flush_mb"] for r in ok)}
                if "peak_rss_with_flush_mb" in ok[0]
                else {}
            ),
            "params": ok[0]["params"],
        }
    report["modes"] = summary
    # Step-time ratios from modes alternating step by step in one process (robust to a shared machine).
    timing_runs = []
    for _ in range(args.rounds):
        timing_runs.append(run_worker(args, "interleaved", args.rows, timeout=3600, modes=",".join(modes)))
    ok_runs = [r for r in timing_runs if "modes" in r]
    report["interleaved"] = {
        mode: {
            "step_ms": statistics.median(r["modes"][mode]["step_ms_median"] for r in ok_runs),
            "paired_ratio": statistics.median(r["modes"][mode]["paired_ratio_median"] for r in ok_runs),
            "paired_ratio_rounds": [round(r["modes"][mode]["paired_ratio_median"], 3) for r in ok_runs],
            "samples_per_s": statistics.median(r["modes"][mode]["samples_per_s"] for r in ok_runs),
        }
        for mode in modes
        if ok_runs
    } or {"failed": timing_runs}
    base = summary.get("nonprivate", {})
    ratios = {}
    for mode in modes[1:]:
        if "step_ms" in summary.get(mode, {}) and "step_ms" in base:
            ratios[mode] = {
                "step_time_ratio_interleaved": report["interleaved"].get(mode, {}).get("paired_ratio"),
                "step_time_ratio_separate_processes": summary[mode]["step_ms"] / base["step_ms"],
                "peak_rss_ratio": summary[mode]["peak_rss_mb"] / base["peak_rss_mb"],
                "peak_above_import_ratio": summary[mode]["peak_above_import_mb"]
                / base["peak_above_import_mb"],
            }
            if "peak_gpu_mb" in base:
                ratios[mode]["peak_gpu_ratio"] = summary[mode]["peak_gpu_mb"] / base["peak_gpu_mb"]
    report["ratios_vs_nonprivate"] = ratios
    if not args.skip_opacus:
        attempts = []
        for rows in args.opacus_rows:
            result = run_worker(args, "opacus", rows, timeout=1200)
            attempts.append(result)
            if "step_ms_median" in result:
                # the same size for our DP step and the non-private step, for a like-for-like ratio
                result["ours_dp_lazy_same_rows"] = run_worker(args, "dp_lazy", rows, timeout=1200)
                result["nonprivate_same_rows"] = run_worker(args, "nonprivate", rows, timeout=1200)
                break
        report["opacus"] = {
            "mem_limit_gb": args.opacus_mem_gb if args.device == "cpu" else None,
            "attempts": attempts,
        }
    if not args.skip_utility:
        report["utility"] = utility(args)
    report["loadavg_before"] = load_before
    report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
