"""Encrypted FedAvg cost: our BFV packing against the common CKKS recipe, measured in the same run.

Prints JSON. For a P-parameter update and K clients (default 1M and 100), each scheme runs a whole
round: every client encrypts its update (weight folded in), the aggregator adds every payload as it
arrives, one client decrypts the aggregate. The schemes are interleaved client by client, so a change of
machine load during the run hits all of them alike. Reported per scheme: wire bytes per parameter
(upload and aggregate download, divided by 4 = fp32); client encrypt, aggregator add and client decrypt
parameters per second on one core (TenSEAL n_threads=1, BLAS threads 1), both per wall second and per CPU
second of the thread (the latter is less sensitive to other processes on a shared machine); and the max
|error| against plaintext weighted FedAvg in float64, next to the Gaussian noise of DP-FedAvg
(noise_multiplier * clip / K).

Peer ("ckks_common"): TenSEAL CKKS, N=8192, coeff_mod_bit_sizes=[60,40,40], scale 2**40, public-key
encryption, one float per slot (``ts.ckks_vector(ctx, values).serialize()``), as NVIDIA FLARE ships it.

    flock /tmp/fedrec-bench.lock .venv/bin/python bench/he_aggregation.py
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from privacy.encryption import (  # noqa: E402
    EncryptionClient,
    StreamingAggregator,
    UpdateSchema,
    generate_keys,
)

FP32_BYTES = 4


class Timer:
    """Accumulates wall and thread-CPU seconds."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.thread_time() - self._cpu


class Ours:
    """privacy.encryption: BFV, symmetric seeded ciphertexts, values packed per slot."""

    def __init__(self, args: argparse.Namespace, *, max_weight: int, label: str) -> None:
        with Timer() as keygen:
            self.keys = generate_keys(
                max_clients=args.clients,
                max_weight=max_weight,
                clip=args.clip,
                precision_bits=args.precision_bits,
            )
        self.keygen_s = keygen.wall
        self.label, self.max_weight = label, max_weight
        self.schema = UpdateSchema([("update", (args.params,))])
        self.client = EncryptionClient(self.keys.secret_context, self.schema, n_threads=1)
        self.aggregator = StreamingAggregator(self.keys.public_context, self.schema, round_idx=0, n_threads=1)
        self.rng = np.random.default_rng([args.seed, 99])

    def weight(self, weight: int) -> int:
        return weight if self.max_weight > 1 else 1

    def encrypt(self, index: int, update: np.ndarray, weight: int) -> list[bytes]:
        return self.client.encrypt_update(update, weight=weight, round_idx=0, client_id=index, rng=self.rng)

    def add(self, payloads: list[bytes]) -> None:
        for p in payloads:
            self.aggregator.add(p)

    def close(self) -> bytes:
        return self.aggregator.close().aggregate

    def decrypt(self, aggregate: bytes) -> tuple[np.ndarray, dict]:
        result = self.client.decrypt_aggregate(aggregate, round_idx=0)
        params = self.keys.spec.params
        return result.average, {
            "scheme": params.scheme,
            "poly_modulus_degree": params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
            "plain_modulus_bits": round(float(np.log2(params.plain_modulus)), 2),
            "values_per_slot": params.digits_per_slot,
            "encryption": "symmetric (clients hold the secret key), seeded ciphertexts",
            "max_weight": self.max_weight,
            "quantum": self.keys.spec.quant.quantum,
            "total_weight_decrypted": result.total_weight,
            "stated_error_bound": result.error_bound,
        }


class Peer:
    """The common recipe: CKKS N=8192, q=[60,40,40], scale 2**40, one float per slot, public-key encryption."""

    label = "ckks_common"

    def __init__(self, args: argparse.Namespace) -> None:
        import tenseal as ts

        self.ts = ts
        with Timer() as keygen:
            self.context = ts.context(
                ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40], n_threads=1
            )
            self.context.global_scale = 2.0**40
            public_bytes = self.context.serialize(
                save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
            )
            self.public = ts.context_from(public_bytes, n_threads=1)
        self.keygen_s = keygen.wall
        self.clip = args.clip
        self.total: Any = None
        self.weight_sum = 0

    def weight(self, weight: int) -> int:
        return weight

    def encrypt(self, index: int, update: np.ndarray, weight: int) -> list[bytes]:
        self.weight_sum += weight  # the peer's weights travel in plaintext
        clipped = np.clip(update, -self.clip, self.clip)
        return [self.ts.ckks_vector(self.context, (weight * clipped).tolist()).serialize()]

    def add(self, payloads: list[bytes]) -> None:
        vector = self.ts.ckks_vector_from(self.public, payloads[0])
        self.total = vector if self.total is None else self.total + vector

    def close(self) -> bytes:
        return self.total.serialize()

    def decrypt(self, aggregate: bytes) -> tuple[np.ndarray, dict]:
        average = np.asarray(self.ts.ckks_vector_from(self.context, aggregate).decrypt()) / self.weight_sum
        return average, {
            "scheme": "ckks",
            "poly_modulus_degree": 8192,
            "coeff_mod_bit_sizes": [60, 40, 40],
            "scale_bits": 40,
            "values_per_slot": 1,
            "encryption": "public key, ts.ckks_vector(ctx, values).serialize()",
        }


def client_update(seed: int, index: int, size: int, clip: float) -> np.ndarray:
    """Client ``index``'s update: uniform in [-clip, clip] (regenerated, never stored for all clients)."""
    return np.random.default_rng([seed, index]).uniform(-clip, clip, size)


def client_weight(seed: int, index: int, max_weight: int) -> int:
    return int(np.random.default_rng([seed, index, 1]).integers(1, max_weight + 1))


def run(args: argparse.Namespace) -> dict:
    schemes: list[Any] = [
        Ours(args, max_weight=args.max_weight, label="bfv_packed_weighted"),
        Ours(args, max_weight=1, label="bfv_packed_equal_weights"),
    ]
    if not args.skip_peer:
        schemes.append(Peer(args))
    timers = {s.label: {"encrypt": Timer(), "add": Timer(), "decrypt": Timer()} for s in schemes}
    upload = {s.label: 0 for s in schemes}
    references = {s.label: np.zeros(args.params) for s in schemes}
    weight_sums = {s.label: 0 for s in schemes}
    for i in range(args.clients):
        update = client_update(args.seed, i, args.params, args.clip)
        clipped = np.clip(update, -args.clip, args.clip)
        raw_weight = client_weight(args.seed, i, args.max_weight)
        for scheme in schemes:
            weight = scheme.weight(raw_weight)
            with timers[scheme.label]["encrypt"]:
                payloads = scheme.encrypt(i, update, weight)
            upload[scheme.label] += sum(len(p) for p in payloads)
            with timers[scheme.label]["add"]:
                scheme.add(payloads)
            references[scheme.label] += weight * clipped
            weight_sums[scheme.label] += weight
    rows = []
    for scheme in schemes:
        label, t = scheme.label, timers[scheme.label]
        aggregate = scheme.close()
        with t["decrypt"]:
            average, info = scheme.decrypt(aggregate)
        errors = np.abs(average - references[label] / weight_sums[label])
        total = args.params * args.clients
        row = {
            "label": label,
            **info,
            "keygen_s": round(scheme.keygen_s, 3),
            "total_weight": weight_sums[label],
            "upload_bytes_per_param": upload[label] / total,
            "upload_bytes_per_param_over_fp32": upload[label] / total / FP32_BYTES,
            "download_bytes_per_param": len(aggregate) / args.params,
            "download_bytes_per_param_over_fp32": len(aggregate) / args.params / FP32_BYTES,
            "encrypt_params_per_s_per_core": total / t["encrypt"].wall,
            "add_params_per_s_per_core": total / t["add"].wall,
            "decrypt_params_per_s_per_core": args.params / t["decrypt"].wall,
            "encrypt_params_per_cpu_s": total / t["encrypt"].cpu,
            "add_params_per_cpu_s": total / t["add"].cpu,
            "decrypt_params_per_cpu_s": args.params / t["decrypt"].cpu,
            "encrypt_s_per_client": t["encrypt"].wall / args.clients,
            "add_s_per_client": t["add"].wall / args.clients,
            "decrypt_s": t["decrypt"].wall,
            "max_abs_error": float(errors.max()),
            "mean_abs_error": float(errors.mean()),
            "clients_encrypted": args.clients,
        }
        if "stated_error_bound" in row:
            row["error_within_bound"] = bool(errors.max() <= row["stated_error_bound"])
        rows.append(row)
    return {s["label"]: s for s in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--max-weight", type=int, default=100, help="weights are integers 1..max_weight")
    parser.add_argument("--precision-bits", type=int, default=16, help="quantum = clip * 2**-bits")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="DP-FedAvg noise to compare with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()

    # TenSEAL's C++ prints a warning on stdout for vectors longer than one ciphertext: keep stdout JSON only.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    started = time.time()
    load_before = os.getloadavg()
    rows = run(args)
    dp_noise_std = args.noise_multiplier * args.clip / args.clients
    peer = rows.get("ckks_common")
    for row in rows.values():
        row["dp_noise_over_max_error"] = dp_noise_std / max(row["max_abs_error"], 1e-300)
        if peer is not None and row is not peer:
            row["vs_peer"] = {
                "upload_bytes_ratio": row["upload_bytes_per_param"] / peer["upload_bytes_per_param"],
                "download_bytes_ratio": row["download_bytes_per_param"] / peer["download_bytes_per_param"],
                **{
                    f"{step}_speedup_wall": row[f"{step}_params_per_s_per_core"]
                    / peer[f"{step}_params_per_s_per_core"]
                    for step in ("encrypt", "add", "decrypt")
                },
                **{
                    f"{step}_speedup_cpu": row[f"{step}_params_per_cpu_s"] / peer[f"{step}_params_per_cpu_s"]
                    for step in ("encrypt", "add", "decrypt")
                },
            }
    out = {
        "benchmark": "he_aggregation",
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - started, 1),
        "params": args.params,
        "clients": args.clients,
        "precision_bits": args.precision_bits,
        "clip": args.clip,
        "update_values": f"uniform in [-{args.clip}, {args.clip}] per coordinate, weights uniform 1..{args.max_weight}",
        "threads": "1 (TenSEAL n_threads=1, BLAS 1): figures are per core",
        "dp_noise_std_on_average": dp_noise_std,
        "dp_noise_note": (
            f"DP-FedAvg Gaussian noise std on the averaged update: noise_multiplier {args.noise_multiplier} "
            f"x clip {args.clip} / {args.clients} clients (McMahan et al. 2018)"
        ),
        "results": rows,
    }
    sys.stdout.flush()
    os.dup2(json_fd, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
